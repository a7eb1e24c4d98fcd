"""Finalize: seal the log, merge its saves into the manifest, publish it.

Finalize never moves an array byte. It writes the log's seal notice, then
appends a seal to the log (after which no save can commit), merges the
records before the seal into the manifest, and publishes:

- with atomic rename: write ``<staging>/partialstore.json``, then rename the
  staging prefix to the final one (no-replace);
- without: ``create`` ``<path>/partialstore.json`` (exclusive).

The seal carries a fresh ``finalize_id`` that the manifest repeats, so every
answer is checked against what is stored: a publish whose answer was lost, or
a finalize called again after a timeout, finds its own checkpoint and
succeeds; only a checkpoint another finalize sealed is
:class:`CheckpointFinalizedError`. A finalizer that finds the log already
sealed by another completes the same deterministic manifest; it succeeds if
that sealer has stopped (a finalize re-run after a kill), and otherwise
reports the checkpoint as the live sealer's, so one of concurrent
finalizers succeeds.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import partialstore
    >>> from partialstore._commit.location import resolve
    >>> from partialstore._runtime.aio import run
    >>> partialstore.save(f"{tmp.name}/ckpt", {"step": 1})
    >>> run(finalize(resolve(f"{tmp.name}/ckpt")))
    >>> partialstore.load(f"{tmp.name}/ckpt")
    {'step': 1}
    >>> tmp.cleanup()
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import uuid

from partialstore._commit import compaction, loghints, records, txlog
from partialstore._commit.compaction import Compacted
from partialstore._commit.exclusive import Created, create_once
from partialstore._commit.location import Location
from partialstore._commit.manifest import build_manifest
from partialstore._commit.published import (
    already_finalized,
    drop_stray_staging,
    forget_finalizes,
    is_ours,
    read_published,
    remember_finalize,
    sealer_gone,
    writer,
)
from partialstore._commit.records import SealRecord
from partialstore._runtime.faults import crash_point
from partialstore.errors import (
    AlreadyExistsError,
    BackendError,
    CheckpointFinalizedError,
    CorruptCheckpointError,
    NotFoundError,
)

__all__ = ["finalize"]

_Entry = txlog.LogEntry
_Saves = list[txlog.LogEntry]
NOTICE_FORMAT = "partialstore.seal-notice"


async def _no_session(location: Location) -> Exception:
    manifest = await read_published(location)
    if manifest is not None:
        return already_finalized(location, manifest)
    return NotFoundError(
        f"No partial save session at {location.path}: call partialstore.save before finalize."
    )


def _seal_record(finalize_id: str) -> SealRecord:
    created = datetime.datetime.now(datetime.UTC).isoformat()
    return SealRecord(finalize_id=finalize_id, created=created, writer=writer())


async def _write_notice(location: Location, finalize_id: str) -> None:
    """Write the log's seal notice, which must be there before any seal of version 2.

    Saves that list the log and see no notice know that no seal is there
    (docs/protocol.md, "Seal notices"). Its content is for people, and it is
    never deleted: an existing notice (an earlier finalize's, or ours after
    a lost answer) is all the rule needs. A create, not a write: it goes
    the way of the log's other requests (TensorStore on S3).
    """
    body = {
        "format": NOTICE_FORMAT,
        "version": 1,
        "finalize_id": finalize_id,
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "writer": writer(),
    }
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    with contextlib.suppress(AlreadyExistsError):
        await location.backend.create(txlog.notice_key(location.log_prefix), data)


async def _read_session(
    location: Location, finalize_id: str
) -> tuple[Compacted | None, _Saves, bool]:
    """The session as :func:`compaction.read_session` reads it; whether the notice is written.

    A process that appended a save to this log writes the notice alongside
    the reads, so that it costs finalize no round trip (a session is then
    there but for a discard or a deleted path, where a notice only makes
    later saves read a record more). Any other waits to see a session first.
    """
    hint = loghints.recall(location.backend, location.log_prefix)
    if hint is None or hint.kind not in (txlog.SAVE, txlog.UNSEALED):
        return *(await compaction.read_session(location)), False
    writing = asyncio.ensure_future(_write_notice(location, finalize_id))
    try:
        base, entries = await compaction.read_session(location)
    except BaseException:
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)
        raise
    await writing
    return base, entries, True


def _sealed_by(entry: txlog.LogEntry) -> SealRecord:
    """The seal record of ``entry``, which :func:`txlog.is_seal` picked."""
    if not isinstance(entry.record, SealRecord):
        raise CorruptCheckpointError(f"Log record {entry.number} was taken for a seal but is not.")
    return entry.record


async def _refuse_occupied_target(location: Location) -> None:
    """Refuse to seal a session whose rename could never land.

    Checked before the seal, because a sealed session can no longer take
    saves or be discarded: with a file or foreign folder at the checkpoint
    path it would be stuck for good.
    """
    if not location.uses_rename:
        return  # the manifest create decides, and no rename target exists
    backend = location.backend
    if await backend.exists(location.final_prefix) or await backend.list(location.final_prefix):
        raise AlreadyExistsError(
            f"Cannot finalize {location.path}: something that is not a partialstore "
            "checkpoint is already at that path, so the session could never be published "
            "there. Move it away and finalize again, or discard the session."
        )


async def _seal(location: Location, finalize_id: str) -> tuple[Compacted | None, _Saves, _Entry]:
    """Make sure the session is sealed; return its base, save records before the seal, the seal.

    The base is the newest usable compaction object; the saves are then only
    the records after it (see :mod:`~partialstore._commit.compaction`).
    """
    backend, log = location.backend, location.log_prefix
    # A listing, even in the process that made the saves and knows the log's last
    # record: records after it may be another writer's, ended by a discard marker.
    base, entries, noticed = await _read_session(location, finalize_id)
    session = txlog.session_of(entries)
    if not session:
        raise await _no_session(location)
    if not txlog.is_seal(session[-1].record):
        await _refuse_occupied_target(location)
        if not noticed:
            await _write_notice(location, finalize_id)
        crash_point("finalize.before_seal")
        seal = _seal_record(finalize_id)
        try:
            number, numbers, sealed = await txlog.append(backend, log, seal, known=entries)
        except CheckpointFinalizedError:
            # Another finalizer sealed first: complete the manifest its seal fixes.
            entries = await _tail_or_log(location, base, entries)
        else:
            crash_point("finalize.after_seal")
            known = {entry.number for entry in entries}
            try:
                entries += await txlog.read_entries(
                    backend, log, [n for n in numbers if n not in known]
                )
                # As other finalizers read it back, so every one merges the same bytes.
                read_back = records.decode_record("seal", sealed.encode())
                entries.append(txlog.LogEntry(number, read_back))
            except NotFoundError:  # a discard before our seal is deleting its records
                base, entries = None, await txlog.read_log(backend, log)
        if base is not None and any(txlog.is_discard(e.record) for e in entries):
            base = None  # a discard came between: entries is then the session after it
        session = txlog.session_of(entries)
    seal_index = next((i for i, e in enumerate(session) if txlog.is_seal(e.record)), None)
    if seal_index is None:  # the sealed session was renamed away between our reads
        raise await _no_session(location)
    saves = [e for e in session[:seal_index] if base is None or e.number > base.through]
    return base, saves, session[seal_index]


async def _tail_or_log(
    location: Location, base: Compacted | None, entries: list[txlog.LogEntry]
) -> list[txlog.LogEntry]:
    """The log read again: from the base's record on if there is a base, else all of it."""
    first = entries[0].number if base is not None and entries else 1
    return await txlog.read_log(location.backend, location.log_prefix, first=first)


