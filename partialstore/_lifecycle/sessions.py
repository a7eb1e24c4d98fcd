"""Unfinalized sessions under a run's root: what they hold, and how idle they are.

A session is a step whose log holds records after its last discard marker
and whose checkpoint is not published: saves of a job that has not
finalized yet, or of one that died. ``sweep`` discards the idle ones with
the ordinary discard (its safety rules: never a finalized checkpoint, and
never a session a finalize has sealed).

Example:
    >>> import numpy as np
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from partialstore._lifecycle.manager import CheckpointManager
    >>> manager = CheckpointManager(tmp.name)
    >>> manager.save(5, {"w": np.zeros(4, np.float32)})
    >>> [(s.step, s.saves, s.nbytes) for s in manager.sessions()]
    [(5, 1, 16)]
    >>> [s.step for s in manager.sweep(older_than_s=0)]
    [5]
    >>> manager.sessions()
    []
    >>> manager.close()
    >>> tmp.cleanup()
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from collections.abc import Callable, Mapping, Sequence

from partialstore._commit import txlog
from partialstore._commit.location import STAGING_SUFFIX, Location
from partialstore._commit.records import LogRecord, SaveRecord
from partialstore._lifecycle.naming import StepNamer
from partialstore.errors import (
    CheckpointFinalizedError,
    InvalidInputError,
    NotFoundError,
)

__all__ = [
    "SessionInfo",
    "candidate_steps",
    "poll_for_step",
    "session_info",
    "sessions_of",
    "sweep_sessions",
]

_CONCURRENCY = 32


@dataclasses.dataclass(frozen=True)
class SessionInfo:
    """One unfinalized session of a run, as listed by ``CheckpointManager.sessions()``.

    Attributes:
      step: the step it will become.
      path: the checkpoint path (what ``partialstore.discard`` takes).
      age_s: seconds since its last committed record (a save, or the seal):
        how long it has been idle.
      saves: committed saves in it.
      nbytes: bytes of the arrays its saves hold (in memory, before any codec).
      sealed: a finalize sealed it and has not published yet (or died): run
        ``finalize`` to complete it; ``sweep`` leaves it alone.
    """

    step: int
    path: str
    age_s: float
    saves: int
    nbytes: int
    sealed: bool = False


def candidate_steps(names: list[str], namer: StepNamer, *, uses_rename: bool) -> list[int]:
    """The steps whose session may be under the root, from the root's child names.

    Example:
        >>> namer = StepNamer("s{step}")
        >>> candidate_steps(["s1", "s2.partial_save", "x"], namer, uses_rename=True)
        [2]
        >>> candidate_steps(["s1", "s2", "x"], namer, uses_rename=False)
        [1, 2]
    """
    found = set()
    for name in names:
        if uses_rename:
            if not name.endswith(STAGING_SUFFIX):
                continue
            name = name[: -len(STAGING_SUFFIX)]
        step = namer.parse(name)
        if step is not None:
            found.add(step)
    return sorted(found)


def _created(record: LogRecord) -> datetime.datetime | None:
    try:
        when = datetime.datetime.fromisoformat(str(record.created))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def _nbytes(record: SaveRecord) -> int:
    return sum(leaf.data.nbytes for leaf in record.leaves if leaf.data is not None)


async def session_info(step: int, location: Location, now: datetime.datetime) -> SessionInfo | None:
    """The session of ``step`` at ``location``, or ``None`` (none, or already published)."""
    session = txlog.session_of(await txlog.read_log(location.backend, location.log_prefix))
    if not session:
        return None
    sealed = any(txlog.is_seal(entry.record) for entry in session)
    if sealed and await location.backend.exists(location.manifest_key):
        return None  # published (the log stays in place where finalize does not rename)
    saves = [entry.record for entry in session if isinstance(entry.record, SaveRecord)]
    times = [when for entry in session if (when := _created(entry.record)) is not None]
    age = (now - max(times)).total_seconds() if times else 0.0
    return SessionInfo(
        step=step,
        path=location.path,
        age_s=max(0.0, age),
        saves=len(saves),
        nbytes=sum(_nbytes(record) for record in saves),
        sealed=sealed,
    )


async def sessions_of(locations: Mapping[int, Location]) -> list[SessionInfo]:
    """The sessions of the given steps, by step (read concurrently)."""
    now = datetime.datetime.now(datetime.UTC)
    limit = asyncio.Semaphore(_CONCURRENCY)

    async def one(step: int, location: Location) -> SessionInfo | None:
        async with limit:
            return await session_info(step, location, now)

    found = await asyncio.gather(*(one(s, loc) for s, loc in sorted(locations.items())))
    return [info for info in found if info is not None]


def sweep_sessions(
    sessions: Sequence[SessionInfo], older_than_s: object, discard: Callable[[str], None]
) -> list[SessionInfo]:
    """Discard (with ``discard(path)``) the unsealed sessions idle for ``older_than_s`` s or more.

    Returns those discarded; one finalized, sealed or discarded since it was
    listed is skipped (``discard`` refuses it).
    """
    if isinstance(older_than_s, bool) or not isinstance(older_than_s, int | float):
        raise InvalidInputError(f"older_than_s must be a number, got {older_than_s!r}.")
    if older_than_s < 0:
        raise InvalidInputError(f"older_than_s must be >= 0, got {older_than_s!r}.")
    swept = []
    for info in sessions:
        if info.sealed or info.age_s < older_than_s:
            continue
        try:
            discard(info.path)
        except (CheckpointFinalizedError, NotFoundError):
            continue
        swept.append(info)
    return swept


def poll_for_step(
    latest: Callable[[], int | None], after: int | None, timeout: float | None, *, where: str
) -> int:
    """Call ``latest()`` until it is newer than ``after``, backing off from 50 ms to 2 s.

    Example:
        >>> poll_for_step(lambda: 7, 5, timeout=1, where="run")
        7

    Raises:
      TimeoutError: ``timeout`` seconds passed first.
    """
    if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
        raise InvalidInputError(f"after must be a non-negative int or None, got {after!r}.")
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.05
    while True:
        step = latest()
        if step is not None and (after is None or step > after):
            return step
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(
                f"No step after {after} was finalized under {where} within {timeout} s."
            )
        time.sleep(delay if remaining is None else min(delay, remaining))
        delay = min(2.0, delay * 2)
