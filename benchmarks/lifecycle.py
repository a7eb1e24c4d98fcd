"""CheckpointManager for a training run: latest step, retention, resume, next to Orbax.

Three measurements (issue 9), on local disk and S3 (moto):

- ``latest``: an evaluator or a restarted job asks for the latest step of a
  root that holds ``--steps`` finalized steps (default 1,000). Timed: a new
  ``partialstore.CheckpointManager(root).latest_step()``, and the same for
  Orbax (``ocp.CheckpointManager(root).latest_step()``, which lists the
  root when it is created; also ``all_steps(read=True)``, a re-listing).
  Requests are counted on S3 by an HTTP proxy
  (:class:`~partialstore.testing.faultproxy.FaultProxy`) between the client
  and moto; every system goes through it.
- ``retention``: a step of ``--objects`` objects (default 10,000) on S3 is
  deleted by retention (``keep_last=1``) after the next step's finalize:
  the time from that finalize's return until ``wait()`` returns, and the
  requests from the finalize's start until then, by kind.
- ``resume``: a restarted job on the root of ``--steps`` steps: a new
  manager, ``recover()`` and ``load()`` of the latest step, timed until the
  first loaded byte (the load returns).

Setup is not timed. The steps of a root are made by saving and finalizing
one step with each system, then copying it under the other step names
(Orbax: the step folder; partialstore: the step's objects, then
``reindex()`` to write the run index), so a 1,000-step root takes seconds
to build. Orbax on S3 is first probed: if ``ocp.CheckpointManager`` on the
S3 root raises or writes local files, its rows say "does not run" with the
probe's finding.

Usage::

    python -m benchmarks.lifecycle [--quick] [--stores local,s3] [--steps N] [--objects N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from benchmarks import report
from benchmarks.cli import Measured, Run, Script, run_script
from benchmarks.common import fmt_seconds, fmt_stats, ratio, stats_json
from benchmarks.stores import StoreEnv, started_stores

STORES = ("local", "s3")
REPS = 5


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="steps in the root (1000)")
    parser.add_argument(
        "--objects", type=int, default=None, help="objects in the retained step (10000)"
    )


def _state(step: int) -> dict[str, Any]:
    return {"params": {"w": np.full((256, 256), step, np.float32)}, "step": step}


@contextlib.contextmanager
def _proxied(store: StoreEnv) -> Iterator[tuple[dict[str, Any], Any]]:
    """Storage options through a counting proxy (S3), or the store's own (local)."""
    if store.is_local:
        yield store.storage_options, None
        return
    from partialstore.testing.faultproxy import FaultProxy

    with FaultProxy(store.endpoint_url) as proxy:
        yield {**store.storage_options, "endpoint_url": proxy.endpoint_url}, proxy


def _timed(fn: Callable[[], Any], proxy: Any) -> tuple[float, Any, int | None]:
    if proxy is not None:
        proxy.wait_idle()
        proxy.reset_log()
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    if proxy is None:
        return seconds, value, None
    proxy.wait_idle()
    return seconds, value, len(proxy.requests())


def _copy_steps(store: StoreEnv, root: str, names: list[str], source: str) -> None:
    """Copy the folder ``root/source`` to ``root/<name>`` for every name (untimed setup)."""
    if store.is_local:
        for name in names:
            shutil.copytree(os.path.join(root, source), os.path.join(root, name))
        return
    fs = store.filesystem()
    base = root.split("://", 1)[1]
    keys = [key for key in fs.find(f"{base}/{source}")]
    pairs = [
        (k, k.replace(f"{base}/{source}/", f"{base}/{name}/", 1)) for name in names for k in keys
    ]
    for start in range(0, len(pairs), 256):
        batch = pairs[start : start + 256]
        fs.copy([a for a, _ in batch], [b for _, b in batch])


def _partialstore_root(store: StoreEnv, steps: int) -> str:
    import partialstore

    root = store.fresh("lifecycle").rsplit("/", 1)[0] + "/partialstore"
    with partialstore.CheckpointManager(root, storage_options=store.storage_options) as manager:
        manager.save(0, _state(0))
        manager.finalize(0)
        _copy_steps(store, root, [f"step_{s:08d}" for s in range(1, steps)], "step_00000000")
        assert len(manager.reindex()) == steps
    return root


def _measure_partialstore_latest(store: StoreEnv, root: str, steps: int) -> dict[str, Any]:
    import partialstore

    times, counts = [], []
    with _proxied(store) as (options, proxy):
        for _ in range(REPS):

            def latest() -> int | None:
                with partialstore.CheckpointManager(root, storage_options=options) as m:
                    return m.latest_step()

            seconds, value, requests = _timed(latest, proxy)
            assert value == steps - 1, value
            times.append(seconds)
            counts.append(requests)
    return {"seconds": stats_json(times), "requests": counts[-1]}


