"""Multi-host saving: real multi-process JAX jobs save one sharded tree together.

Two worker processes (``tests/_multihost_worker.py``) join one JAX job with
``jax.distributed.initialize`` on 127.0.0.1 (CPU, two devices each, so the
mesh spans both processes) and save the same global tree to local disk, S3
(moto) and the generic fsspec backend, then finalize. This process (a
single one, no JAX job) then loads every checkpoint and checks every value
bit for bit, and checks from the keys each worker's backend wrote that
only the primary wrote log records, packs and metadata, that the workers
wrote disjoint chunks, and that chunks tile the shards. Then writes that
fail in one worker (a ``BackendError``, a ``TimeoutError``, an ``OSError``)
fail that save in both with that type and message, naming the worker, and
nothing is committed; ``discard`` and ``gc`` called by both act once (on
the primary) and return or raise alike; no coordination key is left over.
A three-process job has one non-primary killed (SIGKILL) mid-save: the two
survivors raise within 30 s, naming it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _multihost_worker import DEVICES_PER_PROCESS, expected_state

import partialstore
from partialstore._arrays.sharded import shard_chunks
from partialstore._commit.location import job_wide_name
from partialstore._pytree.shards import ShardedArray
from partialstore._runtime.multihost import decode_outcome, encode_outcome, next_op
from partialstore.errors import NotFoundError, ProcessLostError

WORKER = Path(__file__).with_name("_multihost_worker.py")
PROCESSES = 2


def test_shard_chunks_divide_every_shard_edge() -> None:
    f32 = np.dtype(np.float32)

    def chunks(
        shape: tuple[int, ...], edges: tuple[tuple[int, ...], ...], target: int
    ) -> list[int]:
        return shard_chunks(ShardedArray(shape, f32, edges, []), target)

    # Shards of 16 rows; the byte target allows 10 rows: the largest divisor is 8.
    assert chunks((64, 6), ((0, 16, 32, 48, 64), (0, 6)), 240) == [8, 6]
    # Big targets keep whole shards; an unsharded axis may stay whole.
    assert chunks((64, 6), ((0, 32, 64), (0, 6)), 1 << 20) == [32, 6]
    # Uneven shards (edges 0, 6, 12, 14): the chunk divides gcd(6, 12) = 6.
    assert chunks((14, 2), ((0, 6, 12, 14), (0, 2)), 1 << 20) == [6, 2]
    # Splitting a trailing axis only once the leading one is down to 1.
    assert chunks((4, 1024), ((0, 1, 2, 3, 4), (0, 512, 1024)), 1024) == [1, 256]
    assert chunks((), (), 16) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_job(
    tmp_path: Path, job: dict[str, Any], count: int, **extra_env: str
) -> tuple[list[subprocess.Popen[str]], list[Path]]:
    """Start ``count`` worker processes of one JAX job; return them and their report files."""
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    env = dict(os.environ)  # carries the moto server's credentials and endpoint
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        PARTIALSTORE_MULTIHOST_TIMEOUT_S="60",
        **extra_env,
    )
    port = _free_port()
    reports = [tmp_path / f"report{i}.json" for i in range(count)]
    children = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(count), str(i), str(job_file), str(r)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, r in enumerate(reports)
    ]
    return children, reports


def _finish(children: list[subprocess.Popen[str]], timeout: float) -> list[str]:
    """Wait for every child (killing all on a timeout); assert each exited cleanly."""
    outputs = []
    try:
        for child in children:
            outputs.append(child.communicate(timeout=timeout)[0])
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    for child, output in zip(children, outputs, strict=True):
        assert child.returncode == 0, f"worker {children.index(child)} failed:\n{output[-6000:]}"
    return outputs


def _run_job(tmp_path: Path, job: dict[str, Any]) -> list[dict[str, Any]]:
    children, reports = _start_job(tmp_path, job, PROCESSES)
    _finish(children, timeout=240)
    return [json.loads(r.read_text()) for r in reports]


def _assert_same_bits(loaded: Any, expected: Any) -> None:
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        if isinstance(value, np.ndarray):
            got = loaded[name]
            assert got.dtype == value.dtype and got.shape == value.shape, name
            assert got.tobytes() == value.tobytes(), name
        else:
            assert loaded[name] == value and type(loaded[name]) is type(value), name


def _is_chunk(key: str) -> bool:
    return "/data/" in key and "/c/" in key


def test_processes_save_their_own_shards_into_one_checkpoint(
    tmp_path: Path, s3_url: tuple[str, dict[str, Any]]
) -> None:
    s3_root, s3_options = s3_url
    targets = [
        (str(tmp_path / "local" / "ckpt"), {}),
        (f"{s3_root}/ckpt", s3_options),
        ("local://" + str(tmp_path / "fsspec" / "ckpt"), {}),
    ]
    job = {
        "targets": targets,
        "failing": ("local://" + str(tmp_path / "fsspec" / "failing"), {}),
        "causes": "local://" + str(tmp_path / "causes"),
        "collective": "local://" + str(tmp_path / "collective"),
    }
    reports = _run_job(tmp_path, job)
    assert [r["process"] for r in reports] == list(range(PROCESSES))

    expected = expected_state()
    for number, (path, options) in enumerate(targets):
        _assert_same_bits(partialstore.load(path, storage_options=options), expected)
        info = partialstore.metadata(path, storage_options=options)
        assert info.custom_metadata == {"by": "all"}
        assert len(info.saves) == 2  # one record per collective save, not one per process

        per_process = [set(r["targets"][number]["wrote"]) for r in reports]
        for report in reports:
            entry = report["targets"][number]
            assert entry["mismatched"] == []  # each process loaded its own shards back
            assert entry["late_save"] == "refused"
        primary, secondary = per_process
        # The primary alone writes log records, packs, metadata and the manifest.
        assert any("/log/" in key for key in primary)
        assert not [key for key in secondary if not _is_chunk(key)], sorted(secondary)
        if path.startswith("local://"):
            # This backend has no TensorStore kvstore, so chunks go through the
            # backend's write too: every process wrote some, none the same one.
            primary_chunks = {key for key in primary if _is_chunk(key)}
            assert primary_chunks and secondary
            assert not primary_chunks & secondary

    # Chunks of a sharded leaf tile its shards, and each chunk is stored once.
    local = Path(targets[0][0])
    manifest = json.loads((local / "partialstore.json").read_text())
    data = {entry["path"][0][1]: entry.get("data") for entry in manifest["leaves"]}
    # (64, 6) float32 over 4 devices: shards of 16 rows; 256-byte chunks -> 8 rows.
    assert data["rows"]["format"] == "zarr3" and data["rows"]["chunks"] == [8, 6]
    assert sorted(p.name for p in (local / data["rows"]["path"] / "c").iterdir()) == [
        str(i) for i in range(8)
    ]
    # (8, 12) int32 split 2 x 2: shards of 4 x 6 (96 bytes) are single chunks.
    assert data["grid"]["chunks"] == [4, 6]
    # Small leaves that are not sharded across processes are packed by the primary.
    assert data["replicated"]["format"] == "packed"

    # Process 1's chunk writes failed: every process's save raised the
    # backend error, nothing was committed, and finalize found no session.
    assert [r["failing_save"] for r in reports] == ["BackendError"] * PROCESSES
    assert [r["failing_finalize"] for r in reports] == ["NotFoundError"] * PROCESSES

    _assert_causes_reached_every_process(tmp_path, reports)
    _assert_discard_and_gc_were_collective(tmp_path, reports)
    # Every operation's coordination keys were deleted once all were done with them.
    assert [r["leftover_keys"] for r in reports] == [[]] * PROCESSES


def _assert_causes_reached_every_process(tmp_path: Path, reports: list[dict[str, Any]]) -> None:
    """Process 1's TimeoutError and OSError are what every process raised, named as such."""
    for report in reports:
        timeout = report["causes"]["timeout"]
        # The save's own TimeoutError, not result()'s wait running out.
        assert timeout["type"] == "TimeoutError" and timeout["done"] is True, timeout
        assert "injected deadline writing" in timeout["message"], timeout
        oserror = report["causes"]["oserror"]
        assert "OSError" in oserror["bases"], oserror
        assert "No space left on device (injected)" in oserror["message"], oserror
    primary = reports[0]["causes"]
    assert "failed on process 1 of the JAX job: TimeoutError" in primary["timeout"]["message"]
    assert "failed on process 1 of the JAX job: OSError" in primary["oserror"]["message"]
    assert [r["causes"]["oserror"]["errno"] for r in reports] == [errno.ENOSPC] * PROCESSES
    for name in ("timeout", "oserror"):  # nothing was committed
        log = tmp_path / "causes" / name / "log"
        assert not log.exists() or not list(log.iterdir())


