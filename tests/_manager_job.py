"""A training job for the kill-and-resume tests: ``python _manager_job.py ROOT OPTIONS STEPS``.

It follows the README's resume recipe: ``recover()`` (completes a finalize
a kill left sealed), then loads the latest step and checks it bit for bit
against :func:`state_at`, then trains on, saving each step in two partial
saves (one async) and finalizing it, with ``keep_last=3``. It prints one
flushed line per event: ``resumed <step|none>``, ``finalized <step>``,
``done``; a resumed state that differs exits with code 3.

Each step's state depends only on the previous one (:func:`train`), so a
job resumed from the wrong step, or from a torn state, ends with a state
that differs from :func:`state_at`'s.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

KEEP_LAST = 3


def initial_state() -> dict[str, Any]:
    rng = np.random.default_rng(1234)
    return {
        "params": {"w": rng.standard_normal((64, 32)).astype(np.float32)},
        "opt": {"mu": np.zeros((64, 32), np.float32), "count": np.int64(0)},
        "step": -1,
    }


def train(state: dict[str, Any], step: int) -> dict[str, Any]:
    """One deterministic update (bit-for-bit reproducible with numpy on one machine)."""
    w = state["params"]["w"]
    mu = np.float32(0.9) * state["opt"]["mu"] + np.float32(0.1) * np.sin(w + np.float32(step))
    return {
        "params": {"w": (w - np.float32(0.01) * mu).astype(np.float32)},
        "opt": {"mu": mu.astype(np.float32), "count": np.int64(state["opt"]["count"] + 1)},
        "step": step,
    }


def state_at(step: int) -> dict[str, Any]:
    """The state after ``step`` in a run that was never interrupted."""
    state = initial_state()
    for number in range(step + 1):
        state = train(state, number)
    return state


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bit-exact equality of two states (dtype, shape and bytes of every array)."""
    arrays = [
        (a["params"]["w"], b["params"]["w"]),
        (a["opt"]["mu"], b["opt"]["mu"]),
        (np.asarray(a["opt"]["count"]), np.asarray(b["opt"]["count"])),
    ]
    bits = all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in arrays
    )
    return bits and a["step"] == b["step"]


def main(root: str, options: dict[str, Any], steps: int) -> int:
    import partialstore

    with partialstore.CheckpointManager(root, storage_options=options, keep_last=KEEP_LAST) as mgr:
        latest = mgr.recover()
        print(f"resumed {'none' if latest is None else latest}", flush=True)
        state = initial_state()
        if latest is not None:
            state = mgr.load(latest)
            if not same(state, state_at(latest)):
                print(f"mismatch {latest}", flush=True)
                return 3
        for step in range((latest if latest is not None else -1) + 1, steps):
            state = train(state, step)
            mgr.save(step, {"params": state["params"]})
            mgr.save_async(
                step, {"opt": state["opt"], "step": step}, custom_metadata={"step": step}
            )
            mgr.finalize(step)
            print(f"finalized {step}", flush=True)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])))