async def finalize(location: Location) -> None:
    """Seal the session at ``location``, write its manifest and publish it.

    Succeeds when the checkpoint this call sealed is published, whatever was
    lost or retried on the way, and when this process (or writer id) had
    already published it.

    Raises:
      CheckpointFinalizedError: another finalize published the checkpoint.
      NotFoundError: there is no session to finalize.
      OutcomeUnknownError: the store stopped answering before the outcome was known.
    """
    finalize_id = uuid.uuid4().hex
    remember_finalize(location, finalize_id)
    await _finalize(location, finalize_id)
    forget_finalizes(location)  # only a call that raised may be repeated


async def _finalize(location: Location, finalize_id: str) -> None:
    if location.uses_rename:
        # Publishing renames the session away, so only the manifest can tell.
        # Without rename the log stays, and a sealed log says it all (below).
        published = await read_published(location)
        if published is not None:
            if is_ours(location, published):
                return
            raise already_finalized(location, published)
    try:
        seal = await _seal_merge_publish(location, finalize_id)
    except (NotFoundError, AlreadyExistsError, BackendError, CorruptCheckpointError) as error:
        # With rename, a concurrent finalizer may move the session away at any
        # step (reads, seal, manifest write, rename), and the loser then sees
        # missing keys, existing keys, a directory in the way or a fresh stray
        # log that looks cut at its head; a rename whose answer was lost looks
        # the same. The manifest tells what happened.
        published = await read_published(location)
        if published is None:
            raise
        if location.uses_rename:
            await drop_stray_staging(location)
        if is_ours(location, published):
            return
        raise already_finalized(location, published) from error
    crash_point("finalize.after_publish")
    if seal is not None:  # published, but as the live sealer's checkpoint
        raise already_finalized(location, seal, completed=True)


async def _seal_merge_publish(location: Location, finalize_id: str) -> SealRecord | None:
    """Seal (or find the seal), merge and publish.

    Returns ``None`` when the checkpoint is this call's: it sealed the log,
    or completed the seal of one of this writer's finalizes, or of a
    finalize known to have stopped (see
    :func:`~partialstore._commit.published.sealer_gone`). Otherwise returns
    that live sealer's seal record, whose publication this call completed.

    Raises:
      CheckpointFinalizedError: the session was sealed and published before.
    """
    backend = location.backend
    base, saves, seal = await _seal(location, finalize_id)
    sealed = _sealed_by(seal)
    ours = sealed.finalize_id == finalize_id
    if not ours:  # sealed before this call: maybe published already
        # Whether the sealer is gone is looked at first: a sealer seen gone,
        # then found unpublished, can no longer publish.
        gone = sealer_gone(sealed)
        published = await read_published(location)
        if published is not None:
            if is_ours(location, published):
                return None
            raise already_finalized(location, published)
        ours = is_ours(location, sealed) or gone
    body = build_manifest(saves, seal, location.log_prefix, base.state if base else None)
    if location.uses_rename:
        await backend.write(location.staging_manifest_key, body)
        crash_point("finalize.after_manifest_write")
        await backend.rename(location.staging_prefix, location.final_prefix)
    else:
        outcome, _ = await create_once(backend, location.manifest_key, body)
        if outcome is not Created.MINE:  # another manifest, or deleted under us
            raise AlreadyExistsError(f"{location.manifest_key} exists with other contents.")
    return None if ours else sealed