def _assert_discard_and_gc_were_collective(tmp_path: Path, reports: list[dict[str, Any]]) -> None:
    """Every process returned or raised the same; only the primary deleted anything."""
    primary, secondary = (r["collective"] for r in reports)
    for report in (primary, secondary):
        assert report["discard"] == {"returned": None}
        assert report["finalize_discarded"]["type"] == "NotFoundError", report
        assert report["discard_again"]["type"] == "NotFoundError", report
        assert report["gc_unfinalized"]["type"] == "NotFoundError", report
        assert report["gc_again"] == {"returned": []}
    assert "failed on process 0 of the JAX job" in secondary["discard_again"]["message"]
    assert primary["discard_deleted"] and not secondary["discard_deleted"]
    # What the discard leaves is its one tombstone record: no data, no save record.
    abandoned = tmp_path / "collective" / "abandoned"
    left = sorted(p.relative_to(abandoned) for p in abandoned.rglob("*") if p.is_file())
    assert [p.parent.name for p in left] == ["log"], left
    assert json.loads(abandoned.joinpath(left[0]).read_text())["kind"] == "discard"
    # gc removed the wholly replaced first save, and said so in every process.
    deleted = primary["gc"]["returned"]
    assert len(deleted) == 1 and deleted[0].startswith("data/"), primary["gc"]
    assert secondary["gc"] == primary["gc"]
    assert primary["gc_deleted"] and not secondary["gc_deleted"]
    kept = tmp_path / "collective" / "kept"
    remaining = [f"data/{p.name}" for p in (kept / "data").iterdir()]
    assert len(remaining) == 1 and remaining != deleted
    loaded = partialstore.load("local://" + str(kept))
    assert loaded["rows"].tobytes() == expected_state()["rows"].tobytes()


