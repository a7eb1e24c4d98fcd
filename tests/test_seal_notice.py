"""Seal notices (log version 2): a save that sees no notice reads no record before its create.

A finalize writes ``log/seal-notice.json`` before its seal. A save whose
listing shows a version-2 record it knows and no notice goes after the
log's last record without reading it; with a notice, or with only
version-1 records to go by, it reads the last record first, as before.
Version-1 code refuses the records of version 2, so it can neither seal nor
append in a log where saves rely on the notice: checked here against the
real version-1 code, taken from the repository's history.

Requests are counted at the Backend contract (:class:`FaultyBackend`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from _older_code import archive, run_older

import partialstore
from partialstore import registry
from partialstore._commit import loghints, records, txlog
from partialstore._commit.location import resolve
from partialstore._commit.records import SaveRecord, SealRecord
from partialstore._runtime.aio import run
from partialstore.backend import Backend
from partialstore.errors import CheckpointFinalizedError, TransientBackendError
from partialstore.testing.faulty_backend import (
    BackendFault,
    FaultyBackend,
    before,
    hang,
    install_faulty,
)

RIVAL = {"host": "rival", "pid": 7, "writer_id": None}
LOG = "ck/log"
#: The last commit whose code writes log records of version 1.
VERSION_1_COMMIT = "50adc34"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _save(version: int = txlog.VERSION) -> SaveRecord:
    return SaveRecord(uuid.uuid4().hex, _now(), RIVAL, None, [], [], version)


def _save_record(version: int = txlog.VERSION) -> bytes:
    return _save(version).encode()


def _seal(version: int = txlog.VERSION) -> bytes:
    return SealRecord(uuid.uuid4().hex, _now(), RIVAL, version).encode()


def _kinds(backend: Backend, log: str) -> list[tuple[int, str, int]]:
    entries = run(txlog.read_log(backend, log))
    return [(e.number, e.record.kind, e.record.version) for e in entries]


@pytest.fixture
def faulty() -> FaultyBackend:
    return FaultyBackend(registry.open_backend(f"memory://{uuid.uuid4().hex}"))


def test_a_save_goes_after_rival_records_without_reading_them(faulty: FaultyBackend) -> None:
    first, *_ = run(txlog.append(faulty, LOG, _save()))  # this process's: version 2
    for number in (2, 3):  # a rival's saves meanwhile
        run(faulty.inner.create(txlog.record_key(LOG, number), _save_record()))
    number, *_ = run(txlog.append(faulty, LOG, _save()))
    assert (first, number) == (1, 4)
    # The first append read nothing (an empty log), the second only listed the tail.
    assert faulty.calls("read") == []
    assert [c.key[-13:] for c in faulty.calls("create")] == ["00000001.json", "00000004.json"]
    assert len(faulty.calls("list")) == 2


def test_with_a_notice_a_save_reads_the_record_before_it_and_meets_the_seal(
    faulty: FaultyBackend,
) -> None:
    run(txlog.append(faulty, LOG, _save()))
    # A finalizer of version 2: the notice first, then the seal.
    run(faulty.inner.create(txlog.notice_key(LOG), b"{}"))
    run(faulty.inner.create(txlog.record_key(LOG, 2), _seal()))
    with pytest.raises(CheckpointFinalizedError):
        run(txlog.append(faulty, LOG, _save()))
    assert [c.key for c in faulty.calls("read")] == [txlog.record_key(LOG, 2)]
    assert [k[:2] for k in _kinds(faulty.inner, LOG)] == [(1, "save"), (2, "finalize")]


def test_a_seal_without_notice_after_version_1_records_is_read_and_refuses(
    faulty: FaultyBackend,
) -> None:
    """A version-1 log: the seal has no notice, so a save must read it whatever it knows."""
    run(faulty.inner.create(txlog.record_key(LOG, 1), _save_record(version=1)))
    run(faulty.inner.create(txlog.record_key(LOG, 2), _seal(version=1)))
    loghints.remember(faulty, LOG, 1, txlog.SAVE, version=1)  # this process read record 1
    with pytest.raises(CheckpointFinalizedError):
        run(txlog.append(faulty, LOG, _save()))
    assert [c.key for c in faulty.calls("read")] == [txlog.record_key(LOG, 2)]
    assert faulty.calls("create") == []


def test_a_save_after_version_1_records_reads_the_last_then_appends_version_2(
    faulty: FaultyBackend,
) -> None:
    for number in (1, 2):
        run(faulty.inner.create(txlog.record_key(LOG, number), _save_record(version=1)))
    number, *_ = run(txlog.append(faulty, LOG, _save()))
    assert number == 3
    assert [c.key for c in faulty.calls("read")] == [txlog.record_key(LOG, 2)]
    assert _kinds(faulty.inner, LOG) == [(1, "save", 1), (2, "save", 1), (3, "save", 2)]


def _state(tag: str) -> dict[str, object]:
    return {"tag": tag, f"w_{tag}": np.full(3, len(tag), np.float32)}


@pytest.mark.parametrize("saved_here", [True, False], ids=["after-saves", "fresh-process"])
def test_finalize_writes_the_notice_before_its_seal(tmp_path: Path, saved_here: bool) -> None:
    url, faulty = install_faulty(str(tmp_path / "root"))
    path = f"{url}/ck"
    partialstore.save(path, _state("a"))
    if not saved_here:
        loghints.forget(faulty, resolve(path).log_prefix)  # as a process that made no save
    faulty.reset_log()
    partialstore.finalize(path)
    calls = [(c.method, c.key) for c in faulty.calls() if c.method in ("write", "create")]
    notice = ("create", "ck.partial_save/log/seal-notice.json")
    seal = ("create", "ck.partial_save/log/00000002.json")
    assert notice in calls and seal in calls
    assert calls.index(notice) < calls.index(seal)
    assert partialstore.load(path)["tag"] == "a"
    assert json.loads((tmp_path / "root/ck/log/seal-notice.json").read_bytes())["format"] == (
        "partialstore.seal-notice"
    )


def test_a_finalize_whose_reads_fail_does_not_wait_for_its_hung_notice(tmp_path: Path) -> None:
    """The notice is created alongside finalize's reads (this process saved here): when the
    reads fail, finalize raises at once, cancels the notice's create, and seals nothing;
    called again once the store answers, it succeeds."""
    url, faulty = install_faulty(str(tmp_path / "root"))
    path = f"{url}/ck"
    partialstore.save(path, _state("a"))
    hung = faulty.add(BackendFault(hang(), method="create", key=r"seal-notice"))
    failed = faulty.add(BackendFault(before(), method="list", key=r"/log$", times=None))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        response = pool.submit(partialstore.finalize, path)
        try:
            assert hung.wait(1, timeout=10)
            with pytest.raises(TransientBackendError):
                response.result(
                    timeout=10
                )  # the notice is still held: only a cancelled one returns
        finally:
            hung.release()  # so that a finalize that waited for it ends too
    (notice,) = faulty.calls("create", key=r"seal-notice")
    assert (notice.outcome, notice.error) == ("error", "CancelledError")
    assert [c.key for c in faulty.calls("create") if "seal-notice" not in c.key] == [
        "ck.partial_save/log/00000001.json"  # the save's record; no seal
    ]
    failed.remove()
    partialstore.finalize(path)
    assert partialstore.load(path)["tag"] == "a"


# ------------------------------------------------------ the real version-1 code


@pytest.fixture(scope="module")
def version_1_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as of :data:`VERSION_1_COMMIT` (see :mod:`tests._older_code`)."""
    return archive(VERSION_1_COMMIT, tmp_path_factory.mktemp("version1"))


