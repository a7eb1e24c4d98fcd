"""Faults at the Backend contract: a wrapper that fails, loses, delays or holds calls.

:class:`FaultyBackend` wraps any real :class:`~partialstore.backend.Backend`
and forwards every call to it, except where a :class:`BackendFault` says
otherwise. A fault matches on the method name (``create``, ``read``,
``read_versioned``, ``write``, ``exists``, ``list``, ``list_children``,
``delete``, ``delete_prefix``, ``rename``) and a regex on the key (the
prefix for listings and deletes of a prefix, the source for ``rename``);
``skip`` lets the first N matches through and ``times`` is how many it fires
on (``None``: every one). Actions:

- :func:`before`: raise :class:`TransientBackendError` without applying;
- :func:`after`: apply, then raise it (a lost response);
- :func:`after_as_retry`: apply, then answer what a client's retry would see,
  by making the same call again: ``create`` -> :class:`AlreadyExistsError`,
  ``rename`` -> :class:`NotFoundError`, ``delete`` -> ``None``;
- :func:`latency`, :func:`hang` (wait until :meth:`Rule.release` or
  cancellation, then go on) and :func:`call` (run a hook before or after
  the call): these hold the call and let later rules act.

The wrapper keeps the inner backend's capabilities and passes
``kvstore_spec`` and ``tensorstore_context`` through, so where the inner
backend has a TensorStore kvstore (local, S3, GCS) array bytes go from
TensorStore to the store directly, past the wrapper: only the log, the
manifest, packed small leaves and ``zarr.json`` reads it handles itself see
faults there. On the memory backend (no kvstore) every byte passes through.
Faults on array bytes of a real store belong to
:mod:`partialstore.testing.faultproxy`.

:func:`install_faulty` makes a wrapped backend reachable by URL, so the
public API (``partialstore.save(url + "/ck", ...)``) goes through it.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import partialstore
    >>> url, faulty = install_faulty(f"{tmp.name}/root")
    >>> rule = faulty.add(BackendFault(after(), method="create", key=r"/log/"))
    >>> partialstore.save(url + "/ck", {"a": 1})  # record landed, answer lost: read back, fine
    >>> rule.fired, [record.outcome for record in faulty.calls("create", key=r"/log/")]
    (1, ['error'])
    >>> partialstore.finalize(url + "/ck")
    >>> partialstore.load(f"{tmp.name}/root/ck")  # the inner store holds the checkpoint
    {'a': 1}
    >>> tmp.cleanup()
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import inspect
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, TypeVar

from partialstore import registry
from partialstore.backend import Backend, Capabilities, join_key
from partialstore.errors import InvalidInputError, TransientBackendError
from partialstore.testing.faultrules import Rule, RuleHost

__all__ = [
    "BackendFault",
    "CallAction",
    "CallRecord",
    "FaultyBackend",
    "after",
    "after_as_retry",
    "before",
    "call",
    "hang",
    "install_faulty",
    "latency",
]

T = TypeVar("T")
_TERMINAL = ("before", "after", "after_as_retry")


@dataclasses.dataclass(frozen=True)
class CallAction:
    """What a backend fault does; build one with :func:`before`, :func:`after`, ..."""

    kind: str
    seconds: float = 0.0
    error: type[BaseException] = TransientBackendError
    hook: Callable[[CallRecord], Any] | None = None
    when: str = "before"

    @property
    def terminal(self) -> bool:
        """Whether the call's fate is decided (latency, hang and hooks let later rules act)."""
        return self.kind in _TERMINAL


def before(error: type[BaseException] = TransientBackendError) -> CallAction:
    """Raise ``error`` without applying the call; see :class:`FaultyBackend` for an example."""
    return CallAction("before", error=error)


def after(error: type[BaseException] = TransientBackendError) -> CallAction:
    """Apply the call, then raise ``error`` (a lost response); see the module example."""
    return CallAction("after", error=error)