def _orbax_root(store: StoreEnv, steps: int) -> tuple[str | None, str | None]:
    """A root of ``steps`` Orbax steps, or why Orbax does not run on this store."""
    import orbax.checkpoint as ocp

    root = store.fresh("lifecycle").rsplit("/", 1)[0] + "/orbax"
    # In an empty folder: a URL Orbax mistakes for a relative path lands there.
    cwd = tempfile.mkdtemp(prefix="orbax-lifecycle-cwd-")
    try:
        with contextlib.chdir(cwd), ocp.CheckpointManager(root) as manager:
            manager.save(0, args=ocp.args.StandardSave(_state(0)))
            manager.wait_until_finished()
    except Exception as error:  # what Orbax raises on this store is the finding
        return None, f"does not run: {type(error).__name__}: {str(error)[:160]}"
    finally:
        stray = [name for _, _, files in os.walk(cwd) for name in files]
        shutil.rmtree(cwd, ignore_errors=True)
    if not store.is_local and stray:
        return None, f"does not run: it wrote {len(stray)} local files instead of objects"
    _copy_steps(store, root, [str(s) for s in range(1, steps)], "0")
    return root, None


def _measure_orbax_latest(store: StoreEnv, root: str, steps: int) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    new_times, relist_times = [], []
    counts: list[int | None] = []
    with _proxied(store) as (_, proxy):
        for _ in range(REPS):

            def latest() -> int | None:
                with ocp.CheckpointManager(root) as m:
                    return m.latest_step()

            seconds, value, requests = _timed(latest, proxy)
            assert value == steps - 1, value
            new_times.append(seconds)
            counts.append(requests)
            with ocp.CheckpointManager(root) as manager:
                seconds, value, _ = _timed(lambda: manager.all_steps(read=True), None)
                relist_times.append(seconds)
    return {
        "seconds": stats_json(new_times),
        "relist_seconds": stats_json(relist_times),
        "requests": counts[-1],
    }


def _measure_listing_latest(store: StoreEnv, root: str, steps: int) -> dict[str, Any]:
    """Orbax's method where Orbax cannot run: list the step folders, take the newest.

    What ``ocp.CheckpointManager.latest_step`` does on a bucket (one delimiter
    listing of the root, names parsed), over the same root of ``steps`` steps.
    """
    import fsspec

    times: list[float] = []
    counts: list[int | None] = []
    with _proxied(store) as (options, proxy):
        for _ in range(REPS):
            fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)

            def latest(fs: Any = fs) -> int:
                names = fs.ls(root.split("://", 1)[1], detail=False, refresh=True)
                return max(int(name.rsplit("_", 1)[1]) for name in names if "step_" in name)

            seconds, value, requests = _timed(latest, proxy)
            assert value == steps - 1, value
            times.append(seconds)
            counts.append(requests)
    return {"seconds": stats_json(times), "requests": counts[-1], "listing": True}


async def _fill(store: StoreEnv, prefix: str, objects: int) -> None:
    from partialstore import open_backend

    backend = open_backend(prefix, store.storage_options)
    limit = asyncio.Semaphore(64)

    async def one(number: int) -> None:
        async with limit:
            await backend.write(f"obj-{number:06d}", b"x" * 64)

    await asyncio.gather(*(one(n) for n in range(objects)))


def _requests_by_kind(proxy: Any) -> dict[str, int]:
    proxy.wait_idle()
    kinds: dict[str, int] = {}
    for record in proxy.requests():
        kind = record.method + (" ?delete (DeleteObjects)" if "delete" in record.query else "")
        if record.method == "GET" and ("list-type" in record.query or "prefix" in record.query):
            kind = "GET (list)"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _retention_once(
    store: StoreEnv, root: str, options: dict[str, Any], proxy: Any, objects: int
) -> dict[str, Any]:
    import partialstore
    from partialstore._runtime.aio import run

    with partialstore.CheckpointManager(root, storage_options=options, keep_last=1) as m:
        m.save(0, _state(0))
        m.finalize(0)
        # Objects in the step's own data folder, so they are the step's (untimed).
        run(_fill(store, f"{root}/step_00000000/data/extra", objects))
        m.save(1, _state(1))
        if proxy is not None:
            proxy.wait_idle()
            proxy.reset_log()
        m.finalize(1)
        finalized = time.perf_counter()
        m.wait()
        seconds = time.perf_counter() - finalized
        assert m.steps() == [1]
    kinds = _requests_by_kind(proxy) if proxy is not None else {}
    return {
        "objects": objects,
        "seconds": seconds,
        "requests_by_kind": kinds,
        "requests": sum(kinds.values()) if kinds else None,
    }


