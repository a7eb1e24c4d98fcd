"""Reading the transaction log: record keys, listings, and records checked for gaps.

:mod:`partialstore._commit.txlog` appends to the log and re-exports what is
here; finalize, compaction and discard read the log through these.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import partialstore
    >>> from partialstore._commit.location import resolve
    >>> from partialstore._runtime.aio import run
    >>> partialstore.save(f"{tmp.name}/ckpt", {"step": 1})  # appends record 1
    >>> location = resolve(f"{tmp.name}/ckpt")
    >>> run(list_numbers(location.backend, location.log_prefix))
    [1]
    >>> tmp.cleanup()
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

from partialstore._commit import records
from partialstore._commit.formats import LOG_VERSION, SEGMENTED_FROM_VERSION
from partialstore._commit.listing import list_after
from partialstore._commit.records import DiscardRecord, LogRecord, SealRecord
from partialstore.backend import Backend
from partialstore.errors import CorruptCheckpointError, NotFoundError

__all__ = [
    "NOTICE_NAME",
    "SEGMENT_DIGITS",
    "LogEntry",
    "LogTail",
    "is_discard",
    "is_seal",
    "list_numbers",
    "list_tail",
    "notice_key",
    "number_of_key",
    "read_entries",
    "read_log",
    "read_present",
    "read_range",
    "read_record",
    "record_key",
    "segment",
    "session_of",
    "version_after",
]

_NAME = re.compile(r"^(\d{8})\.json$")
_SEGMENTED_NAME = re.compile(r"^(\d+)/(\d{8})\.json$")
#: In a log of version 3, records from number ``10 ** SEGMENT_DIGITS`` (see
#: :func:`segment`) on are kept in folders of that many, named by the leading
#: digits of their numbers (``log/00012/00012345.json``), so that a listing of
#: the log's tail on a store without a listing from a key (a POSIX directory)
#: reads one folder, not the whole log. Below it, and in logs of versions 1
#: and 2, records are named ``log/NNNNNNNN.json`` (docs/format.md, "The log").
#: A folder's name being the leading digits of its records' names is what
#: makes a record's segmented key sort just before its flat one.
SEGMENT_DIGITS = 3


def segment() -> int:
    """The number from which a log of version 3 keeps records in folders (and their size).

    Example:
        >>> segment()
        1000
    """
    return int(10**SEGMENT_DIGITS)  # int: ** of ints is typed Any


#: The seal notice: written by finalize before its seal (log version 2). It
#: sorts after every record name, so every tail listing of the log shows it.
NOTICE_NAME = "seal-notice.json"
# Reading records is latency bound on object stores; bound the fan-out so a
# log of thousands of saves does not open thousands of connections at once.
_READ_CONCURRENCY = 64
# How often a reader lists again when records vanish under it (a concurrent discard).
_REREADS = 8


def record_key(log_prefix: str, number: int, version: int = LOG_VERSION) -> str:
    """Key of log record ``number`` in a log of ``version`` (see :data:`SEGMENT_DIGITS`).

    Example:
        >>> record_key("ck/log", 7), record_key("ck/log", 12345)
        ('ck/log/00000007.json', 'ck/log/00012/00012345.json')
        >>> record_key("ck/log", 12345, version=2)  # versions 1 and 2 keep one folder
        'ck/log/00012345.json'
    """
    name = f"{number:08d}"
    if version >= SEGMENTED_FROM_VERSION and number >= segment():
        return f"{log_prefix}/{name[:-SEGMENT_DIGITS]}/{name}.json"
    return f"{log_prefix}/{name}.json"


def number_of_key(key: str) -> int:
    """The number of the record at ``key`` (either naming, see :data:`SEGMENT_DIGITS`).

    Example:
        >>> number_of_key("log/00000007.json"), number_of_key("log/00012/00012345.json")
        (7, 12345)
    """
    return int(key.rsplit("/", 1)[-1].removesuffix(".json"))


def _keys_of(log_prefix: str, number: int) -> tuple[str, ...]:
    """Where record ``number`` may be, the likelier first (a log's version is not always known)."""
    segmented = record_key(log_prefix, number, SEGMENTED_FROM_VERSION)
    flat = record_key(log_prefix, number, 1)
    return (segmented, flat) if segmented != flat else (flat,)


def _number_of(name: str) -> int | None:
    """The record number a name under the log stands for, or ``None`` (not a record)."""
    match = _NAME.match(name)
    if match:
        return int(match.group(1))
    match = _SEGMENTED_NAME.match(name)
    if match:
        folder, digits = match.groups()
        if int(digits) >= segment() and folder == digits[:-SEGMENT_DIGITS]:
            return int(digits)
    return None


def notice_key(log_prefix: str) -> str:
    """Key of the log's seal notice (see :data:`NOTICE_NAME`)."""
    return f"{log_prefix}/{NOTICE_NAME}"


def is_seal(record: LogRecord) -> bool:
    """Whether ``record`` is the finalize seal."""
    return isinstance(record, SealRecord)


def is_discard(record: LogRecord) -> bool:
    """Whether ``record`` is a discard marker (the session before it is abandoned)."""
    return isinstance(record, DiscardRecord)


class LogEntry:
    """One decoded record and its position in the log."""

    __slots__ = ("number", "record")

    def __init__(self, number: int, record: LogRecord) -> None:
        self.number = number
        self.record = record


class LogTail:
    """What one listing of the log showed: record numbers, and whether a seal notice is there."""

    __slots__ = ("noticed", "numbers")

    def __init__(self, numbers: list[int], noticed: bool) -> None:
        self.numbers = numbers
        self.noticed = noticed


async def list_tail(backend: Backend, log_prefix: str, *, after: int = 0) -> LogTail:
    """The numbers of the records after record ``after`` (ascending), and the seal notice.

    With ``after``, only the tail of the log is listed (``start_after``), so
    the cost is what the tail holds; the notice sorts after every record, so
    every tail shows it.
    """
    found: set[int] = set()
    noticed = False
    # From the segmented key: it sorts before the flat one (``/`` before any
    # digit), so the listing holds the tail whatever the log's version (in a
    # log of version 1 or 2 also the few records of the same thousand before
    # ``after``, dropped here).
    start_after = record_key(log_prefix, after, SEGMENTED_FROM_VERSION) if after else None
    # list, not list_children: a backend may send a recursive listing
    # through a faster client (see backends/s3.py).
    for key in await list_after(backend, log_prefix, start_after):
        name = key[len(log_prefix) + 1 :]
        number = _number_of(name)
        if number is not None and number > after:
            found.add(number)
        noticed = noticed or name == NOTICE_NAME
    return LogTail(sorted(found), noticed)


async def list_numbers(backend: Backend, log_prefix: str, *, after: int = 0) -> list[int]:
    """Numbers of the records after record ``after`` (every record for 0), ascending.

    ``[]`` for no session. See :func:`list_tail`.
    """
    return (await list_tail(backend, log_prefix, after=after)).numbers


async def read_record(backend: Backend, log_prefix: str, number: int) -> LogRecord:
    """Record ``number``, wherever its log's version keeps it (see :data:`SEGMENT_DIGITS`).

    Raises:
      NotFoundError: it does not exist (any more).
    """
    *likelier, last = _keys_of(log_prefix, number)
    for key in likelier:
        try:
            return records.decode_record(key, await backend.read(key))
        except NotFoundError:
            pass  # a log of version 1 or 2 beyond segment() records: the flat name
    return records.decode_record(last, await backend.read(last))


async def read_entries(backend: Backend, log_prefix: str, numbers: Sequence[int]) -> list[LogEntry]:
    """Read the given records concurrently, in order.

    Raises:
      NotFoundError: one of them does not exist (any more).
    """
    found = await read_present(backend, log_prefix, numbers)
    missing = [number for number, entry in zip(numbers, found, strict=True) if entry is None]
    if missing:
        raise NotFoundError(f"Log record {missing[0]} of {log_prefix} no longer exists.")
    return [entry for entry in found if entry is not None]


async def read_range(
    backend: Backend, log_prefix: str, first: int, last: int
) -> list[LogEntry] | None:
    """Records ``first`` to ``last`` read by key, without a listing; ``None`` if one is missing.

    For a caller that knows record ``last`` exists (its own append, or this
    process's hint): the reads cost what a listing's follow-up reads cost, and
    no listing is paid (a LIST is a slower, pricier request than a GET on
    S3, and grows with the bucket on some servers). A missing record (a
    discard deleted it, or the hint is from another log) makes the caller
    read the log by listing instead.

    Raises:
      CorruptCheckpointError: a record is malformed.
    """
    found = await read_present(backend, log_prefix, range(first, last + 1))
    if any(entry is None for entry in found):
        return None
    return [entry for entry in found if entry is not None]


def version_after(previous: int | None) -> int:
    """The version of a record appended after one of version ``previous`` (``None``: first).

    A log keeps the version it was begun in (at least 2): a log of version 3
    holds records of version 3 only, and one begun before holds none. That
    is what keeps older writers out of a log of version 3 (they must read a
    record of it before they append, and they refuse it), and what tells
    where a record of any number is (docs/protocol.md, "Log version 3").

    Example:
        >>> version_after(None), version_after(3), version_after(2), version_after(1)
        (3, 3, 2, 2)
    """
    if previous is None or previous >= SEGMENTED_FROM_VERSION:
        return LOG_VERSION
    return 2


def session_of(entries: Sequence[LogEntry]) -> list[LogEntry]:
    """The records of the live session: those after the last discard marker."""
    for index in range(len(entries) - 1, -1, -1):
        if is_discard(entries[index].record):
            return list(entries[index + 1 :])
    return list(entries)


def _check_dense(
    log_prefix: str, numbers: Sequence[int], entries: Sequence[LogEntry], first: int = 1
) -> None:
    """Raise if records are missing where the protocol never deletes any."""
    last_marker = max((e.number for e in entries if is_discard(e.record)), default=0)
    live = [n for n in numbers if n > last_marker]
    expected = last_marker + 1 if last_marker else first
    version = max((e.record.version for e in entries), default=LOG_VERSION)  # the log's
    for number in live:
        if number != expected:
            raise CorruptCheckpointError(
                f"Log record {record_key(log_prefix, expected, version)} is missing (the log "
                f"goes on at {record_key(log_prefix, number, version)}): a committed save was "
                "deleted or never copied. The session cannot be finalized as it is."
            )
        expected += 1


async def read_log(
    backend: Backend, log_prefix: str, *, first: int = 1, last: int | None = None
) -> list[LogEntry]:
    """Every record of the log in log order, checked for gaps; ``[]`` for no log.

    Records before the last discard marker may vanish while this reads (the
    discard deletes them): it then lists again. A gap after the last marker,
    or missing first records with no marker, is damage. ``first`` and
    ``last`` read only the records from ``first`` (listing only the log's
    tail) up to ``last``; the records read must then start at ``first``,
    unless a discard marker among them starts the session later.

    Raises:
      CorruptCheckpointError: a record is missing or malformed.
    """
    for attempt in range(_REREADS):
        numbers = await list_numbers(backend, log_prefix, after=first - 1)
        numbers = [n for n in numbers if last is None or n <= last]
        found = await read_present(backend, log_prefix, numbers)
        entries = [entry for entry in found if entry is not None]
        last_marker = max((e.number for e in entries if is_discard(e.record)), default=0)
        # Records below the last marker may vanish (that discard deletes them);
        # one above it vanished because a newer discard came: list again.
        pairs = zip(numbers, found, strict=True)
        if all(entry is not None or n < last_marker for n, entry in pairs):
            present = [e.number for e in entries]
            _check_dense(log_prefix, present, entries, first)
            return entries
        await asyncio.sleep(0.01 * 2**attempt)
    raise CorruptCheckpointError(
        f"Log records under {log_prefix} kept vanishing while being read, and no discard "
        "explains it. Is another tool deleting them?"
    )


async def read_present(
    backend: Backend, log_prefix: str, numbers: Sequence[int]
) -> list[LogEntry | None]:
    """Read the given records concurrently; ``None`` for one that no longer exists."""
    limit = asyncio.Semaphore(_READ_CONCURRENCY)

    async def one(number: int) -> LogEntry | None:
        async with limit:
            try:
                return LogEntry(number, await read_record(backend, log_prefix, number))
            except NotFoundError:
                return None

    return list(await asyncio.gather(*(one(n) for n in numbers)))
