"""Interleaved repetitions: rotated system order, budgets across rounds, merged summaries.

The throughput benchmark runs its repetitions in rounds: round ``r`` runs one
repetition of every system, each in its own worker, in the system order
rotated by ``r``. Running all repetitions of one system before the next one
biased the comparisons: on the moto S3 emulator, the same code measured
raw TensorStore / partialstore = 0.79 with partialstore always first and
1.07 with the order alternating per repetition (the system that runs second,
after a cleanup, is favoured).

Each round reports its own summary (one ``throughput`` event); the parent
merges the rounds of each (store, system, workload) with
:func:`merge_rounds` into one summary of the same shape, with statistics
over every repetition. :class:`RoundBudget` applies the per-point time budget
across rounds run in separate workers.

Example::

    rotated(["partialstore", "orbax", "tensorstore"], 1)
    # ['orbax', 'tensorstore', 'partialstore']
    results = merge_rounds([e for e in events if e["type"] == "throughput"])
"""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks import network
from benchmarks.common import stats_json
from benchmarks.worker import rss_summary

STATS_FIELDS = ("save_per_call", "save_total", "finalize", "save_plus_finalize", "load")
Key = tuple[str, str, str]


def rotated(order: list[str], shift: int) -> list[str]:
    """``order`` rotated left by ``shift`` (round 0 keeps it as it is).

    Example::

        rotated(["a", "b", "c"], 2)  # ['c', 'a', 'b']
    """
    if not order:
        return []
    shift %= len(order)
    return order[shift:] + order[:shift]


def _key(event: dict[str, Any]) -> Key:
    return (event["store"], event["system"], event["workload"]["name"])


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(item for item in items if item))


def merge_summaries(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from the per-round summaries of one (store, system, workload).

    Statistics cover every measured repetition (values in round order); peak
    RSS is the worst over all calls; ``verified`` holds only if every
    measured round checked its loaded data; a round that errored makes the
    whole figure an error (its reason kept); rounds skipped for the budget
    become a ``stopped after k of n reps`` note. Where no round measured
    anything (does not run, skipped, crashed) the first round's event stands.

    Example::

        merged = merge_summaries([round0, round1, round2])
        merged["save_total"]["values"]  # one value per round
    """
    rounds = sorted(rounds, key=lambda r: r.get("round", 0))
    planned = sum(r.get("reps_planned") or 1 for r in rounds)
    measured = [r for r in rounds if r.get("load")]
    if not measured:
        return {k: v for k, v in rounds[0].items() if k != "round"} | {"reps_planned": planned}
    merged = {k: v for k, v in measured[0].items() if k != "round"}
    for field in STATS_FIELDS:
        parts = [r.get(field) for r in measured]
        merged[field] = (
            None if parts[0] is None else stats_json([v for p in parts for v in p["values"]])
        )
    merged["save_rss"] = rss_summary([c for r in measured for c in r["save_rss"]["calls"]])
    merged["load_rss"] = {
        name: max(r["load_rss"][name] for r in measured)
        for name in ("max_extra_bytes", "max_peak_bytes")
    }
    if any(r.get("requests") for r in measured):
        merged["requests"] = network.merge([r.get("requests") for r in measured])
    errors = [r for r in rounds if r.get("status") == "error"]
    skipped = [r for r in rounds if r.get("status") == "skipped"]
    notes = _unique([r.get("note", "") for r in measured])
    if skipped:
        why = skipped[0].get("reason", "").removeprefix("skipped: ")
        notes.insert(0, f"stopped after {len(measured)} of {planned} reps: {why}")
    merged |= {
        "status": "error" if errors else "ok",
        "reason": "; ".join(
            _unique([f"repetition {r.get('round', 0) + 1}: {r.get('reason')}" for r in errors])
        ),
        "verified": all(r.get("verified") is True for r in measured),
        "note": "; ".join(notes),
        "reps_planned": planned,
        "seconds": sum(r.get("seconds", 0.0) for r in measured),
    }
    return merged


def merge_rounds(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge the ``throughput`` events of every (store, system, workload), in first-seen order.

    Example::

        results = merge_rounds([e for e in events if e.get("type") == "throughput"])
    """
    groups: dict[Key, list[dict[str, Any]]] = {}
    for event in events:
        groups.setdefault(_key(event), []).append(event)
    return [merge_summaries(rounds) for rounds in groups.values()]


@dataclasses.dataclass
class RoundBudget:
    """The per-point time budget (all repetitions together) across rounds in separate workers.

    Before a round, :meth:`prepare` skips the job if the repetitions so far
    plus one more of their average would pass the budget (the rule a worker
    applies between its own repetitions), or if an earlier round of that
    point failed or was killed; otherwise it gives the job what is left of
    the budget, so the watchdog kills a repetition that runs far past it.
    :meth:`record` sees every event. Jobs hold one workload each.

    Example::

        budget = RoundBudget(150.0)
        budget.prepare("local", job)  # sets job["skip"] or job["budget_s"]
        budget.record(event)
    """

    seconds: float
    spent: dict[Key, list[float]] = dataclasses.field(default_factory=dict)
    stopped: dict[Key, str] = dataclasses.field(default_factory=dict)

    def prepare(self, store: str, job: dict[str, Any]) -> None:
        key = (store, job["system"], job["workloads"][0]["name"])
        times = self.spent.get(key, [])
        spent = sum(times)
        if key not in self.stopped and times and spent + spent / len(times) > self.seconds:
            reps = f"{len(times)} rep{'s' if len(times) > 1 else ''}"
            self.stopped[key] = (
                f"skipped: over budget ({reps} took {spent:.3g} s; "
                f"one more would pass the {self.seconds:.3g} s budget)"
            )
        if key in self.stopped:
            job["skip"] = self.stopped[key]
        else:
            job["budget_s"] = self.seconds - spent

    def record(self, event: dict[str, Any]) -> None:
        if event.get("type") != "throughput":
            return
        key = _key(event)
        if event.get("status") == "ok":
            self.spent.setdefault(key, []).append(float(event.get("seconds", 0.0)))
        elif event.get("status") == "skipped":
            self.stopped.setdefault(key, event.get("reason", "skipped"))
        else:  # an error, or "does not run": later rounds would only repeat it
            round_no = event.get("round", 0) + 1
            self.stopped.setdefault(key, f"skipped: repetition {round_no} did not complete")
