"""Appends that do not list the whole log: conflict losers and per-process hints.

A loser of a race for number k has read record k back, so it goes to k+1
without listing (requests counted at the Backend contract). A writer that
appended before lists only the log's tail from the last record it saw, and
that hint stays correct when another process discards or finalizes in
between: the save lands after a discard marker, or is refused by the seal,
exactly as without a hint.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore import registry
from partialstore._commit import contention, loghints, records, txlog
from partialstore._commit.location import resolve
from partialstore._commit.published import writer
from partialstore._commit.records import DiscardRecord, SaveRecord, SealRecord
from partialstore._runtime.aio import run
from partialstore.backend import Backend
from partialstore.errors import CheckpointFinalizedError, TransientBackendError
from partialstore.testing.faulty_backend import (
    BackendFault,
    FaultyBackend,
    before,
    call,
    hang,
    install_faulty,
)

WRITER = {"host": "test", "pid": 1, "writer_id": None}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _save() -> SaveRecord:
    return SaveRecord(
        save_id=uuid.uuid4().hex,
        created=_now(),
        writer=WRITER,
        custom_metadata=None,
        nodes=[],
        leaves=[],
    )


def _save_record() -> bytes:
    return _save().encode()


def _seal() -> bytes:
    return SealRecord(finalize_id=uuid.uuid4().hex, created=_now(), writer=WRITER).encode()


def _marker() -> bytes:
    return DiscardRecord(discard_id=uuid.uuid4().hex, created=_now(), writer=WRITER).encode()


def _kinds(backend: Backend, log: str) -> list[tuple[int, str]]:
    return [(e.number, e.record.kind) for e in run(txlog.read_log(backend, log))]


def _in_other_process(call: str, path: str, options: dict[str, Any]) -> str:
    """Run ``partialstore.<call>(path)`` in a fresh interpreter; its error type or "ok"."""
    code = (
        "import json, sys, partialstore\n"
        "try:\n"
        f"    partialstore.{call}(sys.argv[1], storage_options=json.loads(sys.argv[2]))\n"
        "    print('ok')\n"
        "except Exception as error:\n"
        "    print(type(error).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, path, json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture
def faulty() -> FaultyBackend:
    return FaultyBackend(registry.open_backend(f"memory://{uuid.uuid4().hex}"))


def _own_save() -> SaveRecord:
    """A record by this process (another actor of it): not a rival."""
    return SaveRecord(uuid.uuid4().hex, _now(), writer(), None, [], [])


def _own_save_record() -> bytes:
    return _own_save().encode()


def test_conflict_loser_goes_to_the_next_number_without_listing(faulty: FaultyBackend) -> None:
    """Beaten by this process's own record, a loser has no rival to wait for: it tries the
    next number at once, without listing."""
    log = "ck/log"
    run(faulty.inner.create(txlog.record_key(log, 1), _save_record()))
    known = run(txlog.read_log(faulty.inner, log))
    run(faulty.inner.create(txlog.record_key(log, 2), _own_save_record()))
    number, numbers, _ = run(txlog.append(faulty, log, _own_save(), known=known))
    assert (number, numbers) == (3, [1, 2])
    assert faulty.calls("list") == []
    creates = [(c.key, c.outcome) for c in faulty.calls("create")]
    assert creates == [("ck/log/00000002.json", "error"), ("ck/log/00000003.json", "ok")]
    # One read: the conflict's read-back, which told the loser record 2's kind.
    assert [c.key for c in faulty.calls("read")] == ["ck/log/00000002.json"]
    assert _kinds(faulty.inner, log) == [(1, "save"), (2, "save"), (3, "save")]


def test_conflict_loser_meets_a_seal_without_listing(faulty: FaultyBackend) -> None:
    log = "ck/log"
    run(faulty.inner.create(txlog.record_key(log, 1), _save_record()))
    known = run(txlog.read_log(faulty.inner, log))
    run(faulty.inner.create(txlog.record_key(log, 2), _seal()))  # a rival's: refused at once
    with pytest.raises(CheckpointFinalizedError):
        run(txlog.append(faulty, log, _save(), known=known))
    assert faulty.calls("list") == []
    assert _kinds(faulty.inner, log) == [(1, "save"), (2, "finalize")]


def test_a_rival_conflict_pauses_then_lists_the_tail(faulty: FaultyBackend) -> None:
    """Beaten by another writer, a loser waits its pause and lists the tail from the record
    it lost to (others appended meanwhile), then goes on after the log's end."""
    log = "ck/log"
    run(faulty.inner.create(txlog.record_key(log, 1), _save_record()))
    known = run(txlog.read_log(faulty.inner, log))
    for number in range(2, 7):  # a rival appended five records meanwhile
        run(faulty.inner.create(txlog.record_key(log, number), _save_record()))
    number, numbers, _ = run(txlog.append(faulty, log, _own_save(), known=known))
    assert (number, numbers) == (7, [1, 2, 3, 4, 5, 6])
    assert contention.writers(faulty, log) == 2  # this process and the rival
    assert [(c.key[-13:], c.outcome) for c in faulty.calls("create")] == [
        ("00000002.json", "error"),
        ("00000007.json", "ok"),
    ]
    assert [c.detail["start_after"] for c in faulty.calls("list")] == [txlog.record_key(log, 1)]
    assert [e.number for e in run(txlog.read_log(faulty.inner, log))] == list(range(1, 8))


