"""The append-only transaction log of a partial-save session.

Each committed save is one record ``log/NNNNNNNN.json``; finalize appends a
seal record, and discard a discard marker. Records are appended with the
backend's atomic ``create`` at the next free number (list, take max+1; a
loser of a race goes on after the record it read back), so the log is
dense: number k is only ever created by a writer that saw k-1. A writer
lists only the log's tail after the last record it saw
(:mod:`partialstore._commit.loghints`), so an append costs the same however
long the log is; a loser of a race waits a pause sized by the contention seen
(:mod:`partialstore._commit.contention`). Hence nothing can be appended after a
seal, and every record before the seal is in the checkpoint. This is the
commit point of saves, finalize and discard alike, and what makes them
linearizable across processes and hosts.

A writer must know the kind of the record it appends after (nothing may
follow a seal). In a log of version 2 a save need not read it: a finalize
writes the log's seal notice before its seal, and once a version-2 record
is in the log, every record after it is of version 2 (a version-1 writer
refuses to append after one). So a save whose listing shows a version-2
record it knows and no notice knows that no seal is among the records
listed (docs/protocol.md, "Seal notices").

The session is the records after the last discard marker. A discard
appends its marker first, then deletes the records before it and the data
they name; readers ignore (and tolerate gaps in) everything before the last
marker, and treat a gap after it as damage. Saves may follow a marker (they
start a new session); a seal may not directly follow one (nothing to
finalize). Every record carries a fresh id, so a create whose answer was
lost is recognised by reading it back (:mod:`partialstore._commit.exclusive`).

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import partialstore
    >>> from partialstore._commit.location import resolve
    >>> from partialstore._runtime.aio import run
    >>> partialstore.save(f"{tmp.name}/ckpt", {"step": 1})  # appends record 1
    >>> location = resolve(f"{tmp.name}/ckpt")
    >>> entries = run(read_log(location.backend, f"{location.staging_prefix}/log"))
    >>> [(entry.number, entry.record.kind) for entry in entries]
    [(1, 'save')]
    >>> tmp.cleanup()
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import NamedTuple

from partialstore._commit import contention, loghints, records
from partialstore._commit.exclusive import Created, create_or_read
from partialstore._commit.formats import LOG_FORMAT, LOG_VERSION
from partialstore._commit.logread import (
    LogEntry,
    LogTail,
    is_discard,
    is_seal,
    list_numbers,
    list_tail,
    notice_key,
    number_of_key,
    read_entries,
    read_log,
    read_range,
    read_record,
    record_key,
    session_of,
    version_after,
)
from partialstore._commit.records import DiscardRecord, LogRecord, SaveRecord, SealRecord
from partialstore.backend import Backend
from partialstore.errors import (
    BackendError,
    CheckpointFinalizedError,
    CorruptCheckpointError,
    NotFoundError,
    OutcomeUnknownError,
    SessionDiscardedError,
)

__all__ = [
    "FORMAT",
    "UNSEALED",
    "VERSION",
    "AppendStart",
    "Appended",
    "LogEntry",
    "append",
    "has_session",
    "is_discard",
    "is_seal",
    "list_numbers",
    "look_ahead",
    "notice_key",
    "number_of_key",
    "read_entries",
    "read_log",
    "read_range",
    "record_key",
    "session_of",
    "version_after",
]

FORMAT = LOG_FORMAT
VERSION = LOG_VERSION
SAVE, SEAL, DISCARD = SaveRecord.kind, SealRecord.kind, DiscardRecord.kind
#: The kind a save gives a record it did not read but knows is no seal (a
#: save or a discard marker): see :func:`_unsealed`.
UNSEALED = "unsealed"
#: How long a save may create by a look taken before its data was written
#: (seconds). A discard that lands its marker and deletes records between the
#: look and the create can take a number back from under the look, and the
#: save then lands below the marker (docs/protocol.md, "Concurrent discards");
#: an older look is taken again, so that window stays about as short as a
#: listing followed by a create, whatever the size of the upload.
LOOK_FRESH_S = 1.0


async def _read_or_none(backend: Backend, log_prefix: str, number: int) -> LogRecord | None:
    """Record ``number``; ``None`` if it no longer exists."""
    try:
        record = await read_record(backend, log_prefix, number)
    except NotFoundError:
        return None
    contention.note_rival(backend, log_prefix, record.writer)
    return record


async def _kind_of(backend: Backend, log_prefix: str, number: int) -> str | None:
    """The kind of record ``number``; ``None`` if it no longer exists."""
    record = await _read_or_none(backend, log_prefix, number)
    return None if record is None else record.kind


class _Seen:
    """What an append knows of the log's records: their kinds and format versions.

    Records are immutable, so what was seen of one stays true.
    """

    __slots__ = ("kinds", "versions")

    def __init__(self, entries: Sequence[LogEntry] = ()) -> None:
        self.kinds = {e.number: e.record.kind for e in entries}
        self.versions = {e.number: e.record.version for e in entries}

    def note(self, number: int, kind: str, version: int) -> None:
        self.kinds[number] = kind
        self.versions[number] = version

    def newest_known(self, numbers: Sequence[int]) -> int:
        """The highest version among the records of ``numbers`` this append knows (0: none)."""
        return max((self.versions[n] for n in numbers if n in self.versions), default=0)


def _unsealed(tail: LogTail, seen: _Seen) -> bool:
    """Whether no record of ``tail`` can be a seal, without reading any.

    True when the listing showed no seal notice and a record of version 2
    or later this append knows: every record after it is then of version 2
    or later, and such a finalize writes the notice before its seal, so a
    seal among the records listed would have shown its notice in the same
    listing.
    """
    return not tail.noticed and seen.newest_known(tail.numbers) >= 2


async def has_session(backend: Backend, log_prefix: str) -> bool:
    """Whether a session is open (or sealed): the log's last record is not a discard marker.

    One listing and one read, whatever the log's length: the session is the
    records after the last marker, so it is empty exactly when the last
    record is a marker (or there is none).
    """
    numbers = await list_numbers(backend, log_prefix)
    if not numbers:
        return False
    try:
        kind = await _kind_of(backend, log_prefix, numbers[-1])
    except CorruptCheckpointError:
        return True  # something is there; finalize will say what is wrong with it
    return kind != DISCARD


async def _discarded_after(backend: Backend, log_prefix: str, number: int) -> bool:
    """Whether a discard marker follows record ``number``."""
    for other in await list_numbers(backend, log_prefix, after=number):
        if await _kind_of(backend, log_prefix, other) == DISCARD:
            return True
    return False


async def _discarded_after_or_unknown(backend: Backend, log_prefix: str, number: int) -> bool:
    """:func:`_discarded_after`, for a record that landed: a failure to look is unknown."""
    try:
        return await _discarded_after(backend, log_prefix, number)
    except BackendError as error:
        raise OutcomeUnknownError(
            f"Log record {number} of {log_prefix} landed after a lost answer, but "
            f"whether a discard removed its session meanwhile could not be checked: {error}"
        ) from error


def _refuse(kind: str, what: str, log_prefix: str, last: int) -> None:
    if kind == SEAL:
        raise CheckpointFinalizedError(
            f"Cannot append the {what} record to {log_prefix}: the session was "
            f"finalized by log record {last}. Save to a new path."
        )
    if kind == DISCARD and what != SAVE:
        raise NotFoundError(
            f"Cannot append the {what} record to {log_prefix}: the session was discarded "
            f"by log record {last}, and no save has started a new one."
        )


def _discarded_in_flight(what: str, log_prefix: str) -> SessionDiscardedError:
    return SessionDiscardedError(
        f"The session under {log_prefix} was discarded while this {what} was being "
        f"committed; the {what} is not part of any session. Repeat it to start a new session."
    )


async def _tail_from(backend: Backend, log_prefix: str, number: int) -> LogTail | None:
    """Record ``number`` and those after it, as listed; ``None`` if ``number`` is gone."""
    tail = await list_tail(backend, log_prefix, after=number - 1)
    return tail if tail.numbers and tail.numbers[0] == number else None


def _unlisted(numbers: list[int]) -> LogTail:
    """A tail known without a listing: whether a notice is there is not known."""
    return LogTail(numbers, noticed=True)


async def _start(
    backend: Backend,
    log_prefix: str,
    what: str,
    known: Sequence[LogEntry],
    seen: _Seen,
    called: float | None = None,
) -> LogTail:
    """The numbers an append starts from: the caller's records, the tail after a hint, or all.

    A save on a log where rivals were seen first waits its pause
    (:func:`partialstore._commit.contention.pause`). A save ``called``
    before this process created the hinted record starts right after it
    (:func:`partialstore._commit.loghints.created_since`). Otherwise a hint is
    used only when its record still exists: the tail listing from it then
    shows the log's end exactly as a full listing would. A hint whose record
    is gone (a discard deleted it, or the log moved or was deleted) is
    dropped, and the whole log is listed as before.
    """
    if what == SAVE:  # after others on a contended log, not ahead of them (see contention)
        await asyncio.sleep(contention.pause(backend, log_prefix))
    numbers = [e.number for e in known]
    if numbers and seen.kinds.get(numbers[-1]) == SAVE:
        return _unlisted(numbers)
    own = None if called is None else loghints.created_since(backend, log_prefix, called)
    if what == SAVE and not known and own is not None:
        seen.note(own.number, SAVE, own.version)
        return _unlisted([own.number])
    hint = loghints.recall(backend, log_prefix) if what == SAVE and not known else None
    if hint is not None:
        # A listing, not an existence check of the hinted record: while a discard
        # deletes the records below its marker, the hinted record may still be
        # there when the next ones are gone, and a create after it would land
        # below the marker. The listing shows the marker, which is never deleted.
        tail = await _tail_from(backend, log_prefix, hint.number)
        if tail is not None:
            seen.note(hint.number, hint.kind, hint.version)  # still right: records are immutable
            return tail
        loghints.forget(backend, log_prefix)
    return await list_tail(backend, log_prefix)


async def _after_conflict(
    backend: Backend,
    log_prefix: str,
    numbers: list[int],
    taken: int,
    theirs: bytes | None,
    seen: _Seen,
    conflicts: int,
    version: int,
) -> LogTail:
    """Where an append looks next after another writer took number ``taken``.

    ``theirs`` is that writer's record, read back by the create (at the key
    of a record of ``version``): this writer
    has seen ``taken``. Among rivals it first waits a random pause sized by
    the contention seen (:func:`partialstore._commit.contention.pause`), so
    losers spread out rather than all try ``taken + 1`` at once (a short
    one after :data:`~partialstore._commit.contention.PRIORITY_AFTER` losses
    in a row), and then lists the tail from ``taken``: the read-back is stale
    by then. However short the pause, it lists: rivals append while the
    create fails and its read-back comes, so a loser that tried ``taken + 1``
    from the read-back would chase the log's end one number behind. With no rival
    seen (the winner was this process), it tries ``taken + 1`` at once,
    without a listing.
    """
    if theirs is None:  # taken, then deleted by a discard: look at the whole log again
        return await list_tail(backend, log_prefix)
    record = records.decode_record(record_key(log_prefix, taken, version), theirs)
    seen.note(taken, record.kind, record.version)
    loghints.remember(backend, log_prefix, taken, record.kind, version=record.version)
    contention.note_rival(backend, log_prefix, record.writer)
    # A seal or marker decides at once (refused, or a new session after it).
    if record.kind != SAVE or not contention.contended(backend, log_prefix):
        return _unlisted([*numbers, taken])  # as close to the read-back as a listing
    # What was read back is stale: a create after it could even land where a
    # discard has just deleted records below its marker. Look again.
    await asyncio.sleep(contention.pause(backend, log_prefix, lost=conflicts))
    tail = await _tail_from(backend, log_prefix, taken)
    if tail is None:
        return await list_tail(backend, log_prefix)
    return LogTail([*numbers, *tail.numbers], tail.noticed)


class AppendStart:
    """Where an append begins: the log's tail it saw, what it knows of it, and when it looked."""

    __slots__ = ("looked", "seen", "tail")

    def __init__(self, tail: LogTail, seen: _Seen, looked: float) -> None:
        self.tail = tail
        self.seen = seen
        self.looked = looked  # time.monotonic() when the look began

    def fresh(self) -> bool:
        """Whether a create may still go by this look (see :data:`LOOK_FRESH_S`)."""
        return time.monotonic() - self.looked <= LOOK_FRESH_S


