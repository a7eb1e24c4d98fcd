"""Log appends against the log's length and against the number of writers (moto S3 or local).

Two series, both through ``partialstore._commit.txlog.append`` (the commit
point of every save) on a real backend wrapped in a request counter at the
Backend contract:

- ``length``: a synthetic log of N save records is written directly through
  the backend; then one append without a hint (a process's first save on
  that path) and one with (every later save), each timed and counted.
- ``writers``: K processes append M records each to one log at once;
  commits per second over the whole run, each append's latency, and the
  contract calls per commit.
- ``saves``: whole ``partialstore.save`` calls, the first of a session
  against one after N records (the synthetic session below, with the hint
  the process that made those saves holds).
- ``finalize``: a session of N saves (one real save, then N-1 copies of its
  record with fresh save ids written directly, then the compaction objects
  the writers would have written in the background), finalized, timed and
  counted; up to ``--no-compaction-max`` saves also without compaction
  objects (what finalize read before they existed).

Usage::

    python -m benchmarks.log_scale [--quick] [--stores s3,local] [--network plain,20ms] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import multiprocessing
import statistics
import sys
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np

import partialstore
from benchmarks import network
from benchmarks.cli import Measured, Run, Script
from benchmarks.stores import started_stores
from partialstore import registry
from partialstore._commit import loghints, txlog
from partialstore._commit.location import Location, resolve
from partialstore._commit.published import writer
from partialstore._commit.records import SaveRecord
from partialstore._runtime.aio import run as run_sync
from partialstore.backend import Backend, Capabilities


class Counting(Backend):
    """Forwards every call to ``inner`` and counts them by method."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.url, self.single_writer = inner, inner.url, inner.single_writer
        self.counts: Counter[str] = Counter()

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    async def create(self, key: str, data: bytes) -> None:
        self.counts["create"] += 1
        await self.inner.create(key, data)

    async def write(self, key: str, data: bytes, **kwargs: Any) -> None:
        self.counts["write"] += 1
        await self.inner.write(key, data, **kwargs)

    async def read(self, key: str, **kwargs: Any) -> bytes:
        self.counts["read"] += 1
        return await self.inner.read(key, **kwargs)

    async def exists(self, key: str) -> bool:
        self.counts["exists"] += 1
        return await self.inner.exists(key)

    async def delete(self, key: str) -> None:
        self.counts["delete"] += 1
        await self.inner.delete(key)

    async def delete_prefix(self, prefix: str) -> None:
        self.counts["delete_prefix"] += 1
        await self.inner.delete_prefix(prefix)

    # ``start_after`` by name: partialstore looks for it in the signature, and a
    # wrapper that hid it would turn every tail listing into a full one.
    async def list(self, prefix: str = "", *, start_after: str | None = None) -> list[str]:
        self.counts["list"] += 1
        return await self.inner.list(prefix, start_after=start_after)

    async def list_children(self, prefix: str = "") -> list[str]:
        self.counts["list"] += 1
        return await self.inner.list_children(prefix)

    async def rename(self, src_prefix: str, dst_prefix: str) -> None:
        self.counts["rename"] += 1
        await self.inner.rename(src_prefix, dst_prefix)


def _progress(text: str) -> None:
    print(f"[log_scale] {text}", file=sys.stderr, flush=True)


def _record_object() -> SaveRecord:
    created = datetime.datetime.now(datetime.UTC).isoformat()
    # This process as the writer, as a real save names it: writers can tell each other apart.
    return SaveRecord(uuid.uuid4().hex, created, writer(), None, [], [])


def _record() -> bytes:
    return _record_object().encode()


async def _fill(backend: Backend, log: str, count: int) -> None:
    limit = asyncio.Semaphore(32)

    async def one(number: int) -> None:
        async with limit:
            await backend.create(txlog.record_key(log, number), _record())

    await asyncio.gather(*(one(n) for n in range(1, count + 1)))


def _timed_append(backend: Counting, log: str) -> dict[str, Any]:
    backend.counts.clear()
    start = time.perf_counter()
    number, *_ = run_sync(txlog.append(backend, log, _record_object()))
    return {"s": time.perf_counter() - start, "number": number, "requests": dict(backend.counts)}


