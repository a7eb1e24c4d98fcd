"""Race tests of the conformance suite: many creators and CAS writers at once.

A mixin of :class:`~partialstore.testing.conformance.BackendConformance`
(which is what backends subclass); kept apart because races need their own
machinery. Threads each drive a private event loop, which races the
backend for real and checks the contract's "awaitable from any loop" rule;
processes are fresh interpreters that open their own backend from the
picklable ``(url, storage_options)``, like a second host would
(:mod:`partialstore.testing.race_workers`).

Nothing is skipped. Without ``atomic_create`` (or ``compare_and_swap``) the
same racers check that the refusal holds under concurrency: every racer is
refused and nothing is written. For a process-local store
(``shared_across_processes = False``) the process races check that another
process indeed sees none of this process's keys.

Run only the races of one backend with
``pytest tests/backends/test_local.py -k race``.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from typing import Any

import pytest

from partialstore._runtime.aio import run
from partialstore.backend import Backend
from partialstore.errors import AlreadyExistsError, ConflictError, UnsupportedOperationError
from partialstore.testing import race_workers

__all__ = ["RaceConformance"]

THREADS, THREAD_ROUNDS, THREAD_PAYLOAD = 8, 20, 256 * 1024
PROCESSES, PROCESS_ROUNDS, PROCESS_PAYLOAD = 4, 10, 2 * 1024 * 1024
CAS_THREADS, CAS_ROUNDS = 6, 10


class RaceConformance:
    """Concurrent-writer tests; needs the ``backend`` and ``backend_url`` fixtures."""

    #: False for stores that exist only inside one process (memory stores).
    shared_across_processes: bool = True

    @staticmethod
    def _workers(kind: str, url: str, options: dict[str, Any], **job: Any) -> list[Any]:
        try:
            return race_workers.run_workers(kind, url, options, count=PROCESSES, **job)
        except race_workers.RaceWorkerError as exc:
            pytest.fail(str(exc))

    @staticmethod
    def _race_refusals(call: Any) -> list[str]:
        """Run ``call(loop)`` in THREADS threads at once; return how each ended."""
        barrier = threading.Barrier(THREADS)
        outcomes: list[str] = [""] * THREADS

        def racer(worker: int) -> None:
            loop = asyncio.new_event_loop()
            try:
                barrier.wait(race_workers.BARRIER_TIMEOUT_S)
                loop.run_until_complete(call(worker))
                outcomes[worker] = "written"
            except UnsupportedOperationError:
                outcomes[worker] = "refused"
            except Exception as exc:
                outcomes[worker] = f"error: {exc!r}"
            finally:
                loop.close()

        threads = [threading.Thread(target=racer, args=(w,)) for w in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return outcomes

    def _check_isolated_from_other_processes(
        self, backend: Backend, backend_url: tuple[str, dict[str, Any]]
    ) -> None:
        run(backend.write("isolation/key", b"only here"))
        url, options = backend_url
        seen = race_workers.exists_in_other_process(url, options, "isolation/key")
        assert seen is False, "a store declared process-local is visible from another process"

    def test_create_race_threads(self, backend: Backend) -> None:
        if not backend.capabilities.atomic_create:
            # No atomic create: concurrent creators must all be refused, never
            # fall back to a check-then-write that could let two of them win.
            refusals = self._race_refusals(
                lambda worker: backend.create("race/refused", b"%d" % worker)
            )
            assert refusals == ["refused"] * THREADS, refusals
            assert not run(backend.exists("race/refused"))
            return
        barrier = threading.Barrier(THREADS)
        outcomes: list[list[str]] = [[] for _ in range(THREADS)]

        def racer(worker: int) -> None:
            # Each thread drives its own event loop: real parallelism, and the
            # contract says coroutines may be awaited from any loop.
            loop = asyncio.new_event_loop()
            try:
                for round_ in range(THREAD_ROUNDS):
                    payload = race_workers.race_payload(worker, round_, THREAD_PAYLOAD)
                    barrier.wait(race_workers.BARRIER_TIMEOUT_S)
                    try:
                        loop.run_until_complete(backend.create(f"race/{round_}", payload))
                        outcomes[worker].append("won")
                    except AlreadyExistsError:
                        outcomes[worker].append("lost")
                    except Exception as exc:
                        outcomes[worker].append(f"error: {exc!r}")
            finally:
                loop.close()

        threads = [threading.Thread(target=racer, args=(w,)) for w in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._check_create_race(backend, outcomes, THREAD_ROUNDS, THREAD_PAYLOAD)

    def test_create_race_processes(
        self, backend: Backend, backend_url: tuple[str, dict[str, Any]]
    ) -> None:
        if not self.shared_across_processes:
            self._check_isolated_from_other_processes(backend, backend_url)
            return
        url, options = backend_url
        if not backend.capabilities.atomic_create:
            outcomes = self._workers("create", url, options, keys=["prace/0"], size=1024)
            assert all(o == ["refused"] for o in outcomes), outcomes
            assert not run(backend.exists("prace/0"))
            return
        keys = [f"prace/{round_}" for round_ in range(PROCESS_ROUNDS)]
        outcomes = self._workers("create", url, options, keys=keys, size=PROCESS_PAYLOAD)
        self._check_create_race(backend, outcomes, PROCESS_ROUNDS, PROCESS_PAYLOAD, "prace")

    def _check_create_race(
        self,
        backend: Backend,
        outcomes: list[list[str]],
        rounds: int,
        size: int,
        prefix: str = "race",
    ) -> None:
        finished = [len(worker_outcomes) for worker_outcomes in outcomes]
        assert finished == [rounds] * len(outcomes), f"racers stopped early: {finished}"
        for round_ in range(rounds):
            per_worker = [worker_outcomes[round_] for worker_outcomes in outcomes]
            errors = [o for o in per_worker if o not in ("won", "lost")]
            assert not errors, f"round {round_}: unexpected errors {errors}"
            winners = [w for w, o in enumerate(per_worker) if o == "won"]
            assert len(winners) == 1, f"round {round_}: winners {winners}, expected exactly one"
            stored = run(backend.read(f"{prefix}/{round_}"))
            assert stored == race_workers.race_payload(winners[0], round_, size), (
                f"round {round_}: stored bytes are not the winner's"
            )

    def test_compare_and_swap_race_threads(self, backend: Backend) -> None:
        run(backend.write("cas/race", b"start"))
        if not backend.capabilities.compare_and_swap:
            refusals = self._race_refusals(
                lambda worker: backend.write("cas/race", b"%d" % worker, if_version="any")
            )
            assert refusals == ["refused"] * THREADS, refusals
            assert run(backend.read("cas/race")) == b"start"
            return
        barrier = threading.Barrier(CAS_THREADS)
        outcomes: list[list[str]] = [[] for _ in range(CAS_THREADS)]

        def racer(worker: int) -> None:
            loop = asyncio.new_event_loop()
            try:
                for round_ in range(CAS_ROUNDS):
                    barrier.wait(race_workers.BARRIER_TIMEOUT_S)
                    _, version = loop.run_until_complete(backend.read_versioned("cas/race"))
                    barrier.wait(race_workers.BARRIER_TIMEOUT_S)
                    payload = race_workers.race_payload(worker, round_, 4096)
                    try:
                        loop.run_until_complete(
                            backend.write("cas/race", payload, if_version=version)
                        )
                        outcomes[worker].append("won")
                    except ConflictError:
                        outcomes[worker].append("lost")
                    except Exception as exc:
                        outcomes[worker].append(f"error: {exc!r}")
                    barrier.wait(race_workers.BARRIER_TIMEOUT_S)
            finally:
                loop.close()

        threads = [threading.Thread(target=racer, args=(w,)) for w in range(CAS_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for round_ in range(CAS_ROUNDS):
            per_worker = [o[round_] for o in outcomes]
            assert sorted(per_worker) == ["lost"] * (CAS_THREADS - 1) + ["won"], per_worker
        last_winner = [o[-1] for o in outcomes].index("won")
        expected = race_workers.race_payload(last_winner, CAS_ROUNDS - 1, 4096)
        assert run(backend.read("cas/race")) == expected

    def test_compare_and_swap_race_processes(
        self, backend: Backend, backend_url: tuple[str, dict[str, Any]]
    ) -> None:
        if not self.shared_across_processes:
            self._check_isolated_from_other_processes(backend, backend_url)
            return
        run(backend.write("cas/prace", b"start"))
        url, options = backend_url
        if not backend.capabilities.compare_and_swap:
            records = self._workers("cas", url, options, key="cas/prace", rounds=1)
            assert [r[0][2] for r in records] == ["refused"] * PROCESSES, records
            assert run(backend.read("cas/prace")) == b"start"
            return
        records = self._workers("cas", url, options, key="cas/prace", rounds=PROCESS_ROUNDS)
        previous = b"start"
        for round_ in range(PROCESS_ROUNDS):
            per_worker = [r[round_] for r in records]
            assert {digest for _, digest, _ in per_worker} == {
                hashlib.sha256(previous).hexdigest()
            }, f"round {round_}: workers read different or unexpected data"
            outcomes = [outcome for _, _, outcome in per_worker]
            assert sorted(outcomes) == ["lost"] * (PROCESSES - 1) + ["won"], outcomes
            previous = race_workers.race_payload(outcomes.index("won"), round_, 4096)
        assert run(backend.read("cas/prace")) == previous
