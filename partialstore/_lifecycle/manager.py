"""``CheckpointManager``: one checkpoint per step of a training run, under one root.

Saving, finalizing, loading and discarding go through the one entry point
per operation in :mod:`partialstore._commit.operations`; this module adds
the step names, the run index (:mod:`.runindex`), retention
(:mod:`.retention`, applied by :mod:`.deletion`), sessions (:mod:`.sessions`)
and preemption (:mod:`.preemption`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from partialstore._commit import loading, operations
from partialstore._commit.location import Location, resolve
from partialstore._lifecycle import deletion, preemption
from partialstore._lifecycle.naming import StepNamer, check_step, normalize_root
from partialstore._lifecycle.retention import Policy
from partialstore._lifecycle.runindex import IndexStore
from partialstore._lifecycle.sessions import (
    SessionInfo,
    candidate_steps,
    poll_for_step,
    sessions_of,
    sweep_sessions,
)
from partialstore._runtime import aio, multihost, ordering
from partialstore._runtime.ordering import AsyncResponse
from partialstore._runtime.stats import OperationStats
from partialstore.errors import (
    AlreadyExistsError,
    InvalidInputError,
    NotFoundError,
)
from partialstore.registry import scheme_of

__all__ = ["CheckpointManager"]

_log = logging.getLogger("partialstore")


class CheckpointManager:
    """The checkpoints of one training run: one per step, named by ``step_format`` under ``root``.

    Example:
        >>> import numpy as np
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> with partialstore.CheckpointManager(tmp.name, keep_last=2) as manager:
        ...     for step in (10, 20, 30):
        ...         manager.save(step, {"w": np.full(3, step, np.float32)})
        ...         _ = manager.save_async(step, {"step": step}, custom_metadata={"loss": 1 / step})
        ...         _ = manager.finalize(step)  # returns its OperationStats
        ...     manager.wait()  # retention deletes step 10 in the background
        ...     manager.latest_step(), manager.steps()
        (30, [20, 30])
        >>> manager = partialstore.CheckpointManager(tmp.name)  # e.g. after a restart
        >>> manager.load()  # the latest step
        {'step': 30, 'w': array([30., 30., 30.], dtype=float32)}
        >>> manager.metadata(20).custom_metadata
        {'loss': 0.05}
        >>> manager.close()
        >>> tmp.cleanup()

    Args:
      root: the run's directory: a local path or URL (``s3://bucket/run``, ``gs://...``).
      storage_options: backend options, used for every step (see ``partialstore.save``).
      keep_last: keep the newest ``n`` finalized steps.
      keep_every: keep every step divisible by ``n``.
      keep_best: ``(metric, "max"|"min", n)``: keep the ``n`` best steps by the
        number ``metric`` in their ``custom_metadata``. With no ``keep_*`` rule
        nothing is deleted; the latest step and unfinalized sessions never are.
      step_format: a step's checkpoint name, with one ``{step}`` field.

    Raises:
      ValueError: a bad argument (:class:`~partialstore.errors.InvalidInputError`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: tuple[str, str, int] | None = None,
        step_format: str = "step_{step:08d}",
    ) -> None:
        self.root = normalize_root(root)
        self._namer = StepNamer(step_format)
        self._policy = Policy.of(keep_last=keep_last, keep_every=keep_every, keep_best=keep_best)
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise InvalidInputError(
                f"storage_options must be a dict or None, got {type(storage_options).__name__}."
            )
        self._options = dict(storage_options or {})
        backend = resolve(self.path(0), self._options).backend
        self._store = IndexStore(backend, self._namer)
        self._deleter = deletion.Deleter(self._store, self._policy, self._location)
        self._inflight: list[AsyncResponse] = []
        self._lock = threading.Lock()
        self._closed = False
        self._sigterm = False  # whether this manager installed the SIGTERM recorder

    def __repr__(self) -> str:
        return f"CheckpointManager({self.root!r}, step_format={self._namer.step_format!r})"

    def path(self, step: int) -> str:
        """The checkpoint path of ``step`` (what the plain ``partialstore`` functions take).

        Example:
            >>> CheckpointManager("s3://bucket/run").path(7)
            's3://bucket/run/step_00000007'
        """
        name = self._namer.name(step)
        return (
            os.path.join(self.root, name) if scheme_of(self.root) == "" else f"{self.root}/{name}"
        )

    def _location(self, step: int) -> Location:
        return resolve(self.path(step), self._options)

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInputError(f"{self!r} is closed; create a new CheckpointManager.")

    def _track(self, response: AsyncResponse) -> AsyncResponse:
        with self._lock:
            # Finished ones drop out unless they failed unseen (wait() raises those).
            self._inflight = [
                r for r in self._inflight if not (r.done() and (r.observed or r.failure() is None))
            ]
            self._inflight.append(response)
        return response

    # -- writing ---------------------------------------------------------------------------

    def save(
        self, step: int, state: Any, *, custom_metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Partially save ``state`` into ``step``'s session and wait (as ``partialstore.save``)."""
        self._check_open()
        path = self.path(step)
        operations.start_save(
            path, state, custom_metadata, self._options, copy=False, check_now=False
        ).result()

    def save_async(
        self, step: int, state: Any, *, custom_metadata: Mapping[str, Any] | None = None
    ) -> AsyncResponse:
        """Start a partial save into ``step``'s session; return at once (as ``save_async``).

        :meth:`finalize` of the step and :meth:`wait` wait for it.
        """
        self._check_open()
        path = self.path(step)
        response = operations.start_save(
            path, state, custom_metadata, self._options, copy=True, check_now=True
        )
        return self._track(response)

    def finalize(self, step: int) -> OperationStats:
        """Publish ``step``, record it in the run index, then apply retention in the background.

        Returns the finalize's figures (:class:`partialstore.OperationStats`).

        The step is recorded as pending in the index before its finalize
        starts and as finalized once it published, so a kill between the two
        never hides it (see docs/protocol.md, "Run index"). In a multi-process
        job every process calls it; the primary writes the index and deletes.

        Raises:
          FileExistsError: ``step`` is already finalized.
          FileNotFoundError: ``step`` has no session.
        """
        self._check_open()
        check_step(step)
        primary = multihost.is_primary()
        if primary:
            aio.run(self._store.update(lambda index: index.with_pending(step)))
        started = time.monotonic()
        try:
            stats = operations.finalize(self.path(step), self._options)
        except NotFoundError:
            if primary:  # no session: nothing will publish it, so no reader should check it
                aio.run(self._store.update(lambda index: index.without_pending(step)))
            raise
        if not primary:
            return stats
        aio.run(self._deleter.publish(step))
        _log.info(
            "Finalized step %d under %s in %.3f s.", step, self.root, time.monotonic() - started
        )
        if self._policy.active:
            self._track(ordering.schedule(("lifecycle", self.root), self._retain, track=False))
        return stats

    async def _retain(self) -> None:
        try:
            await self._deleter.retain()
        except Exception as error:
            # Reported by wait()/close() too; logged now for jobs that call neither for long.
            _log.warning("Retention under %s failed: %s", self.root, error)
            raise

    def wait(self) -> None:
        """Wait for every ``save_async`` and background deletion of this manager.

        Raises:
          Exception: the first failure among them (after all have finished).
        """
        with self._lock:
            pending, self._inflight = self._inflight, []
        failure: BaseException | None = None
        for response in pending:
            try:
                response.result()
            except Exception as error:
                failure = failure or error
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Wait for everything in flight (:meth:`wait`) and release the SIGTERM handler."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._sigterm:
                preemption.uninstall()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except Exception:
            if value is None:
                raise  # the body succeeded: its background work's failure is the news

    # -- reading ---------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The latest finalized step, or ``None``.

        One read of the run index, plus one check per pending step above its
        newest step (a finalize in progress, or one killed before its index update).
        """
        self._check_open()

        async def run() -> int | None:
            return await self._store.latest((await self._store.read()).index)

        return aio.run(run())

    def steps(self) -> list[int]:
        """Every finalized step, ascending (from the run index)."""
        self._check_open()

        async def run() -> list[int]:
            return await self._store.steps((await self._store.read()).index)

        return aio.run(run())

    def _step_or_latest(self, step: int | None) -> int:
        if step is not None:
            return check_step(step)
        latest = self.latest_step()
        if latest is None:
            raise NotFoundError(f"No finalized step under {self.root} yet.")
        return latest

    def load(
        self,
        step: int | None = None,
        *,
        select: Sequence[Any] | str | None = None,
        target: Any = None,
    ) -> Any:
        """Load ``step`` (the latest when ``None``), as ``partialstore.load``.

        Raises:
          FileNotFoundError: no such finalized step (or none at all).
        """
        self._check_open()
        if select is not None and target is not None:
            raise InvalidInputError("Pass either select or target to load, not both.")
        path = self.path(self._step_or_latest(step))
        return operations.load(path, self._options, select=select, target=target)

    def metadata(self, step: int | None = None) -> loading.CheckpointMetadata:
        """Describe ``step`` (the latest when ``None``) without reading array bytes."""
        self._check_open()
        return operations.metadata(self.path(self._step_or_latest(step)), self._options)

    def wait_for_step(self, after: int | None = None, timeout: float | None = None) -> int:
        """Wait until a step newer than ``after`` is finalized; return the latest step.

        For an evaluator following a run: polls the index, backing off from
        50 ms to 2 s between polls.

        Example:
            >>> import tempfile
            >>> tmp = tempfile.TemporaryDirectory()
            >>> trainer, evaluator = CheckpointManager(tmp.name), CheckpointManager(tmp.name)
            >>> trainer.save(100, {"step": 100})
            >>> trainer.finalize(100).operation  # its figures: OperationStats
            'finalize'
            >>> evaluator.wait_for_step(after=None, timeout=60)
            100
            >>> evaluator.wait_for_step(after=100, timeout=0.1)
            Traceback (most recent call last):
            TimeoutError: No step after 100 was finalized under ... within 0.1 s.
            >>> trainer.close(), evaluator.close()
            (None, None)
            >>> tmp.cleanup()

        Raises:
          TimeoutError: none came within ``timeout`` seconds.
        """
        self._check_open()
        return poll_for_step(self.latest_step, after, timeout, where=self.root)

    # -- operating -------------------------------------------------------------------------

    def sessions(self) -> list[SessionInfo]:
        """The unfinalized sessions under the root, by step (with age, saves and bytes)."""
        self._check_open()

        async def candidates() -> list[int]:
            index = (await self._store.read()).index
            backend = self._store.backend
            names = await backend.list_children("")
            uses_rename = backend.capabilities.atomic_rename
            found = candidate_steps(names, self._namer, uses_rename=uses_rename)
            return [s for s in found if s not in index.steps and s not in index.deleting]

        locations = {step: self._location(step) for step in aio.run(candidates())}
        return aio.run(sessions_of(locations))

    def sweep(self, older_than_s: float) -> list[SessionInfo]:
        """Discard the sessions idle for ``older_than_s`` seconds or more; return them.

        Uses ``partialstore.discard`` (its safety rules): a session a finalize
        sealed is left alone (finalize it instead), and one that was finalized
        or discarded meanwhile is skipped.
        """
        self._check_open()
        swept = sweep_sessions(
            self.sessions(), older_than_s, lambda path: operations.discard(path, self._options)
        )
        if swept and multihost.is_primary():
            gone = [info.step for info in swept]
            aio.run(self._store.update(lambda index: index.without(gone)))
        return swept

    def delete_step(self, step: int, *, force: bool = False) -> None:
        """Delete the finalized ``step`` (for an operator); the latest step only with ``force``.

        The index forgets the step before any byte is deleted.

        Example:
            >>> import tempfile
            >>> tmp = tempfile.TemporaryDirectory()
            >>> manager = CheckpointManager(tmp.name)
            >>> for step in (1, 2):
            ...     manager.save(step, {"step": step})
            ...     _ = manager.finalize(step)
            >>> manager.delete_step(2)
            Traceback (most recent call last):
            partialstore.errors.InvalidInputError: Step 2 is the latest step under ...
            >>> manager.delete_step(1)
            >>> manager.steps()
            [2]
            >>> manager.close()
            >>> tmp.cleanup()

        Raises:
          ValueError: ``step`` is the latest step and ``force`` is False.
          FileNotFoundError: ``step`` is not a finalized step (a session is
            discarded with :meth:`sweep` or ``partialstore.discard``).
        """
        self._check_open()
        check_step(step)

        async def run() -> None:
            index = (await self._store.read()).index
            if step == await self._store.latest(index) and not force:
                raise InvalidInputError(
                    f"Step {step} is the latest step under {self.root}: a restarted job would "
                    "resume from an older one. Pass force=True to delete it anyway."
                )
            if step not in index.steps and not await self._store.is_published(step):
                raise NotFoundError(
                    f"No finalized step {step} under {self.root} (an open session there is "
                    "removed with sweep() or partialstore.discard)."
                )
            await self._store.update(lambda i: i.with_deleting([step]))
            await self._deleter.delete([step])

        aio.run(run())

    def recover(self) -> int | None:
        """Complete the finalizes a killed job left sealed; return the step to resume from.

        Call it when a job (re)starts, before :meth:`latest_step`: a finalize
        killed after it sealed its session has every save of that step, and
        its session can only be published (``partialstore.finalize``
        completes it), never saved into nor discarded. Open sessions that
        were not sealed are left as they are: saving the same step again
        replaces their keys, and :meth:`sweep` discards them. A seal made by
        a live process, or by one on another host less than 60 s ago, is left
        to its sealer, unless it carries this job's ``PARTIALSTORE_WRITER_ID``.

        Example:
            >>> import tempfile
            >>> tmp = tempfile.TemporaryDirectory()
            >>> manager = CheckpointManager(tmp.name)
            >>> manager.recover() is None  # a fresh run
            True
            >>> manager.close()
            >>> tmp.cleanup()
        """
        for info in self.sessions():
            if not info.sealed:
                continue
            _log.info("Completing the finalize of step %d that a killed job left.", info.step)
            try:
                self.finalize(info.step)
            except AlreadyExistsError:
                continue  # published meanwhile, or a live finalizer's seal: it publishes
        return self.latest_step()

    def reindex(self) -> list[int]:
        """Add every published step found by listing the root to the index; return the steps.

        For steps written without a manager, or copied in; one listing plus
        one check per step.
        """
        self._check_open()

        async def run() -> list[int]:
            rebuilt = await self._store.rebuild()
            index = await self._store.update(
                lambda i: i.with_published(s for s in rebuilt.steps if s not in i.deleting)
            )
            return await self._store.steps(index)

        return aio.run(run())

    def reached_preemption(self, step: int) -> bool:
        """Whether the job should save and finalize ``step`` now because it is being preempted.

        In a multi-process JAX job, JAX's preemption sync point (every
        process gets True at the same step); in one process, whether SIGTERM
        was received since the first call (which starts recording SIGTERM
        instead of dying of it, until :meth:`close`).

        Example:
            >>> import tempfile
            >>> tmp = tempfile.TemporaryDirectory()
            >>> manager = CheckpointManager(tmp.name)
            >>> manager.reached_preemption(0)  # no SIGTERM so far
            False
            >>> manager.close()  # the previous SIGTERM handler is back
            >>> tmp.cleanup()
        """
        check_step(step)
        if not self._sigterm and not multihost.is_multiprocess():
            preemption.install()
            self._sigterm = True
        return preemption.reached(step)
