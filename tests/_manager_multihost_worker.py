"""One process of a two-process JAX job that trains with a CheckpointManager.

Run by tests/test_manager_multihost.py as
``python _manager_multihost_worker.py <port> <num_processes> <process_id> <root> <report.json>``.
Every process saves the same global sharded tree (tests/_multihost_worker.py)
at steps 0, 1, 2 with ``keep_last=1`` and finalizes each; then it asks
``reached_preemption`` at every step of a loop and prints ``step <n>``
(the test sends SIGTERM to process 1 meanwhile), saves and finalizes the
step where it returned True. It reports the steps it saw, whether step 2
loaded back bit for bit, the step it was preempted at, and every key its
backend wrote or deleted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _multihost_worker import DEVICES_PER_PROCESS, _global_tree, _record_calls, expected_state

#: The preemption loop gives up after this many steps (the test fails then).
MAX_STEPS = 600


def _preempted_step(manager: Any) -> int | None:
    for step in range(10, 10 + MAX_STEPS):
        if manager.reached_preemption(step):
            manager.save(step, {"preempted_at": step})
            manager.finalize(step)
            return step
        print(f"step {step}", flush=True)
        time.sleep(0.05)
    return None


def main() -> None:
    port, count, index, root, report_file = sys.argv[1:6]
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=int(count),
        process_id=int(index),
        initialization_timeout=60,
    )
    from jax.sharding import Mesh

    import partialstore

    written: list[str] = []
    deleted: list[str] = []
    _record_calls(written, deleted)
    devices = np.array(jax.devices()).reshape(int(count), DEVICES_PER_PROCESS)
    state = _global_tree(Mesh(devices, ("proc", "local")))
    report: dict[str, Any] = {"process": int(index)}
    with partialstore.CheckpointManager(root, keep_last=1) as manager:
        for step in range(3):
            manager.save(step, state)
            manager.save_async(step, {"step": step}, custom_metadata={"step": step})
            manager.finalize(step)
        manager.wait()
        report["after_three"] = {"steps": manager.steps(), "latest": manager.latest_step()}
        loaded = manager.load(2)
        report["step2_exact"] = {
            name: loaded[name].tobytes() == value.tobytes()
            for name, value in expected_state().items()
            if isinstance(value, np.ndarray)
        }
        report["preempted_at"] = _preempted_step(manager)
        manager.wait()
        report["latest"] = manager.latest_step()
    report["wrote"] = written
    report["deleted"] = deleted
    Path(report_file).write_text(json.dumps(report))
    jax.distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
