"""Log version 3: records from :func:`~partialstore._commit.logread.segment` on in folders.

A log begun by today's code is of version 3: its records from number
``segment()`` (1,000) on are named ``log/<leading digits>/<number>.json``
(``log/00012/00012345.json``), so that a tail listing on local disk reads one
folder of records, not the whole log. A log begun by older code goes on in
version 2, in one flat folder. Older code (version 2, taken from this
repository's history) must never write into a log of version 3: its listing
does not see the folders, so it must always find a record of version 3 to
refuse among the flat names: the last marker in a log that never reached
``segment()``, and record ``segment() - 1``, which discards keep, in one
that did.

Most tests here make segments of ten (``SEGMENT_DIGITS`` 1), so that a
dozen saves cross into the folders as a production log does at its
thousandth record.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _older_code import archive, run_older

import partialstore
from partialstore import registry
from partialstore._commit import discarding, logread, records, txlog
from partialstore._commit.location import resolve
from partialstore._commit.records import SaveRecord
from partialstore._runtime.aio import run
from partialstore.backend import Backend
from partialstore.testing.faulty_backend import (
    BackendFault,
    FaultyBackend,
    after,
    after_as_retry,
    before,
    call,
    install_faulty,
)

#: The last commit whose code writes log records of version 2.
VERSION_2_COMMIT = "ab21440"
RIVAL = {"host": "rival", "pid": 7, "writer_id": None}
LOG = "ck/log"


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> int:
    """Records from number 10 on in folders of ten (named by all digits but the last)."""
    monkeypatch.setattr(logread, "SEGMENT_DIGITS", 1)
    return logread.segment()


@pytest.fixture(scope="module")
def version_2_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as of :data:`VERSION_2_COMMIT` (see :mod:`tests._older_code`)."""
    return archive(VERSION_2_COMMIT, tmp_path_factory.mktemp("version2"))


def _save(version: int = txlog.VERSION) -> SaveRecord:
    return SaveRecord(uuid.uuid4().hex, None, RIVAL, None, [], [], version)


def _state(step: int) -> dict[str, Any]:
    return {"step": step, f"w{step}": np.full(3, step, np.float32)}


def _names(backend: Backend, log: str) -> list[str]:
    return [key[len(log) + 1 :] for key in run(backend.list(log))]


def _versions(backend: Backend, log: str) -> list[tuple[int, str, int]]:
    entries = run(txlog.read_log(backend, log))
    return [(e.number, e.record.kind, e.record.version) for e in entries]


def test_records_from_the_segment_on_go_in_folders_and_finalize(
    any_backend_url: tuple[str, dict[str, Any]], small_segments: int
) -> None:
    base, options = any_backend_url
    path = f"{base}/ck"
    for step in range(1, 12):
        partialstore.save(path, _state(step), storage_options=options)
    location = resolve(path, options)
    assert _names(location.backend, location.log_prefix) == [
        *(f"0000000{n}.json" for n in range(1, 10)),
        "0000001/00000010.json",
        "0000001/00000011.json",
    ]
    assert {v for *_, v in _versions(location.backend, location.log_prefix)} == {3}
    partialstore.finalize(path, storage_options=options)
    loaded = partialstore.load(path, storage_options=options)
    assert loaded["step"] == 11
    for step in range(1, 12):
        np.testing.assert_array_equal(loaded[f"w{step}"], np.full(3, step, np.float32))
    manifest = records.decode_manifest("m", run(location.backend.read(location.manifest_key)))
    assert [s.log for s in manifest.saves][8:10] == [
        "log/00000009.json",
        "log/0000001/00000010.json",
    ]
    assert manifest.seal == "log/0000001/00000012.json"


def test_a_log_begun_in_version_2_goes_on_in_version_2_with_flat_names(
    small_segments: int,
) -> None:
    backend = registry.open_backend(f"memory://{uuid.uuid4().hex}")
    for number in range(1, 10):
        run(backend.create(txlog.record_key(LOG, number, 2), _save(version=2).encode()))
    for _ in range(3):
        run(txlog.append(backend, LOG, _save()))
    assert _names(backend, LOG) == [f"{n:08d}.json" for n in range(1, 13)]
    assert _versions(backend, LOG) == [(n, "save", 2) for n in range(1, 13)]
    # A tail listing from past the segment finds the flat names too.
    assert run(txlog.list_numbers(backend, LOG, after=10)) == [11, 12]


