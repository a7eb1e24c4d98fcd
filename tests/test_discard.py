"""discard deletes only what the protocol provably wrote, and never races a finalize.

On stores without rename a session lives at the checkpoint path itself, so
``discard("s3://b/run")`` must not touch ``run/step_1`` (a finalized
checkpoint of its own) or a user's ``run/train-00000.tfrecord``. A discard
appends a marker to the log before deleting, so it and a finalize are
ordered by the log: whichever record comes first decides, and both callers
are told which. Every case runs on every backend.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore._commit import discarding, finalizing, published, saving, txlog
from partialstore._commit.location import resolve
from partialstore._commit.records import SaveRecord
from partialstore._runtime.aio import run


@pytest.fixture
def ckpt(any_backend_url: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    root, options = any_backend_url
    return f"{root}/run", options


def _stored(path: str, options: dict[str, Any], prefix: str) -> list[str]:
    location = resolve(path, options)
    return run(location.backend.list(prefix))


def test_discard_spares_nested_checkpoints_and_foreign_objects(ckpt):
    path, opts = ckpt
    partialstore.save(f"{path}/step_1", {"w": np.ones(300_000, np.float32)}, storage_options=opts)
    partialstore.finalize(f"{path}/step_1", storage_options=opts)
    location = resolve(path, opts)
    foreign = [
        f"{location.staging_prefix}/train-00000.tfrecord",
        f"{location.staging_prefix}/data/notes.txt",
    ]
    for key in foreign:
        run(location.backend.write(key, b"user bytes"))
    nested_before = _stored(path, opts, "run/step_1")

    partialstore.save(
        path, {"a": np.arange(10), "big": np.zeros(300_000, np.float32)}, storage_options=opts
    )
    partialstore.discard(path, storage_options=opts)

    assert _stored(path, opts, "run/step_1") == nested_before
    assert partialstore.load(f"{path}/step_1", storage_options=opts)["w"].sum() == 300_000
    for key in foreign:
        assert run(location.backend.read(key)) == b"user bytes"
    # What is left of the session is one tombstone record: no data, no save records.
    left = [k for k in _stored(path, opts, location.staging_prefix) if k not in foreign]
    left = [k for k in left if not k.startswith("run/step_1/")]
    assert len(left) == 1 and left[0].startswith(location.log_prefix), left
    with pytest.raises(FileNotFoundError):
        partialstore.finalize(path, storage_options=opts)


def test_discard_refuses_a_sealed_session_and_the_finalize_completes(ckpt):
    path, opts = ckpt
    partialstore.save(path, {"a": 1}, storage_options=opts)
    location = resolve(path, opts)
    # A finalize of this process that sealed, then raised (say, the store stopped answering).
    published.remember_finalize(location, "f" * 32)
    run(finalizing._seal(location, "f" * 32))
    with pytest.raises(FileExistsError, match="sealed by a finalize"):
        partialstore.discard(path, storage_options=opts)
    partialstore.finalize(path, storage_options=opts)
    assert partialstore.load(path, storage_options=opts) == {"a": 1}


def test_finalize_after_a_discard_marker_finds_no_session(ckpt):
    path, opts = ckpt
    partialstore.save(path, {"a": 1}, storage_options=opts)
    location = resolve(path, opts)
    entries = run(txlog.read_log(location.backend, location.log_prefix))
    # A discard whose marker landed, then died before deleting anything.
    run(txlog.append(location.backend, location.log_prefix, discarding._marker()))
    with pytest.raises(FileNotFoundError):
        partialstore.finalize(path, storage_options=opts)
    # Discard again: nothing to discard, but it finishes the deletions.
    with pytest.raises(FileNotFoundError):
        partialstore.discard(path, storage_options=opts)
    save_id = entries[0].record.save_id
    assert _stored(path, opts, f"{location.staging_prefix}/data/{save_id}") == []
    # A new session starts after the marker and finalizes with only its own saves.
    partialstore.save(path, {"b": 2}, storage_options=opts)
    partialstore.finalize(path, storage_options=opts)
    assert partialstore.load(path, storage_options=opts) == {"b": 2}


def test_a_save_in_flight_during_discard_lands_in_the_next_session(ckpt):
    path, opts = ckpt
    partialstore.save(path, {"old": 1}, storage_options=opts)
    location = resolve(path, opts)
    snap = saving.snapshot({"new": np.arange(300_000, dtype=np.float32)}, None, copy=True)
    save_id = saving.new_save_id()
    written = run(saving.write_save_data(location, snap, save_id))  # data written, no record yet
    partialstore.discard(path, storage_options=opts)

    async def commit() -> int:
        async def done() -> saving.Descriptors:
            return written

        return await saving.commit_save(location, snap, save_id=save_id, written=done())

    run(commit())
    partialstore.finalize(path, storage_options=opts)
    loaded = partialstore.load(path, storage_options=opts)
    assert list(loaded) == ["new"]
    np.testing.assert_array_equal(loaded["new"], np.arange(300_000, dtype=np.float32))


def test_discard_never_follows_a_tampered_save_id(ckpt):
    path, opts = ckpt
    location = resolve(path, opts)
    victim = f"{location.staging_prefix}/data/keep/me.bin"
    run(location.backend.write(victim, b"mine"))
    partialstore.save(path, {"a": 1}, storage_options=opts)
    record = SaveRecord(
        "keep", created=None, writer=None, custom_metadata=None, nodes=[], leaves=[]
    )
    run(txlog.append(location.backend, location.log_prefix, record))
    partialstore.discard(path, storage_options=opts)
    assert run(location.backend.read(victim)) == b"mine"


def test_discard_of_a_finalized_checkpoint_deletes_nothing(ckpt):
    path, opts = ckpt
    partialstore.save(path, {"a": np.ones(10)}, storage_options=opts)
    partialstore.finalize(path, storage_options=opts)
    location = resolve(path, opts)
    before = _stored(path, opts, location.final_prefix)
    with pytest.raises(FileExistsError):
        partialstore.discard(path, storage_options=opts)
    assert _stored(path, opts, location.final_prefix) == before
    manifest = json.loads(run(location.backend.read(location.manifest_key)))
    assert manifest["finalize_id"]


def test_after_discard_load_does_not_claim_an_open_session(ckpt):
    path, opts = ckpt
    partialstore.save(path, {"a": 1}, storage_options=opts)
    with pytest.raises(FileNotFoundError, match="session exists there"):
        partialstore.load(path, storage_options=opts)
    partialstore.discard(path, storage_options=opts)
    with pytest.raises(FileNotFoundError) as missing:
        partialstore.load(path, storage_options=opts)
    assert "session exists" not in str(missing.value)