def measure_length(url: str, options: dict[str, Any], lengths: list[int]) -> list[dict[str, Any]]:
    rows = []
    for length in lengths:
        backend = Counting(registry.open_backend(url, options))
        log = f"len{length}-{uuid.uuid4().hex[:6]}/log"
        run_sync(_fill(backend.inner, log, length))
        first = _timed_append(backend, log)  # no hint: lists the whole log
        later = [_timed_append(backend, log) for _ in range(5)]  # from the hint
        rows.append({"length": length, "first": first, "later": later})
        _progress(f"length {length}: first {first}, later {later}")
    return rows


def _tree(step: int) -> dict[str, Any]:
    return {"step": step, "w": np.ones(16, np.float32), "layer": {"a": np.zeros(4), "b": 2}}


def measure_saves(root: str, options: dict[str, Any], lengths: list[int]) -> list[dict[str, Any]]:
    """Whole ``partialstore.save`` calls: the 1st of a session, and the one after N records.

    The N records are the synthetic session of :func:`_session`; the process
    then holds the hint a process that made those saves would hold (the log's
    last record), as every save of a training job after its first does.
    """
    rows = []
    for length in lengths:
        path = f"{root}/saves{length}-{uuid.uuid4().hex[:6]}"
        start = time.perf_counter()
        location = _session(path, options, length, compacted=False)
        first_s = time.perf_counter() - start  # includes the fill: only the row's label uses it
        hint = (length, txlog.SAVE)
        loghints.remember(location.backend, location.log_prefix, *hint, version=txlog.VERSION)
        later = []
        for step in range(5):
            start = time.perf_counter()
            partialstore.save(path, {f"more{step}": _tree(step)}, storage_options=options)
            later.append(time.perf_counter() - start)
        fresh = f"{root}/fresh{length}-{uuid.uuid4().hex[:6]}"
        firsts = []
        for step in range(5):
            start = time.perf_counter()
            partialstore.save(f"{fresh}-{step}", _tree(step), storage_options=options)
            firsts.append(time.perf_counter() - start)
        rows.append(
            {
                "length": length,
                "first_saves_s": firsts,
                "later_saves_s": later,
                "first_listing_s": _tail_listings(resolve(f"{fresh}-0", options)),
                "later_listing_s": _tail_listings(location),
            }
        )
        _progress(f"saves at {length}: {rows[-1]} (setup {first_s:.1f} s)")
    return rows


_LISTINGS = ("first_listing_s", "later_listing_s")


def _tail_listings(location: Location, times: int = 5) -> list[float]:
    """The store's time for the listing a save's look makes: from the last record on.

    The floor under a save's time that the store sets; emulators scan their
    keys on a LIST, so it grows with the log there (S3 and GCS read one page).
    """
    backend, log = location.backend, location.log_prefix
    last = run_sync(txlog.list_numbers(backend, log))[-1]
    spent = []
    for _ in range(times):
        start = time.perf_counter()
        run_sync(txlog.list_numbers(backend, log, after=last))  # what the look calls
        spent.append(time.perf_counter() - start)
    return spent


def _writer(url: str, options: dict[str, Any], log: str, count: int, go: float, out: Any) -> None:
    backend = Counting(registry.open_backend(url, options))
    run_sync(backend.exists(f"{log}/warm-up"))  # loop, connections: not part of a commit
    backend.counts.clear()
    time.sleep(max(0.0, go - time.time()))
    appends = []  # (seconds, attempts): an attempt is a create
    for _ in range(count):
        creates = backend.counts["create"]
        start = time.perf_counter()
        run_sync(txlog.append(backend, log, _record_object()))
        appends.append((time.perf_counter() - start, backend.counts["create"] - creates))
    out.put((time.time(), appends, dict(backend.counts)))


