"""Measurements run in child processes, one fresh interpreter per group of jobs.

Why child processes: every system starts from a clean heap (so peak RSS is
not flattered or inflated by an earlier system's leftovers), Orbax cannot
slow partialstore through shared caches or threads, and a measurement that
runs past its time budget can be killed without losing the run.

The parent (:mod:`benchmarks.runner`) starts ``python -m benchmarks.worker``
with a task (a store and a list of jobs) as JSON on stdin; the worker writes
one JSON event per line on a private copy of stdout; its own stdout and
stderr (library logging) go to a log file in the output folder.

Each worker first runs one tiny untimed save/finalize/load (or raw
write/read), so one-off costs (imports, first connection, first TensorStore
context) are not charged to the first measured point.

Example (what the parent sends)::

    {"store": {...}, "jobs": [{"kind": "floor", "reps": 5}]}
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

from benchmarks.common import Budget, measure_call, peak_rss, stats_json
from benchmarks.stores import StoreEnv
from benchmarks.systems import (
    Workload,
    build_states,
    flat_arrays,
    make_checkpoint_system,
    state_bytes,
    verify_arrays,
    verify_tree,
)

Emit = Callable[[dict[str, Any]], None]
# partialstore's zarr3 layouts seen by this worker, by workload name, for a
# raw TensorStore job later in the same worker (quick runs group jobs).
_LAYOUTS: dict[str, list[dict[str, Any]]] = {}
# Checkpoint systems this worker made and warmed up, by name: a quick run's
# worker runs one job per system and round, and warms each system up once.
_SYSTEMS: dict[str, Any] = {}
WARMUP = Workload("warmup", saves=1, leaves=1, leaf_bytes=4096)


# ---------------------------------------------------------------------------
# Child side


def _job_floor(job: dict[str, Any], store: StoreEnv, emit: Emit) -> None:
    """One small ``create`` and one ``list`` through partialstore's backend for the store."""
    from partialstore import registry
    from partialstore._runtime.aio import run

    url = store.fresh("floor")
    root = store.group_of(url)
    if store.is_local:
        os.makedirs(root, exist_ok=True)
    backend = registry.open_backend(root, store.storage_options)
    creates: list[float] = []
    lists: list[float] = []
    try:
        run(backend.create("warm/0.json", b"{}"))  # untimed: first connection
        run(backend.list("warm"))
        for i in range(max(3, int(job["reps"]))):
            start = time.perf_counter()
            run(backend.create(f"floor/{i:08d}.json", b'{"kind": "floor"}'))
            middle = time.perf_counter()
            run(backend.list("floor"))
            end = time.perf_counter()
            creates.append(middle - start)
            lists.append(end - middle)
    finally:
        run(backend.close())
        store.remove(url)
    emit(
        {
            "type": "floor",
            "store": store.name,
            "backend": type(backend).__name__,
            "create": stats_json(creates),
            "list": stats_json(lists),
            "total": stats_json([c + li for c, li in zip(creates, lists, strict=True)]),
        }
    )


def _job_orbax_probe(job: dict[str, Any], store: StoreEnv, emit: Emit) -> None:
    from benchmarks.baselines import orbax_probe

    emit({"type": "probe", "store": store.name, "system": "orbax", "reason": orbax_probe(store)})


def _warm_up_checkpoint(system: Any, store: StoreEnv, states: list[Any] | None = None) -> None:
    """Untimed save, finalize and load: of a tiny leaf, or of ``states`` when given."""
    url = store.fresh("warmup")
    try:
        for state in states if states is not None else build_states(WARMUP, seed=1):
            system.save(url, state)
        system.finalize(url)
        system.load(url)
    finally:
        store.remove(url)


def _started(job: dict[str, Any], work: Workload) -> dict[str, Any]:
    return {
        "type": "point_started",
        "system": job["system"],
        "series": job.get("series", ""),
        "name": work.name,
        "budget_s": float(job["budget_s"]),
    }


def _scales(work: Workload, axis: str) -> dict[str, float]:
    # What each phase's cost grows with: saves write bytes (or leaves when the
    # leaves are tiny), finalize handles keys.
    save_scale = work.total_bytes if axis == "bytes" else work.keys
    return {"save": float(save_scale), "finalize": float(work.keys)}


