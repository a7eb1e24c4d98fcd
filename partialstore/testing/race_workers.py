"""Child-process workers for the conformance suite's cross-process races.

They live in an importable module (not in a test file) because the suite
starts them with the ``spawn`` start method: a spawned child imports the
worker by module path and opens its own backend from the picklable
``(url, storage_options)`` pair, exactly like a second host would.

Every worker reports one message on ``results``: ``("ok", worker, records)``
or ``("error", worker, traceback_text)``, so the parent can fail with the
child's real error instead of a hang.

Example (what the suite does)::

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=create_race_worker,
                    args=(url, opts, keys, w, 1 << 20, barrier, results))
        for w in range(4)
    ]
"""

from __future__ import annotations

import hashlib
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["cas_race_worker", "create_race_worker", "race_payload"]

# A worker that waits longer than this at a barrier has lost a sibling.
BARRIER_TIMEOUT_S = 60.0


def race_payload(worker: int, round_: int, size: int) -> bytes:
    """Deterministic bytes unique to ``(worker, round_)``, so the parent can recompute them.

    Example::

        race_payload(0, 3, 1024)[:8]  # same bytes in every process
    """
    header = f"worker={worker} round={round_};".encode()
    block = hashlib.sha256(header).digest()
    body_len = max(size - len(header), 0)
    body = (block * (body_len // len(block) + 1))[:body_len]
    return header + body


def create_race_worker(
    url: str,
    storage_options: Mapping[str, Any],
    keys: Sequence[str],
    worker: int,
    size: int,
    barrier: Any,
    results: Any,
) -> None:
    """Race ``create`` on each key in turn with the sibling workers.

    Records, per key, ``"won"``, ``"lost"`` (AlreadyExistsError) or the
    unexpected error's repr.
    """
    try:
        from partialstore import registry
        from partialstore._aio import run
        from partialstore.errors import AlreadyExistsError

        backend = registry.open_backend(url, dict(storage_options))
        records: list[str] = []
        for round_, key in enumerate(keys):
            payload = race_payload(worker, round_, size)
            barrier.wait(BARRIER_TIMEOUT_S)
            try:
                run(backend.create(key, payload))
                records.append("won")
            except AlreadyExistsError:
                records.append("lost")
            except Exception as exc:  # reported to the parent, which fails the test
                records.append(f"error: {exc!r}")
        run(backend.close())
        results.put(("ok", worker, records))
    except BaseException:
        results.put(("error", worker, traceback.format_exc()))


def cas_race_worker(
    url: str,
    storage_options: Mapping[str, Any],
    key: str,
    rounds: int,
    worker: int,
    barrier: Any,
    results: Any,
) -> None:
    """Race compare-and-swap writes on one key, one round at a time.

    Each round every worker reads ``(data, version)``, waits for all the
    others to have read the same version, then writes with
    ``if_version``. Records ``(round, sha256_of_data_read, outcome)``.
    """
    try:
        from partialstore import registry
        from partialstore._aio import run
        from partialstore.errors import ConflictError

        backend = registry.open_backend(url, dict(storage_options))
        records: list[tuple[int, str, str]] = []
        for round_ in range(rounds):
            barrier.wait(BARRIER_TIMEOUT_S)
            data, version = run(backend.read_versioned(key))
            # Everyone holds the same version before anyone writes.
            barrier.wait(BARRIER_TIMEOUT_S)
            digest = hashlib.sha256(data).hexdigest()
            try:
                run(backend.write(key, race_payload(worker, round_, 4096), if_version=version))
                outcome = "won"
            except ConflictError:
                outcome = "lost"
            except Exception as exc:  # reported to the parent, which fails the test
                outcome = f"error: {exc!r}"
            records.append((round_, digest, outcome))
        run(backend.close())
        results.put(("ok", worker, records))
    except BaseException:
        results.put(("error", worker, traceback.format_exc()))