def test_four_processes_relay_the_first_failure_in_order_and_leave_no_keys(
    tmp_path: Path,
) -> None:
    """Processes 2 and 3 of 4 fail one save: all raise process 2's error; nothing is left."""
    count = 4
    # Through fsspec, whose chunk writes go through the backend, where they fail.
    job = {"many": "local://" + str(tmp_path / "many")}
    children, report_files = _start_job(tmp_path, job, count)
    _finish(children, timeout=240)
    reports = [json.loads(r.read_text())["many"] for r in report_files]
    failing = [r["failing"] for r in reports]
    assert [f["type"] for f in failing] == ["BackendError"] * count, failing
    # The primary reads the reports in process order: process 2's error is
    # the one it raises and relays; processes 2 and 3 raise their own.
    for index in (0, 1):
        assert "failed on process 2 of the JAX job: BackendError" in failing[index]["message"]
        assert "injected failure in process 2 writing" in failing[index]["message"]
    for index in (2, 3):
        assert failing[index]["message"].startswith(f"injected failure in process {index} ")
    for report in reports:
        assert report["finalize"] == {"returned": None}
        assert report["discard"] == {"returned": None}
    assert len({json.dumps(r["gc"]) for r in reports}) == 1
    deleted = reports[0]["gc"]["returned"]
    # The two wholly replaced saves, and the chunks processes 0 and 1 wrote
    # for the save that failed.
    assert len(deleted) == 3 and all(d.startswith("data/") for d in deleted), deleted
    loaded = partialstore.load("local://" + str(tmp_path / "many" / "kept"))
    _assert_same_bits(loaded, {**expected_state(), "step": 2})
    leftovers = [json.loads(r.read_text())["leftover_keys"] for r in report_files]
    assert leftovers == [[]] * count


