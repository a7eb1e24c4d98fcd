"""Per-path ordering of saves and finalize inside one process.

Saves to one path commit in call order, and finalize waits for the saves
queued before it. Each operation is a task on the background loop that
first takes the path's FIFO lock; tasks start in submission order, so they
take it in call order too.

An operation may also have a ``prepare`` step that runs *before* its turn:
a save writes its array bytes while earlier saves still write or commit, and
only its commit (the log record) waits for the lock. At most
:data:`PIPELINE_DEPTH` prepares of one path run at once. On an object store
each commit costs a few requests in series (tens of milliseconds), which a
queue of ``save_async`` calls would otherwise pay with the store idle.

A save that fails is reported through its :class:`AsyncResponse`. If nobody
looked at that response before the next finalize of the path, finalize
raises the failure instead of publishing a checkpoint that silently lacks it.

Example:
    >>> order = []
    >>> async def step(number: int) -> None:
    ...     order.append(number)
    >>> first = schedule("doctest", lambda: step(1), track=False)
    >>> second = schedule("doctest", lambda: step(2), track=False)  # runs after the first
    >>> second.result()
    >>> order
    [1, 2]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, TypeVar, overload

from partialstore._runtime import aio
from partialstore._runtime.stats import OperationStats
from partialstore.errors import PartialStoreError

__all__ = [
    "PIPELINE_DEPTH",
    "AsyncResponse",
    "UnobservedSaveError",
    "raise_unobserved_failures",
    "schedule",
]

#: How many prepares (a save's array writes) of one path may run at once.
#: Two already hide a commit behind the next save's writes; four also keep
#: the store busy when saves are small (see benchmarks/README.md, "Figures
#: behind code decisions").
PIPELINE_DEPTH = 4

T = TypeVar("T")
P = TypeVar("P")


class UnobservedSaveError(PartialStoreError):
    """An earlier ``save_async`` to this path failed and its result was never read."""


class AsyncResponse:
    """Handle of a background save, as returned by :func:`partialstore.save_async`.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> response = partialstore.save_async(f"{tmp.name}/ckpt", {"step": 1})
        >>> # ... training goes on ...
        >>> response.result()  # raises what the save raised, if anything
        >>> response.done()
        True
        >>> tmp.cleanup()
    """

    def __init__(
        self, future: concurrent.futures.Future[None], outcome: _Outcome | None = None
    ) -> None:
        self._future = future
        self._outcome = outcome or _Outcome()
        self.observed = False
        self._stats: Callable[[], OperationStats | None] = lambda: None

    @property
    def stats(self) -> OperationStats | None:
        """The save's figures (:class:`partialstore.OperationStats`) once it committed, else None.

        Example:
            >>> import tempfile
            >>> tmp = tempfile.TemporaryDirectory()
            >>> import numpy as np
            >>> import partialstore
            >>> response = partialstore.save_async(f"{tmp.name}/ckpt", {"w": np.ones(8)})
            >>> response.result()
            >>> (response.stats.nbytes, response.stats.leaves)
            (64, 1)
            >>> tmp.cleanup()
        """
        return self._stats()

    def attach_stats(self, stats: Callable[[], OperationStats | None]) -> None:
        """Let :attr:`stats` read the save's figures from ``stats()``."""
        self._stats = stats

    def result(self, timeout: float | None = None) -> None:
        """Block until the save is committed; re-raise its error if it failed.

        The save's own errors come through unchanged, a ``TimeoutError``
        included (e.g. a multi-process job's coordination timing out); only
        when ``done()`` is still ``False`` did the wait itself time out.

        Example:
            >>> import asyncio
            >>> response = schedule("doctest", lambda: asyncio.sleep(0.5), track=False)
            >>> try:
            ...     response.result(timeout=0.01)
            ... except TimeoutError:
            ...     print("still saving" if not response.done() else "the save failed")
            still saving
            >>> response.result()

        Raises:
          TimeoutError: ``timeout`` seconds passed first (the save goes on),
            or the save itself raised it.
        """
        # Since Python 3.11 concurrent.futures.TimeoutError *is* TimeoutError,
        # so waiting with Future.result(timeout) would confuse a save that
        # failed with one for a wait that ran out: wait first, then ask.
        finished, _ = concurrent.futures.wait([self._future], timeout)
        if not finished:
            raise TimeoutError(
                f"Save did not finish within {timeout} s; it is still running. Call "
                "result() again to keep waiting."
            )
        self.observed = True
        failure = self.failure()
        if failure is not None:
            # The original: the future holds a copy of a TimeoutError made by
            # asyncio (no traceback, no cause).
            raise failure
        self._future.result()

    def done(self) -> bool:
        """Whether the save has finished (committed or failed)."""
        return self._outcome.settled or self._future.done()

    def failure(self) -> BaseException | None:
        """The save's exception once finished, else ``None``."""
        if self._outcome.settled:
            return self._outcome.failure
        if not self._future.done() or self._future.cancelled():
            return None
        return self._future.exception()


