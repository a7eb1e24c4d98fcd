"""The training job behind ``partialstore demo``: a loop that checkpoints every step.

Each step changes every array of a small transformer-like state
deterministically (so any step's state can be recomputed to check a load
bit for bit) and checkpoints it through a :class:`partialstore.CheckpointManager`
in four partial saves, two of them async, then finalizes the step; the
manager keeps the last two steps. ``partialstore demo`` runs this loop in a
child process (``python -m partialstore._cli.demo_job ROOT ...``), kills it
with SIGKILL in the middle of a step, and resumes it in its own process.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> figures = train(tmp.name, {}, last_step=2, scale=0, echo=lambda line: None)
    >>> sorted(figures)
    ['step 1 finalize', 'step 1 saves', 'step 2 finalize', 'step 2 saves']
    >>> import partialstore
    >>> with partialstore.CheckpointManager(tmp.name) as manager:
    ...     loaded = manager.load()
    >>> same_bits(state_at(2, scale=0), loaded)
    True
    >>> tmp.cleanup()
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["KEEP_LAST", "pieces_of", "same_bits", "state_at", "train"]

#: Steps the demo's retention keeps.
KEEP_LAST = 2


def _initial_state(scale: int) -> dict[str, Any]:
    """Step 0: embeddings, two layers (float32 and bfloat16), optimizer moments, rng."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    width = 64 if scale == 0 else 256 * scale
    return {
        "params": {
            "embed": rng.standard_normal((1024, width), dtype=np.float32),
            "layers": [
                {
                    "attn": rng.standard_normal((width, width), dtype=np.float32),
                    "mlp": rng.standard_normal((width, 4 * width)).astype(ml_dtypes.bfloat16),
                    "norm_scale": np.ones(width, np.float32),
                }
                for _ in range(2)
            ],
        },
        "opt_state": {"count": np.int32(0), "mu": [np.zeros(width, np.float32) for _ in range(4)]},
        "rng": np.array([0, 42], np.uint32),
        "step": 0,
    }


def _advance(value: Any, step: int) -> Any:
    """One deterministic "training step" on one leaf."""
    if not isinstance(value, np.ndarray | np.integer):
        return step if isinstance(value, int) else value
    if value.dtype.kind in "iu":
        return (value + step).astype(value.dtype)
    # floats, bfloat16 included (its numpy kind is "V")
    return (value * np.float32(0.5) + np.float32(step)).astype(value.dtype)


def state_at(step: int, *, scale: int = 1) -> dict[str, Any]:
    """The state after ``step`` training steps (recomputed from step 0).

    Example:
        >>> state_at(3, scale=0)["opt_state"]["count"]  # 1 + 2 + 3
        np.int32(6)
    """
    import jax

    state = _initial_state(scale)
    for number in range(1, step + 1):
        state = jax.tree_util.tree_map(lambda leaf, n=number: _advance(leaf, n), state)
    return state


def pieces_of(state: Mapping[str, Any]) -> list[tuple[dict[str, Any], bool]]:
    """The partial saves of one step, and whether each is async.

    Example:
        >>> [sorted(piece) for piece, _ in pieces_of(state_at(0, scale=0))]
        [['params'], ['params'], ['opt_state', 'rng'], ['step']]
    """
    params = state["params"]
    return [
        ({"params": {"embed": params["embed"]}}, False),
        ({"params": {"layers": params["layers"]}}, True),
        ({"opt_state": state["opt_state"], "rng": state["rng"]}, True),
        ({"step": state["step"]}, False),
    ]


def same_bits(expected: Any, actual: Any) -> bool:
    """Whether two trees hold the same structure, dtypes and bytes (see the module example)."""
    import jax

    want, want_tree = jax.tree_util.tree_flatten(expected)
    got, got_tree = jax.tree_util.tree_flatten(actual)
    if str(want_tree) != str(got_tree):
        return False
    for a, b in zip(want, got, strict=True):
        if hasattr(a, "dtype"):
            a, b = np.asarray(a), np.asarray(b)
            if (a.dtype, a.shape, a.tobytes()) != (b.dtype, b.shape, b.tobytes()):
                return False
        elif type(a) is not type(b) or a != b:
            return False
    return True


def _checkpoint(manager: Any, step: int, state: Mapping[str, Any]) -> float:
    """Save ``state`` as four partial saves (two async); return the seconds they took."""
    started = time.perf_counter()
    responses = []
    for piece, asynchronous in pieces_of(state):
        if asynchronous:
            responses.append(manager.save_async(step, piece))
        else:
            manager.save(step, piece, custom_metadata={"loss": 1.0 / step})
    for response in responses:
        response.result()
    return time.perf_counter() - started


def train(
    root: str,
    options: Mapping[str, Any],
    *,
    last_step: int,
    scale: int,
    echo: Callable[[str], object] = print,
) -> dict[str, float]:
    """Train up to ``last_step``, resuming from the latest finalized step; return the figures."""
    import partialstore

    figures: dict[str, float] = {}
    with partialstore.CheckpointManager(
        root, storage_options=dict(options), keep_last=KEEP_LAST
    ) as manager:
        start = manager.recover() or 0
        state = state_at(start, scale=scale)
        for step in range(start + 1, last_step + 1):
            state = _next(state, step)
            echo(f"step {step}: saving")
            figures[f"step {step} saves"] = _checkpoint(manager, step, state)
            stats = manager.finalize(step)
            figures[f"step {step} finalize"] = stats.seconds
            took = f"{stats.requests} requests, {stats.seconds * 1e3:.1f} ms"
            echo(f"step {step}: finalized ({took})")
    return figures


def _next(state: Mapping[str, Any], step: int) -> Any:
    import jax

    return jax.tree_util.tree_map(lambda leaf: _advance(leaf, step), state)


def main(argv: list[str] | None = None) -> int:
    """``python -m partialstore._cli.demo_job ROOT --last-step N --scale S --options JSON``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--last-step", type=int, required=True)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--options", default="{}", help="storage options, a JSON object")
    args = parser.parse_args(argv)
    options = json.loads(args.options)

    def echo(line: str) -> None:
        print(line, flush=True)  # the parent reads it line by line

    train(args.root, options, last_step=args.last_step, scale=args.scale, echo=echo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
