"""One background event loop per process, so sync code can drive coroutines.

The public API is synchronous (``save``) or future-based (``save_async``);
the contract is async. Every coroutine partialstore runs goes through this
loop, which lives in a daemon thread, so calls from any thread (including
threads that already run their own loop, like Jupyter's) never nest loops.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from partialstore import registry
    >>> backend = registry.open_backend(f"{tmp.name}/root")
    >>> run(backend.create("log/00000001.json", b"{}"))
    >>> run(backend.read("log/00000001.json"))
    b'{}'
    >>> tmp.cleanup()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    """Return the process-wide background loop, starting it on first use."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            new_loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=new_loop.run_forever, name="partialstore-io", daemon=True
            )
            thread.start()
            _loop = new_loop
        return _loop


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the background loop and return a thread-safe future."""
    return asyncio.run_coroutine_threadsafe(coro, loop())


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the background loop and block until it finishes.

    Must not be called from the background loop itself (it would deadlock).
    """
    if _loop is not None and threading.current_thread().name == "partialstore-io":
        coro.close()
        raise RuntimeError("partialstore._runtime.aio.run called from the partialstore I/O loop.")
    return submit(coro).result(timeout)


async def settle_all(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """Like ``asyncio.gather``, but a failure is raised only once every write has settled.

    A write handed to a thread (local files) or to TensorStore goes on after
    the task awaiting it is cancelled, so a failed save that cleaned up at
    once could see its own late writes land after the cleanup (on local disk,
    inside a checkpoint a concurrent finalize just renamed into place). So
    the others are waited for, not cancelled; only a cancellation of this
    call cancels them.

    Example:
        >>> async def double(value: int) -> int:
        ...     return 2 * value
        >>> run(settle_all([double(1), double(2)]))
        [2, 4]
    """
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    results: list[T] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    return results