def after_as_retry() -> CallAction:
    """Apply the call, then return or raise what the same call made again does.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> from partialstore import registry
        >>> from partialstore._runtime.aio import run
        >>> faulty = FaultyBackend(registry.open_backend(f"{tmp.name}/root"))
        >>> rule = faulty.add(BackendFault(after_as_retry(), method="create"))
        >>> run(faulty.create("k", b"x"))  # applied, then answered as its retry would be
        Traceback (most recent call last):
        partialstore.errors.AlreadyExistsError: ...
        >>> run(faulty.read("k"))
        b'x'
        >>> tmp.cleanup()
    """
    return CallAction("after_as_retry")


def latency(seconds: float) -> CallAction:
    """Sleep ``seconds`` before the call, e.g. ``BackendFault(latency(0.05), method="read")``."""
    return CallAction("latency", seconds=seconds)


def hang() -> CallAction:
    """Hold the call until the rule is released (then it goes on) or the task is cancelled.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> from partialstore._runtime.aio import submit
        >>> from partialstore import registry
        >>> from partialstore._runtime.aio import run
        >>> faulty = FaultyBackend(registry.open_backend(f"{tmp.name}/root"))
        >>> rule = faulty.add(BackendFault(hang(), method="create"))
        >>> future = submit(faulty.create("k", b"x"))
        >>> rule.wait(1, timeout=10), future.done()  # the create is hanging
        (True, False)
        >>> rule.release()
        >>> future.result(timeout=10)  # then it goes on
        >>> tmp.cleanup()
    """
    return CallAction("hang")


def call(fn: Callable[[CallRecord], Any], *, when: str = "before") -> CallAction:
    """Run ``fn(record)`` before the call, or after it returned (``when="after"``).

    A coroutine function is awaited on the caller's loop. A plain function runs
    in a worker thread, so it may block or use partialstore's synchronous API,
    e.g. finalize the checkpoint through the *inner* URL, as another process
    would (through the wrapper's URL, finalize queues behind the paused save).

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> from partialstore import registry
        >>> from partialstore._runtime.aio import run
        >>> faulty = FaultyBackend(registry.open_backend(f"{tmp.name}/root"))
        >>> seen = []
        >>> rule = faulty.add(
        ...     BackendFault(call(lambda record: seen.append(record.key), when="after"),
        ...                  method="create"))
        >>> run(faulty.create("log/00000001.json", b"{}"))
        >>> seen
        ['log/00000001.json']
        >>> tmp.cleanup()

        A test can finalize through the inner URL from such a hook, as another
        process would, right after a save's record landed.
    """
    if when not in ("before", "after"):
        raise InvalidInputError(f"call(..., when=) must be 'before' or 'after', got {when!r}.")
    return CallAction("call", hook=fn, when=when)


@dataclasses.dataclass(frozen=True)
class BackendFault:
    """A rule: which calls (method names, key regex) and what happens to them."""

    action: CallAction
    method: str | Collection[str] | None = None
    key: str | None = None
    skip: int = 0
    times: int | None = 1
    label: str | None = None

    def matches(self, record: CallRecord) -> bool:
        """Whether the call ``record`` is one this fault is about."""
        methods = {self.method} if isinstance(self.method, str) else self.method
        if methods is not None and record.method not in methods:
            return False
        return self.key is None or re.search(self.key, record.key) is not None

    def name(self) -> str:
        """The label shown in logs: ``label``, else the action's kind."""
        return self.label or self.action.kind


@dataclasses.dataclass
class CallRecord:
    """One call the wrapper saw. ``key`` is relative to the installed root.

    ``outcome`` is ``"pending"``, ``"ok"`` or ``"error"`` (then ``error`` names the
    exception type); ``detail`` has sizes, ranges, ``if_version`` or ``dst``.
    """

    index: int
    method: str
    key: str
    detail: dict[str, Any]
    faults: list[str] = dataclasses.field(default_factory=list)
    outcome: str = "pending"
    error: str | None = None
    started: float = 0.0
    duration: float | None = None


async def _run_hook(fn: Callable[[CallRecord], Any], record: CallRecord) -> None:
    if inspect.iscoroutinefunction(fn):
        await fn(record)
        return
    result = await asyncio.to_thread(fn, record)
    if inspect.isawaitable(result):
        await result