def _job_finalize_series(job: dict[str, Any], store: StoreEnv, emit: Emit) -> None:
    """Finalize latency at each point of one series, for one checkpoint system."""
    system = make_checkpoint_system(job["system"], store)
    _warm_up_checkpoint(system, store)
    reps = int(job["reps"])
    budget = Budget(
        float(job["budget_s"]), exponents={"save": 1.0, "finalize": system.cost_exponent}
    )
    for point in job["points"]:
        work = Workload.from_json(point)
        base = {
            "type": "finalize_point",
            "store": store.name,
            "system": system.name,
            "series": job["series"],
            "workload": work.to_json(),
            "reps_planned": reps,
        }
        scales = _scales(work, job.get("axis", "keys"))
        skip = budget.check(scales)
        if skip:
            emit(base | {"status": "skipped", "reason": skip})
            continue
        emit(_started(job, work))
        try:
            states = build_states(work, seed=2)
            finals: list[float] = []
            saves: list[float] = []
            windows: list[dict[str, list[list[float]]]] = []
            started = time.perf_counter()
            for _ in range(reps):
                url = store.fresh(f"{job['series']}-{work.name}")
                try:
                    t0, m0 = time.perf_counter(), time.monotonic()
                    for state in states:
                        system.save(url, state)
                    t1, m1 = time.perf_counter(), time.monotonic()
                    system.finalize(url)
                    t2, m2 = time.perf_counter(), time.monotonic()
                finally:
                    store.remove(url)
                saves.append(t1 - t0)
                finals.append(t2 - t1)
                windows.append({"saves": [[m0, m1]], "finalize": [[m1, m2]]})
                spent = time.perf_counter() - started
                if len(finals) < reps and spent + spent / len(finals) > budget.seconds_per_point:
                    break
            del states
            n = len(finals)
            budget.record(
                scales, {"save": sum(saves) / n * reps, "finalize": sum(finals) / n * reps}
            )
            note = "" if n == reps else f"stopped after {n} of {reps} reps: over budget"
            emit(
                base
                | {
                    "status": "ok",
                    "finalize": stats_json(finals),
                    "saves_total": stats_json(saves),
                    "note": note,
                    "windows": windows,
                }
            )
        except Exception as err:
            emit(base | {"status": "error", "reason": _error_text(err)})


def _measure_checkpoint_rep(
    system: Any, store: StoreEnv, work: Workload, states: list[Any], verify: bool
) -> dict[str, Any]:
    url = store.fresh(f"tp-{work.name}")
    calls: list[float] = []
    call_rss: list[dict[str, Any]] = []
    windows: dict[str, list[list[float]]] = {"save": [], "finalize": [], "load": []}
    gc.collect()  # once per repetition; per call only malloc_trim (see peak_rss)
    try:
        for state in states:
            began = time.monotonic()
            seconds, rss, _ = measure_call(
                lambda state=state: system.save(url, state), collect=False
            )
            windows["save"].append([began, time.monotonic()])
            calls.append(seconds)
            call_rss.append(rss.to_json() | {"state_bytes": state_bytes(state)})
        began = time.monotonic()
        fin_seconds, fin_rss, _ = measure_call(lambda: system.finalize(url), collect=False)
        windows["finalize"].append([began, time.monotonic()])
        with peak_rss(collect=False) as load_rss:
            start, began = time.perf_counter(), time.monotonic()
            loaded = system.load(url)
            load_seconds = time.perf_counter() - start
            windows["load"].append([began, time.monotonic()])
        problem = verify_tree(loaded, states) if verify else None
        del loaded
        layouts: list[dict[str, Any]] = []
        if verify and system.name == "partialstore":
            from benchmarks.baselines import discover_layouts

            layouts = discover_layouts(store, url)
    finally:
        store.remove(url)
    return {
        "calls": calls,
        "call_rss": call_rss,
        "finalize": fin_seconds,
        "finalize_rss": fin_rss.to_json(),
        "load": load_seconds,
        "load_rss": load_rss.to_json(),
        "problem": problem,
        "layouts": layouts,
        "windows": windows,
    }