async def look_ahead(
    backend: Backend,
    log_prefix: str,
    *,
    what: str = SAVE,
    known: Sequence[LogEntry] = (),
    called: float | None = None,
) -> AppendStart:
    """Find where an append of a ``what`` record begins, before the record is ready.

    A save runs this while its data uploads, so that only the create is left
    once the data is there: a record must never name data that is not
    there, but nothing orders the look before it. The look may be stale by
    the time of the create, which then meets the records appended since
    and goes on after them, as after any race (:func:`append`). ``called``
    is when the save was called (``time.monotonic()``): if this process
    created the log's last record after that, the look needs no request.

    Example:
        >>> from partialstore.backends.memory import MemoryBackend
        >>> from partialstore._runtime.aio import run
        >>> backend = MemoryBackend("memory://look-ahead-example", {})
        >>> start = run(look_ahead(backend, "ck/log"))  # an empty log: record 1 is next
        >>> record = SaveRecord("0" * 32, None, None, None, [], [])
        >>> appended = run(append(backend, "ck/log", record, start=start))
        >>> appended.number, appended.numbers, appended.record.version
        (1, [], 3)
    """
    looked = time.monotonic()
    seen = _Seen(known)
    tail = await _start(backend, log_prefix, what, known, seen, called)
    return AppendStart(await _with_last_kind(backend, log_prefix, tail, seen, what), seen, looked)