def test_a_version_3_append_that_loses_record_1_to_version_2_code_goes_on_in_version_2(
    small_segments: int,
) -> None:
    """Version-2 code creates record 1 between this append's look and its create: the log
    is then of version 2, and this append's record, read back the rival's, is too."""
    faulty = FaultyBackend(registry.open_backend(f"memory://{uuid.uuid4().hex}"))

    async def older_first(request: Any) -> None:
        await faulty.inner.create(request.key, _save(version=2).encode())

    faulty.add(BackendFault(call(older_first), method="create", times=1))
    appended = run(txlog.append(faulty, LOG, _save()))
    assert (appended.number, appended.record.version) == (2, 2)
    for _ in range(10):  # past the segment: flat names, as version-2 code would write them
        run(txlog.append(faulty, LOG, _save()))
    assert _names(faulty.inner, LOG) == [f"{n:08d}.json" for n in range(1, 13)]


def test_a_tail_listing_on_local_disk_reads_the_last_folder_only(
    tmp_path: Path, small_segments: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "ck")
    for step in range(1, 33):  # records 1-9 flat, then folders 1, 2 and 3
        partialstore.save(path, {"step": step})
    location = resolve(path)
    read: list[str] = []
    real_scandir = os.scandir

    def recording(directory: Any = ".") -> Any:
        read.append(os.path.basename(os.fspath(directory)))
        return real_scandir(directory)

    monkeypatch.setattr(os, "scandir", recording)
    numbers = run(txlog.list_numbers(location.backend, location.log_prefix, after=31))
    assert numbers == [32]
    assert read == ["log", "0000003"]  # not the folders 1 and 2, before the start


def test_a_discard_keeps_the_last_flat_record_and_older_code_still_refuses_the_log(
    tmp_path: Path, small_segments: int, version_2_code: Path
) -> None:
    path = str(tmp_path / "root" / "ck")
    for step in range(1, 12):
        partialstore.save(path, _state(step))
    location = resolve(path)
    log = location.log_prefix
    partialstore.discard(path)  # marker 12, in a folder: every flat record is before it
    kept = ["00000009.json", "0000001/00000012.json"]
    assert _names(location.backend, log) == kept
    assert run(location.backend.list(f"{location.staging_prefix}/data")) == []  # record 9's too
    assert isinstance(run(txlog.read_record(location.backend, log, 9)), SaveRecord)
    for call_text in (
        "partialstore.save(sys.argv[2], {'x': 1})",
        "partialstore.finalize(sys.argv[2])",
        "partialstore.discard(sys.argv[2])",
    ):
        outcome = run_older(version_2_code, call_text, path)
        assert outcome.startswith("CorruptCheckpointError") and "version 3" in outcome, outcome
    assert _names(location.backend, log) == kept
    partialstore.save(path, _state(13))
    partialstore.finalize(path)
    assert partialstore.load(path)["step"] == 13


def test_without_the_kept_record_older_code_would_write_into_the_log(
    tmp_path: Path, small_segments: int, version_2_code: Path
) -> None:
    """Why a discard keeps record ``segment() - 1``: with no flat record of version 3 left,
    version-2 code sees an empty log and saves into it, below records it cannot see."""
    path = str(tmp_path / "root" / "ck")
    for step in range(1, 12):
        partialstore.save(path, _state(step))
    partialstore.discard(path)
    location = resolve(path)
    run(location.backend.delete(txlog.record_key(location.log_prefix, 9)))
    assert run_older(version_2_code, "partialstore.save(sys.argv[2], {'x': 1})", path) == "ok"
    assert "00000001.json" in _names(location.backend, location.log_prefix)