def _measure_raw_rep(
    system: str,
    store: StoreEnv,
    work: Workload,
    arrays: dict[str, Any],
    layouts: list[dict[str, Any]],
    verify: bool,
) -> dict[str, Any]:
    from benchmarks import baselines

    url = store.fresh(f"raw-{work.name}")
    sources: dict[str, int] = {}
    windows: dict[str, list[list[float]]] = {}
    gc.collect()  # once per repetition, as for the checkpoint systems
    try:
        if system == "tensorstore":
            kvstore = store.kvstore(url)
            began = time.monotonic()
            seconds, rss, sources = measure_call(
                lambda: baselines.raw_write(kvstore, arrays, layouts), collect=False
            )
            windows["save"] = [[began, time.monotonic()]]
            with peak_rss(collect=False) as load_rss:
                start, began = time.perf_counter(), time.monotonic()
                loaded = baselines.raw_read(kvstore, list(arrays))
                load_seconds = time.perf_counter() - start
                windows["load"] = [[began, time.monotonic()]]
        else:
            seconds, rss, _ = measure_call(
                lambda: baselines.numpy_write(url, arrays), collect=False
            )
            with peak_rss(collect=False) as load_rss:
                start = time.perf_counter()
                loaded = baselines.numpy_read(url, list(arrays))
                load_seconds = time.perf_counter() - start
        problem = verify_arrays(loaded, arrays) if verify else None
        del loaded
    finally:
        store.remove(url)
    total = sum(a.nbytes for a in arrays.values())
    return {
        "calls": [],
        "call_rss": [rss.to_json() | {"state_bytes": total}],
        "write": seconds,
        "load": load_seconds,
        "load_rss": load_rss.to_json(),
        "problem": problem,
        "layout_sources": sources,
        "windows": windows,
    }


def rss_summary(call_rss: list[dict[str, Any]]) -> dict[str, Any]:
    """Worst peak RSS over save calls (each ``RssSample.to_json()`` plus ``state_bytes``).

    Example::

        rss_summary([{"before": 1, "peak": 5, "extra": 4, "method": "m", "state_bytes": 2}])
    """
    worst = max(call_rss, key=lambda r: r["extra"])
    return {
        "max_extra_bytes": worst["extra"],
        "state_bytes_of_that_call": worst["state_bytes"],
        "max_peak_bytes": max(r["peak"] for r in call_rss),
        "method": worst["method"],
        "calls": call_rss,
    }


def _job_throughput(job: dict[str, Any], store: StoreEnv, emit: Emit) -> None:
    """Save per call, total save, finalize, load and peak RSS for each workload.

    The throughput script sends one repetition per job (``reps`` 1, ``round``
    r) and merges the rounds itself (:mod:`benchmarks.rounds`); ``seconds``
    (wall time of the repetitions) feeds its budget across rounds.
    """
    name = job["system"]
    raw = name in ("tensorstore", "numpy")
    pipelined = bool(job.get("pipelined"))
    system = None if raw else _SYSTEMS.get(f"{name}/{pipelined}")
    if not raw and system is None:
        system = make_checkpoint_system(name, store, pipelined=pipelined)
        _SYSTEMS[f"{name}/{pipelined}"] = system
        _warm_up_checkpoint(system, store)
    reps = int(job["reps"])
    for data in job["workloads"]:
        work = Workload.from_json(data)
        base = {
            "type": "throughput",
            "store": store.name,
            "system": name,
            "workload": work.to_json(),
            "reps_planned": reps,
            "round": int(job.get("round", 0)),
        }
        emit(_started(job, work))
        try:
            states = build_states(work, seed=3)
            arrays = flat_arrays(states) if raw else {}
            layouts = job.get("layouts", {}).get(work.name) or _LAYOUTS.get(work.name, [])
            # Untimed warm-up on this store with this workload's first array, the
            # same for every system: each repetition runs in a fresh worker, and
            # the first large write of a process sets up TensorStore's pools.
            if hasattr(system, "layouts"):  # raw TensorStore per save: partialstore's layouts
                system.layouts = layouts  # type: ignore[union-attr]
            if raw:
                first = dict(list(arrays.items())[:1])
                _measure_raw_rep(name, store, WARMUP, first, layouts, verify=False)
            else:
                _warm_up_checkpoint(system, store, [dict(list(flat_arrays(states).items())[:1])])
            results = []
            started = time.perf_counter()
            for rep in range(reps):
                if raw:
                    results.append(_measure_raw_rep(name, store, work, arrays, layouts, rep == 0))
                else:
                    results.append(_measure_checkpoint_rep(system, store, work, states, rep == 0))
                spent = time.perf_counter() - started
                if rep + 1 < reps and spent + spent / (rep + 1) > float(job["budget_s"]):
                    break
            seconds = time.perf_counter() - started
            del states, arrays
            summary = _summarize_throughput(results, reps, raw)
            if summary.get("layouts"):
                _LAYOUTS[work.name] = summary["layouts"]
            emit(base | summary | {"seconds": seconds})
        except Exception as err:
            emit(base | {"status": "error", "reason": _error_text(err)})


