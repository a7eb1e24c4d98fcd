"""Compaction objects: the merge of a session's records so far, so finalize reads few records.

Every :data:`COMPACT_EVERY` records, the writer of save record k (k a
multiple of it) writes ``<staging>/compact/NNNNNNNN.json``: the merge of the
session's save records up to k (what :func:`~partialstore._commit.manifest.build_manifest`
goes on from), with the number of the last discard marker before k and the
save id of record k. It goes on from the newest earlier compaction object, so
it reads about :data:`COMPACT_EVERY` records, and it runs after the save has
returned (it is not on the save's path).

A compaction object is a derived cache (Delta Lake's checkpoints): records are
never deleted for it, it is created exclusively and never changed, and a
reader checks it against the log before using it: record k must still exist
and carry the save id the object names, and no discard marker may follow it.
A missing, damaged or stale object only makes the reader go back to an
older one, or to the whole log. Finalize then reads the newest object and the
records from k on (a ``start_after`` listing of the log's tail), and writes
the same manifest bytes as from the whole log. The compaction itself, whose
writer has just created record k, reads the object due at the previous
multiple of :data:`COMPACT_EVERY` and the records up to k by key, with no
listing (a marker after k makes readers reject the object, see above).

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import partialstore
    >>> from partialstore._commit.location import resolve
    >>> from partialstore._runtime.aio import run
    >>> for step in range(3):
    ...     partialstore.save(f"{tmp.name}/ckpt", {"step": step})
    >>> location = resolve(f"{tmp.name}/ckpt")
    >>> run(compact(location, 3))  # what the writer of record COMPACT_EVERY does
    True
    >>> base, entries = run(read_session(location))
    >>> base.through, [entry.number for entry in entries]
    (3, [3])
    >>> tmp.cleanup()
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import re
import uuid
from typing import Any

from partialstore._commit import records, txlog
from partialstore._commit.exclusive import create_once
from partialstore._commit.location import Location
from partialstore._commit.manifest import merge_state
from partialstore._commit.published import drop_stray_staging, read_published
from partialstore._commit.record_checks import parse_versioned
from partialstore._commit.records import Manifest, SaveRecord
from partialstore._runtime.faults import crash_point
from partialstore.backend import Backend
from partialstore.errors import BackendError, CorruptCheckpointError, NotFoundError

__all__ = [
    "COMPACT_DIR",
    "COMPACT_EVERY",
    "FORMAT",
    "VERSION",
    "Compacted",
    "compact",
    "compact_prefix",
    "delete_before",
    "drain",
    "read_session",
    "schedule",
]

#: A compaction object is written for every record number that is a multiple of this.
COMPACT_EVERY = 100
COMPACT_DIR = "compact"
FORMAT = "partialstore.compaction"
VERSION = 1
#: How many of the newest objects a reader tries before reading the whole log.
_CANDIDATES = 3
_NAME = re.compile(r"^(\d{8})\.json$")
_log = logging.getLogger(__name__)
_tasks: set[asyncio.Task[bool]] = set()


@dataclasses.dataclass(frozen=True)
class Compacted:
    """A decoded compaction object: the merge of the session's saves through record ``through``."""

    through: int
    through_save_id: str
    session_start: int  # the last discard marker before ``through``; 0 for none
    state: Manifest


def compact_prefix(location: Location, root: str | None = None) -> str:
    """Where the compaction objects of ``location``'s session live (under ``root`` if given)."""
    return f"{root or location.staging_prefix}/{COMPACT_DIR}"


def _key(location: Location, number: int) -> str:
    return f"{compact_prefix(location)}/{number:08d}.json"


def encode(compacted: Compacted) -> bytes:
    """Two lines: the object's own fields, then the merged state in the manifest's layout."""
    head = {
        "format": FORMAT,
        "version": VERSION,
        "compaction_id": uuid.uuid4().hex,  # unique bytes: see exclusive.create_once
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "through": compacted.through,
        "through_save_id": compacted.through_save_id,
        "session_start": compacted.session_start,
    }
    line = json.dumps(head, separators=(",", ":"), sort_keys=True).encode()
    return line + b"\n" + compacted.state.encode()


def _int_field(head: dict[str, Any], name: str, key: str) -> int:
    value = head.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CorruptCheckpointError(f"Compaction object {key}: '{name}' is not an int >= 0.")
    return value


def decode(key: str, data: bytes) -> Compacted:
    """Parse and check a compaction object read from ``key``.

    Raises:
      CorruptCheckpointError: it is malformed (the caller then reads records instead).
    """
    head_bytes, newline, state = data.partition(b"\n")
    if not newline:
        raise CorruptCheckpointError(f"Compaction object {key} has no state line.")
    head = parse_versioned(f"Compaction object {key}", head_bytes, fmt=FORMAT, version=VERSION)
    save_id = head.get("through_save_id")
    if not isinstance(save_id, str):
        raise CorruptCheckpointError(f"Compaction object {key}: 'through_save_id' is missing.")
    return Compacted(
        through=_int_field(head, "through", key),
        through_save_id=save_id,
        session_start=_int_field(head, "session_start", key),
        state=records.decode_manifest(key, state),
    )


async def _numbers(backend: Backend, prefix: str) -> list[int]:
    """Numbers of the compaction objects under ``prefix``, ascending."""
    found = []
    for key in await backend.list(prefix):
        match = _NAME.match(key[len(prefix) + 1 :])
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


