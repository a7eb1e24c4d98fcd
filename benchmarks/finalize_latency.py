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
import sys
from typing import Any

from benchmarks import network, report
from benchmarks.cli import Measured, Run, Script, add_list_option
from benchmarks.common import (
    GiB,
    MiB,
    fmt_ratio,
    fmt_seconds,
    fmt_stats,
    loglog_slope,
    ratio,
)
from benchmarks.runner import exit_status
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


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_list_option(parser, "--series", SERIES, "series", "series")
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
    out.extend(_network_tables(result))
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


def _network_tables(result: dict[str, Any]) -> list[str]:
    """Plain emulator and latency profile side by side, with the requests of each operation."""
    points = [p for p in result["points"] if p["system"] == "partialstore"]
    profiled = [p for p in points if "@" in p["store"]]
    if not profiled:
        return []
    index = {(p["store"], p["series"], p["workload"]["name"]): p for p in points}
    rows = []
    for p in profiled:
        kind, _ = network.split_label(p["store"])
        plain = index.get((kind, p["series"], p["workload"]["name"]))
        saves = p["workload"]["saves"]
        requests = p.get("requests") or {}
        rows.append(
            [
                f"{p['series']}: {p['workload']['name']}",
                kind,
                _cell(plain),
                _cell(p),
                network.fmt_requests(requests.get("saves"), per=saves),
                network.fmt_requests(requests.get("finalize")),
            ]
        )
    profile = result["config"].get("profile") or {}
    link = profile.get("bandwidth_mbps")
    return [
        f"### partialstore: plain emulator and the {profile.get('label', '')} profile",
        "",
        f"The profile: +{profile.get('rtt_ms', 0):g} ms per request, "
        + (f"{link:g} Mbit/s shared link" if link else "no bandwidth cap")
        + "; requests counted by the proxy per repetition (median), with the longest "
        "chain of requests in series (round trips on the critical path).",
        "",
        report.markdown_table(
            [
                "point",
                "store",
                "finalize, plain",
                f"finalize, {profile.get('label', '')}",
                "requests per save",
                "finalize requests",
            ],
            rows,
        ),
        "",
    ]


def _slope(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def measure(run: Run) -> Measured:
    """Run every series of every system on every store, each in worker processes."""
    args = run.args
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for store in args.stores:
        jobs = [j for system in args.systems for j in _jobs_for(store, system, args.series, args)]
        if args.quick:
            # One worker per store: process start-up dominates tiny runs.
            groups.append((store, jobs))
        else:
            groups.extend((store, [job]) for job in jobs)
    events, workers, store_info, unavailable = run.plan(
        groups, label="finalize", timeout_for=lambda jobs: _timeout(jobs, args.budget_s)
    )
    for event in events:
        if event.get("type") == "floor":
            store_info[event["store"]]["floor"] = event
            store_info[event["store"]]["floor_backend"] = event.get("backend")
    points = [e for e in events if e.get("type") == "finalize_point"]
    for point in points:
        point["x"] = x_value(point["series"], point["workload"])
    config = {
        "stores": args.stores,
        "systems": args.systems,
        "series": args.series,
        "reps": args.reps,
        "budget_s_per_point": args.budget_s,
        "emulator_max_bytes": args.emulator_max_bytes,
        "emulator_max_saves": args.emulator_max_saves,
        "network": args.network,
        "profile": args.profile.to_json(),
    }
    body = {
        "stores": store_info,
        "orbax": report.orbax_status(args.stores, args.systems, events, unavailable),
        "points": points,
        "summary": _summary(points, _floors(store_info)),
        "workers": workers,
    }
    return Measured(config, body, exit_status(workers, points))


def _floors(store_info: dict[str, Any]) -> dict[str, float | None]:
    return {
        name: (info.get("floor") or {}).get("total", {}).get("median")
        for name, info in store_info.items()
    }


def plot(result: dict[str, Any], path: str) -> None:
    """Finalize latency against each series, one line per system and store (log-log)."""
    report.plot_finalize_scaling(
        result["points"],
        {k: v for k, v in _floors(result["stores"]).items() if v},
        {k: v for k, v in AXES.items() if k in result["config"]["series"]},
        path,
        title=f"Finalize latency ({'quick' if result['quick'] else 'full'} run, "
        f"{result['machine']['cpu_count']} CPUs); dotted: store floor",
    )


SCRIPT = Script(
    name="finalize_latency",
    description="Finalize latency of partialstore and Orbax against bytes, saves and "
    "leaves, on local disk, S3 (moto) and GCS (fake-gcs-server).",
    stores=STORE_NAMES,
    systems=CHECKPOINT_SYSTEMS,
    add_arguments=_add_arguments,
    measure=measure,
    render=render_tables,
    plot=plot,
)


# ``python -m benchmarks.finalize_latency`` and ``partialstore bench finalize_latency`` call this.
main = SCRIPT.main


if __name__ == "__main__":
    sys.exit(main())
