"""The append-only transaction log of a partial-save session.

Each committed save is one record ``log/NNNNNNNN.json``; finalize appends a
seal record. Records are appended with the backend's atomic ``create`` at the
next free number (list, take max+1, retry on ``AlreadyExistsError``), so the
log is dense: number k is only ever created by a writer that saw k-1. Hence
nothing can be appended after a seal, and every record before the seal is in
the checkpoint. This is the commit point of saves and finalize alike, and
what makes them linearizable across processes and hosts.

Example::

    number = await append(backend, "ckpt/log", save_record_bytes)
    records = await read_all(backend, "ckpt/log")
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from partialstore.backend import Backend
from partialstore.errors import (
    AlreadyExistsError,
    CheckpointFinalizedError,
    CorruptCheckpointError,
    NotFoundError,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "LogEntry",
    "append",
    "decode_versioned",
    "encode_record",
    "is_seal",
    "list_numbers",
    "paused_gc",
    "read_all",
]

FORMAT = "partialstore.log"
VERSION = 1
_NAME = re.compile(r"^(\d{8})\.json$")
# Reading records is latency bound on object stores; bound the fan-out so a
# log of thousands of saves does not open thousands of connections at once.
_READ_CONCURRENCY = 64


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small objects.

    Merging 10^4 leaf entries allocates enough containers to trigger full
    collections, each of which walks every object of the process (JAX's
    included): measured, that tripled the cost of a 6,000-leaf merge. The
    objects built here hold no cycles, so nothing is lost by waiting.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def record_key(log_prefix: str, number: int) -> str:
    """Key of log record ``number`` (1-based, 8 digits so names sort numerically)."""
    return f"{log_prefix}/{number:08d}.json"


def encode_record(record: dict[str, Any]) -> bytes:
    """Serialize a record deterministically (sorted keys, no whitespace)."""
    body = {"format": FORMAT, "version": VERSION, **record}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def decode_versioned(data: bytes, *, what: str, fmt: str, version: int) -> dict[str, Any]:
    """Parse a JSON object of format ``fmt`` and version ``version``; ``what`` names it.

    Shared by log records and manifests. The GC is paused: a manifest or
    record of 10^4 leaves is many small objects (see :func:`paused_gc`).

    Raises:
      CorruptCheckpointError: not JSON, another format, or another version.
    """
    try:
        with paused_gc():
            body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(f"{what} is not valid JSON: {error}.") from error
    if not isinstance(body, dict) or body.get("format") != fmt:
        raise CorruptCheckpointError(f"{what} is not a {fmt} object.")
    if body.get("version") != version:
        raise CorruptCheckpointError(
            f"{what} has format version {body.get('version')!r}; this partialstore "
            f"reads version {version}. Upgrade partialstore to read it."
        )
    return body


def decode_record(key: str, data: bytes) -> dict[str, Any]:
    """Parse and check one record; raise :class:`CorruptCheckpointError` if malformed.

    The checks live in :func:`partialstore.records.decode_record`.
    """
    from partialstore import records  # records builds on this module

    return records.decode_record(key, data)


def is_seal(record: dict[str, Any]) -> bool:
    """Whether ``record`` is the finalize seal."""
    return record.get("kind") == "finalize"


class LogEntry:
    """One decoded record and its position in the log."""

    __slots__ = ("number", "record")

    def __init__(self, number: int, record: dict[str, Any]) -> None:
        self.number = number
        self.record = record


async def list_numbers(backend: Backend, log_prefix: str) -> list[int]:
    """Numbers of every record in the log, ascending; ``[]`` for no session."""
    numbers = []
    # list, not list_children: the log is flat, and a backend may send a
    # recursive listing through a faster client (see backends/s3.py).
    for key in await backend.list(log_prefix):
        match = _NAME.match(key[len(log_prefix) + 1 :])
        if match:
            numbers.append(int(match.group(1)))
    numbers.sort()
    return numbers


async def _read(backend: Backend, log_prefix: str, number: int) -> dict[str, Any]:
    key = record_key(log_prefix, number)
    return decode_record(key, await backend.read(key))


async def read_entries(backend: Backend, log_prefix: str, numbers: Sequence[int]) -> list[LogEntry]:
    """Read the given records concurrently, in order."""
    limit = asyncio.Semaphore(_READ_CONCURRENCY)

    async def one(number: int) -> LogEntry:
        async with limit:
            return LogEntry(number, await _read(backend, log_prefix, number))

    return list(await asyncio.gather(*(one(n) for n in numbers)))


async def read_all(backend: Backend, log_prefix: str) -> list[LogEntry]:
    """Every record of the log, in log order."""
    return await read_entries(backend, log_prefix, await list_numbers(backend, log_prefix))


async def append(
    backend: Backend,
    log_prefix: str,
    data: bytes,
    *,
    what: str = "save",
    known: Sequence[LogEntry] = (),
) -> tuple[int, list[int]]:
    """Append ``data`` as the next record; return its number and the numbers before it.

    ``known`` are records the caller has just read (in log order); when the
    last of them is a save, the first attempt goes straight to the number
    after it, saving a list and a read.

    Raises:
      CheckpointFinalizedError: the log is sealed (a finalize committed first).
    """
    known_saves = {e.number for e in known if not is_seal(e.record)}  # records are immutable
    numbers = [e.number for e in known]
    if not (numbers and numbers[-1] in known_saves):
        numbers = await list_numbers(backend, log_prefix)
    while True:
        last = numbers[-1] if numbers else 0
        if last and last not in known_saves:
            try:
                last_record = await _read(backend, log_prefix, last)
            except NotFoundError:
                numbers = await list_numbers(backend, log_prefix)
                continue  # the session was discarded under us; look again
            if is_seal(last_record):
                raise CheckpointFinalizedError(
                    f"Cannot append the {what} record to {log_prefix}: the session was "
                    f"finalized by log record {last}. Save to a new path."
                )
            known_saves.add(last)
        try:
            await backend.create(record_key(log_prefix, last + 1), data)
        except AlreadyExistsError:
            numbers = await list_numbers(backend, log_prefix)
            continue  # another writer took this number; look again
        return last + 1, numbers
