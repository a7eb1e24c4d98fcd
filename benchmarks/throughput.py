"""Save and load throughput of partialstore, Orbax and the raw limits, on three stores.

Workloads (float32 random arrays; ``--quick`` shrinks every one to seconds):

- ``a``: 4 saves x 4 leaves x 16 MiB (256 MiB)
- ``b``: 4 saves x 250 leaves x 4 KiB (small leaves)
- ``c``: 1 save of one 1 GiB array
- ``d``: 16 saves x 1 leaf x 16 MiB
- ``e``: 256 saves x 1 leaf x 64 KiB (many saves)

Per repetition (fresh path each time): every ``save`` call is timed and its
peak RSS measured, then ``finalize``, then ``load`` of the whole tree, and
every loaded byte is checked (untimed). The raw TensorStore baseline writes
and reads the same arrays, each as its own zarr3 array with the chunk grid
and codecs partialstore used for that shape (read from partialstore's own
``zarr.json`` files in the same run); on local disk ``np.save`` + ``fsync``
is a second raw limit.

Repetitions are interleaved across systems: for each store and workload,
round ``r`` runs one repetition of every system, each in a fresh worker, in
the system order rotated by ``r`` (round 0 starts with partialstore, whose
layouts the raw baseline copies). Running every repetition of one system
before the next biased the ratios by which system ran first (on moto S3, raw
TensorStore / partialstore measured 0.79 that way and 1.07 alternating);
:mod:`benchmarks.rounds` merges the rounds into one figure per system and
applies the time budget across them.

Usage::

    python -m benchmarks.throughput [--quick] [--stores local,s3,gcs] [--out DIR]
    partialstore bench throughput --quick
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks import network, report
from benchmarks.cli import Measured, Run, Script, add_list_option
from benchmarks.common import (
    GiB,
    MiB,
    fmt_bytes,
    fmt_ratio,
    fmt_stats,
    ratio,
)
from benchmarks.rounds import RoundBudget, merge_rounds, rotated
from benchmarks.runner import exit_status
from benchmarks.stores import STORE_NAMES
from benchmarks.systems import CHECKPOINT_SYSTEMS, PER_SAVE_RAW_SYSTEM, RAW_SYSTEMS, Workload

SYSTEMS = (*CHECKPOINT_SYSTEMS, PER_SAVE_RAW_SYSTEM, *RAW_SYSTEMS)
WORKLOADS = ("a", "b", "c", "d", "e")


def workloads(quick: bool) -> list[Workload]:
    """Workloads a-e (full sizes, or tiny ones for ``--quick``).

    Example::

        [w.total_bytes for w in workloads(quick=False)]
    """
    if quick:
        return [
            Workload("a", 2, 2, 256 << 10, "2 saves x 2 leaves x 256 KiB"),
            Workload("b", 2, 25, 4096, "2 saves x 25 leaves x 4 KiB"),
            Workload("c", 1, 1, 2 * MiB, "1 save of one 2 MiB array"),
            Workload("d", 4, 1, 256 << 10, "4 saves x 1 leaf x 256 KiB"),
            Workload("e", 8, 1, 4096, "8 saves x 1 leaf x 4 KiB"),
        ]
    return [
        Workload("a", 4, 4, 16 * MiB, "4 saves x 4 leaves x 16 MiB"),
        Workload("b", 4, 250, 4096, "4 saves x 250 leaves x 4 KiB"),
        Workload("c", 1, 1, GiB, "1 save of one 1 GiB array"),
        Workload("d", 16, 1, 16 * MiB, "16 saves x 1 leaf x 16 MiB"),
        Workload("e", 256, 1, 64 << 10, "256 saves x 1 leaf x 64 KiB"),
    ]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_list_option(parser, "--workloads", WORKLOADS, "workload", "workloads")
    parser.add_argument(
        "--emulator-max-bytes",
        type=int,
        default=256 * MiB,
        help="on S3/GCS emulators, workloads larger than this have their leaves shrunk to "
        "fit (every system on that store gets the same shrunk workload; default 256 MiB, "
        "so workload c is 256 MiB there: 1 GiB x 3 repetitions x 2 systems through an "
        "emulator on the same 2 cores would take minutes and measure the emulator)",
    )
    parser.add_argument(
        "--pipelined",
        action="store_true",
        help="partialstore saves with save_async (each save's arrays upload while the "
        "previous save commits) and finalize waits for them: read save+finalize, since "
        "the save calls then return before their data is written",
    )


def _plan(
    store: str, systems: list[str], works: list[Workload], args: argparse.Namespace
) -> list[list[dict[str, Any]]]:
    """Groups of jobs (one worker each): one repetition per job, in rotated rounds.

    For each workload, round r runs every system once, in the order rotated
    by r; round 0 starts with partialstore, so the raw baseline can copy its
    layouts from then on. A quick run puts all of a store's jobs in one worker.
    """
    if store != "local":
        works = [w.scaled_to(args.emulator_max_bytes) for w in works]
    order = [s for s in ("partialstore", *SYSTEMS[1:]) if s in systems]
    if store != "local" and "numpy" in order:
        order.remove("numpy")  # np.save writes files: local disk only
    jobs: list[dict[str, Any]] = []
    if store != "local" and "orbax" in order:
        jobs.append({"kind": "orbax_probe", "system": "orbax"})
    for work in works:
        for rnd in range(args.reps):
            jobs.extend(
                {
                    "kind": "throughput",
                    "system": system,
                    "round": rnd,
                    "workloads": [work.to_json()],
                    "reps": 1,
                    "budget_s": args.budget_s,
                    "pipelined": args.pipelined,
                }
                for system in rotated(order, rnd)
            )
    if args.quick:
        # One worker per store: process start-up (JAX, Orbax imports) dominates tiny runs.
        return [jobs]
    return [[job] for job in jobs]


def _timeout(jobs: list[dict[str, Any]], budget_s: float) -> float:
    total = 90.0
    for job in jobs:
        total += (budget_s * 1.5 + 60) * max(1, len(job.get("workloads", [])))
    return total


def _throughput(work: dict[str, Any], stats: dict[str, Any] | None) -> str:
    if not stats or not stats.get("median"):
        return "n/a"
    return f"{work['total_bytes'] / MiB / stats['median']:.3g} MiB/s"


def _rss_cell(entry: dict[str, Any]) -> str:
    rss = entry.get("save_rss") or {}
    if "max_extra_bytes" not in rss:
        return "n/a"
    state = rss.get("state_bytes_of_that_call") or 0
    share = f" ({rss['max_extra_bytes'] / state:.0%} of its state)" if state else ""
    return f"+{fmt_bytes(rss['max_extra_bytes'])}{share}"


def _ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    index = {(r["workload"]["name"], r["store"], r["system"]): r for r in results}
    rows = []
    for name, store in sorted({(r["workload"]["name"], r["store"]) for r in results}):

        def med(system: str, field: str, name: str = name, store: str = store) -> float | None:
            entry = index.get((name, store, system))
            if not entry or entry.get("status") != "ok" or not entry.get(field):
                return None
            return entry[field]["median"]

        rows.append(
            {
                "workload": name,
                "store": store,
                "save_vs_tensorstore": ratio(
                    med("partialstore", "save_total"), med("tensorstore", "save_total")
                ),
                "save_finalize_vs_tensorstore": ratio(
                    med("partialstore", "save_plus_finalize"), med("tensorstore", "save_total")
                ),
                "load_vs_tensorstore": ratio(
                    med("partialstore", "load"), med("tensorstore", "load")
                ),
                "save_vs_tensorstore_per_save": ratio(
                    med("partialstore", "save_total"), med("tensorstore-per-save", "save_total")
                ),
                "save_vs_numpy": ratio(
                    med("partialstore", "save_total"), med("numpy", "save_total")
                ),
                "load_vs_numpy": ratio(med("partialstore", "load"), med("numpy", "load")),
                "save_per_call_vs_orbax": ratio(
                    med("partialstore", "save_per_call"), med("orbax", "save_per_call")
                ),
                "finalize_vs_orbax": ratio(
                    med("partialstore", "finalize"), med("orbax", "finalize")
                ),
                "load_vs_orbax": ratio(med("partialstore", "load"), med("orbax", "load")),
            }
        )
    return rows


def _network_row(
    r: dict[str, Any], index: dict[tuple[str, str, str], Any], ratios: dict[tuple[str, str], Any]
) -> list[str]:
    """One row of the side-by-side table: a system's 20 ms result next to its plain one."""
    kind, _ = network.split_label(r["store"])
    name = r["workload"]["name"]
    plain = index.get((kind, r["system"], name)) or {}
    requests = r.get("requests") or {}
    ps = r["system"] == "partialstore"

    def save_ratio(store: str) -> str:
        return fmt_ratio((ratios.get((store, name)) or {}).get("save_vs_tensorstore")) if ps else ""

    return [
        name,
        kind,
        r["system"],
        fmt_stats(plain.get("save_total")) if plain.get("status") == "ok" else "n/a",
        fmt_stats(r.get("save_total")) if r.get("status") == "ok" else str(r.get("status")),
        save_ratio(kind),
        save_ratio(r["store"]),
        network.fmt_requests(requests.get("save")),
        network.fmt_requests(requests.get("finalize")) if ps else "",
        network.fmt_requests(requests.get("load")),
    ]


