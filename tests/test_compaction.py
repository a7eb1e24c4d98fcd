"""Compaction objects: finalize reads few records and writes the same manifest bytes.

``COMPACT_EVERY`` is lowered to 5 so a few dozen small saves make several
compaction objects. Every test compares what finalize published with the
manifest merged from the whole log (``build_manifest`` over every save
record), which is what finalize wrote before compaction existed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore._commit import compaction, finalizing, txlog
from partialstore._commit.location import Location, resolve
from partialstore._commit.manifest import build_manifest
from partialstore._commit.records import DiscardRecord, SaveRecord
from partialstore._runtime.aio import run
from partialstore.testing.faulty_backend import BackendFault, before, install_faulty

EVERY = 5


@pytest.fixture(autouse=True)
def _small_compactions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compaction, "COMPACT_EVERY", EVERY)


def _tree(step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Saves whose merge replaces leaves, subtrees and container kinds, and merges metadata."""
    tree: dict[str, Any] = {f"k{step % 7}": np.full(3, step, np.float32), "step": step}
    if step % 3 == 0:
        tree["sub"] = {"a": step, f"b{step % 4}": [step, step + 1]}
    elif step % 3 == 1:
        tree["sub"] = [step]  # another container kind at the same path
    else:
        tree["sub"] = step  # a leaf where a subtree was
    return tree, {"last": step, f"m{step % 3}": {"s": step}}


def _save_many(path: str, steps: range) -> None:
    for step in steps:
        tree, meta = _tree(step)
        partialstore.save(path, tree, custom_metadata=meta)
    run(compaction.drain())


def _compacted(location: Location) -> list[str]:
    return run(location.backend.list(compaction.compact_prefix(location)))


def _merged_from_whole_log(location: Location) -> bytes:
    """The manifest the sealed log gives without any compaction object."""
    session = txlog.session_of(run(txlog.read_log(location.backend, location.log_prefix)))
    saves = [e for e in session if isinstance(e.record, SaveRecord)]
    return build_manifest(saves, session[-1], location.log_prefix)


def _published(location: Location) -> bytes:
    return run(location.backend.read(location.manifest_key))


def test_finalize_reads_only_records_after_the_newest_compaction(tmp_path: Path) -> None:
    url, faulty = install_faulty("local://" + str(tmp_path))
    path = f"{url}/ck"
    _save_many(path, range(23))
    location = resolve(path)
    assert [key.rsplit("/", 1)[1] for key in _compacted(location)] == [
        "00000005.json",
        "00000010.json",
        "00000015.json",
        "00000020.json",
    ]
    before_finalize = len(faulty.calls("read", key=r"/log/"))
    partialstore.finalize(path)
    record_reads = len(faulty.calls("read", key=r"/log/")) - before_finalize
    assert record_reads <= 5  # records 20..23 (and no more), not 23
    assert _published(location) == _merged_from_whole_log(location)
    loaded = partialstore.load(path)
    assert loaded["step"] == 22 and loaded["sub"] == [22]  # 22 % 3 == 1: a list


def test_finalizers_with_and_without_compaction_merge_the_same_bytes(tmp_path: Path) -> None:
    url, faulty = install_faulty("local://" + str(tmp_path))
    path = f"{url}/ck"
    _save_many(path, range(17))
    location = resolve(path)
    base, saves, seal = run(finalizing._seal(location, uuid.uuid4().hex))
    assert base is not None and base.through == 15
    with_base = build_manifest(saves, seal, location.log_prefix, base.state)
    # A second finalizer of the same seal that cannot see the compaction objects.
    faulty.add(BackendFault(before(), method="list", key=r"/compact", times=None))
    base2, saves2, seal2 = run(finalizing._seal(location, uuid.uuid4().hex))
    assert base2 is None and seal2.number == seal.number == 18
    without = build_manifest(saves2, seal2, location.log_prefix)
    assert with_base == without == _merged_from_whole_log(location)


def test_damaged_and_stale_compaction_objects_are_ignored(tmp_path: Path) -> None:
    path = "local://" + str(tmp_path / "ck")
    _save_many(path, range(16))
    location = resolve(path)
    prefix = compaction.compact_prefix(location)
    backend = location.backend
    run(backend.write(f"{prefix}/00000015.json", b'{"format": "partialstore.compaction"'))
    stale = run(backend.read(f"{prefix}/00000005.json"))
    run(backend.write(f"{prefix}/00000010.json", stale.replace(b'"through":5', b'"through":10')))
    base, entries = run(compaction.read_session(location))
    # 15 is damaged and 10 names record 5's save id: the reader goes back to 5.
    assert base is not None and base.through == 5
    assert [e.number for e in entries] == list(range(5, 17))
    partialstore.finalize(path)
    assert _published(location) == _merged_from_whole_log(location)


