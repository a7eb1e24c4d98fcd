"""Recording published steps and deleting old ones: retention and ``delete_step``.

Deleting a step takes it out of the index's ``steps`` into ``deleting``
first (so no reader is told about it any more), then deletes its manifest
(so a rebuild by listing never finds it again, even half-deleted), then
everything under its name (on S3 in batched ``DeleteObjects``), then drops
it from ``deleting``. A deletion killed midway is finished by the next
retention pass of any manager of the root.

Example:
    >>> from partialstore._lifecycle.indexformat import RunIndex
    >>> RunIndex(steps=(1, 2, 3)).with_deleting([1])
    RunIndex(steps=(2, 3), pending=(), deleting=(1,), metrics={})
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from partialstore._commit import loading
from partialstore._commit.location import Location
from partialstore._lifecycle.indexformat import Metrics, RunIndex
from partialstore._lifecycle.retention import Metric, Policy, metric_value, plan_deletions
from partialstore._lifecycle.runindex import Change, IndexStore
from partialstore.errors import NotFoundError

__all__ = ["Deleter"]

_log = logging.getLogger("partialstore")
_CONCURRENCY = 8
#: Manifest reads for ``keep_best`` metrics at once (latency bound on object stores).
_READ_CONCURRENCY = 32


class Deleter:
    """Index updates after a finalize, and the deletions of one manager's root."""

    def __init__(
        self, store: IndexStore, policy: Policy, location: Callable[[int], Location]
    ) -> None:
        self.store = store
        self.policy = policy
        self.location = location

    async def _metric_of(self, step: int) -> Metric:
        """The ``keep_best`` metric in ``step``'s custom_metadata (one manifest read)."""
        assert self.policy.best_metric is not None
        location = self.location(step)
        try:
            manifest = await loading.read_manifest(location)
        except NotFoundError:
            return None
        custom = loading.read_metadata(location, manifest).custom_metadata
        return metric_value(custom, self.policy.best_metric)

    async def _metrics(self, steps: Iterable[int]) -> Metrics:
        if self.policy.best_metric is None:
            return {}
        steps = sorted(set(steps))
        limit = asyncio.Semaphore(_READ_CONCURRENCY)

        async def one(step: int) -> Metric:
            async with limit:
                return await self._metric_of(step)

        values = await asyncio.gather(*(one(step) for step in steps))
        return {self.policy.best_metric: dict(zip(steps, values, strict=True))}

    async def publish(self, step: int) -> RunIndex:
        """Record the published ``step`` (with its ``keep_best`` metric) in the index."""
        metrics = await self._metrics([step])
        return await self.store.update(lambda index: index.with_published([step], metrics))

    def _plan(self, index: RunIndex) -> list[int]:
        known: dict[int, Metric] = {}
        if self.policy.best_metric is not None:
            known = index.metrics.get(self.policy.best_metric, {})
        return plan_deletions(index.steps, known, self.policy)

    def _pass(self, published: list[int], looked_up: Metrics) -> Change:
        """The index change of one retention pass (applied again on a fresh read if needed)."""

        def change(index: RunIndex) -> RunIndex | None:
            live = set(index.steps) | set(published)
            metrics = {
                name: {s: v for s, v in values.items() if s in live}
                for name, values in looked_up.items()
            }
            base = index.with_published(published, metrics) or index
            planned = base.with_deleting(self._plan(base))
            return planned or (None if base is index else base)

        return change

    async def retain(self) -> list[int]:
        """One retention pass: take the steps the policy lets go out of the index, delete them.

        In the same index update it promotes pending steps found published (a
        finalizer killed before its index update) and records the metrics it
        had to read from manifests, so the next pass need not read them
        again. It also finishes deletions a killed pass left. Returns the
        steps deleted.
        """
        index = (await self.store.read()).index
        stale = [s for s in index.pending if s not in index.steps]
        published = await self.store.published_among(stale) if stale else []
        looked_up: Metrics = {}
        if self.policy.best_metric is not None:
            have = index.metrics.get(self.policy.best_metric, {})
            looked_up = await self._metrics(s for s in [*index.steps, *published] if s not in have)
        index = await self.store.update(self._pass(published, looked_up))
        doomed = list(index.deleting)
        if doomed:
            await self.delete(doomed)
        return doomed

    async def _delete_one(self, step: int, limit: asyncio.Semaphore) -> None:
        async with limit:
            backend = self.store.backend
            await backend.delete(self.store.manifest_key(step))
            await backend.delete_prefix(self.store.namer.name(step))

    async def delete(self, steps: list[int]) -> None:
        """Delete ``steps`` (already out of the index's ``steps``), then forget them."""
        limit = asyncio.Semaphore(_CONCURRENCY)
        await asyncio.gather(*(self._delete_one(step, limit) for step in steps))
        await self.store.update(lambda index: index.without(steps))
        _log.info("Deleted steps %s under %s.", steps, self.store.backend.url)