def _network_tables(result: dict[str, Any]) -> list[str]:
    """Plain emulator and latency profile side by side, with the requests of each operation."""
    results = result["results"]
    index = {(r["store"], r["system"], r["workload"]["name"]): r for r in results}
    ratios = {(r["store"], r["workload"]): r for r in result["ratios"]}
    rows = [
        _network_row(r, index, ratios)
        for r in results
        if "@" in r["store"] and r["system"] in ("partialstore", "tensorstore")
    ]
    if not rows:
        return []
    profile = result["config"].get("profile") or {}
    label, link = profile.get("label", ""), profile.get("bandwidth_mbps")
    return [
        f"### Plain emulator and the {label} profile",
        "",
        f"The profile: +{profile.get('rtt_ms', 0):g} ms per request, "
        + (f"{link:g} Mbit/s shared link" if link else "no bandwidth cap")
        + ". Requests per call (a raw system saves everything in one call), median over "
        "calls and repetitions, counted by the proxy; serial: the longest chain of "
        "requests in series.",
        "",
        report.markdown_table(
            [
                "workload",
                "store",
                "system",
                "save total, plain",
                f"save total, {label}",
                "save / raw TS, plain",
                f"save / raw TS, {label}",
                "requests per save call",
                "finalize requests",
                "load requests",
            ],
            rows,
        ),
        "",
    ]


