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
Then saves fail in process 1 only (a ``BackendError``, a ``TimeoutError``,
an ``OSError``) and every process reports what it raised; every process
calls ``discard`` and ``gc`` and reports what they returned or raised and
what its backend deleted; finally the primary lists the coordination keys
left behind. A job with ``"many"`` (run with more processes) saves three
times, then once failing in processes 2 and 3, finalizes, discards and
collects garbage, and reports each outcome and the keys left. A job with
``"exit"`` only starts the heartbeat and leaves. A job with ``"kill"``
instead hangs one process in a chunk write (the test kills it) and reports
what the others raised, and when.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
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


#: In one process, called with the key of every array chunk its backend
#: writes (before writing it): raises to make that write fail, or hangs.
INJECT: dict[str, Callable[[str], Awaitable[None]] | None] = {"chunk": None}


def _record_calls(written: list[str], deleted: list[str]) -> None:
    """Wrap the backends' ``write``/``create`` and deletes to log every key this process touched.

    Chunk writes first go through :data:`INJECT` when it is set.
    """
    from partialstore.backends.fsspec import FsspecBackend
    from partialstore.backends.local import LocalBackend
    from partialstore.backends.s3 import S3Backend

    wrapped_functions: set[Any] = set()
    for backend_class in (LocalBackend, S3Backend, FsspecBackend):
        for cls in backend_class.__mro__:
            for method in ("write", "create", "delete", "delete_prefix"):
                original = cls.__dict__.get(method)
                if original is None or original in wrapped_functions:
                    continue
                log = deleted if method.startswith("delete") else written

                async def wrapped(
                    self: Any,
                    key: str,
                    *args: Any,
                    _original: Any = original,
                    _log: list[str] = log,
                    **kwargs: Any,
                ) -> Any:
                    inject = INJECT["chunk"]
                    if inject is not None and "/c/" in key and _log is written:
                        await inject(key)
                    _log.append(key)
                    return await _original(self, key, *args, **kwargs)

                wrapped_functions.add(wrapped)
                setattr(cls, method, wrapped)


def _raising(make: Callable[[str], BaseException]) -> Callable[[str], Awaitable[None]]:
    async def inject(key: str) -> None:
        raise make(key)

    return inject


def _describe(error: BaseException) -> dict[str, Any]:
    return {
        "type": type(error).__name__,
        "bases": [cls.__name__ for cls in type(error).__mro__],
        "message": str(error),
        "errno": getattr(error, "errno", None),
    }


def _outcome(call: Callable[[], Any]) -> Any:
    """``{"returned": value}``, or the error's description."""
    try:
        return {"returned": call()}
    except Exception as error:
        return _describe(error)


def _save_targets(targets: list[Any], state: dict[str, Any], written: list[str]) -> list[Any]:
    """Save, finalize, refuse a late save and load back each target; report each."""
    import jax
    from jax.sharding import NamedSharding

    import partialstore

    reports = []
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
        reports.append({"wrote": wrote, "late_save": late, "mismatched": mismatched})
    return reports


def _failing_save(path: str, options: dict[str, Any], state: dict[str, Any]) -> dict[str, str]:
    """A chunk write failing in process 1 fails the save everywhere; nothing is committed."""
    import partialstore
    from partialstore._runtime import multihost
    from partialstore.errors import BackendError

    def backend_error(key: str) -> BaseException:
        return BackendError(f"injected failure writing {key}")

    INJECT["chunk"] = _raising(backend_error) if multihost.process_index() == 1 else None
    report = {}
    try:
        partialstore.save(path, {"rows": state["rows"]}, storage_options=options)
    except OSError as error:
        report["failing_save"] = type(error).__name__
    else:
        report["failing_save"] = "returned"
    INJECT["chunk"] = None
    try:
        partialstore.finalize(path, storage_options=options)
    except FileNotFoundError as error:
        report["failing_finalize"] = type(error).__name__
    else:
        report["failing_finalize"] = "returned"
    return report


def _failure_causes(prefix: str, state: dict[str, Any]) -> dict[str, Any]:
    """Saves that fail in process 1 only, with a TimeoutError and with an OSError."""
    import partialstore
    from partialstore._runtime import multihost

    on_one = multihost.process_index() == 1

    def timeout(key: str) -> BaseException:
        return TimeoutError(f"injected deadline writing {key}")

    def no_space(key: str) -> BaseException:
        return OSError(errno.ENOSPC, "No space left on device (injected)", key)

    INJECT["chunk"] = _raising(timeout) if on_one else None
    response = partialstore.save_async(f"{prefix}/timeout", {"rows": state["rows"]})
    report: dict[str, Any] = {"timeout": _outcome(lambda: response.result(timeout=120))}
    report["timeout"]["done"] = response.done()  # done: the save raised, not the wait
    INJECT["chunk"] = _raising(no_space) if on_one else None
    rows = {"rows": state["rows"]}
    report["oserror"] = _outcome(lambda: partialstore.save(f"{prefix}/oserror", rows))
    INJECT["chunk"] = None
    return report