def _summarize_throughput(results: list[dict[str, Any]], reps: int, raw: bool) -> dict[str, Any]:
    n = len(results)
    problem = results[0]["problem"]
    summary: dict[str, Any] = {
        "status": "error" if problem else "ok",
        "reason": f"loaded data does not match what was saved: {problem}" if problem else "",
        "verified": problem is None,
        "note": "" if n == reps else f"stopped after {n} of {reps} reps: over budget",
        "load": stats_json([r["load"] for r in results]),
        "windows": [r["windows"] for r in results if r["windows"]],
        "save_rss": rss_summary([c for r in results for c in r["call_rss"]]),
        "load_rss": {
            "max_extra_bytes": max(r["load_rss"]["extra"] for r in results),
            "max_peak_bytes": max(r["load_rss"]["peak"] for r in results),
        },
    }
    if raw:
        summary["save_total"] = stats_json([r["write"] for r in results])
        summary["save_per_call"] = None
        summary["finalize"] = None
        summary["save_plus_finalize"] = summary["save_total"]
        summary["layout_sources"] = results[0]["layout_sources"]
    else:
        summary["save_per_call"] = stats_json([c for r in results for c in r["calls"]])
        summary["save_total"] = stats_json([sum(r["calls"]) for r in results])
        summary["finalize"] = stats_json([r["finalize"] for r in results])
        summary["save_plus_finalize"] = stats_json(
            [sum(r["calls"]) + r["finalize"] for r in results]
        )
        summary["layouts"] = results[0]["layouts"]
    return summary


def _error_text(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:400] if lines else ''}"


JOBS: dict[str, Callable[[dict[str, Any], StoreEnv, Emit], None]] = {
    "floor": _job_floor,
    "orbax_probe": _job_orbax_probe,
    "finalize_series": _job_finalize_series,
    "throughput": _job_throughput,
}


def emit_unavailable(
    job: dict[str, Any], store: StoreEnv, reason: str, emit: Emit, status: str = "does not run"
) -> None:
    """One event with ``status`` per point or workload of a job that will not run.

    ``status`` is "does not run" (the system cannot run on this store) or
    "skipped" (the job's point is over its time budget).
    """
    if job["kind"] == "orbax_probe":
        emit({"type": "probe", "store": store.name, "system": "orbax", "reason": reason})
    elif job["kind"] == "finalize_series":
        for point in job["points"]:
            emit(
                {
                    "type": "finalize_point",
                    "store": store.name,
                    "system": job["system"],
                    "series": job["series"],
                    "workload": Workload.from_json(point).to_json(),
                    "status": status,
                    "reason": reason,
                }
            )
    elif job["kind"] == "throughput":
        for data in job["workloads"]:
            emit(
                {
                    "type": "throughput",
                    "store": store.name,
                    "system": job["system"],
                    "workload": Workload.from_json(data).to_json(),
                    "round": int(job.get("round", 0)),
                    "status": status,
                    "reason": reason,
                }
            )


def child_main(stdin: TextIO = sys.stdin) -> int:
    """Entry point of a worker process: run the jobs of the task read from ``stdin``."""
    task = json.load(stdin)
    # Keep the event stream clean: library prints go to the log with stderr.
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(event: dict[str, Any]) -> None:
        events.write(json.dumps(event) + "\n")

    store = StoreEnv.from_json(task["store"])
    unavailable: dict[str, str] = {}

    def emit_and_note(event: dict[str, Any]) -> None:
        if event.get("type") == "probe" and event.get("reason"):
            unavailable[event["system"]] = event["reason"]
        emit(event)

    for job in task["jobs"]:
        try:
            reason = unavailable.get(job.get("system", ""))
            if reason:
                emit_unavailable(job, store, reason, emit)
                continue
            JOBS[job["kind"]](job, store, emit_and_note)
        except Exception as err:
            traceback.print_exc()
            emit({"type": "job_error", "job": job["kind"], "reason": _error_text(err)})
    emit({"type": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
