"""The main job (``partialstore demo``) round-trips on local disk, S3 and GCS."""

from __future__ import annotations

import subprocess
import sys

import pytest

from partialstore._cli.cli import main
from partialstore._cli.demo import run_demo


@pytest.mark.parametrize("store", ["local", "s3", "gcs"])
def test_demo_round_trips(store, tmp_path, request):
    if store == "local":
        url, options = str(tmp_path / "step_1000"), {}
    else:
        root, options = request.getfixturevalue(f"{store}_url")
        url = f"{root}/step_1000"
    lines: list[str] = []
    timings = run_demo(url, storage_options=options, echo=lines.append)
    assert set(timings) >= {"finalize", "load", "metadata", "all saves committed"}
    assert lines[-1].endswith("all equal")


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