def test_version_2_code_refuses_a_new_log(tmp_path: Path, version_2_code: Path) -> None:
    path = str(tmp_path / "root" / "ck")
    partialstore.save(path, _state(1))  # record 1, version 3
    for call_text in (
        "partialstore.save(sys.argv[2], {'x': 1})",
        "partialstore.finalize(sys.argv[2])",
    ):
        outcome = run_older(version_2_code, call_text, path)
        assert outcome.startswith("CorruptCheckpointError") and "version 3" in outcome, outcome
    partialstore.finalize(path)
    assert partialstore.load(path)["step"] == 1


def test_a_session_begun_by_version_2_code_goes_on_in_version_2(
    tmp_path: Path, version_2_code: Path
) -> None:
    path = str(tmp_path / "root" / "ck")
    older_save = "partialstore.save(sys.argv[2], {'old': np.arange(4), 'step': 0})"
    assert run_older(version_2_code, older_save, path) == "ok"
    partialstore.save(path, _state(1))  # record 2, of version 2: the log's
    later = "partialstore.save(sys.argv[2], {'later': np.arange(2)})"
    assert run_older(version_2_code, later, path) == "ok"  # version-2 code goes on after it
    location = resolve(path)
    assert _versions(location.backend, location.log_prefix) == [
        (1, "save", 2),
        (2, "save", 2),
        (3, "save", 2),
    ]
    assert run_older(version_2_code, "partialstore.finalize(sys.argv[2])", path) == "ok"
    loaded = partialstore.load(path)
    assert loaded["step"] == 1
    np.testing.assert_array_equal(loaded["old"], np.arange(4))
    np.testing.assert_array_equal(loaded["later"], np.arange(2))


@pytest.mark.parametrize("fault", ["lost answer", "answered as its retry", "503 twice"])
def test_a_record_in_a_folder_lands_once_through_create_faults(
    small_segments: int, fault: str
) -> None:
    """A create at a folder key that lands but loses its answer, is answered as the
    client's own retry would be ("exists"), or fails twice before landing: the append
    reads back its own record there and reports it, once."""
    faulty = FaultyBackend(registry.open_backend(f"memory://{uuid.uuid4().hex}"))
    for number in range(1, small_segments):
        run(faulty.inner.create(txlog.record_key(LOG, number), _save().encode()))
    action, times = {
        "lost answer": (after(), 1),
        "answered as its retry": (after_as_retry(), 1),
        "503 twice": (before(), 2),
    }[fault]
    rule = faulty.add(BackendFault(action, method="create", key=r"/0000001/", times=times))
    appended = run(txlog.append(faulty, LOG, _save()))
    assert rule.fired == times
    assert (appended.number, appended.record.version) == (10, 3)
    assert _names(faulty.inner, LOG)[-1] == "0000001/00000010.json"
    assert [n for n, *_ in _versions(faulty.inner, LOG)] == list(range(1, 11))
    stored = run(txlog.read_record(faulty.inner, LOG, 10))
    assert isinstance(stored, SaveRecord) and stored.save_id == appended.record.save_id


def test_a_discard_whose_marker_takes_the_folder_number_first_starts_the_next_session(
    tmp_path: Path, small_segments: int
) -> None:
    """A discard lands its marker at record 10, the first in a folder, and deletes the
    records before it, between a save's look and its create: the save goes after the
    marker (record 11) and is the whole next session."""
    url, faulty = install_faulty(str(tmp_path / "root"))
    path = f"{url}/ck"
    for step in range(1, 10):
        partialstore.save(path, _state(step))
    location = resolve(path)

    async def discard_first(request: Any) -> None:
        await discarding.discard(dataclasses.replace(location, backend=faulty.inner))

    faulty.add(BackendFault(call(discard_first), method="create", key=r"/0000001/", times=1))
    partialstore.save(path, _state(10))
    names = _names(faulty.inner, location.log_prefix)
    assert names == ["00000009.json", "0000001/00000010.json", "0000001/00000011.json"]
    partialstore.finalize(path)
    loaded = partialstore.load(path)
    assert loaded["step"] == 10 and set(loaded) == {"step", "w10"}
