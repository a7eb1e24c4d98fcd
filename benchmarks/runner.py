"""Runs worker processes from the benchmark scripts and collects what they report.

Each group of jobs runs in a fresh ``python -m benchmarks.worker`` (see
:mod:`benchmarks.worker` for why); :func:`run_group` starts it, forwards its
events (for the progress bar), kills it when a point runs far past its
budget or the whole worker hangs, and makes sure every point that was asked
for comes back with a status, even when the worker never got to it.

Example::

    events, record = run_group(
        store, [{"kind": "floor", "reps": 5}],
        timeout_s=120, log_path="/tmp/bench/worker.log", cwd="/tmp/bench",
    )
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks import network, report
from benchmarks.baselines import orbax_missing
from benchmarks.common import REPO_ROOT
from benchmarks.stores import StoreEnv, started_stores
from benchmarks.systems import Workload
from benchmarks.worker import emit_unavailable

# A point still running at budget * factor + slack gets its worker killed.
POINT_KILL_FACTOR = 1.25
POINT_KILL_SLACK_S = 30.0


@dataclasses.dataclass
class WorkerOutcome:
    """What a worker reported: its events, and ``status`` ok / timeout / crashed."""

    events: list[dict[str, Any]]
    status: str
    detail: str
    seconds: float


def _log_tail(path: str, limit: int = 1500) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - limit))
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def run_worker(
    task: dict[str, Any],
    store: StoreEnv,
    *,
    timeout_s: float,
    log_path: str,
    cwd: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> WorkerOutcome:
    """Run ``task`` in a fresh ``python -m benchmarks.worker`` and collect its events.

    The worker is killed after ``timeout_s``; the events it sent before are kept.
    """
    env = dict(os.environ)
    env.update(store.env)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    started = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"\n===== worker: {json.dumps(task)[:500]}\n".encode())
        log.flush()
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=cwd or str(REPO_ROOT),
            env=env,
        )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(json.dumps(task).encode())
    process.stdin.close()
    lines: queue.Queue[bytes | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    events: list[dict[str, Any]] = []
    deadline = started + timeout_s
    point: dict[str, Any] | None = None  # the point running now, with its own deadline
    status, detail = "crashed", ""
    while True:
        now = time.monotonic()
        wait_until = min(deadline, point["deadline"]) if point else deadline
        try:
            line = lines.get(timeout=max(0.01, wait_until - now))
            if point and line is not None and time.monotonic() >= point["deadline"]:
                # Its output came in after the budget ran out (a busy machine reads
                # the pipe late): judged as over budget all the same.
                raise queue.Empty
        except queue.Empty:
            process.kill()
            if point and time.monotonic() >= point["deadline"]:
                status = "killed over budget"
                ran = time.monotonic() - point["started"]
                detail = (
                    f"skipped: over budget ({point['name']} ran past its "
                    f"{point['budget_s']:.0f} s budget; worker killed after {ran:.0f} s)"
                )
                events.append({**point, "type": "killed_point", "reason": detail})
            else:
                status = "timeout"
                detail = f"worker killed after {timeout_s:.0f} s (time budget)"
            break
        if line is None:
            break
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("type") == "done":
            status = "ok"
            continue
        if event.get("type") == "point_started":
            # Orbax cannot be interrupted inside a call, so a point that runs
            # far past its budget is stopped by killing the worker.
            budget = float(event["budget_s"])
            point = event | {
                "started": time.monotonic(),
                "deadline": time.monotonic() + budget * POINT_KILL_FACTOR + POINT_KILL_SLACK_S,
            }
            continue
        point = None
        events.append(event)
        if on_event is not None:
            on_event(event)
    returncode = process.wait()
    if status == "crashed":
        detail = f"worker exited with code {returncode}: {_log_tail(log_path)}"
    return WorkerOutcome(events, status, detail, time.monotonic() - started)


def _expected(job: dict[str, Any]) -> list[tuple[str, ...]]:
    kind = job["kind"]
    if kind == "finalize_series":
        return [("finalize_point", job["system"], job["series"], p["name"]) for p in job["points"]]
    if kind == "throughput":
        # A round (one repetition) per job; a quick run's worker holds every round.
        rnd = str(job.get("round", 0))
        return [("throughput", job["system"], rnd, w["name"]) for w in job["workloads"]]
    return [(kind,)]


def _identity(event: dict[str, Any]) -> tuple[str, ...]:
    kind = event.get("type", "")
    if kind == "finalize_point":
        return (kind, event["system"], event["series"], event["workload"]["name"])
    if kind == "throughput":
        return (kind, event["system"], str(event.get("round", 0)), event["workload"]["name"])
    return ({"probe": "orbax_probe"}.get(kind, kind),)


def run_group(
    store: StoreEnv,
    jobs: list[dict[str, Any]],
    *,
    timeout_s: float,
    log_path: str,
    cwd: str,
    unavailable: dict[tuple[str, str], str] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ``jobs`` in one worker; return its events and a record of the worker.

    Every point or workload a job asked for gets an event: where the worker
    was killed or crashed before reporting one, an ``error`` event saying so
    is added, so nothing silently disappears from the tables.

    ``unavailable`` maps ``(store, system)`` to why that system does not run
    there (filled from Orbax probes as they report); such jobs are answered
    with "does not run" events without starting a worker, and so are jobs
    with a ``skip`` reason (over their time budget), with "skipped" events.
    """
    unavailable = unavailable if unavailable is not None else {}
    answered: list[dict[str, Any]] = []
    runnable = []
    for job in jobs:
        reason = unavailable.get((store.name, job.get("system", "")))
        if reason:
            emit_unavailable(job, store, reason, answered.append)
        elif job.get("skip"):
            emit_unavailable(job, store, job["skip"], answered.append, status="skipped")
        else:
            runnable.append(job)
    for event in answered:
        if on_event is not None:
            on_event(event)
    if not runnable:
        record = {"store": store.name, "jobs": [], "status": "ok", "detail": "", "seconds": 0.0}
        return answered, record

    def note(event: dict[str, Any]) -> None:
        if event.get("type") == "probe" and event.get("reason"):
            unavailable[(store.name, event["system"])] = event["reason"]
        if on_event is not None:
            on_event(event)

    jobs = runnable
    outcome = run_worker(
        {"store": store.to_json(), "jobs": jobs},
        store,
        timeout_s=timeout_s,
        log_path=log_path,
        cwd=cwd,
        on_event=note,
    )
    killed = [e for e in outcome.events if e.get("type") == "killed_point"]
    events = answered + [
        e for e in outcome.events if e.get("type") not in ("job_error", "killed_point")
    ]
    job_errors = [e["reason"] for e in outcome.events if e.get("type") == "job_error"]
    detail = "; ".join(job_errors) or f"{outcome.status}: {outcome.detail}"
    seen = {_identity(e) for e in events}
    for job in jobs:
        over_budget = ""
        for ident in _expected(job):
            if ident in seen:
                continue
            status, reason = "error", f"not measured: {detail}"[:600]
            kill = killed[0] if killed else None
            if (
                kill
                and kill["system"] == job.get("system")
                and kill["series"] == job.get("series", "")
            ):
                if ident[-1] == kill["name"]:
                    over_budget = kill["reason"]
                    status, reason = "skipped", over_budget
                elif over_budget and job["kind"] == "finalize_series":
                    # Points grow along a series: the later ones would run longer still.
                    status = "skipped"
                    reason = f"skipped: over budget (a smaller point ran past it: {over_budget})"
            event: dict[str, Any] = {
                "type": ident[0] if ident[0] != "orbax_probe" else "probe",
                "store": store.name,
                "status": status,
                "reason": reason,
            }
            if ident[0] == "finalize_point":
                point = next(p for p in job["points"] if p["name"] == ident[3])
                event |= {
                    "system": ident[1],
                    "series": ident[2],
                    "workload": Workload.from_json(point).to_json(),
                }
            elif ident[0] == "throughput":
                work = next(w for w in job["workloads"] if w["name"] == ident[3])
                event |= {
                    "system": ident[1],
                    "round": int(ident[2]),
                    "workload": Workload.from_json(work).to_json(),
                }
            elif ident[0] == "orbax_probe":
                event |= {"system": "orbax", "reason": event["reason"]}
            events.append(event)
            if on_event is not None:
                on_event(event)
    record = {
        "store": store.name,
        "jobs": [_job_record(job) for job in jobs],
        "status": outcome.status,
        "detail": (outcome.detail + " " + "; ".join(job_errors)).strip()[-1500:],
        "seconds": outcome.seconds,
    }
    return events, record