def test_processes_exit_cleanly_while_their_heartbeat_runs(tmp_path: Path) -> None:
    """A process that leaves after jax.distributed.shutdown() exits with 0, not SIGABRT.

    Beats every 50 ms, so a heartbeat request is often in flight at the exit:
    a daemon thread ended inside jaxlib's C++ code aborts the process.
    """
    count = 6
    children, reports = _start_job(
        tmp_path, {"exit": "heartbeat"}, count, PARTIALSTORE_MULTIHOST_LIVENESS_S="0.3"
    )
    _finish(children, timeout=240)  # asserts every exit status is 0
    assert [json.loads(r.read_text())["process"] for r in reports] == list(range(count))


def test_a_killed_process_makes_the_others_fail_fast_naming_it(tmp_path: Path) -> None:
    """SIGKILL one non-primary mid-save: both survivors raise within 30 s, naming it."""
    count, victim = 3, 2
    marker = tmp_path / "victim-is-writing"
    reports = [str(tmp_path / f"report{i}.json") for i in range(count)]
    job = {
        "kill": {
            "victim": victim,
            "marker": str(marker),
            "path": "local://" + str(tmp_path / "ckpt"),
            "reports": reports,
        }
    }
    children, _ = _start_job(tmp_path, job, count)
    survivors = [c for i, c in enumerate(children) if i != victim]
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert all(c.poll() is None for c in children), "a worker exited before the kill"
            assert time.monotonic() < deadline, "the victim never started writing"
            time.sleep(0.05)
        killed_at = time.time()
        children[victim].kill()  # SIGKILL
        children[victim].wait()
    except BaseException:
        for child in children:
            child.kill()
        raise
    _finish(survivors, timeout=120)
    for index in (0, 1):
        report = json.loads(Path(reports[index]).read_text())
        assert report["type"] == "ProcessLostError", report
        assert f"Process {victim} of the JAX job" in report["message"], report
        assert report["raised_at"] - killed_at < 30, report
    # Nothing was committed: the primary never appended the save's record.
    log = tmp_path / "ckpt" / "log"
    assert not log.exists() or not list(log.iterdir())


def test_outcomes_carry_the_cause_type_message_and_process() -> None:
    # Outside a JAX job this process is process 0.
    cases: list[tuple[BaseException, type[BaseException]]] = [
        (TimeoutError("deadline"), TimeoutError),
        (OSError(errno.ENOSPC, "No space left on device"), OSError),
        (PermissionError("denied"), PermissionError),
        (NotFoundError("no session"), NotFoundError),
        (ProcessLostError("process 3 died"), ProcessLostError),
        (_ThirdPartyError("odd"), ValueError),  # its nearest built-in class
        # Cannot be built from a message alone: its base class UnicodeError can.
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), UnicodeError),
    ]
    for original, expected in cases:
        message = encode_outcome(original)
        with pytest.raises(Exception) as raised:
            decode_outcome(message, "The save")
        error = raised.value
        assert isinstance(error, expected), (original, error)
        text = str(error)
        assert text.startswith("The save failed on process 0 of the JAX job: ")
        assert f"{type(original).__name__}: {original}" in text
        # Relayed on (as the primary does), it still names where it happened.
        with pytest.raises(Exception) as relayed:
            decode_outcome(encode_outcome(error), "Finalize")
        assert type(relayed.value) is type(error)
        assert str(relayed.value) == str(error).replace("The save", "Finalize", 1)
    assert decode_outcome(encode_outcome(None, "17"), "The save") == "17"


class _ThirdPartyError(ValueError):
    """An exception class no other process could import."""


def test_collective_operations_are_named_by_checkpoint_not_spelling() -> None:
    # One counter per checkpoint, so every process names the n-th operation
    # on it alike whichever spelling each used.
    first, second = (
        next_op(job_wide_name("s3a://b/run/q")),
        next_op(job_wide_name("s3://b/run//q/")),
    )
    assert first.rsplit("/", 1)[0] == second.rsplit("/", 1)[0]
    assert int(second.rsplit("/", 1)[1]) == int(first.rsplit("/", 1)[1]) + 1
    assert next_op(job_wide_name("s3://b/run/other")).rsplit("/", 1)[0] != first.rsplit("/", 1)[0]
