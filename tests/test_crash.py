"""Crash safety: real child processes killed with SIGKILL during save and finalize.

The rule under test (issue 3): a process killed at any instant during a save
leaves the previous state intact; the next save and finalize work; the
finalized checkpoint holds every save that returned, and no torn leaf ever.

Two kinds of kill, both with ``SIGKILL`` (no cleanup handler can run, as after
an out-of-memory kill or a preempted VM):

- at a named crash point (:data:`partialstore._runtime.faults.CRASH_POINTS`, armed
  through ``PARTIALSTORE_CRASH_AT`` in the child's environment);
- at a random instant chosen by the parent (seeded), while the child saves
  multi-chunk arrays in a loop.

Backends: local, S3 (moto), GCS (fake-gcs-server) and the generic fsspec
backend. The memory backend lives inside one process, so a killed process
takes its store along; it has no crash to survive (its in-process concurrency
is tested in ``test_concurrency.py``).

Every crash point runs on every one of these backends (workers fork from a
preloaded fork server, so a case costs well under a second on local disk and
GCS, one or two on moto). ``finalize.after_manifest_write`` lies before the
publication only where finalize renames (local disk); elsewhere the manifest
create *is* the publication, the point is never reached, and the test checks
that the child finishes and the checkpoint is complete.
"""

from __future__ import annotations

import random
import signal
import time
import uuid
from typing import Any

import pytest
from _workers import (
    Child,
    assert_same_bits,
    assert_state,
    make_array,
    make_state,
    stored_chunks,
)

import partialstore
from partialstore._commit import logread, txlog
from partialstore._commit.location import resolve
from partialstore._commit.records import DiscardRecord
from partialstore._runtime.aio import run
from partialstore._runtime.faults import CRASH_POINTS

CROSS_PROCESS = ("local", "s3", "gcs", "fsspec")
KILLED = -signal.SIGKILL


def _cases() -> list[Any]:
    return [
        pytest.param(backend, point, id=f"{backend}-{point}")
        for backend in CROSS_PROCESS
        for point in CRASH_POINTS
    ]


def assert_checkpoint_holds(path: str, options: dict[str, Any], tags: list[str]) -> None:
    """The finalized checkpoint at ``path`` is exactly the saves of ``tags``, bit for bit."""
    loaded = partialstore.load(path, storage_options=options)
    assert sorted(loaded) == sorted(tags)
    for tag in tags:
        assert_state(tag, loaded[tag])
    info = partialstore.metadata(path, storage_options=options)
    assert len(info.saves) == len(tags)
    assert info.custom_metadata == dict.fromkeys(tags, True)


@pytest.mark.parametrize(("any_backend_url", "point"), _cases(), indirect=["any_backend_url"])
def test_kill_at_crash_point(any_backend_url: tuple[str, dict[str, Any]], point: str) -> None:
    root, options = any_backend_url
    _kill_at_and_recover(f"{root}/ckpt", options, point)


@pytest.mark.parametrize(
    ("any_backend_url", "point"),
    [pytest.param(b, p, id=f"{b}-{p}") for b in ("local", "s3") for p in CRASH_POINTS],
    indirect=["any_backend_url"],
)
def test_kill_at_crash_point_in_the_log_folders(
    any_backend_url: tuple[str, dict[str, Any]], point: str
) -> None:
    """The same kills where a log of version 3 keeps its records in folders: a discard
    marker at record 999 (the records before it already deleted) makes the child's saves
    and seal records 1,000 to 1,002, the first in a folder."""
    root, options = any_backend_url
    path = f"{root}/ckpt"
    location = resolve(path, options)
    marker = DiscardRecord(uuid.uuid4().hex, None, None)  # of this code's version, 3
    last_flat = txlog.record_key(location.log_prefix, logread.segment() - 1)
    run(location.backend.create(last_flat, marker.encode()))
    _kill_at_and_recover(path, options, point)
    # Finalize moved the log along with the session where it renames.
    names = run(location.backend.list(location.staging_prefix))
    names += run(location.backend.list(location.final_prefix))
    assert any(name.endswith("/log/00001/00001000.json") for name in names), names


def _kill_at_and_recover(path: str, options: dict[str, Any], point: str) -> None:
    """Kill a child saving A and B (and finalizing) at ``point``; check what must hold."""
    in_finalize = point.startswith("finalize.")
    # Without atomic rename the manifest create *is* the publication, so
    # finalize never passes finalize.after_manifest_write: the child then
    # finishes, and what must hold is what holds after finalize.after_publish.
    reachable = point != "finalize.after_manifest_write" or resolve(path, options).uses_rename
    child = Child(
        {"mode": "crash_sequence", "path": path, "options": options, "finalize": in_finalize},
        # Saves reach a save.* point once each: ":2" lets piece A return and kills B.
        crash_at=point if in_finalize else f"{point}:2",
    )
    try:
        returncode = child.wait()
    finally:
        child.close()
    assert returncode == (KILLED if reachable else 0), child.describe()
    assert child.tags("committed") == (["A", "B"] if in_finalize else ["A"]), child.describe()

    published = point == "finalize.after_publish" or not reachable
    sealed = point in ("finalize.after_seal", "finalize.after_manifest_write")
    # B is in the session iff the kill came after its log record was created.
    tags = ["A", "B"] if in_finalize or point == "save.after_log_append" else ["A"]

    if published:
        assert_checkpoint_holds(path, options, tags)
        with pytest.raises(FileExistsError):
            partialstore.finalize(path, storage_options=options)
        with pytest.raises(FileExistsError):
            partialstore.save(path, {"C": make_state("C")}, storage_options=options)
    else:
        with pytest.raises(FileNotFoundError):
            partialstore.load(path, storage_options=options)
        with pytest.raises(FileNotFoundError):
            partialstore.metadata(path, storage_options=options)
        if sealed:
            # The log is sealed: no save can join this checkpoint any more, and
            # the refused save says so instead of vanishing.
            with pytest.raises(FileExistsError):
                partialstore.save(
                    path, {"C": make_state("C")}, custom_metadata={"C": True},
                    storage_options=options,
                )  # fmt: skip
        else:
            partialstore.save(
                path, {"C": make_state("C")}, custom_metadata={"C": True}, storage_options=options
            )
            tags.append("C")
        # Finalize completes the session (after a kill past the seal: the same,
        # already sealed one; finalize is idempotent).
        partialstore.finalize(path, storage_options=options)
        assert_checkpoint_holds(path, options, tags)

    # A save killed before its commit left unreferenced data; nothing else is garbage.
    killed_uncommitted = point in ("save.after_data", "save.before_log_append")
    assert len(partialstore.gc(path, storage_options=options)) == int(killed_uncommitted)
    assert_checkpoint_holds(path, options, tags)


