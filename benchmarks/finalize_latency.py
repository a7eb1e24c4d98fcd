"""Finalize latency against bytes, saves and leaves, on local disk, S3 and GCS.

For every point, each repetition makes a fresh checkpoint path, runs the
point's partial saves (not timed for this figure), then times ``finalize``
alone. Series (full run; ``--quick`` shrinks them to seconds):

- ``bytes``: 4 saves x 4 leaves, total 1 MiB to 1 GiB (distinct random arrays).
- ``saves``: 1 to 1,000 saves of 10 leaves x 4 KiB.
- ``leaves``: 4 saves of 10 to 10,000 leaves x 1 KiB.
- ``anchor``: 24 saves x 250 leaves x 4 KiB, the point where Orbax took 43 s.

Each store's floor (one small ``create`` plus one ``list`` through
partialstore's backend) is measured in the same run. Orbax is probed on each
store first; where stock Orbax does not run, its rows say so and why. Points
predicted to exceed ``--budget-s`` are reported as skipped, never waited for.

Usage::

    python -m benchmarks.finalize_latency [--quick] [--stores local,s3,gcs] [--out DIR]
    partialstore bench finalize_latency --quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from benchmarks import report
from benchmarks.common import (
    GiB,
    MiB,
    fmt_ratio,
    fmt_seconds,
    fmt_stats,
    loglog_slope,
    machine_description,
    ratio,
)
from benchmarks.runner import (
    add_common_arguments,
    exit_status,
    parse_list,
    run_plan,
)
from benchmarks.stores import STORE_NAMES
from benchmarks.systems import CHECKPOINT_SYSTEMS, Workload

SERIES = ("bytes", "saves", "leaves", "anchor")
# x-axis of each plotted series: (label, kind).
AXES = {
    "bytes": ("total bytes", "bytes"),
    "saves": ("number of saves", "count"),
    "leaves": ("leaves per save", "count"),
}


def series_points(series: str, quick: bool) -> list[Workload]:
    """The workloads of one series, smallest first.

    Example::

        [w.total_bytes for w in series_points("bytes", quick=True)]
    """
    if series == "bytes":
        totals = [256 << 10, 1 * MiB] if quick else [m * MiB for m in (1, 4, 16, 64, 256, 1024)]
        return [
            Workload(report.describe_size(t), saves=4, leaves=4, leaf_bytes=t // 16) for t in totals
        ]
    if series == "saves":
        counts = [1, 4] if quick else [1, 4, 16, 64, 256, 1000]
        return [
            Workload(f"{n} saves", saves=n, leaves=10, leaf_bytes=4096, distinct=False)
            for n in counts
        ]
    if series == "leaves":
        counts = [10, 40] if quick else [10, 100, 1000, 10000]
        return [
            Workload(f"{n} leaves", saves=4, leaves=n, leaf_bytes=1024, distinct=False)
            for n in counts
        ]
    if series == "anchor":
        saves, leaves = (3, 10) if quick else (24, 250)
        return [
            Workload(
                f"{saves}x{leaves}", saves=saves, leaves=leaves, leaf_bytes=4096, distinct=False
            )
        ]
    raise ValueError(f"unknown series {series!r}")


def x_value(series: str, workload: dict[str, Any]) -> float:
    """The plotted x of a point: total bytes, saves, leaves per save, or keys."""
    return {
        "bytes": workload["total_bytes"],
        "saves": workload["saves"],
        "leaves": workload["leaves"],
    }.get(series, workload["keys"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.finalize_latency",
        description="Finalize latency of partialstore and Orbax against bytes, saves and "
        "leaves, on local disk, S3 (moto) and GCS (fake-gcs-server).",
    )
    add_common_arguments(parser, systems=CHECKPOINT_SYSTEMS)
    parser.add_argument(
        "--series",
        default=",".join(SERIES),
        help=f"comma-separated series (default: {','.join(SERIES)})",
    )
    parser.add_argument(
        "--emulator-max-bytes",
        type=int,
        default=GiB,
        help="largest point of the bytes series on S3/GCS emulators (default 1 GiB); "
        "larger points are left out",
    )
    parser.add_argument(
        "--emulator-max-saves",
        type=int,
        default=256,
        help="largest point of the saves series on S3/GCS emulators (default 256; every "
        "save is several requests to an emulator sharing the 2 cores, so 1,000 saves x 3 "
        "repetitions would take most of the run); larger points are left out",
    )
    return parser


def _jobs_for(
    store: str, system: str, series: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    if system == "partialstore":
        jobs.append({"kind": "floor", "reps": max(5, args.reps)})
    if system == "orbax" and store != "local":
        jobs.append({"kind": "orbax_probe", "system": "orbax"})
    for name in series:
        points = series_points(name, args.quick)
        if store != "local" and name == "bytes":
            points = [p for p in points if p.total_bytes <= args.emulator_max_bytes]
        if store != "local" and name == "saves":
            points = [p for p in points if p.saves <= args.emulator_max_saves]
        jobs.append(
            {
                "kind": "finalize_series",
                "system": system,
                "series": name,
                "axis": "bytes" if name == "bytes" else "keys",
                "points": [p.to_json() for p in points],
                "reps": args.reps,
                "budget_s": args.budget_s,
            }
        )
    return jobs


def _timeout(jobs: list[dict[str, Any]], budget_s: float) -> float:
    # A hard stop well past the budgets: only a hung worker ever reaches it.
    total = 90.0
    for job in jobs:
        total += budget_s * 1.5 * len(job.get("points", [])) + 60
    return total


def _summary(points: list[dict[str, Any]], floors: dict[str, float]) -> dict[str, Any]:
    def med(system: str, store: str, series: str) -> list[tuple[float, float]]:
        return sorted(
            (p["x"], p["finalize"]["median"])
            for p in points
            if p["system"] == system
            and p["store"] == store
            and p["series"] == series
            and p.get("status") == "ok"
        )

    summary: dict[str, Any] = {}
    for store in sorted({p["store"] for p in points}):
        entry: dict[str, Any] = {"floor_median_s": floors.get(store)}
        by_bytes = med("partialstore", store, "bytes")
        if len(by_bytes) >= 2:
            entry["bytes_largest_over_smallest"] = ratio(by_bytes[-1][1], by_bytes[0][1])
            entry["bytes_range"] = [by_bytes[0][0], by_bytes[-1][0]]
            entry["largest_bytes_over_floor"] = ratio(by_bytes[-1][1], floors.get(store))
        for system in CHECKPOINT_SYSTEMS:
            for series in ("saves", "leaves"):
                values = med(system, store, series)
                if len(values) >= 2:
                    entry[f"{system}_{series}_loglog_slope"] = loglog_slope(
                        [v[0] for v in values], [v[1] for v in values]
                    )
        ps_anchor = med("partialstore", store, "anchor")
        ob_anchor = med("orbax", store, "anchor")
        if ps_anchor and ob_anchor:
            entry["anchor_orbax_over_partialstore"] = ratio(ob_anchor[0][1], ps_anchor[0][1])
        summary[store] = entry
    return summary


def _cell(point: dict[str, Any] | None) -> str:
    if point is None:
        return "not run"
    if point.get("status") == "ok":
        text = fmt_stats(point["finalize"])
        return f"{text} ({point['note']})" if point.get("note") else text
    if point.get("status") == "does not run":
        return "does not run (see the Orbax table)"
    if point.get("status") == "skipped":
        return str(point.get("reason", "skipped"))
    return f"{point.get('status')}: {point.get('reason', '')}"


def render_tables(result: dict[str, Any]) -> str:
    """The markdown report of a finalize-latency result (what is printed on stdout)."""
    out = [f"## Finalize latency ({'quick' if result['quick'] else 'full'} run)", ""]
    floors = result["stores"]
    out.append("Store floor: one small `create` plus one `list` through partialstore's backend.")
    out.append("")
    out.append(
        report.markdown_table(
            ["store", "server", "create", "list", "create + list"],
            [
                [
                    name,
                    info["server"],
                    fmt_stats((info.get("floor") or {}).get("create")),
                    fmt_stats((info.get("floor") or {}).get("list")),
                    fmt_stats((info.get("floor") or {}).get("total")),
                ]
                for name, info in floors.items()
            ],
        )
    )
    out.append("")
    if result.get("orbax"):
        out.append("Orbax on each store (probed with a tiny save/finalize/load in this run):")
        out.append("")
        out.append(report.orbax_table(result["orbax"]))
        out.append("")
    points = result["points"]
    index = {(p["system"], p["store"], p["series"], p["workload"]["name"]): p for p in points}
    for series in result["config"]["series"]:
        names: list[str] = []
        for p in points:
            if p["series"] == series and p["workload"]["name"] not in names:
                names.append(p["workload"]["name"])
        if not names:
            continue
        out.append(f"### Finalize against {series}")
        out.append("")
        rows = []
        for store in floors:
            floor = (floors[store].get("floor") or {}).get("total", {}).get("median")
            for name in names:
                ps = index.get(("partialstore", store, series, name))
                ob = index.get(("orbax", store, series, name))
                ps_med = ps["finalize"]["median"] if ps and ps.get("status") == "ok" else None
                ob_med = ob["finalize"]["median"] if ob and ob.get("status") == "ok" else None
                rows.append(
                    [
                        name,
                        store,
                        _cell(ps),
                        _cell(ob),
                        fmt_ratio(ratio(ps_med, ob_med)),
                        fmt_ratio(ratio(ps_med, floor)),
                    ]
                )
        out.append(
            report.markdown_table(
                [
                    "point",
                    "store",
                    "partialstore finalize",
                    "Orbax finalize",
                    "partialstore / Orbax",
                    "partialstore / floor",
                ],
                rows,
            )
        )
        out.append("")
    out.append("### Summary (ratios of medians from this run)")
    out.append("")
    rows = []
    for store, entry in result["summary"].items():
        rows.append(
            [
                store,
                fmt_seconds(entry.get("floor_median_s") or float("nan")),
                fmt_ratio(entry.get("bytes_largest_over_smallest")),
                fmt_ratio(entry.get("largest_bytes_over_floor")),
                _slope(entry.get("partialstore_saves_loglog_slope")),
                _slope(entry.get("partialstore_leaves_loglog_slope")),
                _slope(entry.get("orbax_saves_loglog_slope")),
                _slope(entry.get("orbax_leaves_loglog_slope")),
                fmt_ratio(entry.get("anchor_orbax_over_partialstore")),
            ]
        )
    out.append(
        report.markdown_table(
            [
                "store",
                "floor",
                "finalize largest / smallest bytes",
                "largest bytes / floor",
                "slope vs saves (ps)",
                "slope vs leaves (ps)",
                "slope vs saves (Orbax)",
                "slope vs leaves (Orbax)",
                "anchor: Orbax / partialstore",
            ],
            rows,
        )
    )
    out.append("")
    out.append(
        "Cells: median [min .. max] over repetitions (n shown when below 3). Slopes are "
        "least-squares log-log slopes of the median (1 = linear growth)."
    )
    return "\n".join(out)


def _slope(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    """Run the finalize-latency benchmark; print the table, write JSON and PNG to ``--out``.

    Example::

        main(["--quick", "--stores", "local", "--out", "/tmp/bench"])
    """
    args = _parser().parse_args(argv)
    stores = parse_list(args.stores, STORE_NAMES, "store")
    systems = parse_list(args.systems, CHECKPOINT_SYSTEMS, "system")
    series = parse_list(args.series, SERIES, "series")
    args.reps = args.reps or (2 if args.quick else 3)
    args.budget_s = args.budget_s or (30.0 if args.quick else 150.0)
    os.makedirs(args.out, exist_ok=True)
    out_json = os.path.join(args.out, "finalize_latency.json")
    out_png = os.path.join(args.out, "finalize_latency.png")
    out_md = os.path.join(args.out, "finalize_latency.md")
    log_path = os.path.join(args.out, "finalize_latency-workers.log")
    tmp_root = tempfile.mkdtemp(prefix="partialstore-bench-", dir=args.tmp_dir)
    started = time.monotonic()
    machine = machine_description(tmp_root)
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for store in stores:
        jobs = [j for system in systems for j in _jobs_for(store, system, series, args)]
        if args.quick:
            # One worker per store: process start-up dominates tiny runs.
            groups.append((store, jobs))
        else:
            groups.extend((store, [job]) for job in jobs)
    try:
        events, workers, store_info, unavailable = run_plan(
            groups,
            stores=stores,
            systems=systems,
            label="finalize",
            tmp_root=tmp_root,
            log_path=log_path,
            timeout_for=lambda jobs: _timeout(jobs, args.budget_s),
        )
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    for event in events:
        if event.get("type") == "floor":
            store_info[event["store"]]["floor"] = event
            store_info[event["store"]]["floor_backend"] = event.get("backend")
    points = [e for e in events if e.get("type") == "finalize_point"]
    for point in points:
        point["x"] = x_value(point["series"], point["workload"])
    floors = {
        name: (info.get("floor") or {}).get("total", {}).get("median")
        for name, info in store_info.items()
    }
    result = {
        "benchmark": "finalize_latency",
        "format": 1,
        "command": "python -m benchmarks.finalize_latency " + " ".join(argv or sys.argv[1:]),
        "quick": bool(args.quick),
        "config": {
            "stores": stores,
            "systems": systems,
            "series": series,
            "reps": args.reps,
            "budget_s_per_point": args.budget_s,
            "emulator_max_bytes": args.emulator_max_bytes,
            "emulator_max_saves": args.emulator_max_saves,
        },
        "machine": machine,
        "stores": store_info,
        "orbax": report.orbax_status(stores, systems, events, unavailable),
        "points": points,
        "summary": _summary(points, floors),
        "workers": workers,
        "elapsed_s": time.monotonic() - started,
    }
    tables = render_tables(result)
    report.write_json(out_json, result)
    with open(out_md, "w") as handle:
        handle.write(tables + "\n")
    print(tables, flush=True)
    report.plot_finalize_scaling(
        points,
        {k: v for k, v in floors.items() if v},
        {k: v for k, v in AXES.items() if k in series},
        out_png,
        title=f"Finalize latency ({'quick' if args.quick else 'full'} run, "
        f"{machine['cpu_count']} CPUs); dotted: store floor",
    )
    print(f"\nWrote {out_json}, {out_png} and {out_md}", file=sys.stderr)
    return exit_status(workers, points)


if __name__ == "__main__":
    sys.exit(main())
