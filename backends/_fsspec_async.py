"""Await an fsspec async filesystem's coroutines from any event loop.

fsspec async filesystems (s3fs, gcsfs, ...) created with
``asynchronous=False`` run their aiohttp/aiobotocore sessions on fsspec's own
loop thread (``fs.loop``). Their ``_method`` coroutines must run on that loop;
awaiting them directly from another loop fails or, worse, binds the session to
the wrong loop. :func:`call` schedules the coroutine on ``fs.loop`` and awaits
the result from whatever loop the caller runs on, so a backend built on it
never binds itself to its first caller's loop (a rule of the Backend
contract). Cancelling the awaiting task cancels the work on ``fs.loop`` too.

A backend reads ``data = await call(fs, fs._cat_file, "bucket/key")``;
:func:`on_loop` shows the mechanism offline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["call", "on_loop"]

T = TypeVar("T")


async def on_loop(loop: asyncio.AbstractEventLoop, coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``coro_fn()`` on ``loop`` and await its result from the current loop.

    ``coro_fn`` is a zero-argument callable so the coroutine object is created
    where it runs (some libraries look up the running loop at creation).

    Example:
        >>> import asyncio
        >>> import fsspec.asyn
        >>> from partialstore._runtime.aio import run
        >>> loop = fsspec.asyn.get_loop()  # fsspec's IO thread, what ``fs.loop`` is
        >>> async def runs_on_fs_loop() -> bool:
        ...     return asyncio.get_running_loop() is loop
        >>> run(on_loop(loop, runs_on_fs_loop))
        True
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:  # pragma: no cover - coroutines always run in a loop
        running = None
    if running is loop:
        return await coro_fn()

    async def runner() -> T:
        return await coro_fn()

    future = asyncio.run_coroutine_threadsafe(runner(), loop)
    return await asyncio.wrap_future(future)


async def call(fs: Any, method: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
    """Await ``method(*args, **kwargs)`` (a coroutine method of ``fs``) on ``fs.loop``.

    A backend writes as ``await call(fs, fs._pipe_file, "bucket/key", b"data", mode="create")``;
    :func:`on_loop` has a runnable example.
    """
    return await on_loop(fs.loop, lambda: method(*args, **kwargs))