@pytest.mark.parametrize("any_backend_url", CROSS_PROCESS, indirect=True)
def test_writer_id_recognises_a_killed_jobs_finalize(
    any_backend_url: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, options = any_backend_url
    path = f"{root}/ckpt"
    monkeypatch.setenv("PARTIALSTORE_WRITER_ID", "job-7")
    child = Child(
        {"mode": "crash_sequence", "path": path, "options": options, "finalize": True},
        crash_at="finalize.after_publish",  # published, killed before finalize returned
    )
    try:
        assert child.wait() == KILLED, child.describe()
    finally:
        child.close()
    # The restarted job (same writer id) calls finalize again: its own checkpoint.
    partialstore.finalize(path, storage_options=options)
    assert_checkpoint_holds(path, options, ["A", "B"])
    monkeypatch.setenv("PARTIALSTORE_WRITER_ID", "job-8")  # another job's finalize
    with pytest.raises(FileExistsError, match="finalized by host"):
        partialstore.finalize(path, storage_options=options)


# Random-instant kills. The big leaf spans several chunks (the workers shrink
# arrays.py's 16 MiB chunk size to CHUNK_BYTES), so a kill can land between
# chunk writes of one leaf: the torn-leaf case.
BIG_SHAPE = (512, 1024)  # float32: 2 MiB, 4 chunks
CHUNK_BYTES = 512 << 10
ROUNDS = 3


@pytest.mark.parametrize("any_backend_url", CROSS_PROCESS, indirect=True)
def test_kill_at_random_instants(any_backend_url: tuple[str, dict[str, Any]]) -> None:
    root, options = any_backend_url
    path = f"{root}/ckpt"
    rng = random.Random(20240603)  # seeded: the same kill delays on every run
    reported: list[list[str]] = []
    for round_ in range(ROUNDS):
        child = Child(
            {
                "mode": "save_loop",
                "path": path,
                "options": options,
                "prefix": f"r{round_}",
                "count": 1000,
                "shape": BIG_SHAPE,
                "chunk_bytes": CHUNK_BYTES,
            }
        )
        try:
            # Time the kill from the first commit: before it the child is
            # mostly importing (kills inside a first save are the crash points').
            child.wait_for("committed")
            time.sleep(rng.uniform(0.0, 0.8))
            child.kill()
            assert child.wait() == KILLED, child.describe()
        finally:
            child.close()
        reported.append(child.tags("committed"))

    # The killed sessions are still unfinalized and one finalize completes them.
    with pytest.raises(FileNotFoundError):
        partialstore.load(path, storage_options=options)
    partialstore.finalize(path, storage_options=options)
    loaded = partialstore.load(path, storage_options=options)
    info = partialstore.metadata(path, storage_options=options)

    in_checkpoint: list[str] = []
    for round_, committed in enumerate(reported):
        have = sorted(
            (k for k in loaded if k.startswith(f"r{round_}_")), key=lambda k: int(k.split("_")[1])
        )
        # Every reported save is there; at most one more, if the kill fell
        # between a save's commit and its "committed" line.
        assert have[: len(committed)] == committed, (round_, committed, have)
        assert have in (committed, [*committed, f"r{round_}_{len(committed)}"]), (committed, have)
        in_checkpoint += have
    assert len(info.saves) == len(in_checkpoint)
    for tag in in_checkpoint:
        assert_same_bits(make_array(tag, BIG_SHAPE), loaded[tag]["big"], f"{tag}/big")
        assert_same_bits(make_array(f"{tag}/s"), loaded[tag]["small"], f"{tag}/small")
    chunks = stored_chunks(path, options, "latest")
    assert chunks[0] < BIG_SHAPE[0], f"the big leaf is one chunk {chunks}: no torn-leaf case"
    # Every save replaced "latest": the last one in log order won, whole.
    last = in_checkpoint[-1]
    assert info.custom_metadata == {"latest": last}
    assert_same_bits(make_array(last, BIG_SHAPE), loaded["latest"], "latest")
    # At most one killed save per round left data behind; removing it breaks nothing.
    assert len(partialstore.gc(path, storage_options=options)) <= ROUNDS
    first = in_checkpoint[0]
    again = partialstore.load(path, select=[first], storage_options=options)
    assert_same_bits(make_array(first, BIG_SHAPE), again[first]["big"], f"{first}/big")
