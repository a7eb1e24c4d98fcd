"""Discard and gc: delete only what the protocol provably wrote.

``discard`` never deletes "everything under a prefix": on a store without
rename the session's staging prefix is the checkpoint path itself, which may
hold finalized checkpoints of its own (``run/step_1``) or a user's files. It
appends a discard marker to the log first, so a concurrent finalize either
sealed before it (the discard is refused and the checkpoint publishes) or
finds the session gone; then it deletes the data directories named by the
records before its marker, and those records. Saves in flight have no record
yet, so their data is never touched: they commit into a new session after
the marker. The marker stays as a small tombstone, so a writer holding an
old view of the log cannot revive the discarded session.

``gc`` deletes, in a finalized checkpoint, the data directories of saves
its manifest does not use, and only directories named like a save id.

Example:
    >>> import numpy as np
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import partialstore
    >>> from partialstore._commit.location import resolve
    >>> from partialstore._runtime.aio import run
    >>> partialstore.save(f"{tmp.name}/broken", {"w": np.ones(3)})
    >>> run(discard(resolve(f"{tmp.name}/broken")))
    >>> partialstore.save(f"{tmp.name}/ckpt", {"w": np.zeros(3)})
    >>> partialstore.save(f"{tmp.name}/ckpt", {"w": np.ones(3)})  # replaces the first save
    >>> partialstore.finalize(f"{tmp.name}/ckpt")
    >>> run(gc(resolve(f"{tmp.name}/ckpt")))
    ['data/...']
    >>> tmp.cleanup()
"""

from __future__ import annotations

import datetime
import re
import uuid

from partialstore._commit import compaction, logread, records, txlog
from partialstore._commit.formats import SEGMENTED_FROM_VERSION
from partialstore._commit.location import DATA_DIR, LOG_DIR, Location
from partialstore._commit.published import (
    already_finalized,
    drop_stray_staging,
    read_published,
    writer,
)
from partialstore._commit.records import DiscardRecord, SaveRecord
from partialstore.errors import CheckpointFinalizedError, CorruptCheckpointError, NotFoundError

__all__ = ["SAVE_ID", "discard", "gc"]

#: What a save id (and so a save's data directory name) looks like.
SAVE_ID = re.compile(r"^[0-9a-f]{32}$")


async def _delete_dead(location: Location, entries: list[txlog.LogEntry], marker: int) -> None:
    """Delete the records before ``marker`` and the data their saves wrote.

    With rename, a finalize of the session that follows the marker may move
    the staging prefix while this deletes; what moved along is deleted from
    the checkpoint too (those saves are not in it: they precede the marker).
    """
    dead = [e for e in entries if e.number < marker]
    # Compaction objects first: they are derived from the records (and
    # readers check them against the log, so one left behind is ignored).
    await compaction.delete_before(location, location.staging_prefix, marker)
    await _delete_records_and_data(location, location.staging_prefix, dead)
    if location.uses_rename and await read_published(location) is not None:
        await compaction.delete_before(location, location.final_prefix, marker)
        await _delete_records_and_data(location, location.final_prefix, dead)


async def _delete_records_and_data(
    location: Location, root: str, dead: list[txlog.LogEntry]
) -> None:
    backend = location.backend
    for entry in dead:
        record = entry.record
        # Only a well-formed save id: never a path that a tampered record chose.
        if isinstance(record, SaveRecord) and SAVE_ID.match(record.save_id):
            await backend.delete_prefix(f"{root}/{location.data_dir(record.save_id)}")
    for entry in dead:
        if _fences_older_writers(entry):
            continue  # its data went above; the record stays
        key = txlog.record_key(f"{root}/{LOG_DIR}", entry.number, entry.record.version)
        await backend.delete(key)