async def _checked(
    location: Location, number: int, last: int | None = None
) -> tuple[Compacted, list[txlog.LogEntry]] | None:
    """Compaction object ``number`` and the log's records from it on, if it is usable.

    The records are the whole tail (a listing), or with ``last`` those up to
    record ``last``, read by key.
    """
    backend, log = location.backend, location.log_prefix
    try:
        key = _key(location, number)
        if last is None:
            base = decode(key, await backend.read(key))
            entries = await txlog.read_log(backend, log, first=number)
        else:
            body, found = await asyncio.gather(
                backend.read(key), txlog.read_range(backend, log, number, last)
            )
            base = decode(key, body)
            if found is None:
                return None
            entries = found
    except (NotFoundError, CorruptCheckpointError) as why:
        _log.debug("compaction object %s not used: %s", number, why)
        return None
    head = entries[0].record if entries else None
    if base.through != number or not isinstance(head, SaveRecord) or entries[0].number != number:
        return None  # record k is gone (a discard) or the object names another number
    if head.save_id != base.through_save_id or any(txlog.is_discard(e.record) for e in entries):
        return None  # another record at that number, or a discard ended the session
    return base, entries


async def _read_known(
    location: Location, before: int | None, last: int
) -> tuple[Compacted | None, list[txlog.LogEntry]] | None:
    """:func:`read_session` up to record ``last``, known to exist, without a listing.

    Compaction objects are due at every multiple of :data:`COMPACT_EVERY`, so
    the newest one up to ``last`` is read by key, with the records from it
    to ``last``; before the first is due, records 1 to ``last``. ``None`` when
    no object is usable or a record is missing (a discard's deletions,
    another log): the caller lists.
    """
    top = min(last, before - 1) if before is not None else last
    newest = top // COMPACT_EVERY * COMPACT_EVERY
    for number in range(newest, 0, -COMPACT_EVERY)[:_CANDIDATES]:
        found = await _checked(location, number, last)
        if found is not None:
            return found
    if top >= COMPACT_EVERY:
        return None  # objects were due but none is usable: list rather than read it all
    entries = await txlog.read_range(location.backend, location.log_prefix, 1, last)
    return None if entries is None else (None, entries)


async def read_session(
    location: Location, before: int | None = None, last: int | None = None
) -> tuple[Compacted | None, list[txlog.LogEntry]]:
    """The newest usable compaction object (numbered below ``before``) and the records from it.

    With an object at k, the records returned are k and every one after it
    (no discard marker among them); without one, the whole log as
    :func:`~partialstore._commit.txlog.read_log` reads it. ``last``, a record
    the caller has just created, makes this read by key up to it, with no
    listing, for a caller that needs nothing after it (the compaction of
    record ``last``); it must not decide where to append, since records after
    ``last`` (a discard marker) are not looked at.

    Raises:
      CorruptCheckpointError: the log itself is damaged.
    """
    if last is not None:
        found = await _read_known(location, before, last)
        if found is not None:
            return found
    try:
        numbers = await _numbers(location.backend, compact_prefix(location))
    except BackendError as why:  # a cache: the log alone still answers
        _log.debug("listing compaction objects failed: %s", why)
        numbers = []
    candidates = [n for n in reversed(numbers) if before is None or n < before]
    for number in candidates[:_CANDIDATES]:
        found = await _checked(location, number)
        if found is not None:
            return found
    return None, await txlog.read_log(location.backend, location.log_prefix)


async def compact(location: Location, number: int) -> bool:
    """Write the compaction object for save record ``number``; whether one now exists.

    Reads the newest usable earlier object and the records after it up to
    ``number``. Does nothing when record ``number`` is not a save of the live
    session as far as the log shows.
    """
    base, entries = await read_session(location, before=number, last=number)
    entries = [e for e in entries if e.number <= number]
    session = txlog.session_of(entries)
    if not session or session[-1].number != number:
        return False
    head = session[-1].record
    if not isinstance(head, SaveRecord):
        return False
    markers = [e.number for e in entries if txlog.is_discard(e.record)]
    if base is not None:
        session = [e for e in session if e.number > base.through]
    start = markers[-1] if markers else (base.session_start if base is not None else 0)
    state = merge_state(session, location.log_prefix, base.state if base else None)
    body = encode(Compacted(number, head.save_id, start, state))
    crash_point("compaction.before_create")
    await create_once(location.backend, _key(location, number), body)
    if location.uses_rename and await read_published(location) is not None:
        await drop_stray_staging(location)  # finalized meanwhile: this landed in a stray prefix
        return False
    return True


async def _compact_quietly(location: Location, number: int) -> bool:
    try:
        return await compact(location, number)
    except Exception as why:  # a cache: a failure only makes later readers read more
        _log.debug("compaction at record %s of %s failed: %s", number, location.path, why)
        return False


def schedule(location: Location, number: int) -> None:
    """After save record ``number`` committed: start its compaction if it is due.

    Runs in the background on the running loop; :func:`drain` waits for it.
    """
    if number % COMPACT_EVERY:
        return
    task = asyncio.get_running_loop().create_task(_compact_quietly(location, number))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def drain() -> None:
    """Wait for every compaction this process started (tests; a clean shutdown)."""
    while _tasks:
        await asyncio.gather(*list(_tasks), return_exceptions=True)


async def delete_before(location: Location, root: str, marker: int) -> None:
    """Delete the compaction objects under ``root`` of a session ended by discard ``marker``."""
    prefix = compact_prefix(location, root)
    for number in await _numbers(location.backend, prefix):
        if number < marker:
            await location.backend.delete(f"{prefix}/{number:08d}.json")