def test_compaction_before_an_unfinished_discard_is_ignored(tmp_path: Path) -> None:
    path = "local://" + str(tmp_path / "ck")
    _save_many(path, range(7))  # compaction object at 5
    location = resolve(path)
    marker = DiscardRecord(uuid.uuid4().hex, None, None).encode()
    run(location.backend.create(txlog.record_key(location.log_prefix, 8), marker))
    _save_many(path, range(100, 104))  # records 9..12 start a new session
    partialstore.finalize(path)
    assert _published(location) == _merged_from_whole_log(location)
    assert partialstore.load(path)["step"] == 103
    assert "k0" not in partialstore.load(path)  # the discarded session's leaves are gone


def test_discard_deletes_the_sessions_compaction_objects(tmp_path: Path) -> None:
    path = "local://" + str(tmp_path / "ck")
    _save_many(path, range(11))
    location = resolve(path)
    assert len(_compacted(location)) == 2
    partialstore.discard(path)
    assert _compacted(location) == []
    _save_many(path, range(200, 206))  # records 13..18, compaction at 15
    assert [key.rsplit("/", 1)[1] for key in _compacted(location)] == ["00000015.json"]
    partialstore.finalize(path)
    assert _published(location) == _merged_from_whole_log(location)
    assert partialstore.load(path)["step"] == 205


def test_kill_during_compaction_leaves_a_correct_checkpoint(tmp_path: Path) -> None:
    path = "local://" + str(tmp_path / "ck")
    code = (
        "import sys, numpy as np, partialstore\n"
        "from partialstore._commit import compaction\n"
        "from partialstore._runtime.aio import run\n"
        f"compaction.COMPACT_EVERY = {EVERY}\n"
        "for step in range(5):\n"
        "    partialstore.save(sys.argv[1], {'step': step, 'w': np.full(3, step)})\n"
        "    print('committed', step, flush=True)\n"
        "run(compaction.drain())\n"
        "print('survived', flush=True)\n"
    )
    env = {**os.environ, "PARTIALSTORE_CRASH_AT": "compaction.before_create"}
    child = subprocess.run(
        [sys.executable, "-c", code, path], env=env, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "survived" not in child.stdout
    location = resolve(path)
    assert [e.number for e in run(txlog.read_log(location.backend, location.log_prefix))] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert _compacted(location) == []
    _save_many(path, range(5, 12))  # compaction at 10 reads the whole log
    assert [key.rsplit("/", 1)[1] for key in _compacted(location)] == ["00000010.json"]
    partialstore.finalize(path)
    assert _published(location) == _merged_from_whole_log(location)
    loaded = partialstore.load(path)
    assert loaded["step"] == 11


def test_a_compaction_reads_by_key_without_listing(tmp_path: Path) -> None:
    """The writer of record k compacts from the object due at k - EVERY and the records
    after it, read by key: no listing, and the object equals one built from the whole log."""
    url, faulty = install_faulty("local://" + str(tmp_path))
    path = f"{url}/ck"
    _save_many(path, range(10))  # objects at 5 and 10 (written in the background)
    location = resolve(path)
    key = f"{compaction.compact_prefix(location)}/00000010.json"
    built_in_background = compaction.decode(key, run(location.backend.read(key)))
    run(location.backend.delete(key))
    faulty.reset_log()
    assert run(compaction.compact(location, 10)) is True
    assert faulty.calls("list") == []
    reads = sorted(c.key.rsplit("/", 2)[-2] + "/" + c.key[-13:] for c in faulty.calls("read"))
    assert reads == ["compact/00000005.json"] + [f"log/{n:08d}.json" for n in range(5, 11)]
    again = compaction.decode(key, run(location.backend.read(key)))
    assert again.state == built_in_background.state and again.through == 10


def test_a_compaction_whose_reads_fail_leaves_no_object_and_finalize_is_unchanged(
    tmp_path: Path,
) -> None:
    """A 503 burst (transient errors past the retries) on the record reads of a by-key
    compaction: the background compaction gives up without writing, and finalize, reading
    the log instead, publishes what the whole log gives."""
    url, faulty = install_faulty("local://" + str(tmp_path))
    path = f"{url}/ck"
    _save_many(path, range(9))  # object at 5 only
    location = resolve(path)
    rule = faulty.add(BackendFault(before(), method="read", key=r"/log/0000001", times=None))
    _save_many(path, range(9, 10))  # record 10: its compaction reads 5..10 by key and fails
    assert [k.rsplit("/", 1)[1] for k in _compacted(location)] == ["00000005.json"]
    assert rule.fired > 0  # the compaction did read by key, and was refused
    faulty.remove(rule)
    partialstore.finalize(path)
    assert _published(location) == _merged_from_whole_log(location)
    assert partialstore.load(path)["step"] == 9