def _measure_retention(store: StoreEnv, objects: int) -> dict[str, Any]:
    root = store.fresh("retention").rsplit("/", 1)[0]
    with _proxied(store) as (options, proxy):
        return _retention_once(store, root, options, proxy, objects)


def _measure_resume(store: StoreEnv, root: str, steps: int) -> dict[str, Any]:
    import partialstore

    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        with partialstore.CheckpointManager(root, storage_options=store.storage_options) as m:
            step = m.recover()
            state = m.load(step)
        times.append(time.perf_counter() - start)
        assert state["step"] == 0 and step == steps - 1  # copies of step 0's checkpoint
    return {"seconds": stats_json(times)}


def _measure_store(store: StoreEnv, steps: int, objects: int) -> dict[str, Any]:
    os.environ.update(store.env)
    row: dict[str, Any] = {"store": store.name, "steps": steps}
    root = _partialstore_root(store, steps)
    row["partialstore"] = _measure_partialstore_latest(store, root, steps)
    orbax_root, finding = _orbax_root(store, steps)
    row["orbax"] = (
        {"finding": finding}
        if orbax_root is None
        else _measure_orbax_latest(store, orbax_root, steps)
    )
    if orbax_root is None and store.name == "s3":
        row["orbax"] |= _measure_listing_latest(store, root, steps)
    row["resume"] = _measure_resume(store, root, steps)
    if not store.is_local:
        row["retention"] = _measure_retention(store, objects)
    return row


def measure(run: Run) -> Measured:
    steps = run.args.steps or (40 if run.args.quick else 1000)
    objects = run.args.objects or (300 if run.args.quick else 10_000)
    rows = []
    with started_stores(run.args.stores, run.scratch) as stores:
        for name in run.args.stores:
            rows.append(_measure_store(stores[name], steps, objects))
    config = {"stores": run.args.stores, "steps": steps, "objects": objects, "reps": REPS}
    return Measured(config=config, body={"rows": rows}, status=0)


def _count(requests: int | None) -> str:
    return "not counted (local disk)" if requests is None else str(requests)


def render(result: dict[str, Any]) -> str:
    latest_rows, other_rows = [], []
    for row in result["rows"]:
        ps, orbax = row["partialstore"], row["orbax"]
        orbax_cell = fmt_stats(orbax["seconds"]) if "seconds" in orbax else ""
        if "finding" in orbax:  # Orbax itself did not run: its method, by listing
            orbax_cell = f"Orbax {orbax['finding']}" + (
                f"; its method (list the step folders): {orbax_cell}" if orbax_cell else ""
            )
        speedup = (
            None
            if "seconds" not in orbax
            else ratio(orbax["seconds"]["median"], ps["seconds"]["median"])
        )
        latest_rows.append(
            [
                row["store"],
                row["steps"],
                fmt_stats(ps["seconds"]),
                _count(ps["requests"]),
                orbax_cell,
                "" if "seconds" not in orbax else _count(orbax.get("requests")),
                fmt_stats(orbax.get("relist_seconds")),
                "" if speedup is None else f"{speedup:.1f}x",
            ]
        )
        retention = row.get("retention")
        other_rows.append(
            [
                row["store"],
                fmt_stats(row["resume"]["seconds"]),
                "" if retention is None else f"{retention['objects']} objects",
                "" if retention is None else fmt_seconds(retention["seconds"]),
                "" if retention is None else retention["requests"],
                "" if retention is None else retention["requests_by_kind"],
            ]
        )
    return "\n\n".join(
        [
            "## CheckpointManager: latest step (new manager + latest_step())",
            report.markdown_table(
                [
                    "store",
                    "steps",
                    "partialstore",
                    "requests",
                    "Orbax",
                    "Orbax requests",
                    "Orbax all_steps(read=True)",
                    "Orbax / partialstore",
                ],
                latest_rows,
            ),
            "## Resume (new manager, recover(), load of the latest step) and retention",
            report.markdown_table(
                [
                    "store",
                    "resume",
                    "retained step",
                    "retention after finalize",
                    "requests",
                    "requests by kind",
                ],
                other_rows,
            ),
        ]
    )


SCRIPT = Script(
    name="lifecycle",
    description=__doc__.splitlines()[0],
    stores=STORES,
    add_arguments=_add_arguments,
    measure=measure,
    render=render,
)


def main(argv: list[str] | None = None) -> int:
    return run_script(SCRIPT, argv)


if __name__ == "__main__":
    raise SystemExit(main())