class FaultyBackend(RuleHost, Backend):
    """A real backend behind fault rules and a call log.

    Args:
      inner: the backend that does the work.
      url: the URL this wrapper answers for (default: ``inner.url``).

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> from partialstore import registry
        >>> from partialstore._runtime.aio import run
        >>> faulty = FaultyBackend(registry.open_backend(f"{tmp.name}/root"))
        >>> from partialstore.errors import TransientBackendError
        >>> rule = faulty.add(BackendFault(before(), method="write", times=2))
        >>> for _ in range(3):
        ...     try:
        ...         run(faulty.write("k", b"x"))
        ...         print("written")
        ...     except TransientBackendError:
        ...         print("refused")
        refused
        refused
        written
        >>> tmp.cleanup()
    """

    def __init__(self, inner: Backend, *, url: str | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.url = url or inner.url
        self.single_writer = inner.single_writer  # the inner backend's promise
        self._prefix = ""

    def _view(self, inner: Backend, url: str, prefix: str) -> FaultyBackend:
        """A wrapper of ``inner`` (rooted at ``prefix`` below this one) sharing rules and log."""
        view = FaultyBackend(inner, url=url)
        view._lock, view._rules, view._log, view._prefix = (
            self._lock,
            self._rules,
            self._log,
            prefix,
        )
        return view

    # -- log ----------------------------------------------------------------------

    def calls(self, method: str | None = None, key: str | None = None) -> list[CallRecord]:
        """The logged calls in order, optionally only ``method`` / key regex ``key``.

        Example:
            >>> import tempfile
            >>> tmp = tempfile.TemporaryDirectory()
            >>> from partialstore import registry
            >>> from partialstore._runtime.aio import run
            >>> faulty = FaultyBackend(registry.open_backend(f"{tmp.name}/root"))
            >>> run(faulty.create("ck/log/00000001.json", b"{}"))
            >>> [(c.method, c.key, c.outcome) for c in faulty.calls("create", key=r"/log/")]
            [('create', 'ck/log/00000001.json', 'ok')]
            >>> tmp.cleanup()
        """
        return self._records(BackendFault(CallAction("log"), method=method, key=key))

    # -- the faulty call ----------------------------------------------------------

    async def _call(
        self, method: str, key: str, run: Callable[[], Awaitable[T]], **detail: Any
    ) -> T:
        full_key, started = join_key(self._prefix, key), time.monotonic()
        record, fired = self._logged(
            lambda index: CallRecord(index, method, full_key, detail, started=started)
        )
        terminal = fired[-1].fault.action if fired and fired[-1].fault.action.terminal else None
        try:
            for rule in fired:
                await self._hold(rule, record, "before")
            if terminal is not None and terminal.kind == "before":
                raise self._injected(terminal, record, "before it was applied")
            result = await run()
            for rule in fired:
                await self._hold(rule, record, "after")
            if terminal is not None and terminal.kind == "after":
                raise self._injected(terminal, record, "after it was applied (response lost)")
            if terminal is not None and terminal.kind == "after_as_retry":
                result = await run()  # exactly what a client's retry would be answered
            record.outcome = "ok"
            return result
        except BaseException as err:
            record.outcome, record.error = "error", type(err).__name__
            raise
        finally:
            record.duration = time.monotonic() - record.started

    async def _hold(self, rule: Rule, record: CallRecord, when: str) -> None:
        action = rule.fault.action
        if action.kind == "latency" and when == "before":
            await asyncio.sleep(action.seconds)
        elif action.kind == "hang" and when == "before":
            while not rule.released.is_set():
                await asyncio.sleep(0.01)
        elif action.kind == "call" and action.when == when and action.hook is not None:
            await _run_hook(action.hook, record)

    def _injected(self, action: CallAction, record: CallRecord, when: str) -> BaseException:
        return action.error(
            f"Injected fault: {record.method} of {record.key!r} on {self.url} failed {when} "
            f"(FaultyBackend rule {record.faults[-1]!r}); retry the operation."
        )

    # -- the Backend contract -----------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    async def create(self, key: str, data: bytes) -> None:
        await self._call("create", key, lambda: self.inner.create(key, data), size=len(data))

    async def write(self, key: str, data: bytes, *, if_version: str | None = None) -> None:
        await self._call(
            "write",
            key,
            lambda: self.inner.write(key, data, if_version=if_version),
            size=len(data),
            if_version=if_version,
        )

    async def read(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        return await self._call(
            "read", key, lambda: self.inner.read(key, start=start, end=end), start=start, end=end
        )

    async def read_versioned(self, key: str) -> tuple[bytes, str]:
        return await self._call("read_versioned", key, lambda: self.inner.read_versioned(key))

    async def exists(self, key: str) -> bool:
        return await self._call("exists", key, lambda: self.inner.exists(key))

    async def delete(self, key: str) -> None:
        await self._call("delete", key, lambda: self.inner.delete(key))

    async def delete_prefix(self, prefix: str) -> None:
        await self._call("delete_prefix", prefix, lambda: self.inner.delete_prefix(prefix))

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> list[str]:
        return await self._call(
            "list",
            prefix,
            lambda: self.inner.list(prefix, start_after=start_after),
            start_after=start_after,
        )

    # ``builtins.list``: inside the class body ``list`` names the method above.
    async def list_children(self, prefix: str = "") -> builtins.list[str]:
        return await self._call("list_children", prefix, lambda: self.inner.list_children(prefix))

    async def rename(self, src_prefix: str, dst_prefix: str) -> None:
        await self._call(
            "rename",
            src_prefix,
            lambda: self.inner.rename(src_prefix, dst_prefix),
            dst=join_key(self._prefix, dst_prefix),
        )

    def kvstore_spec(self, prefix: str) -> dict[str, Any] | None:
        """The inner backend's spec: TensorStore's bytes then bypass the wrapper."""
        return self.inner.kvstore_spec(prefix)

    def tensorstore_context(self) -> dict[str, Any] | None:
        return self.inner.tensorstore_context()

    async def close(self) -> None:
        await self.inner.close()

    def __repr__(self) -> str:
        return f"FaultyBackend({self.url!r} over {self.inner!r})"


def install_faulty(
    inner_url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[str, FaultyBackend]:
    """Wrap the backend at ``inner_url`` and register it under a fresh URL scheme.

    Returns ``(url, faulty)``: ``partialstore.save(url + "/ck", ...)`` (and every
    other public function) then works on ``inner_url + "/ck"`` through
    ``faulty``. Paths further down (``url + "/a/ck"``) get wrappers of
    ``inner_url + "/a"`` that share ``faulty``'s rules and log, keys relative
    to ``url``. The inner backends are opened with ``storage_options``; those
    passed to the public API are ignored. Each call registers a new scheme
    (``faulty<hex>``), so installs never collide; they last for the process.

    Example:
        >>> import numpy as np
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> url, faulty = install_faulty(f"{tmp.name}/root")
        >>> rule = faulty.add(BackendFault(before(), method="create", key=r"/log/", times=None))
        >>> partialstore.save(url + "/ck", {"a": np.ones(3)})
        Traceback (most recent call last):
        partialstore.errors.TransientBackendError: Injected fault: create of ...
        >>> tmp.cleanup()
    """
    options = dict(storage_options or {})
    scheme = f"faulty{uuid.uuid4().hex[:12]}"
    root_url = f"{scheme}://root"
    faulty = FaultyBackend(registry.open_backend(inner_url, options), url=root_url)
    base = inner_url.rstrip("/")

    def factory(url: str, _ignored: Mapping[str, Any]) -> Backend:
        url = url.rstrip("/")
        if url == root_url:
            return faulty
        if not url.startswith(root_url + "/"):
            raise InvalidInputError(
                f"{url!r} is not under {root_url!r}; install_faulty serves only paths below it."
            )
        rest = url[len(root_url) + 1 :]
        return faulty._view(registry.open_backend(f"{base}/{rest}", options), url, rest)

    registry.register_backend(scheme, factory)
    return root_url, faulty
