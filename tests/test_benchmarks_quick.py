"""The benchmark scripts keep working: ``--quick`` runs produce the table, JSON and PNG.

No timing is asserted anywhere: these tests check that every figure the
issue asks for is present and well formed (min <= median <= max over the
repetitions, ratios computed, peak RSS recorded, every loaded byte checked),
that systems which cannot run on a store say so with a reason, and that the
time-budget and worker-kill paths report what they skipped instead of
dropping it. The S3 and GCS emulators are started by the scripts; if one
cannot start, the test fails.

Needs the ``bench`` extra (orbax-checkpoint, matplotlib).
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import (  # noqa: E402
    cli,
    finalize_latency,
    inner_chunks,
    lifecycle,
    log_scale,
    network,
    report,
    rounds,
    runner,
    throughput,
    time_to_error,
)
from benchmarks.common import Budget, Stats, loglog_slope, peak_rss  # noqa: E402
from benchmarks.runner import run_group  # noqa: E402
from benchmarks.stores import StoreEnv  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_stats(stats: dict[str, Any], min_n: int = 1) -> None:
    assert set(stats) >= {"n", "min", "median", "max", "values"}
    assert stats["n"] == len(stats["values"]) >= min_n
    assert stats["min"] <= stats["median"] <= stats["max"]
    assert all(v >= 0 and math.isfinite(v) for v in stats["values"])


def _check_outputs(out: Path, name: str, stdout: str, title: str) -> dict[str, Any]:
    assert title in stdout
    assert "| store |" in stdout or "| point | store |" in stdout
    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert (out / f"{name}.md").read_text().strip() == stdout.strip()
    result = json.loads((out / f"{name}.json").read_text())
    assert result["benchmark"] == name
    machine = result["machine"]
    assert machine["cpu_count"] >= 1
    assert machine["memory_total_bytes"] > 0
    assert machine["packages"]["partialstore"]
    assert machine["packages"]["tensorstore"]
    assert result["elapsed_s"] > 0
    assert all(w["status"] == "ok" for w in result["workers"]), result["workers"]
    return result


def test_finalize_latency_quick_on_three_stores(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    rc = finalize_latency.main(
        [
            "--quick",
            "--stores",
            "local,s3,gcs",
            "--series",
            "bytes",
            "--network",
            "plain",
            "--out",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    result = _check_outputs(out, "finalize_latency", stdout, "## Finalize latency (quick run)")
    assert rc == 0

    assert set(result["stores"]) == {"local", "s3", "gcs"}
    for name, info in result["stores"].items():
        floor = info["floor"]
        for field in ("create", "list", "total"):
            _check_stats(floor[field], min_n=3)
        if name != "local":
            assert info["endpoint_url"].startswith("http://127.0.0.1:")

    # Orbax: runs on local disk; elsewhere either runs or says why not.
    assert result["orbax"]["local"] is None
    points = result["points"]
    expected = {
        (store, system, series, w.name)
        for store in ("local", "s3", "gcs")
        for system in ("partialstore", "orbax")
        for series in ("bytes",)
        for w in finalize_latency.series_points(series, quick=True)
    }
    got = {(p["store"], p["system"], p["series"], p["workload"]["name"]) for p in points}
    assert got == expected
    for p in points:
        reason = result["orbax"].get(p["store"]) if p["system"] == "orbax" else None
        if reason:
            assert p["status"] == "does not run" and p["reason"] == reason
            continue
        assert p["status"] == "ok", p
        _check_stats(p["finalize"], min_n=2)
        _check_stats(p["saves_total"], min_n=2)
        assert p["x"] > 0
    for store in ("s3", "gcs"):
        reason = result["orbax"][store]
        assert reason is None or (isinstance(reason, str) and reason)
        if reason:
            assert f"| {store} | does not run |" in stdout

    summary = result["summary"]
    for store in ("local", "s3", "gcs"):
        assert summary[store]["floor_median_s"] > 0
        assert summary[store]["bytes_largest_over_smallest"] > 0
        assert summary[store]["largest_bytes_over_floor"] > 0


def test_throughput_quick_on_three_stores(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    rc = throughput.main(
        [
            "--quick",
            "--stores",
            "local,s3,gcs",
            "--workloads",
            "c",
            "--network",
            "plain",
            "--out",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    result = _check_outputs(out, "throughput", stdout, "## Save / load throughput (quick run)")
    assert rc == 0
    assert "### Ratios of medians" in stdout

    results = {(r["store"], r["system"], r["workload"]["name"]): r for r in result["results"]}
    per_save = "tensorstore-per-save"  # raw TensorStore, one blocking call per save
    systems = {
        "local": ("partialstore", "orbax", per_save, "tensorstore", "numpy"),
        "s3": ("partialstore", "orbax", per_save, "tensorstore"),
        "gcs": ("partialstore", "orbax", per_save, "tensorstore"),
    }
    expected = {(s, sys_, "c") for s, names in systems.items() for sys_ in names}
    assert set(results) == expected
    # Repetitions run in rounds, the system order rotated by one each round.
    (local,) = [w for w in result["workers"] if w["store"] == "local"]
    assert [(j["system"], j["round"]) for j in local["jobs"]] == [
        ("partialstore", 0),
        ("orbax", 0),
        (per_save, 0),
        ("tensorstore", 0),
        ("numpy", 0),
        ("orbax", 1),
        (per_save, 1),
        ("tensorstore", 1),
        ("numpy", 1),
        ("partialstore", 1),
    ]
    for (store, system, _), r in results.items():
        reason = result["orbax"].get(store) if system == "orbax" else None
        if reason:
            assert r["status"] == "does not run" and r["reason"] == reason
            continue
        assert r["status"] == "ok", r
        assert r["verified"] is True
        _check_stats(r["save_total"], min_n=2)
        _check_stats(r["load"], min_n=2)
        _check_stats(r["save_plus_finalize"], min_n=2)
        if system in ("partialstore", "orbax", per_save):
            _check_stats(r["save_per_call"], min_n=2)
            _check_stats(r["finalize"], min_n=2)
        else:
            assert r["save_per_call"] is None and r["finalize"] is None
        rss = r["save_rss"]
        assert rss["max_peak_bytes"] >= rss["max_extra_bytes"] >= 0
        assert rss["max_peak_bytes"] > 0
        assert rss["method"]
        assert r["load_rss"]["max_peak_bytes"] > 0
        if system == "tensorstore":
            arrays = r["workload"]["saves"] * r["workload"]["leaves"]
            assert sum(r["layout_sources"].values()) == arrays
    assert result["orbax"]["local"] is None

    ratios = {(r["workload"], r["store"]): r for r in result["ratios"]}
    assert set(ratios) == {("c", s) for s in ("local", "s3", "gcs")}
    for (_, store), row in ratios.items():
        assert row["save_vs_tensorstore"] > 0
        assert row["save_vs_tensorstore_per_save"] > 0
        assert row["load_vs_tensorstore"] > 0
        if store == "local":
            assert row["save_vs_numpy"] > 0
            assert row["save_per_call_vs_orbax"] > 0
            assert row["finalize_vs_orbax"] > 0


def test_network_profile_counts_requests_through_the_proxy(tmp_path: Path, capsys: Any) -> None:
    # One tiny case per script behind the 20 ms proxy: every request of partialstore
    # and of raw TensorStore goes through it, and each operation's count is reported.
    out = tmp_path / "out"
    argv = ["--quick", "--stores", "s3", "--network", "plain,20ms", "--rtt-ms", "20"]
    rc = finalize_latency.main(
        [*argv, "--series", "saves", "--systems", "partialstore", "--out", str(out)]
    )
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "### partialstore: plain emulator and the 20ms profile" in stdout
    result = json.loads((out / "finalize_latency.json").read_text())
    assert list(result["stores"]) == ["s3", "s3@20ms"]
    assert "behind a proxy" in result["stores"]["s3@20ms"]["server"]
    assert result["config"]["profile"] == {
        "rtt_ms": 20.0,
        "bandwidth_mbps": 1000.0,
        "label": "20ms",
    }
    for point in result["points"]:
        assert point["status"] == "ok", point
        assert "windows" not in point
        if point["store"] == "s3":
            assert "requests" not in point  # the plain emulator has no proxy
            continue
        saves, final = point["requests"]["saves"], point["requests"]["finalize"]
        assert saves["n"] == final["n"] == point["finalize"]["n"]
        # Each save commits one log record with a conditional PUT; finalize publishes.
        records = [c for c in saves["chain"] if c.startswith("PUT log/")]
        assert len(records) == point["workload"]["saves"]
        assert saves["by_method"]["PUT"] >= point["workload"]["saves"]
        assert final["chain"][-1] == "PUT partialstore.json (conditional)"
        # Checkpoint paths are plain keys, so the S3 backend's commit requests take
        # its TensorStore path (a space in the path once sent them all through s3fs).
        assert final["by_client"] == {"tensorstore": final["total_median"]}
        assert 1 <= final["serial_median"] <= final["total_median"]

    rc = throughput.main(
        [*argv, "--workloads", "d", "--systems", "partialstore,tensorstore", "--out", str(out)]
    )
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "### Plain emulator and the 20ms profile" in stdout
    result = json.loads((out / "throughput.json").read_text())
    by = {(r["store"], r["system"]): r for r in result["results"]}
    assert set(by) == {(s, y) for s in ("s3", "s3@20ms") for y in ("partialstore", "tensorstore")}
    ps, raw = by[("s3@20ms", "partialstore")], by[("s3@20ms", "tensorstore")]
    assert ps["verified"] and raw["verified"]
    assert ps["requests"]["save"]["n"] == ps["save_per_call"]["n"]  # one count per call
    assert ps["requests"]["finalize"]["n"] == ps["finalize"]["n"]
    # Raw TensorStore's own HTTP goes through the proxy too: its writes are counted.
    assert raw["requests"]["save"]["by_method"]["PUT"] >= raw["workload"]["saves"]
    assert raw["requests"]["load"]["by_method"]["GET"] >= raw["workload"]["saves"]
    assert "requests" not in by[("s3", "tensorstore")]


def test_serial_chain_counts_requests_in_series() -> None:
    from partialstore.testing.faultrules import RequestRecord

    def request(method: str, key: str, start: float, seconds: float) -> RequestRecord:
        record = RequestRecord(0, method, "/b/" + key, "", "s3", "b", key, {}, 0, "x")
        record.started, record.duration = start, seconds
        return record

    # Three chunk PUTs in parallel, then a HEAD, then a conditional PUT after it.
    records = [
        request("PUT", "c/0", 0.0, 0.05),
        request("PUT", "c/1", 0.01, 0.05),
        request("PUT", "c/2", 0.0, 0.09),
        request("HEAD", "m", 0.1, 0.02),
        request("PUT", "log/1", 0.125, 0.02),
    ]
    chain = network.serial_chain(records)
    assert [r.key for r in chain] == ["c/0", "m", "log/1"]
    counted = network.account(records)
    assert counted["total"] == 5 and counted["serial"] == 3
    assert counted["by_method"] == {"HEAD": 1, "PUT": 4}
    assert network.serial_chain([]) == []
    profile = network.NetworkProfile.from_args(20, 1000)
    assert network.store_labels(["local", "s3", "gcs"], ["plain", "20ms"], profile) == [
        "local",
        "s3",
        "s3@20ms",
        "gcs",
        "gcs@20ms",
    ]
    assert network.store_labels(["local", "s3"], ["20ms"], profile) == ["local", "s3@20ms"]


def test_time_to_error_quick_on_s3(tmp_path: Path, capsys: Any) -> None:
    # A correctness bound, not a performance figure: each case must fail, with a
    # partialstore error that says why, within its promised bound.
    out = tmp_path / "out"
    rc = time_to_error.main(["--quick", "--stores", "s3", "--network", "plain", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert "## Time to error (quick run)" in stdout
    assert (out / "time_to_error.md").read_text().strip() == stdout.strip()
    result = json.loads((out / "time_to_error.json").read_text())
    assert result["benchmark"] == "time_to_error" and result["quick"] is True
    rows = {row["case"]: row for row in result["measurements"]}
    assert [row["store"] for row in result["measurements"]] == ["s3"] * len(rows)
    expected = {
        "refused": ("BackendError", "the connection was refused", 10.0),
        "invalid_host": ("BackendError", "does not resolve", 10.0),
        "no_credentials": ("BackendError", "no AWS credentials found", 10.0),
        "missing_bucket": ("NotFoundError", "does not exist", 10.0),
        "503_save_deadline5": ("TransientBackendError", "deadline=5 s", 120.0),
        "503_load_deadline5": ("TransientBackendError", "deadline=5 s", 120.0),
    }
    assert set(rows) == set(expected) == {c.id for c in time_to_error.cases(quick=True)}
    for case, (error_type, words, bound) in expected.items():
        row = rows[case]
        assert row["status"] == "raised" and row["partialstore_error"] is True, row
        assert (row["error_type"], words in row["message"]) == (error_type, True), row
        assert row["bound_s"] == bound and 0 < row["seconds"] < bound, row
        assert row["met_bound"] is True
    # The 503 store really answered 503 to the calls measured.
    assert rows["503_save_deadline5"]["requests_answered_503"] > 1
    assert rows["503_load_deadline5"]["requests_answered_503"] > 1
    assert rc == 0


def test_lifecycle_quick_on_local_and_s3(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    assert lifecycle.main(["--quick", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "## CheckpointManager: latest step" in stdout
    rows = {row["store"]: row for row in json.loads((out / "lifecycle.json").read_text())["rows"]}
    assert set(rows) == {"local", "s3"}
    for row in rows.values():
        for figures in (row["partialstore"]["seconds"], row["orbax"]["seconds"]):
            assert figures["min"] <= figures["median"] <= figures["max"]
    # One read of the run index, counted at the proxy in front of moto.
    assert rows["s3"]["partialstore"]["requests"] == 1
    # Orbax does not run on S3 here: the table says why, and measures its method instead.
    assert rows["s3"]["orbax"]["finding"].startswith("does not run")
    assert rows["s3"]["orbax"]["listing"] is True
    retention = rows["s3"]["retention"]
    assert (
        retention["objects"] == 300
        and retention["requests_by_kind"]["POST ?delete (DeleteObjects)"] >= 1
    )


def test_over_budget_points_are_reported_as_skipped(tmp_path: Path) -> None:
    store = StoreEnv(name="local", root=str(tmp_path / "store"))
    points = finalize_latency.series_points("leaves", quick=True)
    job = {
        "kind": "finalize_series",
        "system": "partialstore",
        "series": "leaves",
        "axis": "keys",
        "points": [p.to_json() for p in points],
        "reps": 2,
        "budget_s": 0.001,
    }
    events, record = run_group(
        store, [job], timeout_s=300, log_path=str(tmp_path / "log"), cwd=str(tmp_path)
    )
    assert record["status"] == "ok", record
    first, second = events
    # The first point always runs (nothing to predict from) but stops after one rep.
    assert first["status"] == "ok"
    assert first["finalize"]["n"] == 1
    assert first["note"].startswith("stopped after 1 of 2 reps")
    assert second["status"] == "skipped"
    assert second["reason"].startswith("skipped: over budget (predicted")


def test_killed_worker_reports_every_point_it_did_not_measure(tmp_path: Path) -> None:
    store = StoreEnv(name="local", root=str(tmp_path / "store"))
    points = finalize_latency.series_points("saves", quick=True)
    job = {
        "kind": "finalize_series",
        "system": "partialstore",
        "series": "saves",
        "points": [p.to_json() for p in points],
        "reps": 2,
        "budget_s": 30,
    }
    events, record = run_group(
        store, [job], timeout_s=0.2, log_path=str(tmp_path / "log"), cwd=str(tmp_path)
    )
    assert record["status"] == "timeout"
    assert [e["workload"]["name"] for e in events] == [p.name for p in points]
    for event in events:
        assert event["status"] == "error"
        assert event["reason"].startswith("not measured: timeout")


def test_point_running_past_its_budget_is_killed_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "POINT_KILL_SLACK_S", 0.0)
    store = StoreEnv(name="local", root=str(tmp_path / "store"))
    points = finalize_latency.series_points("saves", quick=True)
    job = {
        "kind": "finalize_series",
        "system": "partialstore",
        "series": "saves",
        "axis": "keys",
        "points": [p.to_json() for p in points],
        "reps": 2,
        "budget_s": 0.0001,
    }
    events, record = run_group(
        store, [job], timeout_s=300, log_path=str(tmp_path / "log"), cwd=str(tmp_path)
    )
    assert record["status"] == "killed over budget"
    first, second = events
    assert first["status"] == "skipped"
    assert "ran past its" in first["reason"] and "worker killed" in first["reason"]
    assert second["status"] == "skipped"
    assert second["reason"].startswith("skipped: over budget (a smaller point ran past it")
    assert runner.exit_status([record], events) == 0


def test_full_run_sizes_cover_the_issue_ranges() -> None:
    by_bytes = finalize_latency.series_points("bytes", quick=False)
    assert by_bytes[0].total_bytes == 1 << 20 and by_bytes[-1].total_bytes == 1 << 30
    assert [w.saves for w in finalize_latency.series_points("saves", quick=False)][-1] == 1000
    assert [w.leaves for w in finalize_latency.series_points("leaves", quick=False)] == [
        10,
        100,
        1000,
        10000,
    ]
    (anchor,) = finalize_latency.series_points("anchor", quick=False)
    assert (anchor.saves, anchor.leaves) == (24, 250)
    sizes = {w.name: (w.saves, w.leaves, w.leaf_bytes) for w in throughput.workloads(False)}
    assert sizes == {
        "a": (4, 4, 16 << 20),
        "b": (4, 250, 4096),
        "c": (1, 1, 1 << 30),
        "d": (16, 1, 16 << 20),
        "e": (256, 1, 64 << 10),
    }


def test_stats_budget_slope_and_rss_helpers() -> None:
    stats = Stats.of([3.0, 1.0, 2.0]).to_json()
    assert (stats["min"], stats["median"], stats["max"], stats["n"]) == (1.0, 2.0, 3.0, 3)

    budget = Budget(60, exponents={"save": 1.0, "finalize": 2.0})
    assert budget.check({"save": 1, "finalize": 1}) is None  # nothing to predict from
    budget.record({"save": 10, "finalize": 10}, {"save": 1.0, "finalize": 1.0})
    # One earlier point: linear growth assumed.
    assert budget.predict({"save": 20, "finalize": 20}) == pytest.approx(2.0 + 2.0)
    # Two: the measured growth, clamped to [1, worst exponent].
    budget.record({"save": 20, "finalize": 20}, {"save": 2.0, "finalize": 8.0})
    assert budget.predict({"save": 40, "finalize": 40}) == pytest.approx(4.0 + 32.0)
    assert budget.check({"save": 40, "finalize": 40}) is None
    reason = budget.check({"save": 20, "finalize": 200})
    assert reason is not None and reason.startswith("skipped: over budget")
    assert budget.check({"save": 1, "finalize": 1}) == reason  # larger points stay skipped

    assert loglog_slope([1, 10, 100], [2, 20, 200]) == pytest.approx(1.0)
    assert loglog_slope([1, 10, 100], [5, 500, 50000]) == pytest.approx(2.0)

    with peak_rss() as rss:
        block = bytearray(64 << 20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
    del block
    assert rss.extra >= 60 << 20
    assert rss.peak >= rss.before + rss.extra - 1


def test_report_helpers() -> None:
    table = report.markdown_table(["a", "b"], [["x|y", 1]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]
    stream = io.StringIO()
    bar = report.ProgressBar(2, "t", stream=stream)
    bar.step("one")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[1].startswith("t [") and "1/2" in lines[1]
    assert "2/2" in lines[-1] and lines[-1].endswith("done")


def _round(
    rnd: int, calls: list[float], load: float, extra: int, *, verified: bool = True
) -> dict[str, Any]:
    """A fake per-round summary as the worker emits it (one repetition)."""
    rss = [
        {"before": 100, "peak": 100 + extra, "extra": extra, "method": "m", "state_bytes": 8}
        for _ in calls
    ]
    return {
        "type": "throughput",
        "store": "local",
        "system": "partialstore",
        "workload": {"name": "a"},
        "reps_planned": 1,
        "round": rnd,
        "status": "ok" if verified else "error",
        "reason": "" if verified else "loaded data does not match what was saved: x",
        "verified": verified,
        "note": "",
        "save_per_call": Stats.of(calls).to_json(),
        "save_total": Stats.of([sum(calls)]).to_json(),
        "finalize": Stats.of([0.5]).to_json(),
        "save_plus_finalize": Stats.of([sum(calls) + 0.5]).to_json(),
        "load": Stats.of([load]).to_json(),
        "save_rss": {"calls": rss},
        "load_rss": {"max_extra_bytes": extra // 2, "max_peak_bytes": 100 + extra // 2},
        "layouts": [{"round": rnd}],
        "seconds": 2.0,
    }


def test_merge_rounds_combines_interleaved_repetitions() -> None:
    assert rounds.rotated(["p", "o", "t"], 0) == ["p", "o", "t"]
    assert rounds.rotated(["p", "o", "t"], 4) == ["o", "t", "p"]

    # Given out of order, as rounds of other systems interleave with them.
    merged = rounds.merge_summaries(
        [_round(2, [3.0, 1.0], 4.0, 30), _round(0, [1.0, 2.0], 6.0, 10), _round(1, [2.0], 5.0, 50)]
    )
    assert merged["status"] == "ok" and merged["verified"] is True
    assert merged["reps_planned"] == 3 and "round" not in merged
    assert merged["save_per_call"]["values"] == [1.0, 2.0, 2.0, 3.0, 1.0]  # round order
    assert merged["save_total"] == Stats.of([3.0, 2.0, 4.0]).to_json()
    assert (merged["load"]["min"], merged["load"]["median"], merged["load"]["max"]) == (4, 5, 6)
    assert merged["finalize"]["n"] == 3
    assert merged["save_rss"]["max_extra_bytes"] == 50
    assert merged["save_rss"]["max_peak_bytes"] == 150
    assert len(merged["save_rss"]["calls"]) == 5
    assert merged["load_rss"] == {"max_extra_bytes": 25, "max_peak_bytes": 125}
    assert merged["layouts"] == [{"round": 0}]
    assert merged["seconds"] == 6.0

    # One round failed its check, one was skipped for the budget.
    skipped = _round(2, [1.0], 1.0, 1) | {"status": "skipped", "reason": "skipped: over budget"}
    for key in ("load", "save_total", "verified"):
        del skipped[key]
    merged = rounds.merge_summaries(
        [_round(0, [1.0], 1.0, 1), _round(1, [1.0], 1.0, 1, verified=False), skipped]
    )
    assert merged["status"] == "error" and merged["verified"] is False
    assert merged["reason"].startswith("repetition 2: loaded data does not match")
    assert merged["note"] == "stopped after 2 of 3 reps: over budget"
    assert merged["save_total"]["n"] == 2 and merged["reps_planned"] == 3

    # No round measured anything: the first round's verdict stands.
    absent = {"type": "throughput", "store": "s3", "system": "orbax", "workload": {"name": "a"}}
    events = [absent | {"round": r, "status": "does not run", "reason": "why"} for r in (1, 0)]
    (merged,) = rounds.merge_rounds(events)
    assert (merged["status"], merged["reason"], merged["reps_planned"]) == (
        "does not run",
        "why",
        2,
    )


def test_round_budget_skips_rounds_that_would_pass_it() -> None:
    budget = rounds.RoundBudget(10.0)
    job = {"system": "orbax", "workloads": [{"name": "e"}], "budget_s": 10.0}
    first, second, third = (dict(job) for _ in range(3))
    budget.prepare("local", first)
    assert first["budget_s"] == 10.0 and "skip" not in first
    event = {"type": "throughput", "store": "local", "system": "orbax", "workload": {"name": "e"}}
    budget.record(event | {"status": "ok", "seconds": 4.0})
    budget.prepare("local", second)
    assert second["budget_s"] == 6.0 and "skip" not in second  # 4 + 4 <= 10
    budget.record(event | {"status": "ok", "seconds": 4.0})
    budget.prepare("local", third)  # 8 + 4 > 10
    assert third["skip"] == (
        "skipped: over budget (2 reps took 8 s; one more would pass the 10 s budget)"
    )
    other = dict(job, system="partialstore")
    budget.prepare("local", other)
    assert "skip" not in other
    # A round killed over its budget, or failed, stops the later rounds of that point.
    killed = "skipped: over budget (e ran past its 10 s budget; worker killed after 43 s)"
    budget.record(event | {"system": "partialstore", "status": "skipped", "reason": killed})
    budget.prepare("local", other)
    assert other["skip"] == killed
    budget.record(event | {"store": "s3", "status": "error", "round": 0, "reason": "boom"})
    on_s3 = dict(job)
    budget.prepare("s3", on_s3)
    assert on_s3["skip"] == "skipped: repetition 1 did not complete"


def _demo_script(seen: dict[str, Any]) -> cli.Script:
    """A script on the shared skeleton whose steps record what they were given."""

    def add_arguments(parser: Any) -> None:
        cli.add_list_option(parser, "--colours", ("red", "blue"), "colour", "colours")

    def measure(run: cli.Run) -> cli.Measured:
        seen["scratch"] = Path(run.scratch)
        seen["scratch_existed"] = seen["scratch"].is_dir()
        body = {"rows": [{"colour": c} for c in run.args.colours]}
        return cli.Measured({"stores": run.args.stores}, body, status=3)

    def plot(result: dict[str, Any], path: str) -> None:
        Path(path).write_bytes(PNG_MAGIC + json.dumps(result["rows"]).encode())

    return cli.Script(
        name="demo",
        description="A demo script.",
        stores=("local", "s3"),
        add_arguments=add_arguments,
        measure=measure,
        render=lambda result: f"## Demo\n\n{len(result['rows'])} rows",
        plot=plot,
    )


def test_skeleton_writes_raw_results_and_publishes_only_the_summary(
    tmp_path: Path, capsys: Any
) -> None:
    seen: dict[str, Any] = {}
    out, latest = tmp_path / "out", tmp_path / "latest"
    argv = ["--stores", "s3", "--colours", "blue", "--out", str(out), "--publish", str(latest)]
    assert cli.run_script(_demo_script(seen), argv) == 3  # measure's status passes through
    stdout = capsys.readouterr().out
    assert stdout.strip() == "## Demo\n\n1 rows"
    assert (out / "demo.md").read_text().strip() == stdout.strip()
    assert (out / "demo.png").read_bytes() == PNG_MAGIC + b'[{"colour": "blue"}]'
    result = json.loads((out / "demo.json").read_text())
    assert result["benchmark"] == "demo" and result["quick"] is False
    assert result["command"] == "python -m benchmarks.demo " + " ".join(argv)
    assert result["config"] == {"stores": ["s3"]}
    assert result["rows"] == [{"colour": "blue"}]
    assert result["machine"]["cpu_count"] >= 1 and result["elapsed_s"] > 0
    assert list(result)[-1] == "elapsed_s"
    # The scratch folder existed while measuring and is gone after.
    assert seen["scratch_existed"] and not seen["scratch"].exists()
    # Only the table and the plot are published; the raw JSON stays in --out.
    assert sorted(p.name for p in latest.iterdir()) == ["demo.md", "demo.png"]
    assert (latest / "demo.md").read_bytes() == (out / "demo.md").read_bytes()


def test_skeleton_refuses_bad_options(capsys: Any) -> None:
    script = _demo_script({})
    for argv, words in (
        (["--stores", "gcs"], "unknown or missing store(s) ['gcs']"),
        (["--colours", "red,green"], "unknown or missing colour(s) ['green']"),
        (["--quick", "--publish"], "--quick figures mean nothing"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.run_script(script, argv)
        assert exit_info.value.code == 2
        assert words in capsys.readouterr().err


def test_raw_results_default_to_a_folder_git_ignores() -> None:
    for script in (finalize_latency.SCRIPT, throughput.SCRIPT, time_to_error.SCRIPT):
        assert script.parser().parse_args([]).out == cli.RESULTS_DIR
        assert script.parser().parse_args(["--publish"]).publish == cli.LATEST_DIR
    raw = cli.RESULTS_DIR / "throughput.json"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(raw)], cwd=REPO_ROOT, check=False, timeout=30
    )
    assert ignored.returncode == 0, f"{raw} is not ignored by git"
    tracked = subprocess.run(
        ["git", "ls-files", "benchmarks/latest"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert tracked and all(Path(name).suffix in (".md", ".png") for name in tracked), tracked


def test_log_scale_quick_on_local(tmp_path: Path, capsys: Any) -> None:
    """The log benchmark runs, and its request counter keeps tail listings tails: a
    wrapper that hid ``start_after`` would make every hinted append list the whole log."""
    from partialstore import registry
    from partialstore._commit.listing import _takes_start_after

    counting = log_scale.Counting(registry.open_backend("memory://log-scale-quick"))
    assert _takes_start_after(counting)
    argv = ["--quick", "--stores", "local", "--network", "plain", "--writers", "1"]
    argv += ["--per-writer", "2", "--finalize-counts", "10", "--out", str(tmp_path)]
    assert log_scale.main(argv) == 0
    body = json.loads((tmp_path / "log_scale.json").read_text())["stores"]["local"]
    later = [append["requests"] for row in body["length"] for append in row["later"]]
    assert later and all(requests == {"list": 1, "create": 1} for requests in later)
    assert [row["requests_per_commit"] for row in body["writers"]] == [2.0]
    assert {row["saves"] for row in body["finalize"]} == {10}
    for row in body["saves"]:  # the store's floor under each save: its look's listing
        assert len(row["first_listing_s"]) == len(row["later_listing_s"]) == 5
        assert all(seconds > 0 for seconds in row["first_listing_s"] + row["later_listing_s"])
    assert body["saves"]
    assert "the look's listing alone" in capsys.readouterr().out


def test_throughput_pipelined_saves_with_save_async(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    argv = ["--quick", "--stores", "local", "--workloads", "d", "--out", str(out)]
    rc = throughput.main([*argv, "--systems", "partialstore,tensorstore", "--pipelined"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "saved with `save_async` (`--pipelined`)" in stdout
    result = json.loads((out / "throughput.json").read_text())
    assert result["config"]["pipelined"] is True
    ps = next(r for r in result["results"] if r["system"] == "partialstore")
    assert ps["status"] == "ok" and ps["verified"]  # every save landed, loaded back equal


def test_inner_chunks_quick_saves_at_each_limit_and_restores_the_rule(tmp_path: Path) -> None:
    """The inner-chunk benchmark saves with each limit (each within its count), times raw
    TensorStore with each save's layout (it raises if that layout is not found), and
    leaves the save path's inner-chunk rule as it found it."""
    from partialstore._arrays import zarr3

    rule = zarr3.inner_chunks
    argv = ["--quick", "--limits", "none,64,16", "--rounds", "1", "--out", str(tmp_path)]
    assert inner_chunks.main(argv) == 0
    assert zarr3.inner_chunks is rule
    rows = json.loads((tmp_path / "inner_chunks.json").read_text())["rows"]
    assert len(rows) == 2
    for row in rows:
        assert set(row["times_s"]) == set(row["raw_s"]) == {"none", "64", "16"}
        for series in (row["times_s"], row["raw_s"]):  # the save, and raw TensorStore
            assert all(len(times) == 1 and times[0] > 0 for times in series.values())
        chunk, inner = row["layout"]["none"]
        assert chunk == inner  # no inner chunks: one per chunk
        for limit in (64, 16):
            chunk, inner = row["layout"][str(limit)]
            assert math.prod(chunk) // math.prod(inner) <= limit