def render_tables(result: dict[str, Any]) -> str:
    """The markdown report of a throughput result (what is printed on stdout)."""
    out = [f"## Save / load throughput ({'quick' if result['quick'] else 'full'} run)", ""]
    if result.get("config", {}).get("pipelined"):
        out.append(
            "partialstore saved with `save_async` (`--pipelined`): its save calls return "
            "before their data is written, so read save+finalize."
        )
        out.append("")
    if result.get("orbax"):
        out.append("Orbax on each store (probed with a tiny save/finalize/load in this run):")
        out.append("")
        out.append(report.orbax_table(result["orbax"]))
        out.append("")
    rows = []
    for r in result["results"]:
        work = r["workload"]
        label = f"{work['name']}: {work.get('description') or ''}".strip()
        if r.get("status") != "ok":
            why = {
                "does not run": "does not run (see the Orbax table)",
                "skipped": str(r.get("reason", "skipped")),
            }.get(r.get("status", ""), f"{r.get('status')}: {r.get('reason', '')}")
            rows.append([label, r["store"], r["system"], why] + [""] * 7)
            continue
        note = f" ({r['note']})" if r.get("note") else ""
        rows.append(
            [
                label + note,
                r["store"],
                r["system"],
                fmt_stats(r.get("save_per_call")),
                fmt_stats(r.get("save_total")),
                fmt_stats(r.get("finalize")),
                fmt_stats(r.get("load")),
                _throughput(work, r.get("save_plus_finalize")),
                _throughput(work, r.get("load")),
                _rss_cell(r),
                f"+{fmt_bytes(r.get('load_rss', {}).get('max_extra_bytes', 0))}",
            ]
        )
    out.append(
        report.markdown_table(
            [
                "workload",
                "store",
                "system",
                "save per call",
                "save total",
                "finalize",
                "load",
                "save+finalize MiB/s",
                "load MiB/s",
                "peak RSS added by a save",
                "RSS added by load",
            ],
            rows,
        )
    )
    out.append("")
    out.append("### Ratios of medians from this run (time ratios: below 1 = partialstore faster)")
    out.append("")
    out.append(
        report.markdown_table(
            [
                "workload",
                "store",
                "save / raw TS",
                "save / raw TS per save",
                "save+finalize / raw TS",
                "load / raw TS",
                "save / np.save",
                "load / np.load",
                "save per call / Orbax",
                "finalize / Orbax",
                "load / Orbax",
            ],
            [
                [
                    r["workload"],
                    r["store"],
                    fmt_ratio(r["save_vs_tensorstore"]),
                    fmt_ratio(r.get("save_vs_tensorstore_per_save")),
                    fmt_ratio(r["save_finalize_vs_tensorstore"]),
                    fmt_ratio(r["load_vs_tensorstore"]),
                    fmt_ratio(r["save_vs_numpy"]),
                    fmt_ratio(r["load_vs_numpy"]),
                    fmt_ratio(r["save_per_call_vs_orbax"]),
                    fmt_ratio(r["finalize_vs_orbax"]),
                    fmt_ratio(r["load_vs_orbax"]),
                ]
                for r in result["ratios"]
            ],
        )
    )
    out.append("")
    out.extend(_network_tables(result))
    out.append(
        "Cells: median [min .. max] over repetitions (n shown when below 3); save per call "
        "over every call of every repetition. Raw systems write everything in one call. "
        "Peak RSS: VmHWM during the call minus VmRSS before it (see benchmarks/README.md)."
    )
    return "\n".join(out)


