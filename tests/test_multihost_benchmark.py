"""benchmarks/multihost.py keeps working: a ``--quick`` run of real 1- and 2-process jobs.

No timing is asserted: the run must produce every figure, direct and through
the round-trip proxy, the primary's requests to the coordination service
must be the fixed few of the gather protocol, and no coordination key may
be left after the saves, finalizes, discard and gc.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import multihost  # noqa: E402


def test_quick_run_reports_every_figure_and_leaves_no_keys(tmp_path: Path) -> None:
    argv = ["--quick", "--processes", "1,2", "--rtt-ms", "0,2", "--out", str(tmp_path)]
    assert multihost.main(argv) == 0
    result = json.loads((tmp_path / "multihost.json").read_text())
    assert result["command"] == "python -m benchmarks.multihost " + " ".join(argv)
    config = result["config"]
    saves = config["saves"] * config["reps"]
    rows = result["rows"]
    assert [(row["rtt_ms"], row["processes"]) for row in rows] == [
        (0, 1),
        (0, 2),
        (2, 1),
        (2, 2),
    ]
    for row in rows:
        assert row["save"]["n"] == saves and row["finalize"]["n"] == config["reps"]
        assert 0 < row["save"]["min"] <= row["save"]["median"] <= row["save"]["max"]
    for single in (rows[0], rows[2]):  # one process: no coordination at all
        assert single["protocol"]["n"] == 0 and single["leftover_keys"] is None
        assert single["requests_per_save"] == {"min": 0, "max": 0}
    for pair in (rows[1], rows[3]):
        # The primary sets the save id, waits for the count's {key}.all and
        # sets the outcome; in a finalize it sets the outcome; nothing is left.
        assert pair["protocol"]["n"] == 2 * saves and pair["barrier"]["n"] == 2 * saves
        assert pair["requests_per_save"] == {"min": 3, "max": 3}
        assert pair["request_kinds"] == {"key_value_set": 2, "blocking_key_value_get": 1}
        assert pair["finalize_requests"] == [1] * config["reps"]
        assert pair["leftover_keys"] == []
    table = (tmp_path / "multihost.md").read_text()
    assert "| direct | 2 |" in table and "| 2 ms | 2 |" in table
