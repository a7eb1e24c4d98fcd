"""The run index on a store: read it, change it transactionally, rebuild it by listing.

Where the backend has compare-and-swap, every change reads the index with
its version and writes it back only if that version is still current
(``write(if_version=...)``); the first one creates it with
:func:`~partialstore._commit.exclusive.create_once`. A change is a pure,
idempotent function of the current index, applied again on a fresh read
when another writer came first or when an answer was lost, so a lost
response never applies a change twice nor loses another writer's. A
missing or damaged index is rebuilt by listing the root and checking that
each step's manifest exists; without compare-and-swap the index is never
stored and every read is such a rebuild. See docs/protocol.md, "Run index".

Example:
    >>> from partialstore import registry
    >>> from partialstore._runtime.aio import run
    >>> from partialstore._lifecycle.naming import StepNamer
    >>> store = IndexStore(registry.open_backend("memory://runindex-doc"), StepNamer("s{step}"))
    >>> run(store.update(lambda index: index.with_published([3])))
    RunIndex(steps=(3,), pending=(), deleting=(), metrics={})
    >>> run(store.read()).index.steps
    (3,)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable, Iterable

from partialstore._commit.exclusive import Created, create_once
from partialstore._commit.location import MANIFEST_NAME
from partialstore._lifecycle.indexformat import INDEX_KEY, RunIndex, decode, encode
from partialstore._lifecycle.naming import StepNamer
from partialstore.backend import Backend, join_key
from partialstore.errors import (
    ConflictError,
    CorruptCheckpointError,
    NotFoundError,
    OutcomeUnknownError,
    TransientBackendError,
)

__all__ = ["Change", "IndexStore", "Snapshot"]

_log = logging.getLogger("partialstore")
#: Changes lost to other writers before giving up (each one is a fresh read
#: and write; managers of one run rarely change the index at one instant).
_CONFLICT_ATTEMPTS = 64
#: Failures of the store itself (already retried by the backend) before giving up.
_FAILURE_ATTEMPTS = 3
_CHECK_CONCURRENCY = 64

Change = Callable[[RunIndex], RunIndex | None]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The index as read: ``version`` for compare-and-swap (``None``: nothing stored)."""

    index: RunIndex
    version: str | None
    stored: bool


class IndexStore:
    """The run index of one root (``backend``), whose steps are named by ``namer``."""

    def __init__(self, backend: Backend, namer: StepNamer) -> None:
        self.backend = backend
        self.namer = namer

    @property
    def transactional(self) -> bool:
        """Whether the index is stored (the backend has compare-and-swap)."""
        return self.backend.capabilities.compare_and_swap

    def manifest_key(self, step: int) -> str:
        """The key whose existence means ``step`` is finalized (published)."""
        return join_key(self.namer.name(step), MANIFEST_NAME)

    async def is_published(self, step: int) -> bool:
        """Whether ``step``'s checkpoint is published (one request)."""
        return await self.backend.exists(self.manifest_key(step))

    async def published_among(self, steps: Iterable[int]) -> list[int]:
        """The steps of ``steps`` that are published, ascending (checked concurrently)."""
        limit = asyncio.Semaphore(_CHECK_CONCURRENCY)

        async def one(step: int) -> int | None:
            async with limit:
                return step if await self.is_published(step) else None

        found = await asyncio.gather(*(one(step) for step in sorted(set(steps))))
        return [step for step in found if step is not None]

    async def rebuild(self) -> RunIndex:
        """The index derived from the store: every published step under the root."""
        names = await self.backend.list_children("")
        candidates = [step for name in names if (step := self.namer.parse(name)) is not None]
        return RunIndex(steps=tuple(await self.published_among(candidates)))

    async def read(self) -> Snapshot:
        """The index (rebuilt by listing when missing, damaged or not stored); writes nothing."""
        if not self.transactional:
            return Snapshot(await self.rebuild(), None, False)
        try:
            data, version = await self.backend.read_versioned(INDEX_KEY)
        except NotFoundError:
            return Snapshot(await self.rebuild(), None, False)
        try:
            return Snapshot(decode(INDEX_KEY, data), version, True)
        except CorruptCheckpointError as error:
            _log.warning("%s; rebuilding it by listing %s.", error, self.backend.url)
            return Snapshot(await self.rebuild(), version, False)

    async def _write(self, snapshot: Snapshot, new: RunIndex) -> bool:
        """Store ``new`` in place of ``snapshot``; whether it landed as ours."""
        data = encode(new)
        if snapshot.version is None:
            outcome, _ = await create_once(self.backend, INDEX_KEY, data)
            return outcome is Created.MINE
        try:
            await self.backend.write(INDEX_KEY, data, if_version=snapshot.version)
        except (ConflictError, NotFoundError):
            return False
        return True

    async def update(self, change: Change) -> RunIndex:
        """Apply ``change`` to the stored index transactionally; return the index it made.

        ``change`` returns ``None`` when the index already says what it wants;
        it is applied again to a fresh read after a conflict or a failure.

        Raises:
          ConflictError: other writers won every attempt.
          BackendError: the store kept failing.
        """
        failures = 0
        for attempt in range(_CONFLICT_ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.uniform(0, min(0.5, 0.005 * 2**attempt)))
            try:
                snapshot = await self.read()
                new = change(snapshot.index)
                if not self.transactional or (new is None and snapshot.stored):
                    return snapshot.index if new is None else new
                if await self._write(snapshot, snapshot.index if new is None else new):
                    return snapshot.index if new is None else new
            except (TransientBackendError, OutcomeUnknownError):
                failures += 1
                if failures >= _FAILURE_ATTEMPTS:
                    raise
        raise ConflictError(
            f"The run index {INDEX_KEY} under {self.backend.url} changed under every one of "
            f"{_CONFLICT_ATTEMPTS} updates: too many managers write to this root at once. "
            "Try again."
        )

    async def latest(self, index: RunIndex) -> int | None:
        """The latest published step: the highest in ``steps``, or a pending one above it.

        A pending step above every indexed one was being finalized; it is
        checked (one request each, newest first) because the finalizer may
        have been killed between publishing and updating the index.
        """
        top = max(index.steps, default=None)
        above = sorted((s for s in index.pending if top is None or s > top), reverse=True)
        for step in above:
            if await self.is_published(step):
                return step
        return top

    async def steps(self, index: RunIndex) -> list[int]:
        """Every published step the index knows of: ``steps`` and published pending ones."""
        pending = [s for s in index.pending if s not in index.steps]
        return sorted({*index.steps, *await self.published_among(pending)})