def measure_writers(
    url: str, options: dict[str, Any], writers: list[int], count: int
) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    rows = []
    for k in writers:
        log = f"k{k}-{uuid.uuid4().hex[:6]}/log"
        out = context.Queue()
        go = time.time() + 8.0 + 0.5 * k  # every worker imported and waiting
        procs = [
            context.Process(target=_writer, args=(url, options, log, count, go, out))
            for _ in range(k)
        ]
        for proc in procs:
            proc.start()
        reports = [out.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join()
        appends = sorted(pair for _, each, _ in reports for pair in each)
        latencies = [seconds for seconds, _ in appends]
        wall = max(end for end, _, _ in reports) - go
        requests: Counter[str] = Counter()
        for _, _, counts in reports:
            requests.update(counts)
        median = statistics.median(latencies)
        rows.append(
            {
                "writers": k,
                "commits": len(latencies),
                "commits_per_s": len(latencies) / wall,
                "p50_s": median,
                "max_s": max(latencies),
                "max_over_median": max(latencies) / median,
                # the attempts (creates) of the slowest appends, slowest first: a
                # long tail of lost races, or long pauses between few attempts
                "slowest_attempts": [tries for _, tries in appends[::-1][:5]],
                "attempts_max": max(tries for _, tries in appends),
                "requests_per_commit": sum(requests.values()) / len(latencies),
                "requests": dict(requests),
            }
        )
        _progress(f"writers {k}: {rows[-1]}")
    return rows


def _session(path: str, options: dict[str, Any], saves: int, compacted: bool) -> Any:
    """A session of ``saves`` saves at ``path`` (see the module docstring); its location."""
    from partialstore._commit import compaction  # only here: older trees lack it

    partialstore.save(path, _tree(1), storage_options=options)
    location = resolve(path, options)
    log = location.log_prefix
    template = run_sync(location.backend.read(txlog.record_key(log, 1)))
    entries = run_sync(txlog.read_log(location.backend, log))
    save_id = entries[0].record.save_id  # type: ignore[union-attr]

    async def fill() -> None:
        limit = asyncio.Semaphore(32)

        async def one(number: int) -> None:
            body = template.replace(save_id.encode(), uuid.uuid4().hex.encode())
            async with limit:
                await location.backend.create(txlog.record_key(log, number), body)

        await asyncio.gather(*(one(n) for n in range(2, saves + 1)))

    run_sync(fill())
    if compacted:
        for number in range(compaction.COMPACT_EVERY, saves + 1, compaction.COMPACT_EVERY):
            run_sync(compaction.compact(location, number))
    return location


def measure_finalize(
    root: str, options: dict[str, Any], counts: list[int], plain_max: int
) -> list[dict[str, Any]]:
    from partialstore._commit import finalizing

    rows = []
    for saves in [n for n in counts if n > 0]:
        for compacted in (True, False) if saves <= plain_max else (True,):
            path = f"{root}/fin{saves}-{'c' if compacted else 'p'}-{uuid.uuid4().hex[:6]}"
            location = _session(path, options, saves, compacted)
            counting = Counting(location.backend)
            start = time.perf_counter()
            run_sync(finalizing.finalize(dataclasses.replace(location, backend=counting)))
            seconds = time.perf_counter() - start
            row = {"saves": saves, "compaction": compacted, "s": seconds}
            rows.append({**row, "requests": dict(counting.counts)})
            _progress(f"finalize {rows[-1]}")
    return rows


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    network.add_network_arguments(parser)
    parser.add_argument(
        "--finalize-counts", default="", help="saves (default 10,1000,10000; 0: none)"
    )
    parser.add_argument(
        "--no-compaction-max",
        type=int,
        default=1000,
        help="largest session also finalized without compaction objects (default 1000)",
    )
    parser.add_argument("--lengths", default="", help="log lengths (default 10,300,10000)")
    parser.add_argument("--writers", default="", help="writer counts (default 1,4,16)")
    parser.add_argument("--per-writer", type=int, default=0, help="appends per writer (10)")


def _ints(text: str, default: list[int]) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text else default


def measure(run: Run) -> Measured:
    args = run.args
    lengths = _ints(args.lengths, [10, 100] if args.quick else [10, 300, 10000])
    writers = _ints(args.writers, [1, 2] if args.quick else [1, 4, 16])
    per_writer = args.per_writer or (3 if args.quick else 10)
    counts = _ints(args.finalize_counts, [10, 200] if args.quick else [10, 1000, 10000])
    body: dict[str, Any] = {"stores": {}}
    profile = network.profile_of(args)
    labels = network.store_labels(args.stores, args.network, profile)
    with started_stores(labels, run.scratch, profile) as stores:
        for name, env in stores.items():
            url, options = env.fresh("log"), dict(env.storage_options)
            body["stores"][name] = {
                "length": measure_length(url, options, lengths),
                "writers": measure_writers(url, options, writers, per_writer),
                "saves": measure_saves(url, options, lengths),
                "finalize": measure_finalize(url, options, counts, args.no_compaction_max),
            }
    config = {"lengths": lengths, "writers": writers, "per_writer": per_writer}
    config["finalize_counts"] = counts
    config["network"] = {"profiles": list(args.network), **profile.to_json()}
    return Measured(config=config, body=body, status=0)


def render(result: dict[str, Any]) -> str:
    out = ["## Log appends against log length and writers", ""]
    for store, data in result["stores"].items():
        out += [f"### {store}: append at log length N", ""]
        out += ["| N | first (no hint) | requests | later (hint), median | requests |"]
        out += ["|---|---|---|---|---|"]
        for row in data["length"]:
            later = statistics.median(r["s"] for r in row["later"])
            out.append(
                f"| {row['length']} | {row['first']['s'] * 1e3:.1f} ms | "
                f"{row['first']['requests']} | {later * 1e3:.1f} ms | "
                f"{row['later'][-1]['requests']} |"
            )
        out += ["", f"### {store}: K writers on one log", ""]
        out += [
            "| K | commits | commits/s | vs K=1 | p50 | max | max/p50 | requests/commit "
            "| attempts of the 5 slowest |"
        ]
        out += ["|---|---|---|---|---|---|---|---|---|"]
        single = next((r for r in data["writers"] if r["writers"] == 1), None)
        for row in data["writers"]:
            ratio = f"{row['commits_per_s'] / single['commits_per_s']:.2f}x" if single else ""
            out.append(
                f"| {row['writers']} | {row['commits']} | {row['commits_per_s']:.1f} | {ratio} | "
                f"{row['p50_s'] * 1e3:.0f} ms | {row['max_s'] * 1e3:.0f} ms | "
                f"{row['max_over_median']:.1f} | {row.get('requests_per_commit', 0):.1f} | "
                f"{', '.join(map(str, row.get('slowest_attempts', [])))} |"
            )
        out += ["", f"### {store}: finalize of N saves", ""]
        out += ["| N | compaction objects | finalize | requests |", "|---|---|---|---|"]
        for row in data["finalize"]:
            out.append(
                f"| {row['saves']} | {'yes' if row['compaction'] else 'no'} | "
                f"{row['s'] * 1e3:.0f} ms | {row['requests']} |"
            )
        out += ["", f"### {store}: whole saves, the 1st of a session and after N records", ""]
        out += [
            "| N | 1st save, median | save after N records, median | ratio "
            "| the look's listing alone, 1st / after N |"
        ]
        out += ["|---|---|---|---|---|"]
        for row in data.get("saves", []):
            first = statistics.median(row["first_saves_s"])
            later = statistics.median(row["later_saves_s"])
            listings = [statistics.median(row.get(k) or [0.0]) for k in _LISTINGS]
            out.append(
                f"| {row['length']} | {first * 1e3:.1f} ms | {later * 1e3:.1f} ms | "
                f"{later / first:.2f}x | {listings[0] * 1e3:.1f} ms / {listings[1] * 1e3:.1f} ms |"
            )
        out.append("")
    return "\n".join(out)


SCRIPT = Script(
    name="log_scale",
    description="Log appends against the log's length and the number of writers.",
    stores=("s3", "gcs", "local"),
    add_arguments=_add_arguments,
    measure=measure,
    render=render,
)


def main(argv: list[str] | None = None) -> int:
    return SCRIPT.main(argv)


if __name__ == "__main__":
    sys.exit(main())