class _Outcome:
    """How an operation ended, recorded while it still holds its path's lock.

    The future returned to the caller only learns the outcome a loop
    iteration after the lock is released, when the next operation (a
    finalize looking for failed saves) may already run.
    """

    __slots__ = ("failure", "settled")

    def __init__(self) -> None:
        self.settled = False
        self.failure: BaseException | None = None

    async def watch(self, operation: Coroutine[Any, Any, T]) -> T:
        try:
            result = await operation
        except Exception as error:
            self.failure = error
            self.settled = True
            raise
        self.settled = True
        return result


_locks: dict[Hashable, asyncio.Lock] = {}  # touched only on the background loop
_prepare_slots: dict[Hashable, asyncio.Semaphore] = {}  # likewise
_responses: dict[Hashable, list[AsyncResponse]] = {}
_responses_lock = threading.Lock()


async def _ordered(
    key: Hashable,
    make: Callable[..., Coroutine[Any, Any, None]],
    prepare: Callable[[], Coroutine[Any, Any, object]] | None,
    outcome: _Outcome,
) -> None:
    lock = _locks.setdefault(key, asyncio.Lock())
    if prepare is None:
        async with lock:
            return await outcome.watch(make())
    # Start preparing now, then queue for the lock with no await in between,
    # so the lock (FIFO) is still taken in call order.
    prepared = asyncio.ensure_future(_prepare(key, prepare))
    try:
        async with lock:
            # make() awaits the prepare itself, so it handles the prepare's
            # failure exactly as a failure of its own first step.
            return await outcome.watch(make(prepared))
    finally:
        if not prepared.done():  # make() failed before waiting, or we were cancelled
            prepared.cancel()


async def _prepare(key: Hashable, prepare: Callable[[], Coroutine[Any, Any, P]]) -> P:
    slots = _prepare_slots.setdefault(key, asyncio.Semaphore(PIPELINE_DEPTH))
    async with slots:
        return await prepare()


@overload
def schedule(
    key: Hashable,
    make: Callable[[], Coroutine[Any, Any, None]],
    *,
    prepare: None = None,
    track: bool = True,
) -> AsyncResponse: ...


@overload
def schedule(
    key: Hashable,
    make: Callable[[Awaitable[P]], Coroutine[Any, Any, None]],
    *,
    prepare: Callable[[], Coroutine[Any, Any, P]],
    track: bool = True,
) -> AsyncResponse: ...


def schedule(
    key: Hashable,
    make: Callable[..., Coroutine[Any, Any, None]],
    *,
    prepare: Callable[[], Coroutine[Any, Any, object]] | None = None,
    track: bool = True,
) -> AsyncResponse:
    """Run ``make()`` on the background loop after all earlier work on ``key``.

    With ``prepare``, ``prepare()`` starts at once (at most
    :data:`PIPELINE_DEPTH` per key at a time) and ``make`` is called, in
    turn, with the task running it: ``make(prepared)`` awaits ``prepared``
    for its result or its exception.

    Example:
        >>> async def write_bytes() -> int:
        ...     return 3  # starts at once
        >>> async def commit(written) -> None:
        ...     print("committing", await written)  # after earlier work on the key
        >>> schedule("doctest", commit, prepare=write_bytes, track=False).result()
        committing 3
    """
    outcome = _Outcome()
    response = AsyncResponse(aio.submit(_ordered(key, make, prepare, outcome)), outcome)
    if track:
        with _responses_lock:
            # Keep only responses that may still turn into an unread failure.
            pending = [
                r
                for r in _responses.get(key, [])
                if not r.observed and not (r.done() and r.failure() is None)
            ]
            _responses[key] = [*pending, response]
    return response


def raise_unobserved_failures(key: Hashable) -> None:
    """Raise if a finished save on ``key`` failed and nobody read its result.

    Called by finalize after it has waited for the queue; each failure is
    reported once.
    """
    with _responses_lock:
        responses = _responses.pop(key, [])
    failures = [r.failure() for r in responses if not r.observed]
    failures = [f for f in failures if f is not None]
    for response in responses:
        response.observed = True
    if failures:
        raise UnobservedSaveError(
            f"{len(failures)} earlier save_async call(s) to this path failed and their results "
            f"were never read; the first failure: {failures[0]!r}. Nothing was finalized. "
            "Fix or repeat those saves, then call finalize again."
        ) from failures[0]
