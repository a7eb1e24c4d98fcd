"""``partialstore demo``: a training job that checkpoints in pieces, end to end.

It saves a model state in several partial saves (some async, mixed leaf
kinds, one replacement), finalizes, loads everything back, checks every
byte against what it saved, and prints how long each phase took.

From a shell: ``partialstore demo`` uses a temporary local folder,
``partialstore demo s3://bucket/demo`` any URL (storage options via
``--storage-options``), and ``partialstore demo --emulator s3`` a moto S3
server it starts on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["demo_state", "run_demo"]


def demo_state(scale: int = 1) -> list[tuple[dict[str, Any], bool]]:
    """The pieces of a small transformer-like state, and whether to save each async.

    ``scale`` multiplies the width of the large matrices (1 gives about 20 MiB in all).
    """
    import jax.numpy as jnp
    import ml_dtypes

    rng = np.random.default_rng(0)
    width = 512 * scale
    embed = rng.standard_normal((4096, width), dtype=np.float32)
    layers = [
        {
            "attn": rng.standard_normal((width, width), dtype=np.float32),
            "mlp": rng.standard_normal((width, 4 * width)).astype(ml_dtypes.bfloat16),
            "norm_scale": np.ones(width, np.float32),
        }
        for _ in range(2)
    ]
    return [
        ({"params": {"embed": jnp.asarray(embed)}, "step": 0}, False),
        ({"params": {"layers": layers}}, True),
        (
            {
                "opt_state": {
                    "count": np.int32(1000),
                    "mu": [np.zeros(width, np.float32) for _ in range(4)],
                },
                "rng": np.array([0, 42], np.uint32),
            },
            True,
        ),
        (
            {"step": 1000, "config": {"name": "demo", "lr": 3e-4, "tied": True, "notes": None}},
            False,
        ),
    ]


def _expected(pieces: list[tuple[dict[str, Any], bool]]) -> dict[str, Any]:
    from partialstore._commit.manifest import merge_metadata

    merged: dict[str, Any] = {}
    for piece, _ in pieces:
        merged = merge_metadata(merged, piece)
    return merged


def _check_equal(expected: Any, actual: Any, where: str = "") -> int:
    """Compare trees leaf by leaf, bit for bit; return the number of bytes checked."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(expected) != set(actual):
            raise AssertionError(f"{where or '/'}: keys differ: {sorted(expected)} vs {actual!r}")
        return sum(_check_equal(expected[k], actual[k], f"{where}/{k}") for k in expected)
    if isinstance(expected, list | tuple):
        if len(expected) != len(actual):
            raise AssertionError(f"{where}: length {len(expected)} != {len(actual)}")
        return sum(
            _check_equal(e, a, f"{where}[{i}]")
            for i, (e, a) in enumerate(zip(expected, actual, strict=True))
        )
    if hasattr(expected, "dtype"):
        want = np.asarray(expected)
        got = np.asarray(actual)
        if want.dtype != got.dtype or want.shape != got.shape or want.tobytes() != got.tobytes():
            raise AssertionError(f"{where}: array bytes differ")
        return want.nbytes
    if type(expected) is not type(actual) or expected != actual:
        raise AssertionError(f"{where}: {expected!r} != {actual!r}")
    return 0


@contextlib.contextmanager
def _emulated(kind: str | None) -> Iterator[tuple[str | None, dict[str, Any]]]:
    if kind is None:
        yield None, {}
        return
    from partialstore.testing import servers

    server: servers.MotoS3Server | servers.FakeGcsServer = (
        servers.MotoS3Server() if kind == "s3" else servers.FakeGcsServer()
    )
    server.start()
    # TensorStore reads its GCS endpoint from the environment only.
    saved_env = {name: os.environ.get(name) for name in server.env()}
    os.environ.update(server.env())
    try:
        bucket = f"demo-{uuid.uuid4().hex[:12]}"
        server.create_bucket(bucket)
        scheme = "s3" if kind == "s3" else "gs"
        yield f"{scheme}://{bucket}/checkpoints/step_1000", server.storage_options()
    finally:
        server.stop()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_demo(
    url: str | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    emulator: str | None = None,
    scale: int = 1,
    echo: Callable[[str], object] = print,
) -> dict[str, float]:
    """Run the demo job; return the seconds each phase took.

    Raises:
      AssertionError: a loaded byte differs from the saved one.
    """
    import partialstore

    with contextlib.ExitStack() as stack:
        emulated_url, emulated_options = stack.enter_context(_emulated(emulator))
        if emulated_url is not None:
            url, storage_options = emulated_url, emulated_options
        if url is None:
            url = f"{stack.enter_context(tempfile.TemporaryDirectory())}/step_1000"
        options = dict(storage_options or {})
        pieces = demo_state(scale)
        echo(f"partialstore demo: checkpointing a model in {len(pieces)} partial saves to {url}")

        timings = _save_pieces(partialstore, url, pieces, options, echo)
        info, loaded = _finish_and_read(partialstore, url, options, timings)

        checked = _check_equal(_expected(pieces), loaded)
        if info.custom_metadata != {"piece": 3} or len(info.saves) != len(pieces):
            raise AssertionError(
                f"metadata differs: {info.custom_metadata}, {len(info.saves)} saves"
            )
        for phase in ("all saves committed", "finalize", "metadata", "load"):
            echo(f"  {phase:34s}: {timings[phase] * 1e3:8.1f} ms")
        echo(f"verified {checked / 2**20:.1f} MiB of array bytes and every scalar: all equal")
        return timings


def _save_pieces(
    partialstore: ModuleType,
    url: str,
    pieces: list[tuple[dict[str, Any], bool]],
    options: dict[str, Any],
    echo: Callable[[str], object],
) -> dict[str, float]:
    """Save every piece (blocking or async as marked); time each and the commit of all."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    responses = []
    for index, (piece, asynchronous) in enumerate(pieces):
        t0 = time.perf_counter()
        if asynchronous:
            responses.append(partialstore.save_async(url, piece, storage_options=options))
            mode = "save_async (returned)"
        else:
            partialstore.save(url, piece, custom_metadata={"piece": index}, storage_options=options)
            mode = "save"
        timings[f"save {index}"] = time.perf_counter() - t0
        echo(f"  {mode:22s} piece {index}: {timings[f'save {index}'] * 1e3:8.1f} ms")
    for response in responses:
        response.result()
    timings["all saves committed"] = time.perf_counter() - started
    return timings


def _finish_and_read(
    partialstore: ModuleType, url: str, options: dict[str, Any], timings: dict[str, float]
) -> tuple[Any, Any]:
    """Finalize, then read the metadata and the tree back, adding each phase to ``timings``."""
    t0 = time.perf_counter()
    partialstore.finalize(url, storage_options=options)
    timings["finalize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = partialstore.metadata(url, storage_options=options)
    timings["metadata"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = partialstore.load(url, storage_options=options)
    timings["load"] = time.perf_counter() - t0
    return info, loaded