def test_the_pause_is_sized_by_writers_round_trip_and_races_lost(faulty: FaultyBackend) -> None:
    log = "ck/log"
    assert contention.pause(faulty, log) == 0.0  # a lone writer never waits
    contention.note_round_trip(faulty, log, 0.02)
    round_trip = contention.MIN_ROUND_TRIP + 0.3 * (0.02 - contention.MIN_ROUND_TRIP)
    for pid in range(15):  # fifteen other writers seen
        contention.note_rival(faulty, log, {"host": "other", "pid": pid, "writer_id": None})
    contention.note_rival(faulty, log, writer())  # this process is not its own rival
    assert contention.writers(faulty, log) == 16
    slot = contention.ATTEMPT_ROUND_TRIPS * round_trip
    assert contention.pause_window(faulty, log) == pytest.approx(16 * slot)
    assert contention.pause_window(faulty, log, lost=1) == pytest.approx(8 * slot)
    for _ in range(50):  # full jitter: every pause within its window
        assert 0.0 <= contention.pause(faulty, log, lost=1) <= 8 * slot + 1e-9
    priority = contention.PRIORITY_SLOTS * slot  # however many writers
    assert contention.pause_window(faulty, log, lost=contention.PRIORITY_AFTER) == priority
    assert contention.pause_window(faulty, log, lost=10) == priority
    contention.note_round_trip(faulty, log, 1e6)  # a store that hangs: still capped
    assert contention.pause_window(faulty, log, lost=contention.PRIORITY_AFTER) == (
        contention.MAX_PAUSE
    )


