"""Loads read what they need: bytes read at most 2x the bytes returned, any target layout.

A JAX job of P processes loads a checkpoint with each process reading its
own shards of every leaf in one ``read_arrays`` call. These tests make those
calls one after another in this process (``benchmarks.load_bytes``
``read_as_processes``), with leaves split into equal blocks along every
axis, and count the bytes that really moved: on local disk TensorStore's
file counters plus the reads the Backend contract saw (through a wrapper),
on S3 every GET at the HTTP proxy in front of moto (TensorStore reads chunks
with its own client, so only the proxy sees them all). Every block read is
checked bit for bit.

Old checkpoints, whose chunk objects hold one plain chunk each, still load;
the reference reader (docs/) decodes the new layout itself for the dtypes
outside zarr v3 core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import partialstore
from benchmarks import load_bytes
from partialstore import registry
from partialstore._arrays import zarr3
from partialstore._runtime.aio import run
from partialstore.errors import CorruptCheckpointError
from partialstore.testing.faulty_backend import install_faulty

DOCS = Path(__file__).resolve().parents[1] / "docs"

# Target layouts: blocks per axis. 8 "processes" each, as in the target.
LAYOUTS = [(1, 8), (8, 1), (2, 4), (4, 2)]


def _tree() -> dict[str, np.ndarray]:
    """Leaves of 1 MiB and more (below that they are packed and read whole), odd shapes too."""
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal((512, 640), np.float32),
        "emb": rng.standard_normal((2048, 256)).astype(ml_dtypes.bfloat16),
        "odd": rng.integers(0, 1 << 30, (1000, 320), np.int32),
    }


def _save(path: str, tree: dict[str, Any], options: Any = None) -> None:
    partialstore.save(path, tree, storage_options=options)
    partialstore.finalize(path, storage_options=options)


def _codecs(zarr_json: Path) -> list[str]:
    return [codec["name"] for codec in json.loads(zarr_json.read_text())["codecs"]]


def _ratios(path: str, tree: dict[str, np.ndarray], counter: Any, options: Any) -> list[float]:
    ratios = []
    for parts in LAYOUTS:
        before = counter()
        returned = load_bytes.read_as_processes(
            path, tree, load_bytes.grid_plan(tree, parts), options
        )
        read = counter()[0] - before[0]
        assert returned == sum(a.nbytes for a in tree.values())
        ratios.append(read / returned)
    return ratios


def test_local_loads_read_at_most_twice_what_they_return(tmp_path: Path) -> None:
    inner = str(tmp_path / "root")
    url, faulty = install_faulty(inner)
    tree = _tree()
    _save(f"{url}/ck", tree)
    stored = sorted((tmp_path / "root" / "ck" / "data").glob("*/a*/zarr.json"))
    assert len(stored) == 3 and all(_codecs(z) == ["sharding_indexed"] for z in stored)
    counter = load_bytes.local_counter(f"{url}/ck", inner, faulty)
    ratios = _ratios(f"{url}/ck", tree, counter, None)
    assert all(0.99 < r <= 2.0 for r in ratios), dict(zip(LAYOUTS, ratios, strict=True))
    # One process holding all 8 blocks reads each chunk object in one request, not 8.
    data = (tmp_path / "root" / "ck" / "data").rglob("*")
    objects = len([p for p in data if p.is_file() and "/c/" in p.as_posix()])
    before = counter()
    one_process = [[pair for p in load_bytes.grid_plan(tree, (1, 8)) for pair in p]]
    load_bytes.read_as_processes(f"{url}/ck", tree, one_process, None)
    read, requests = (after - first for after, first in zip(counter(), before, strict=True))
    assert read <= 1.01 * sum(a.nbytes for a in tree.values())
    assert requests <= objects + len(stored) + 1  # + each zarr.json + the manifest


def test_s3_loads_read_at_most_twice_what_they_return(proxied_s3_url: Any) -> None:
    root, options, proxy = proxied_s3_url.url, proxied_s3_url.options, proxied_s3_url.proxy
    tree = _tree()
    path = f"{root}/ck"
    _save(path, tree, options)
    counter = load_bytes.s3_counter(path, proxy=proxy, options=options)
    ratios = _ratios(path, tree, counter, options)
    assert all(0.99 < r <= 2.0 for r in ratios), dict(zip(LAYOUTS, ratios, strict=True))
    chunk_gets = proxy.requests("GET", key=r"/c/\d+/\d+$")
    assert any("range" in r.headers for r in chunk_gets)  # inner chunks read by range


def test_a_checkpoint_of_the_old_layout_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arrays written as before (one plain chunk per object) load, whole and in blocks."""
    tree = _tree()
    with monkeypatch.context() as patch:
        patch.setattr(zarr3, "inner_chunks", lambda shape, chunks, itemsize: list(chunks))
        _save(str(tmp_path / "ck"), tree)
    stored = sorted((tmp_path / "ck" / "data").glob("*/a*/zarr.json"))
    assert len(stored) == 3 and all(_codecs(z) == ["bytes", "crc32c"] for z in stored)
    loaded = partialstore.load(tmp_path / "ck")
    for name, array in tree.items():
        assert loaded[name].dtype == array.dtype and loaded[name].tobytes() == array.tobytes()
    plan = load_bytes.grid_plan(tree, (2, 4))
    assert load_bytes.read_as_processes(str(tmp_path / "ck"), tree, plan, None) == sum(
        a.nbytes for a in tree.values()
    )


