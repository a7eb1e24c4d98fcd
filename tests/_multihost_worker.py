"""One process of a multi-process JAX job that saves a sharded tree with partialstore.

Run by tests/test_multihost.py as
``python _multihost_worker.py <port> <num_processes> <process_id> <job.json> <report.json>``.
``job.json`` lists the checkpoint targets ``[[path, storage_options], ...]``.
The process joins the job with ``jax.distributed.initialize`` (CPU, two
devices per process), builds the global state of :func:`expected_state`
over a mesh spanning every process, saves it in two pieces to each target
(one ``save``, one ``save_async``), finalizes, checks that a later save
raises ``FileExistsError`` everywhere, loads its own shards back with a
sharded target, and writes a report: the keys its backends wrote (observed
by wrapping the backends' ``write``/``create``) and the chunk shapes used.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

DEVICES_PER_PROCESS = 2
#: Small chunks, so every shard of the larger leaves spans several chunks.
CHUNK_BYTES = 256


def expected_state() -> dict[str, Any]:
    """The global values of every leaf (numpy), identical in every process."""
    rng = np.random.default_rng(7)
    return {
        "rows": rng.standard_normal((64, 6)).astype(np.float32),
        "grid": rng.integers(-(2**31), 2**31 - 1, (8, 12), dtype=np.int64).astype(np.int32),
        "half_replicated": rng.standard_normal((16, 5)).astype(ml_dtypes.bfloat16),
        "cols": rng.integers(0, 255, (6, 40), dtype=np.uint8),
        "replicated": rng.standard_normal((3, 4)).astype(np.float32),
        "host": np.arange(10, dtype=np.int16),
        "step": 7,
        "note": "multihost",
    }


# How each global leaf is laid out on the ("proc", "local") mesh; rows of the
# mesh are processes, so "proc" splits across processes and "local" within one.
SPECS = {
    "rows": ("proc_local",),
    "grid": ("proc", "local"),
    "half_replicated": ("proc", None),
    "cols": (None, "local"),
    "replicated": (None, None),
}


def _global_tree(mesh: Any) -> dict[str, Any]:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    state = expected_state()
    out: dict[str, Any] = {}
    for name, value in state.items():
        spec = SPECS.get(name)
        if spec is None:
            out[name] = value
            continue
        axes = tuple(("proc", "local") if a == "proc_local" else a for a in spec)
        sharding = NamedSharding(mesh, PartitionSpec(*axes))
        out[name] = jax.make_array_from_callback(value.shape, sharding, lambda i, v=value: v[i])
    return out


#: Set in one process to make its backend writes of array chunks fail.
FAIL_CHUNK_WRITES = {"on": False}


def _record_writes(written: list[str]) -> None:
    """Wrap the backends' ``write`` and ``create`` to log every key this process wrote.

    While :data:`FAIL_CHUNK_WRITES` is on, chunk writes raise ``BackendError``.
    """
    from partialstore.backends.fsspec import FsspecBackend
    from partialstore.backends.local import LocalBackend
    from partialstore.backends.s3 import S3Backend

    from partialstore.errors import BackendError

    wrapped_functions: set[Any] = set()
    for backend_class in (LocalBackend, S3Backend, FsspecBackend):
        for cls in backend_class.__mro__:
            for method in ("write", "create"):
                original = cls.__dict__.get(method)
                if original is None or original in wrapped_functions:
                    continue

                async def wrapped(
                    self: Any, key: str, *args: Any, _original: Any = original, **kwargs: Any
                ) -> Any:
                    if FAIL_CHUNK_WRITES["on"] and "/c/" in key:
                        raise BackendError(f"injected failure writing {key}")
                    written.append(key)
                    return await _original(self, key, *args, **kwargs)

                wrapped_functions.add(wrapped)
                setattr(cls, method, wrapped)


def main() -> None:
    port, count, index, job_file, report_file = sys.argv[1:6]
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=int(count),
        process_id=int(index),
        initialization_timeout=60,
    )
    from jax.sharding import Mesh, NamedSharding

    import partialstore
    from partialstore import arrays, multihost

    arrays.CHUNK_BYTES = CHUNK_BYTES
    written: list[str] = []
    _record_writes(written)

    devices = np.array(jax.devices()).reshape(int(count), DEVICES_PER_PROCESS)
    mesh = Mesh(devices, ("proc", "local"))
    state = _global_tree(mesh)
    job = json.loads(Path(job_file).read_text())
    targets = job["targets"]
    report: dict[str, Any] = {"process": multihost.process_index(), "targets": []}
    for path, options in targets:
        written.clear()
        first = {k: state[k] for k in ("rows", "grid", "replicated", "step")}
        second = {k: v for k, v in state.items() if k not in first}
        partialstore.save(path, first, custom_metadata={"by": "all"}, storage_options=options)
        partialstore.save_async(path, second, storage_options=options).result()
        partialstore.finalize(path, storage_options=options)
        wrote = list(written)
        try:
            partialstore.save(path, {"late": 1}, storage_options=options)
        except FileExistsError:
            late = "refused"
        else:
            late = "accepted"
        # Each process reads back only its own shards, placed like the originals.
        target = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
            for k, v in state.items()
            if isinstance(v, jax.Array)
        }
        loaded = partialstore.load(path, target=target, storage_options=options)
        mismatched = []
        for name, array in loaded.items():
            assert isinstance(array.sharding, NamedSharding)
            for shard in array.addressable_shards:
                if not np.array_equal(np.asarray(shard.data), expected_state()[name][shard.index]):
                    mismatched.append(name)
        report["targets"].append({"wrote": wrote, "late_save": late, "mismatched": mismatched})
    if job.get("failing"):
        # A write that fails in one process fails the save in every process,
        # commits nothing, and nobody waits forever.
        path, options = job["failing"]
        FAIL_CHUNK_WRITES["on"] = multihost.process_index() == 1
        try:
            partialstore.save(path, {"rows": state["rows"]}, storage_options=options)
        except OSError as error:
            report["failing_save"] = type(error).__name__
        else:
            report["failing_save"] = "returned"
        FAIL_CHUNK_WRITES["on"] = False
        try:
            partialstore.finalize(path, storage_options=options)
        except FileNotFoundError as error:
            report["failing_finalize"] = type(error).__name__
        else:
            report["failing_finalize"] = "returned"
    Path(report_file).write_text(json.dumps(report))
    jax.distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