def _version_1(code: Path, call: str, path: str) -> str:
    return run_older(code, call, path)


def test_version_1_code_refuses_to_finalize_or_save_after_newer_records(
    version_1_code: Path, tmp_path: Path
) -> None:
    path = str(tmp_path / "root" / "ck")
    partialstore.save(path, _state("new"))  # record 1, of today's version (2 or later)
    newer = f"version {txlog.VERSION}"
    finalized = _version_1(version_1_code, "partialstore.finalize(sys.argv[2])", path)
    assert finalized.startswith("CorruptCheckpointError") and newer in finalized
    saved = _version_1(version_1_code, "partialstore.save(sys.argv[2], {'x': 1})", path)
    assert saved.startswith("CorruptCheckpointError") and newer in saved
    location = resolve(path)
    assert [k[:2] for k in _kinds(location.backend, location.log_prefix)] == [(1, "save")]
    partialstore.finalize(path)  # the version-2 code finalizes what it saved
    assert partialstore.load(path)["tag"] == "new"


def test_a_session_begun_by_version_1_code_goes_on_and_finalizes(
    version_1_code: Path, tmp_path: Path
) -> None:
    path = str(tmp_path / "root" / "ck")
    call = "partialstore.save(sys.argv[2], {'old': np.arange(4), 'tag': 'old'})"
    assert _version_1(version_1_code, call, path) == "ok"
    partialstore.save(path, _state("new"))
    location = resolve(path)
    log = location.log_prefix
    assert _kinds(location.backend, log) == [(1, "save", 1), (2, "save", 2)]
    partialstore.finalize(path)
    loaded = partialstore.load(path)
    assert loaded["tag"] == "new"
    np.testing.assert_array_equal(loaded["old"], np.arange(4))
    manifest = records.decode_manifest("m", run(location.backend.read(location.manifest_key)))
    assert [s.log for s in manifest.saves] == ["log/00000001.json", "log/00000002.json"]


def test_version_1_record_bytes_stay_version_1() -> None:
    data = _save_record(version=1)
    record = records.decode_record("k", data)
    assert record.version == 1 and record.encode() == data
    assert dataclasses.replace(record, version=2).encode() != data
