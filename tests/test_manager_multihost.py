"""CheckpointManager in a real two-process JAX job (tests/_manager_multihost_worker.py).

Both processes save one sharded tree per step and finalize; only the
primary writes the run index and deletes old steps (checked from the keys
each process's backend wrote and deleted); both see the same steps. Then
SIGTERM to the non-primary process: JAX's preemption sync point makes
``reached_preemption`` true in both at the same step, and that step is saved
and finalized by both together.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from _multihost_worker import DEVICES_PER_PROCESS

import partialstore
from partialstore._lifecycle.indexformat import INDEX_KEY

WORKER = Path(__file__).with_name("_manager_multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_two_process_job_with_a_manager(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        PARTIALSTORE_MULTIHOST_TIMEOUT_S="60",
    )
    port = _free_port()
    reports = [tmp_path / f"report{i}.json" for i in range(2)]
    children = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), "2", str(i), root, str(report)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, report in enumerate(reports)
    ]
    try:
        victim = children[1]
        assert victim.stdout is not None
        lines = []
        while not (line := victim.stdout.readline()).startswith("step ") and line:
            lines.append(line)
        assert line.startswith("step "), "".join(lines)
        victim.send_signal(signal.SIGTERM)
        outputs = [child.communicate(timeout=180)[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    for child, output in zip(children, outputs, strict=True):
        assert child.returncode == 0, output[-4000:]
    primary, other = (json.loads(r.read_text()) for r in reports)
    # The primary's wait() waited for its retention; the other process may look
    # before that retention pass is done.
    assert primary["after_three"] == {"steps": [2], "latest": 2}
    assert other["after_three"]["latest"] == 2
    assert other["after_three"]["steps"] in ([2], [1, 2], [0, 1, 2])
    step = primary["preempted_at"]
    assert step is not None and other["preempted_at"] == step  # the same step in both
    assert primary["latest"] == other["latest"] == step
    # Only the primary wrote the index and deleted old steps.
    assert any(key == INDEX_KEY for key in primary["wrote"])
    assert not any(INDEX_KEY in key for key in other["wrote"])
    assert any(key.startswith("step_00000000") for key in primary["deleted"])
    assert not any(key.startswith("step_") for key in other["deleted"])
    manager = partialstore.CheckpointManager(root)
    assert manager.steps() == [step]  # keep_last=1
    assert manager.load() == {"preempted_at": step}
    manager.close()
    for report in (primary, other):
        assert report["step2_exact"] and all(report["step2_exact"].values())