async def _with_last_kind(
    backend: Backend, log_prefix: str, tail: LogTail, seen: _Seen, what: str
) -> LogTail:
    """``tail``, once the kind of its last record is in ``seen`` (read if need be).

    A save that knows no seal can be in the tail (:func:`_unsealed`) notes
    the last record as :data:`UNSEALED` without reading it. A last record
    that vanished (a discard deleted it under us) sends the look to the
    whole log again.
    """
    while tail.numbers and tail.numbers[-1] not in seen.kinds:
        last = tail.numbers[-1]
        if what == SAVE and _unsealed(tail, seen):
            # After a record of version 2 or 3: of that version too (version_after).
            seen.note(last, UNSEALED, seen.newest_known(tail.numbers))
            break
        record = await _read_or_none(backend, log_prefix, last)
        if record is None:
            tail = await list_tail(backend, log_prefix)
            continue
        seen.note(last, record.kind, record.version)
    return tail


async def _create_noted(
    backend: Backend, log_prefix: str, number: int, record: LogRecord, data: bytes
) -> tuple[Created, bool, bytes | None]:
    """Create ``record`` (encoded as ``data``) as number ``number``, noting its round trip.

    Its key is that of a record of its version (:func:`record_key`); see
    :func:`create_or_read` for what comes back.
    """
    key = record_key(log_prefix, number, record.version)
    started = time.monotonic()
    outcome, clean, theirs = await create_or_read(backend, key, data)
    round_trip = time.monotonic() - started
    contention.note_round_trip(backend, log_prefix, round_trip)
    return outcome, clean, theirs


