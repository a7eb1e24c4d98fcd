"""Kill-and-resume: a real training job (tests/_manager_job.py) killed with SIGKILL at
random instants and restarted always resumes from the latest finalized step, bit-exact.

After each kill the test works out, independently of the job, which steps
are published (``partialstore.metadata`` on each step path) and which
sessions a killed finalize left sealed (those are completed by the job's
``recover()``, so they count as finalized). The restarted job must resume
from the highest of these, never an older step, and its loaded state must
equal an uninterrupted run's bit for bit (the job exits 3 otherwise). Also:
kills at the crash points inside finalize, SIGTERM reaching
``reached_preemption`` in a real process, and two writer processes plus an
evaluator on one root.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _manager_job as job
import pytest

import partialstore
from partialstore._commit import txlog
from partialstore._commit.location import resolve
from partialstore._runtime.aio import run

STEPS = 20
JOB = str(Path(__file__).with_name("_manager_job.py"))


def _start(
    root: str, options: dict[str, Any], *args: str, script: str = JOB, crash_at: str = ""
) -> subprocess.Popen[str]:
    env = {**os.environ, "PARTIALSTORE_CRASH_AT": crash_at}
    return subprocess.Popen(
        [sys.executable, script, root, json.dumps(options), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _path(root: str, step: int) -> str:
    return f"{root}/step_{step:08d}"


def _published(root: str, options: dict[str, Any]) -> list[int]:
    found = []
    for step in range(STEPS):
        try:
            partialstore.metadata(_path(root, step), storage_options=options)
        except FileNotFoundError:
            continue
        found.append(step)
    return found


def _sealed(root: str, options: dict[str, Any]) -> list[int]:
    """Steps whose session holds a seal but that are not published (a killed finalize)."""
    found = []
    for step in range(STEPS):
        location = resolve(_path(root, step), options)
        entries = txlog.session_of(run(txlog.read_log(location.backend, location.log_prefix)))
        if any(txlog.is_seal(e.record) for e in entries) and not run(
            location.backend.exists(location.manifest_key)
        ):
            found.append(step)
    return found


def _kill_after(child: subprocess.Popen[str], finalizes: int, rng: random.Random) -> str:
    """SIGKILL the job at a random instant of the step after its ``finalizes``-th finalize.

    Counting finalizes first puts every kill in the middle of the run, whatever
    the machine's speed; the delay, a random fraction of the last step's
    duration, puts it anywhere in a step (a save, the finalize, the index
    update, retention).
    """
    assert child.stdout is not None
    lines = [child.stdout.readline()]  # "resumed ...": the job has imported and resumed
    times = [time.monotonic()]
    while len(lines) <= finalizes and lines[-1].startswith(("resumed", "finalized")):
        lines.append(child.stdout.readline())
        times.append(time.monotonic())
    period = times[-1] - times[-2] if len(times) > 1 else 0.1
    time.sleep(rng.uniform(0.0, period))
    child.send_signal(signal.SIGKILL)
    out, err = child.communicate(timeout=60)
    output = "".join(lines) + out
    assert "mismatch" not in output and "done" not in output, output + err
    return output


def _resumed_from(output: str) -> int | None:
    first = output.splitlines()[0]
    assert first.startswith("resumed "), output
    value = first.split()[1]
    return None if value == "none" else int(value)


def _run_with_kills(root: str, options: dict[str, Any], kills: int, seed: int) -> None:
    rng = random.Random(seed)
    expected: int | None = None
    for _ in range(kills):
        child = _start(root, options, str(STEPS))
        output = _kill_after(child, rng.randrange(1, 4), rng)
        assert _resumed_from(output) == expected, output
        finalized = set(_published(root, options)) | set(_sealed(root, options))
        expected = max(finalized, default=None)
    child = _start(root, options, str(STEPS))
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, out + err
    assert _resumed_from(out) == expected, out
    assert expected is not None and expected < STEPS - 1  # the kills did interrupt the run
    assert out.splitlines()[-1] == "done"
    final = partialstore.load(_path(root, STEPS - 1), storage_options=options)
    assert job.same(final, job.state_at(STEPS - 1))
    # Retention ran in every incarnation: only the last keep_last steps are left.
    assert _published(root, options) == list(range(STEPS - job.KEEP_LAST, STEPS))


def test_kill_and_resume_local(tmp_path: Path) -> None:
    _run_with_kills(str(tmp_path / "run"), {}, kills=3, seed=1)


def test_kill_and_resume_s3(s3_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_url
    _run_with_kills(url, options, kills=3, seed=2)


@pytest.mark.parametrize("point", ["finalize.after_seal", "finalize.after_publish"])
def test_a_kill_inside_finalize_resumes_from_that_step(tmp_path: Path, point: str) -> None:
    """Killed after its seal (``recover()`` completes the finalize) or after it published
    but before the index update (the intent shows the step): step 4 counts either way."""
    root = str(tmp_path / "run")
    child = _start(root, {}, "6", crash_at=f"{point}:5")  # the 5th finalize: step 4
    out, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, out + err
    assert out.splitlines()[-1] == "finalized 3"
    assert _sealed(root, {}) == ([4] if point == "finalize.after_seal" else [])
    index = json.loads((Path(root) / "partialstore.run.json").read_text())
    assert 4 in index["pending"] and 4 not in index["steps"]  # the index never got step 4
    child = _start(root, {}, "6")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, out + err
    assert out.splitlines() == ["resumed 4", "finalized 5", "done"]
    assert job.same(partialstore.load(_path(root, 5)), job.state_at(5))


PREEMPTED_JOB = """
import json, sys, time
import pytest