def _fences_older_writers(entry: txlog.LogEntry) -> bool:
    """Whether ``entry`` is the record a discard never deletes: ``segment() - 1``, version 3.

    Older writers list only the records below ``logread.segment()`` (they do not see
    the folders), so among those they must always find one of version 3,
    which they refuse. In a log that never reached it that is the
    last marker (a marker is deleted only by a discard after it); in one
    that did, record ``segment() - 1`` is kept, as every discard after it
    leaves it (docs/protocol.md, "Log version 3").
    """
    return entry.number == logread.segment() - 1 and entry.record.version >= SEGMENTED_FROM_VERSION


def _marker() -> DiscardRecord:
    created = datetime.datetime.now(datetime.UTC).isoformat()
    return DiscardRecord(discard_id=uuid.uuid4().hex, created=created, writer=writer())


async def discard(location: Location) -> None:
    """Abandon the unfinalized session at ``location`` and delete what its saves wrote.

    Raises:
      CheckpointFinalizedError: the checkpoint is finalized, or a finalize sealed the
        session first (it is being published; nothing was deleted).
      NotFoundError: there is no session.
    """
    backend, log = location.backend, location.log_prefix
    published = await read_published(location)
    if published is not None:
        raise CheckpointFinalizedError(
            f"{location.path} is a finalized checkpoint; discard only abandons unfinalized "
            "sessions. Delete the checkpoint with your store's tools if you mean to."
        )
    try:
        entries = await txlog.read_log(backend, log)
    except CorruptCheckpointError:
        if location.uses_rename and await read_published(location) is not None:
            raise await _nothing_to_discard(location) from None  # renamed away meanwhile
        raise
    session = txlog.session_of(entries)
    if not session:
        if entries:  # a discard that was interrupted: finish its deletions
            await _delete_dead(location, entries, entries[-1].number)
        raise await _nothing_to_discard(location)
    if txlog.is_seal(session[-1].record):
        raise _sealed(location, session[-1].number)
    try:
        number, numbers, _ = await txlog.append(backend, log, _marker(), known=entries)
    except CheckpointFinalizedError as error:
        raise _sealed(location, None) from error
    if location.uses_rename and await read_published(location) is not None:
        # The session was renamed away by a finalize just before our marker,
        # which then went into a fresh staging prefix: nothing was discarded.
        await drop_stray_staging(location)
        raise already_finalized(location, await read_published(location))
    known = {entry.number for entry in entries}
    try:
        entries += await txlog.read_entries(backend, log, [n for n in numbers if n not in known])
    except NotFoundError:  # another discard is deleting the same records
        entries = await txlog.read_log(backend, log)
    await _delete_dead(location, entries, number)


def _sealed(location: Location, number: int | None) -> CheckpointFinalizedError:
    where = f" (log record {number})" if number else ""
    return CheckpointFinalizedError(
        f"The session at {location.path} was sealed by a finalize{where}, so it is being "
        "published and was not discarded. If that finalize died, call partialstore.finalize "
        "to complete it."
    )


async def _nothing_to_discard(location: Location) -> Exception:
    published = await read_published(location)
    if published is not None:
        return already_finalized(location, published)
    return NotFoundError(f"No partial save session at {location.path} to discard.")


async def gc(location: Location) -> list[str]:
    """Delete data of a finalized checkpoint that its manifest does not use.

    Saves that crashed, lost the race against the seal, or were entirely
    replaced by later saves leave such directories. Only finalized
    checkpoints are collected: in an open session an unreferenced directory
    may belong to a save still in flight.

    Returns the deleted directories (relative to the checkpoint).
    """
    try:
        body = await location.backend.read(location.manifest_key)
    except NotFoundError as error:
        raise NotFoundError(
            f"gc needs a finalized checkpoint, and {location.path} has none."
        ) from error
    used = records.decode_manifest(location.manifest_key, body).save_dirs()
    data_prefix = f"{location.final_prefix}/{DATA_DIR}"
    unused = [
        name
        for name in await location.backend.list_children(data_prefix)
        if SAVE_ID.match(name) and name not in used
    ]
    for save_dir in unused:
        await location.backend.delete_prefix(f"{data_prefix}/{save_dir}")
    return [f"{DATA_DIR}/{d}" for d in unused]
