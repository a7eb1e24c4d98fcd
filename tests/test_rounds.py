"""Random concurrency rounds: 8 savers, 3 finalizers and a discarder on one path.

Each actor is a separate writer with its own backend client (as separate
processes or hosts would be), running the core coroutines concurrently on
one event loop; random start delays and random per-request latency at the
Backend contract vary the interleaving from round to round (seeded, so a
failing round replays). After every round the outcomes each actor was told
are checked against what is actually stored:

- no lost save: a save that returned is in the checkpoint, unless a discard
  that returned came after it in the log;
- no phantom: a save that raised is not in the checkpoint;
- no false ``FileExistsError``: whoever got it, a checkpoint is published;
- one winner: a published checkpoint has exactly one finalizer that
  returned, and an unpublished path has none;
- no debris: the data directories left are exactly those of the saves in
  the checkpoint (or, unpublished, in the live session).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore import registry
from partialstore._commit import discarding, finalizing, saving, txlog
from partialstore._commit.location import DATA_DIR, Location, resolve
from partialstore._commit.records import SaveRecord
from partialstore._runtime import aio
from partialstore.backend import Backend, Capabilities
from partialstore.errors import CheckpointFinalizedError, NotFoundError, SessionDiscardedError

ROUNDS = 100
SAVERS, FINALIZERS = 8, 3
STORES = ("local", "s3", "gcs")


class Jittery(Backend):
    """A real backend whose every call first sleeps a random few milliseconds."""

    def __init__(self, inner: Backend, rng: random.Random) -> None:
        self._inner, self._rng, self.url = inner, rng, inner.url

    async def _pause(self) -> None:
        await asyncio.sleep(self._rng.uniform(0, 0.004))

    @property
    def capabilities(self) -> Capabilities:
        return self._inner.capabilities

    def kvstore_spec(self, prefix: str) -> dict[str, Any] | None:
        return self._inner.kvstore_spec(prefix)

    def tensorstore_context(self) -> dict[str, Any] | None:
        return self._inner.tensorstore_context()

    async def create(self, key: str, data: bytes) -> None:
        await self._pause()
        await self._inner.create(key, data)

    async def write(self, key: str, data: bytes, *, if_version: str | None = None) -> None:
        await self._pause()
        await self._inner.write(key, data, if_version=if_version)

    async def read(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        await self._pause()
        return await self._inner.read(key, start=start, end=end)

    async def exists(self, key: str) -> bool:
        await self._pause()
        return await self._inner.exists(key)

    async def delete(self, key: str) -> None:
        await self._pause()
        await self._inner.delete(key)

    async def delete_prefix(self, prefix: str) -> None:
        await self._pause()
        await self._inner.delete_prefix(prefix)

    async def list(self, prefix: str = "") -> list[str]:
        await self._pause()
        return await self._inner.list(prefix)

    async def list_children(self, prefix: str = "") -> list[str]:
        await self._pause()
        return await self._inner.list_children(prefix)

    async def rename(self, src_prefix: str, dst_prefix: str) -> None:
        await self._pause()
        await self._inner.rename(src_prefix, dst_prefix)


def _actor_location(path: str, options: dict[str, Any], rng: random.Random) -> Location:
    """A location with its own backend client, as a separate process would have."""
    shared = resolve(path, options)
    parent = path.rsplit("/", 1)[0]
    backend = Jittery(registry.open_backend(parent, options), rng)
    return Location(path, backend, shared.final_prefix, shared.staging_prefix)


def _array(round_no: int, saver: int) -> np.ndarray:
    return np.full(64, round_no * 100 + saver, np.float32)


async def _run_round(path: str, options: dict[str, Any], seed: int, span: float) -> dict[str, Any]:
    """One round; actors start at random instants within ``span`` seconds.

    ``span`` is a few times one save's duration on this store, so on a fast
    store and a slow one alike finalizers and the discarder start before,
    during and after the saves commit.
    """
    rng = random.Random(seed)
    outcomes: dict[str, Any] = {}

    async def act(name: str, coro_factory: Any) -> None:
        await asyncio.sleep(rng.uniform(0, span))
        try:
            outcomes[name] = ("ok", await coro_factory())
        except (CheckpointFinalizedError, SessionDiscardedError, NotFoundError) as error:
            outcomes[name] = (type(error).__name__, str(error))

    tasks = []
    for i in range(SAVERS):
        snap = saving.snapshot({f"s{i}": _array(seed, i)}, None, copy=True)
        loc = _actor_location(path, options, rng)
        tasks.append(act(f"save{i}", lambda loc=loc, snap=snap: saving.commit_save(loc, snap)))
    for j in range(FINALIZERS):
        loc = _actor_location(path, options, rng)
        tasks.append(act(f"finalize{j}", lambda loc=loc: finalizing.finalize(loc)))
    loc = _actor_location(path, options, rng)
    tasks.append(act("discard", lambda loc=loc: discarding.discard(loc)))
    await asyncio.gather(*tasks)
    return outcomes


def _one_save_seconds(path: str, options: dict[str, Any]) -> float:
    """How long one actor's save takes on this store (the median of three)."""
    times = []
    for i in range(3):
        snap = saving.snapshot({"x": _array(0, i)}, None, copy=True)
        location = _actor_location(path, options, random.Random(i))
        started = time.perf_counter()
        aio.run(saving.commit_save(location, snap))
        times.append(time.perf_counter() - started)
    return sorted(times)[1]