import partialstore
root, options = sys.argv[1], json.loads(sys.argv[2])
with partialstore.CheckpointManager(root, storage_options=options) as mgr:
    assert not mgr.reached_preemption(0)  # from now on, SIGTERM is recorded
    print("ready", flush=True)
    for step in range(10_000):
        time.sleep(0.02)
        if mgr.reached_preemption(step):
            mgr.save(step, {"step": step})
            mgr.finalize(step)
            print(f"preempted {step}", flush=True)
            break
"""


PLAIN_JOB = """
import sys, time
import pytest

import partialstore
with partialstore.CheckpointManager(sys.argv[1]) as mgr:
    print("ready", flush=True)
    time.sleep(60)
"""


def test_sigterm_makes_the_job_save_and_finalize(tmp_path: Path) -> None:
    script, plain = tmp_path / "preempted.py", tmp_path / "plain.py"
    script.write_text(PREEMPTED_JOB)
    plain.write_text(PLAIN_JOB)
    root = str(tmp_path / "run")
    child = _start(root, {}, script=str(script))
    # A job that never asks about preemption keeps dying of SIGTERM.
    bystander = _start(str(tmp_path / "other"), {}, script=str(plain))
    for process in (child, bystander):
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err  # SIGTERM did not kill it: the manager caught it
    assert bystander.wait(timeout=60) == -signal.SIGTERM
    step = int(out.split()[-1])
    manager = partialstore.CheckpointManager(root)
    assert manager.latest_step() == step
    assert manager.load() == {"step": step}
    manager.close()
    assert os.path.isdir(os.path.join(root, f"step_{step:08d}"))


WRITER_JOB = """
import json, sys
import numpy as np
import partialstore
root, options, parity = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
with partialstore.CheckpointManager(root, storage_options=options) as mgr:
    for step in range(parity, 10, 2):
        mgr.save(step, {"w": np.full(8, step, np.int32)})
        mgr.finalize(step)
print("done", flush=True)
"""


def test_two_jobs_and_an_evaluator_on_one_root(
    tmp_path: Path, s3_url: tuple[str, dict[str, Any]]
) -> None:
    """Two processes finalize the even and the odd steps of one S3 root at once (real
    conditional requests from two clients) while this process follows the run: every step
    ends up in the index, in order for the follower. (In one process, on every store:
    tests/test_manager.py.)"""
    root, options = s3_url
    script = tmp_path / "writer.py"
    script.write_text(WRITER_JOB)
    writers = [_start(root, options, str(parity), script=str(script)) for parity in (0, 1)]
    seen: list[int] = []
    with partialstore.CheckpointManager(root, storage_options=options) as evaluator:
        latest = None
        while latest != 9:
            latest = evaluator.wait_for_step(latest, timeout=120)
            seen.append(latest)
            assert evaluator.load(latest)["w"].tolist() == [latest] * 8
        for writer in writers:
            out, err = writer.communicate(timeout=120)
            assert writer.returncode == 0 and out.strip() == "done", err
        assert evaluator.steps() == list(range(10))
    assert seen == sorted(set(seen))