class Appended(NamedTuple):
    """What :func:`append` did: the number it took, the numbers before it, and the record."""

    number: int
    #: Every number before ``number`` when the caller's records or a full
    #: listing was the start (seals and discards always); only those from the
    #: hint on when a save started from a hint.
    numbers: list[int]
    #: The record as written: its ``version`` is the log's (:func:`version_after`).
    record: LogRecord


async def append(
    backend: Backend,
    log_prefix: str,
    record: LogRecord,
    *,
    known: Sequence[LogEntry] = (),
    start: AppendStart | None = None,
) -> Appended:
    """Append ``record`` as the next record of the log.

    ``known`` are records the caller has just read (in log order); when the
    last of them is a save, the first attempt goes straight to the number
    after it, saving a list and a read. Otherwise a save starts from this
    process's hint (:mod:`~partialstore._commit.loghints`): it lists only the
    tail of the log from the last record it saw. ``start`` is that beginning
    found ahead by :func:`look_ahead` (a save looks while its data uploads).
    A create whose answer was lost counts as appended when the record read
    back is ours. The record is written in the version of the record it goes
    after (:func:`version_after`), whatever version it came with.

    Raises:
      CheckpointFinalizedError: the log is sealed (a finalize committed first).
      NotFoundError: a seal or discard meets a discarded session (nothing to act on).
      SessionDiscardedError: a discard removed this record's session while it was
        being appended (only after a lost answer).
      OutcomeUnknownError: the store kept failing, so whether it landed is unknown.
    """
    what = record.kind
    if start is None or not start.fresh():
        start = await look_ahead(backend, log_prefix, what=what, known=known)
    tail, seen = start.tail, start.seen
    conflicts = 0
    versions = records.Versioned(record)
    while True:
        tail = await _with_last_kind(backend, log_prefix, tail, seen, what)
        numbers = tail.numbers
        last = numbers[-1] if numbers else 0
        if last:
            kind = seen.kinds[last]
            loghints.remember(backend, log_prefix, last, kind, version=seen.versions[last])
            _refuse(kind, what, log_prefix, last)
        ours, data = versions.of(version_after(seen.versions[last] if last else None))
        outcome, clean, theirs = await _create_noted(backend, log_prefix, last + 1, ours, data)
        if outcome is Created.MINE:
            # After an inconclusive answer our record may have landed, been
            # deleted by a discard, and been created again below its marker.
            if not clean and await _discarded_after_or_unknown(backend, log_prefix, last + 1):
                raise _discarded_in_flight(what, log_prefix)
            loghints.remember(
                backend, log_prefix, last + 1, what, version=ours.version, created=True
            )
            return Appended(last + 1, numbers, ours)
        if outcome is Created.VANISHED and what == SAVE:
            # The number was taken and then deleted by a discard; it may have
            # been our own record, whose data the discard then deleted.
            raise _discarded_in_flight(what, log_prefix)
        conflicts += 1
        tail = await _after_conflict(
            backend, log_prefix, numbers, last + 1, theirs, seen, conflicts, ours.version
        )
