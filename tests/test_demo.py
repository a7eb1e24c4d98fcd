"""The main job (``partialstore demo``): trains, is killed, resumes and verifies on every store."""

from __future__ import annotations

import subprocess
import sys

import pytest

import partialstore
from partialstore._cli.cli import main
from partialstore._cli.demo import KILL_AT, LAST_STEP, run_demo


@pytest.mark.parametrize("store", ["local", "s3", "gcs"])
def test_demo_round_trips(store, tmp_path, request):
    if store == "local":
        url, options = str(tmp_path / "run"), {}
    else:
        root, options = request.getfixturevalue(f"{store}_url")
        url = f"{root}/run"
    lines: list[str] = []
    timings = run_demo(url, storage_options=options, echo=lines.append, scale=0)
    assert {"job until killed", "resume (recover + load)", "check (load + verify)"} <= set(timings)
    # steps KILL_AT..LAST_STEP were saved again after the resume
    assert {f"step {s} finalize" for s in range(KILL_AT, LAST_STEP + 1)} <= set(timings)
    assert any(f"killed the job with SIGKILL while it saved step {KILL_AT}" in x for x in lines)
    assert lines[-1].endswith("all equal")
    with partialstore.CheckpointManager(url, storage_options=options) as manager:
        assert manager.steps() == [LAST_STEP - 1, LAST_STEP] and manager.sessions() == []


def test_cli_demo_on_a_temporary_folder(capsys):
    assert main(["demo"]) == 0
    assert "all equal" in capsys.readouterr().out


def test_cli_finds_the_benchmarks_from_another_directory(tmp_path):
    # The console script adds the checkout (three levels above
    # partialstore/_cli/cli.py) to sys.path; run from elsewhere, it must still
    # find benchmarks/.
    done = subprocess.run(
        [sys.executable, "-m", "partialstore._cli.cli", "bench", "throughput", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "benchmarks.throughput" in done.stdout