def measure(run: Run) -> Measured:
    """Run every workload in rotated rounds of every system, on every store."""
    args = run.args
    works = [w for w in workloads(args.quick) if w.name in args.workloads]
    plan = [
        (store, jobs) for store in args.stores for jobs in _plan(store, args.systems, works, args)
    ]
    layouts: dict[tuple[str, str], list[dict[str, Any]]] = {}
    budget = RoundBudget(args.budget_s)

    def prepare(store: str, jobs: list[dict[str, Any]]) -> None:
        for job in jobs:
            if job["kind"] != "throughput":
                continue
            budget.prepare(store, job)
            # The raw TensorStore baseline writes with partialstore's own chunking.
            if job["system"] in ("tensorstore", "tensorstore-per-save"):
                job["layouts"] = {
                    w["name"]: layouts.get((store, w["name"]), []) for w in job["workloads"]
                }

    def keep(event: dict[str, Any]) -> None:
        budget.record(event)
        if event.get("system") == "partialstore" and event.get("layouts"):
            layouts[(event["store"], event["workload"]["name"])] = event["layouts"]

    events, workers, store_info, unavailable = run.plan(
        plan,
        label="throughput",
        timeout_for=lambda jobs: _timeout(jobs, args.budget_s),
        before_group=prepare,
        on_event=keep,
    )
    results = merge_rounds([e for e in events if e.get("type") == "throughput"])
    config = {
        "stores": args.stores,
        "systems": args.systems,
        "workloads": [w.to_json() for w in works],
        "reps": args.reps,
        "budget_s_per_workload": args.budget_s,
        "emulator_max_bytes": args.emulator_max_bytes,
        "network": args.network,
        "profile": args.profile.to_json(),
        "pipelined": args.pipelined,
    }
    body = {
        "stores": store_info,
        "orbax": report.orbax_status(args.stores, args.systems, events, unavailable),
        "results": results,
        "ratios": _ratios(results),
        "workers": workers,
    }
    return Measured(config, body, exit_status(workers, results))


def plot(result: dict[str, Any], path: str) -> None:
    """Save + finalize and load throughput per workload, one bar per system and store."""
    report.plot_throughput(
        result["results"],
        path,
        title=f"Save+finalize and load throughput ({'quick' if result['quick'] else 'full'} "
        f"run, {result['machine']['cpu_count']} CPUs)",
    )


SCRIPT = Script(
    name="throughput",
    description="Save/load throughput and peak RSS of partialstore, Orbax, raw "
    "TensorStore and np.save on local disk, S3 (moto) and GCS (fake-gcs-server).",
    stores=STORE_NAMES,
    systems=SYSTEMS,
    add_arguments=_add_arguments,
    measure=measure,
    render=render_tables,
    plot=plot,
)


# ``python -m benchmarks.throughput`` and ``partialstore bench throughput`` call this.
main = SCRIPT.main


if __name__ == "__main__":
    sys.exit(main())