@pytest.mark.parametrize("kind", ["memory", "fsspec"])
def test_backend_without_kvstore_reads_at_most_twice_what_it_returns(
    kind: str, tmp_path: Path
) -> None:
    """Without a TensorStore kvstore every byte passes the Backend contract: count it there."""
    inner_url = {"memory": f"memory://{uuid.uuid4().hex}", "fsspec": f"local://{tmp_path}/fs"}[kind]
    url, faulty = install_faulty(inner_url)
    tree = _tree()
    _save(f"{url}/ck", tree)
    inner = registry.open_backend(inner_url)

    def counter() -> tuple[int, int]:
        calls = [c for c in faulty.calls("read") if c.key.startswith("ck/")]
        total = 0
        for call in calls:
            start, end = call.detail.get("start"), call.detail.get("end")
            if end is None:  # a whole object: its size
                end = len(run(inner.read(call.key)))
            total += end - (start or 0)
        return total, len(calls)

    ratios = _ratios(f"{url}/ck", tree, counter, None)
    assert all(0.99 < r <= 2.0 for r in ratios), dict(zip(LAYOUTS, ratios, strict=True))
    ranged = [c for c in faulty.calls("read", key=r"/c/") if c.detail.get("start") is not None]
    assert ranged  # inner chunks were read by range, not whole chunk objects
    loaded = partialstore.load(f"{url}/ck")
    for name, array in tree.items():
        assert loaded[name].tobytes() == array.tobytes()


def test_damaged_inner_chunk_index_is_reported_through_the_backend() -> None:
    """A chunk object whose index fails its CRC is damage, not garbage read."""
    url = f"memory://{uuid.uuid4().hex}"
    tree = _tree()
    _save(f"{url}/ck", tree)
    backend = registry.open_backend(url)
    key = next(k for k in run(backend.list("ck/data")) if k.endswith("/c/0/0"))
    body = bytearray(run(backend.read(key)))
    body[-10] ^= 0xFF  # inside the index
    run(backend.write(key, bytes(body)))
    with pytest.raises(CorruptCheckpointError, match="index"):
        load_bytes.read_as_processes(f"{url}/ck", tree, load_bytes.grid_plan(tree, (1, 8)), None)


def test_reference_reader_reads_inner_chunks_of_raw_bit_dtypes(tmp_path: Path) -> None:
    """bfloat16 and float8 are outside zarr v3 core: the reader decodes the layout itself."""
    rng = np.random.default_rng(3)
    tree = {
        "bf16": rng.standard_normal((1000, 600)).astype(ml_dtypes.bfloat16),
        "f8": rng.standard_normal((1200, 1000)).astype(ml_dtypes.float8_e5m2),
    }
    _save(str(tmp_path / "ck"), tree)
    stored = sorted((tmp_path / "ck" / "data").glob("*/a*/zarr.json"))
    assert len(stored) == 2 and all(_codecs(z) == ["sharding_indexed"] for z in stored)
    out = tmp_path / "leaves.npz"
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        sys.path.insert(0, {str(DOCS)!r})
        import reference_reader
        leaves = reference_reader.read_checkpoint({str(tmp_path / "ck")!r})
        np.savez({str(out)!r}, **{{k: v.view(np.uint8) for k, v in leaves.items()}})
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env=env)
    with np.load(out) as got:
        for name, array in tree.items():
            assert got[f"['{name}']"].tobytes() == array.tobytes(), name


def test_benchmark_reads_at_most_twice_with_jax_shardings_on_8_devices(tmp_path: Path) -> None:
    """The benchmark itself (real NamedShardings on 8 CPU devices, in a fresh interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    command = [sys.executable, "-m", "benchmarks.load_bytes", "--quick", "--stores", "local"]
    subprocess.run(
        [*command, "--out", str(tmp_path)], check=True, timeout=300, env=env, cwd=DOCS.parent
    )
    result = json.loads((tmp_path / "load_bytes.json").read_text())
    rows = result["rows"]
    assert {(r["load"], r["processes"]) for r in rows} == {
        (load, n) for load in load_bytes.LOADS for n in load_bytes.PROCESSES
    }
    assert all(r["read"] > 0 and r["read"] <= 2 * r["returned"] for r in rows), rows