def _collective(prefix: str, state: dict[str, Any], deleted: list[str]) -> dict[str, Any]:
    """discard and gc in every process: the primary deletes, all return or raise the same."""
    import partialstore

    report: dict[str, Any] = {}
    abandoned = f"{prefix}/abandoned"
    partialstore.save(abandoned, {"rows": state["rows"], "step": 1})
    deleted.clear()
    report["discard"] = _outcome(lambda: partialstore.discard(abandoned))
    report["discard_deleted"] = list(deleted)
    report["finalize_discarded"] = _outcome(lambda: partialstore.finalize(abandoned))
    report["discard_again"] = _outcome(lambda: partialstore.discard(abandoned))

    kept = f"{prefix}/kept"
    partialstore.save(kept, {"rows": state["rows"]})
    partialstore.save(kept, {"rows": state["rows"]})  # wholly replaces the first save
    partialstore.finalize(kept)
    deleted.clear()
    report["gc"] = _outcome(lambda: partialstore.gc(kept))
    report["gc_deleted"] = list(deleted)
    report["gc_again"] = _outcome(lambda: partialstore.gc(kept))
    report["gc_unfinalized"] = _outcome(lambda: partialstore.gc(abandoned))
    return report


def _many_processes(prefix: str, state: dict[str, Any]) -> dict[str, Any]:
    """Saves in a larger job, one failing in processes 2 and 3, then finalize, discard, gc."""
    import partialstore
    from partialstore._runtime import multihost
    from partialstore.errors import BackendError

    index = multihost.process_index()
    kept, dropped = f"{prefix}/kept", f"{prefix}/dropped"
    for step in range(3):
        partialstore.save(kept, {**state, "step": step})

    def failure(key: str) -> BaseException:
        return BackendError(f"injected failure in process {index} writing {key}")

    INJECT["chunk"] = _raising(failure) if index >= 2 else None
    report = {"failing": _outcome(lambda: partialstore.save(kept, {"rows": state["rows"]}))}
    INJECT["chunk"] = None
    report["finalize"] = _outcome(lambda: partialstore.finalize(kept))
    partialstore.save(dropped, {"rows": state["rows"]})
    report["discard"] = _outcome(lambda: partialstore.discard(dropped))
    report["gc"] = _outcome(lambda: partialstore.gc(kept))
    return report


def _leftover_keys() -> list[str]:
    """Coordination keys left once every process is done (heartbeats excepted)."""
    from jax._src import distributed

    client = distributed.global_state.client
    client.wait_at_barrier("partialstore-test-done", 60_000)
    keys = [key for key, _ in client.key_value_dir_get("partialstore/")]
    return [key for key in keys if not key.startswith("partialstore/heartbeat/")]


def _killed_mid_save(job: dict[str, Any], mesh: Any, report_file: str) -> None:
    """The victim hangs in its first chunk write until the test kills it; the others report.

    Survivors leave with ``os._exit``: a JAX shutdown would wait for the dead
    process. The primary hosts the coordination service, so it leaves last.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    import partialstore
    from partialstore._runtime import multihost

    spec = job["kill"]
    rows = 8 * mesh.devices.size
    value = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    sharding = NamedSharding(mesh, PartitionSpec(("proc", "local")))
    array = jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])

    async def hang(key: str) -> None:
        Path(spec["marker"]).write_text(key)
        await asyncio.sleep(3600)

    if multihost.process_index() == spec["victim"]:
        INJECT["chunk"] = hang
    try:
        partialstore.save(spec["path"], {"rows": array, "step": 3})
    except Exception as error:
        report: dict[str, Any] = {"raised_at": time.time(), **_describe(error)}
    else:
        report = {"raised_at": time.time(), "type": "returned"}
    Path(report_file).write_text(json.dumps(report))
    if multihost.is_primary():
        deadline = time.monotonic() + 60
        others = [Path(p) for i, p in enumerate(spec["reports"]) if i not in (0, spec["victim"])]
        while not all(p.exists() for p in others) and time.monotonic() < deadline:
            time.sleep(0.05)
    os._exit(0)


def main() -> None:
    port, count, index, job_file, report_file = sys.argv[1:6]
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=int(count),
        process_id=int(index),
        initialization_timeout=60,
    )
    from jax.sharding import Mesh

    from partialstore._arrays import arrays
    from partialstore._runtime import multihost

    arrays.CHUNK_BYTES = CHUNK_BYTES
    written: list[str] = []
    deleted: list[str] = []
    _record_calls(written, deleted)

    devices = np.array(jax.devices()).reshape(int(count), DEVICES_PER_PROCESS)
    mesh = Mesh(devices, ("proc", "local"))
    job = json.loads(Path(job_file).read_text())
    if "exit" in job:  # beat a while, then leave as a job does
        multihost.next_op(job["exit"])  # starts the heartbeat
        time.sleep(0.5)
        Path(report_file).write_text(json.dumps({"process": multihost.process_index()}))
        jax.distributed.shutdown()
        return
    if "kill" in job:
        _killed_mid_save(job, mesh, report_file)
    state = _global_tree(mesh)
    report: dict[str, Any] = {"process": multihost.process_index()}
    if "many" in job:
        report["many"] = _many_processes(job["many"], state)
        report["leftover_keys"] = _leftover_keys()
        Path(report_file).write_text(json.dumps(report))
        jax.distributed.shutdown()
        return
    report["targets"] = _save_targets(job["targets"], state, written)
    report.update(_failing_save(*job["failing"], state))
    report["causes"] = _failure_causes(job["causes"], state)
    report["collective"] = _collective(job["collective"], state, deleted)
    report["leftover_keys"] = _leftover_keys()
    Path(report_file).write_text(json.dumps(report))
    jax.distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