def _log_entries(location: Location) -> list[txlog.LogEntry]:
    prefix = location.log_prefix
    if location.uses_rename and aio.run(location.backend.exists(location.manifest_key)):
        prefix = f"{location.final_prefix}/log"
    return aio.run(txlog.read_log(location.backend, prefix))


def _data_dirs(location: Location, published: bool) -> set[str]:
    root = location.final_prefix if published else location.staging_prefix
    return set(aio.run(location.backend.list_children(f"{root}/{DATA_DIR}")))


def _check_round(path: str, options: dict[str, Any], seed: int, outcomes: dict[str, Any]) -> None:
    where = f"round seed {seed}: {outcomes}"
    location = resolve(path, options)
    published = aio.run(location.backend.exists(location.manifest_key))
    entries = _log_entries(location)
    markers = [e.number for e in entries if txlog.is_discard(e.record)]
    marker = max(markers, default=0)
    winners = [n for n, o in outcomes.items() if n.startswith("finalize") and o[0] == "ok"]
    told_exists = [n for n, o in outcomes.items() if o[0] == "CheckpointFinalizedError"]
    if told_exists:
        assert published, f"FileExistsError without a checkpoint: {told_exists}; {where}"
    assert len(winners) == (1 if published else 0), where
    if outcomes["discard"][0] == "ok":
        assert marker, where
    if published:
        loaded = partialstore.load(path, storage_options=options)
        manifest = partialstore.metadata(path, storage_options=options)
        in_checkpoint = {s["save_id"] for s in manifest.saves}
    else:
        loaded = {}
        in_checkpoint = {
            e.record.save_id for e in txlog.session_of(entries) if isinstance(e.record, SaveRecord)
        }
    for i in range(SAVERS):
        verdict, value = outcomes[f"save{i}"]
        key = f"s{i}"
        if verdict == "ok" and published and value > marker:
            assert key in loaded, f"lost save {key}; {where}"
            np.testing.assert_array_equal(loaded[key], _array(seed, i))
        elif verdict != "ok" or value < marker:
            assert key not in loaded, f"phantom save {key}; {where}"
    # Unpublished sessions keep data of their live saves only; published ones,
    # of the checkpoint's saves (no data of losers, discarded or refused saves).
    log = [(e.number, e.record.kind, getattr(e.record, "save_id", None)) for e in entries]
    dirs = _data_dirs(location, published)
    assert dirs == in_checkpoint, f"data {dirs} != {in_checkpoint}; log {log}; {where}"
    if location.uses_rename and published:
        staging = aio.run(location.backend.list(location.staging_prefix))
        assert staging == [], f"stray staging {staging}; {where}"


@pytest.mark.parametrize("store", STORES)
def test_random_rounds_keep_every_promise(store: str, request: pytest.FixtureRequest) -> None:
    if store == "local":
        root, options = str(request.getfixturevalue("tmp_path") / "root"), {}
    else:
        root, options = request.getfixturevalue(f"{store}_url")
    seen: set[tuple[str, str]] = set()
    span = 3 * _one_save_seconds(f"{root}/calibrate", options)
    for round_no in range(ROUNDS):
        path = f"{root}/r{round_no}"
        outcomes = aio.run(_run_round(path, options, round_no, span))
        _check_round(path, options, round_no, outcomes)
        seen |= {(name.rstrip("0123456789"), verdict) for name, (verdict, _) in outcomes.items()}
    # The rounds must have met every kind of race, or they proved little.
    for wanted in [
        ("save", "ok"),
        ("save", "CheckpointFinalizedError"),
        ("finalize", "ok"),
        ("finalize", "CheckpointFinalizedError"),
        ("discard", "ok"),
        ("discard", "CheckpointFinalizedError"),
    ]:
        assert wanted in seen, (wanted, sorted(seen))
