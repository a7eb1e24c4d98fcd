"""``partialstore ls / latest / sweep / rm`` on a run's root, through the real console script.

A run is built with :class:`partialstore.CheckpointManager` in this process
(finalized steps and one open session); each command runs in a child
process on local disk and on S3 (moto), and its exit status, stdout and
effect on the store are checked. Each error path has its own test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore._cli import exitcodes
from partialstore._cli.runs import parse_duration
from partialstore.errors import InvalidInputError
from tests.test_cli import assert_one_line_error, run_cli

Store = tuple[str, dict[str, Any]]


@pytest.fixture(params=["local", "s3"])
def run_root(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A run with finalized steps 10 and 20 and an open session at step 30."""
    if request.param == "local":
        root, options = str(tmp_path / "run"), {}
    else:
        url, options = request.getfixturevalue("s3_url")
        root = f"{url}/run"
    with partialstore.CheckpointManager(root, storage_options=options) as manager:
        for step in (10, 20):
            manager.save(step, {"w": np.full(256, step, np.float32), "step": step})
            manager.finalize(step)
        manager.save(30, {"w": np.zeros(256, np.float32)})
    return root, options


def test_ls_lists_steps_and_open_sessions(run_root: Store) -> None:
    root, options = run_root
    done = run_cli("ls", root, "--json", options=options)
    assert done.returncode == exitcodes.OK, done.stderr
    listed = json.loads(done.stdout)
    rows = [(r["step"], r["state"], r["saves"], r["bytes"]) for r in listed["steps"]]
    assert rows == [(10, "finalized", 1, 1024), (20, "finalized", 1, 1024), (30, "open", 1, 1024)]
    assert all(r["age_s"] is not None and r["age_s"] >= 0 for r in listed["steps"])
    human = run_cli("ls", root, options=options)
    assert (
        human.returncode == exitcodes.OK and "finalized" in human.stdout and "open" in human.stdout
    )


def test_latest_prints_the_latest_finalized_step(run_root: Store) -> None:
    root, options = run_root
    done = run_cli("latest", root, options=options)
    assert (done.returncode, done.stdout.strip()) == (exitcodes.OK, "20")
    as_json = json.loads(run_cli("latest", root, "--json", options=options).stdout)
    assert as_json["step"] == 20 and as_json["path"].endswith("step_00000020")


def test_latest_of_an_empty_root_exits_not_found(tmp_path: Path) -> None:
    assert_one_line_error(
        run_cli("latest", str(tmp_path / "empty")), exitcodes.NOT_FOUND, "No finalized step"
    )


def test_sweep_discards_only_idle_sessions(run_root: Store) -> None:
    root, options = run_root
    kept = json.loads(
        run_cli("sweep", root, "--older-than", "1h", "--json", options=options).stdout
    )
    assert kept["discarded"] == []
    time.sleep(1.1)
    done = run_cli("sweep", root, "--older-than", "1s", "--json", options=options)
    assert done.returncode == exitcodes.OK, done.stderr
    assert [row["step"] for row in json.loads(done.stdout)["discarded"]] == [30]
    with partialstore.CheckpointManager(root, storage_options=options) as manager:
        assert manager.sessions() == [] and manager.steps() == [10, 20]


def test_sweep_refuses_a_malformed_duration(tmp_path: Path) -> None:
    done = run_cli("sweep", str(tmp_path), "--older-than", "two hours")
    assert_one_line_error(done, exitcodes.INVALID, "not a duration")


def test_rm_deletes_a_step_and_refuses_the_latest_without_force(run_root: Store) -> None:
    root, options = run_root
    done = run_cli("rm", root, "--step", "20", options=options)
    assert_one_line_error(done, exitcodes.INVALID, "latest step")
    done = run_cli("rm", root, "--step", "10", options=options)
    assert done.returncode == exitcodes.OK, done.stderr
    with partialstore.CheckpointManager(root, storage_options=options) as manager:
        assert manager.steps() == [20]
        with pytest.raises(FileNotFoundError):
            partialstore.load(manager.path(10), storage_options=options)
    assert run_cli("rm", root, "--step", "20", "--force", options=options).returncode == 0
    assert_one_line_error(run_cli("latest", root, options=options), exitcodes.NOT_FOUND)


def test_rm_of_a_step_that_is_not_finalized_exits_not_found(run_root: Store) -> None:
    root, options = run_root
    done = run_cli("rm", root, "--step", "30", options=options)
    assert done.returncode == exitcodes.NOT_FOUND and "Traceback" not in done.stderr


@pytest.mark.parametrize("text", ["", "-1h", "2 hours", "h", "1w"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(InvalidInputError, match="not a duration"):
        parse_duration(text)