def test_a_writer_that_lost_races_in_a_row_goes_first_and_still_lists(
    faulty: FaultyBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rival wins three races in a row among 16 writers. The loser's window is a slot per
    writer before its first attempt and half that after its first loss; from
    :data:`contention.PRIORITY_AFTER` losses on it is :data:`contention.PRIORITY_SLOTS`
    slots, and the loser still lists the tail from the record it lost to before it creates."""
    log = "ck/log"
    run(faulty.inner.create(txlog.record_key(log, 1), _save_record()))
    known = run(txlog.read_log(faulty.inner, log))
    for pid in range(15):
        contention.note_rival(faulty, log, {"host": "other", "pid": pid, "writer_id": None})
    windows: list[tuple[int, float]] = []
    real_window = contention.pause_window

    seen_slots: list[float] = []

    def recorded(backend: Backend, log_prefix: str, lost: int = 0) -> float:
        writers = contention.writers(backend, log_prefix)  # uncapped: the round trip is short
        seen_slots.append(real_window(backend, log_prefix, lost=0) / writers)
        windows.append((lost, real_window(backend, log_prefix, lost)))
        return windows[-1][1]

    monkeypatch.setattr(contention, "pause_window", recorded)

    async def rival_first(record: Any) -> None:
        await faulty.inner.create(record.key, _save_record())

    faulty.add(BackendFault(call(rival_first), method="create", times=3))
    number, *_ = run(txlog.append(faulty, log, _own_save(), known=known))
    assert number == 5
    assert [lost for lost, _ in windows] == [0, 1, 2, 3]
    # In slots, at the round trip each pause saw: 16, then 17 / 2 (the rival who won is a
    # 17th writer), then PRIORITY_SLOTS twice.
    slots = [window / slot for (_, window), slot in zip(windows, seen_slots, strict=True)]
    priority = contention.PRIORITY_SLOTS
    assert slots == pytest.approx([16, 17 / 2, priority, priority])
    creates = [(c.key[-13:], c.outcome) for c in faulty.calls("create")]
    assert creates == [
        ("00000002.json", "error"),
        ("00000003.json", "error"),
        ("00000004.json", "error"),
        ("00000005.json", "ok"),
    ]
    # After every loss a listing that shows the record lost to and what follows it:
    # never a create straight from the read-back.
    assert [c.detail["start_after"] for c in faulty.calls("list")] == [
        txlog.record_key(log, n) for n in (1, 2, 3)
    ]


def test_a_stale_hint_under_a_discard_in_progress_lands_after_the_marker(
    faulty: FaultyBackend,
) -> None:
    """This process's hint (record 1) still exists while a discard (marker 4) has deleted
    the records after it: the tail listing shows the marker, so the save lands after it.
    (An existence check of the hint alone would put it at 2, below the marker.)"""
    log = "ck/log"
    first, *_ = run(txlog.append(faulty, log, _save()))
    for number in (2, 3):
        run(faulty.inner.create(txlog.record_key(log, number), _save_record()))
    run(faulty.inner.create(txlog.record_key(log, 4), _marker()))
    for number in (3, 2):  # the discard's deletions, not yet at record 1
        run(faulty.inner.delete(txlog.record_key(log, number)))
    number, *_ = run(txlog.append(faulty, log, _save()))
    assert (first, number) == (1, 5)
    assert _kinds(faulty.inner, log) == [(1, "save"), (4, "discard"), (5, "save")]


def test_a_second_save_lists_only_the_tail(tmp_path: Path) -> None:
    inner = registry.open_backend(str(tmp_path / "root"))
    faulty = FaultyBackend(inner)
    log = "ck/log"
    for _ in range(30):
        run(inner.create(txlog.record_key(log, len(run(inner.list(log))) + 1), _save_record()))
    first, *_ = run(txlog.append(faulty, log, _save()))  # no hint yet: full listing
    run(inner.create(txlog.record_key(log, 32), _save_record()))  # another writer
    second, numbers, _ = run(txlog.append(faulty, log, _save()))
    assert (first, second, numbers) == (31, 33, [31, 32])
    lists = faulty.calls("list")
    assert len(lists) == 2
    # What the wrapper's inner backend returned for the hinted listing: the tail only.
    assert run(faulty.inner.list(log, start_after=txlog.record_key(log, 30))) == [
        txlog.record_key(log, n) for n in (31, 32, 33)
    ]


def _state(tag: str) -> dict[str, Any]:
    return {"tag": tag, "w": np.full(4, len(tag), np.float32)}


def test_hint_below_a_discard_lands_after_the_marker(s3_url: tuple[str, dict[str, Any]]) -> None:
    root, options = s3_url
    path = f"{root}/ck"
    partialstore.save(path, _state("old1"), storage_options=options)
    partialstore.save(path, _state("old2"), storage_options=options)  # hint: record 2
    assert _in_other_process("discard", path, options) == "ok"  # marker 3, deletes 1 and 2
    partialstore.save(path, _state("new"), storage_options=options)
    location = resolve(path, options)
    assert _kinds(location.backend, location.log_prefix) == [(3, "discard"), (4, "save")]
    partialstore.finalize(path, storage_options=options)
    loaded = partialstore.load(path, storage_options=options)
    assert loaded["tag"] == "new"


def test_hint_before_an_unfinished_discard_starts_a_new_session(
    s3_url: tuple[str, dict[str, Any]],
) -> None:
    root, options = s3_url
    path = f"{root}/ck"
    partialstore.save(path, _state("old"), storage_options=options)  # hint: record 1
    location = resolve(path, options)
    backend, log = location.backend, location.log_prefix
    # A discard that appended its marker and died before deleting anything.
    run(backend.create(txlog.record_key(log, 2), _marker()))
    partialstore.save(path, _state("new"), storage_options=options)
    assert _kinds(backend, log) == [(1, "save"), (2, "discard"), (3, "save")]
    partialstore.finalize(path, storage_options=options)
    manifest = records.decode_manifest("m", run(backend.read(location.manifest_key)))
    assert [s.log for s in manifest.saves] == ["log/00000003.json"]
    assert partialstore.load(path, storage_options=options)["tag"] == "new"


def test_hint_after_another_process_finalized_is_refused(
    s3_url: tuple[str, dict[str, Any]],
) -> None:
    root, options = s3_url
    path = f"{root}/ck"
    partialstore.save(path, _state("a"), storage_options=options)  # hint: record 1
    assert _in_other_process("finalize", path, options) == "ok"
    with pytest.raises(CheckpointFinalizedError):
        partialstore.save(path, _state("late"), storage_options=options)
    location = resolve(path, options)
    assert _kinds(location.backend, location.log_prefix) == [(1, "save"), (2, "finalize")]
    assert partialstore.load(path, storage_options=options)["tag"] == "a"


def test_hint_on_a_deleted_and_restarted_log(tmp_path: Path) -> None:
    path = str(tmp_path / "root" / "ck")
    for tag in ("a", "b", "c"):
        partialstore.save(path, _state(tag))  # hint: record 3
    location = resolve(path)
    hint = loghints.recall(location.backend, location.log_prefix)
    assert hint is not None and (hint.number, hint.kind) == (3, "save")
    run(location.backend.delete_prefix(location.staging_prefix))  # a user removed it all
    partialstore.save(path, _state("fresh"))
    assert _kinds(location.backend, location.log_prefix) == [(1, "save")]
    partialstore.finalize(path)
    assert partialstore.load(path)["tag"] == "fresh"


def _calls_on_log(faulty: FaultyBackend, method: str) -> list[str]:
    return [c.key for c in faulty.calls(method) if "/log" in c.key]


def test_a_save_looks_at_the_log_while_its_data_uploads(tmp_path: Path) -> None:
    """With the save's data write held, the log's tail is listed already; once the data
    lands, the create is the only request left (one round trip after the data)."""
    url, faulty = install_faulty(str(tmp_path / "root"))
    path = f"{url}/ck"
    partialstore.save(path, {"a": np.ones(3)})  # record 1; this process now holds a hint
    listed_before = len(_calls_on_log(faulty, "list"))
    held = faulty.add(BackendFault(hang(), method="write", key=r"/data/"))
    response = partialstore.save_async(path, {"a": np.zeros(3)})
    assert held.wait(1, timeout=10)
    deadline = time.monotonic() + 10
    while len(_calls_on_log(faulty, "list")) == listed_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(_calls_on_log(faulty, "list")) == listed_before + 1  # looked, data still held
    log = "ck.partial_save/log"  # local disk stages under a prefix it renames on finalize
    assert _calls_on_log(faulty, "create") == [f"{log}/00000001.json"]  # nothing created yet
    held.release()
    response.result()
    assert _calls_on_log(faulty, "list")[listed_before:] == [log]
    assert _calls_on_log(faulty, "create")[1:] == [f"{log}/00000002.json"]
    partialstore.finalize(path)
    assert partialstore.load(path)["a"].tolist() == [0.0, 0.0, 0.0]


def test_pipelined_saves_commit_after_their_own_record_without_a_look(tmp_path: Path) -> None:
    """A save in flight when this process created the log's last record appends right after
    it: two save_async calls list the log once between them; a later save lists again."""
    url, faulty = install_faulty(str(tmp_path / "root"))
    path, log = f"{url}/ck", "ck.partial_save/log"
    first = partialstore.save_async(path, {"a": np.ones(3)})
    second = partialstore.save_async(path, {"b": np.ones(3)})  # called before record 1 exists
    first.result()
    second.result()
    assert len(_calls_on_log(faulty, "list")) == 1
    assert _calls_on_log(faulty, "create") == [f"{log}/00000001.json", f"{log}/00000002.json"]
    partialstore.save(path, {"c": np.ones(3)})  # called after record 2 landed: looks again
    assert len(_calls_on_log(faulty, "list")) == 2
    partialstore.finalize(path)
    assert sorted(partialstore.load(path)) == ["a", "b", "c"]


def test_a_discard_between_pipelined_saves_starts_a_new_session(tmp_path: Path) -> None:
    """Another process discards right after the first save's record landed; the second save,
    in flight since before, goes straight to number 2, finds the marker there and lands after
    it, in a new session of its own."""
    root = str(tmp_path / "root")
    url, faulty = install_faulty(root)
    path = f"{url}/ck"

    def discard_as_another_process(_record: object) -> None:
        partialstore.discard(f"{root}/ck")  # the inner URL: not queued behind our saves

    faulty.add(
        BackendFault(
            call(discard_as_another_process, when="after"),
            method="create",
            key=r"/log/00000001\.json",
        )
    )
    first = partialstore.save_async(path, {"a": np.ones(3)})
    second = partialstore.save_async(path, {"b": np.ones(3)})
    first.result()
    second.result()
    location = resolve(f"{root}/ck")
    assert _kinds(location.backend, location.log_prefix) == [(2, "discard"), (3, "save")]
    partialstore.finalize(path)
    assert sorted(partialstore.load(path)) == ["b"]


def test_a_look_older_than_its_bound_is_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save whose data took longer than LOOK_FRESH_S lists the log again before its create,
    so a concurrent discard has no more than a listing's time to take a number from under it."""
    url, faulty = install_faulty(str(tmp_path / "root"))
    path = f"{url}/ck"
    partialstore.save(path, {"a": np.ones(3)})
    listed = len(_calls_on_log(faulty, "list"))
    partialstore.save(path, {"b": np.ones(3)})  # fresh look: one listing
    assert len(_calls_on_log(faulty, "list")) == listed + 1
    monkeypatch.setattr(txlog, "LOOK_FRESH_S", -1.0)  # every look is already too old
    partialstore.save(path, {"c": np.ones(3)})
    assert len(_calls_on_log(faulty, "list")) == listed + 3
    partialstore.finalize(path)
    assert sorted(partialstore.load(path)) == ["a", "b", "c"]


def test_a_look_that_fails_is_taken_again_after_the_data(tmp_path: Path) -> None:
    """A 503 on the look's listing (past the backend's retries) costs the save nothing but
    a second look once its data is written; the save commits after record 1."""
    url, faulty = install_faulty(str(tmp_path / "root"))
    path = f"{url}/ck"
    partialstore.save(path, {"a": np.ones(3)})
    listed = len(_calls_on_log(faulty, "list"))
    failed = faulty.add(BackendFault(before(), method="list", key=r"/log$"))
    partialstore.save(path, {"b": np.ones(3)})
    assert failed.fired == 1
    assert len(_calls_on_log(faulty, "list")) == listed + 2  # the failed look, then the retry
    partialstore.finalize(path)
    assert sorted(partialstore.load(path)) == ["a", "b"]


def test_a_save_whose_data_fails_does_not_wait_for_its_look(tmp_path: Path) -> None:
    """The data write fails (a 503 burst past the retries) while the look's listing hangs:
    the save raises the data's error at once and cancels its look, rather than waiting for
    a listing whose answer nothing needs any more."""
    url, faulty = install_faulty(str(tmp_path / "root"))
    path = f"{url}/ck"
    partialstore.save(path, {"a": np.ones(3)})
    hung = faulty.add(BackendFault(hang(), method="list", key=r"/log$"))
    failed = faulty.add(BackendFault(before(), method="write", key=r"/data/", times=None))
    response = partialstore.save_async(path, {"b": np.ones(3)})
    assert hung.wait(1, timeout=10)
    with pytest.raises(TransientBackendError):
        response.result(timeout=10)  # the listing is still held: only a cancelled look returns
    assert failed.fired >= 1
    (look,) = [c for c in faulty.calls("list") if c.key.endswith("/log")][-1:]
    assert (look.outcome, look.error) == ("error", "CancelledError")
    hung.release()
    failed.remove()
    partialstore.save(path, {"b": np.ones(3)})  # the path still works: the save commits
    partialstore.finalize(path)
    assert sorted(partialstore.load(path)) == ["a", "b"]