def _job_record(job: dict[str, Any]) -> dict[str, Any]:
    # What ran, in order, without the bulky point lists and layouts.
    record = {k: v for k, v in job.items() if k not in ("points", "workloads", "layouts")}
    if "workloads" in job:
        record["workloads"] = [w["name"] for w in job["workloads"]]
    return record


# What run_plan returns: events, worker records, store info, (store, system) -> why not.
PlanResult = tuple[
    list[dict[str, Any]],
    list[dict[str, Any]],
    dict[str, dict[str, Any]],
    dict[tuple[str, str], str],
]


def run_plan(
    groups: list[tuple[str, list[dict[str, Any]]]],
    *,
    stores: list[str],
    systems: list[str],
    label: str,
    tmp_root: str,
    log_path: str,
    timeout_for: Callable[[list[dict[str, Any]]], float],
    before_group: Callable[[str, list[dict[str, Any]]], None] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    profile: network.NetworkProfile | None = None,
) -> PlanResult:
    """Start the stores, run every (store, jobs) group in a worker, with a progress bar.

    ``before_group`` may adjust a group's jobs from earlier results (the raw
    TensorStore baseline copies partialstore's layouts); ``on_event`` sees
    every event as it arrives. Returns ``(events, worker records, store info,
    unavailable)``, the last mapping (store, system) to why it cannot run.
    Stores named ``s3@20ms`` / ``gcs@20ms`` run behind a latency proxy built
    from ``profile``; their events get the request counts of each operation
    (:func:`benchmarks.network.annotate`).

    Example::

        events, workers, info, unavailable = run_plan(
            groups, stores=["local"], systems=["partialstore"], label="finalize",
            tmp_root=tmp, log_path=log, timeout_for=lambda jobs: 600.0,
        )
    """
    events: list[dict[str, Any]] = []
    workers: list[dict[str, Any]] = []
    proxies: dict[str, Any] = {}
    with started_stores(stores, tmp_root, profile, proxies) as envs:
        bar = report.ProgressBar(sum(expected_count(jobs) for _, jobs in groups), label)
        unavailable = dict(orbax_missing(stores, systems))
        for store, jobs in groups:
            if before_group is not None:
                before_group(store, jobs)

            def step(event: dict[str, Any]) -> None:
                network.annotate(event, proxies.get(event.get("store", "")))
                what = event.get("workload", {}).get("name") or event.get("type", "")
                if "round" in event:
                    what += f" rep {event['round'] + 1}"
                bar.step(f"{event['store']} {event.get('system', '')} {what}")
                if on_event is not None:
                    on_event(event)

            group_events, record = run_group(
                envs[store],
                jobs,
                timeout_s=timeout_for(jobs),
                log_path=log_path,
                cwd=tmp_root,
                unavailable=unavailable,
                on_event=step,
            )
            events.extend(group_events)
            workers.append(record)
        bar.close()
        store_info = {
            name: {"server": env.server, "endpoint_url": env.endpoint_url, "network": env.network}
            for name, env in envs.items()
        }
    return events, workers, store_info, unavailable


def expected_count(jobs: list[dict[str, Any]]) -> int:
    """How many events (progress steps) ``jobs`` will produce."""
    return sum(len(_expected(job)) for job in jobs)


def exit_status(workers: list[dict[str, Any]], results: list[dict[str, Any]]) -> int:
    """1 if a worker failed or a figure errored (not for "does not run"/"skipped"), else 0."""
    failed = any(w["status"] not in ("ok", "killed over budget") for w in workers)
    errored = any(r.get("status") == "error" for r in results)
    return 1 if failed or errored else 0
