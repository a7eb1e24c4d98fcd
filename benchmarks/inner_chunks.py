"""What inner chunks cost a save: whole saves on local disk at several inner-chunk limits.

Each stored chunk object is split into inner chunks (zarr3's
``sharding_indexed``) so that loads with another sharding read only what
they need (``benchmarks.load_bytes``). Writing a chunk costs time per inner
chunk, so the limit :data:`partialstore._arrays.sharded.MAX_INNER_CHUNKS`
trades save speed against how finely a load can pick. This script saves
the same trees with each limit in turn, and with no inner chunks at all
(``none``, the layout before inner chunks), interleaved in rounds so that
disk and page-cache drift hits every limit alike, and reports the median
save time per limit against ``none``. Beside each save, raw TensorStore
writes the same arrays with the layout that save stored (chunks, inner
chunks and codecs, read from its ``zarr.json`` files): what the same layout
costs with no checkpoint around it, so the two ratios tell whose cost an
inner chunk is.

Local disk only: there the write itself is cheap and the encoding shows;
on an object store the requests are the same at every limit.

Usage::

    python -m benchmarks.inner_chunks --out /tmp/inner              # about 2 minutes
    python -m benchmarks.inner_chunks --quick --out /tmp/inner      # seconds
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import partialstore
from benchmarks import baselines
from benchmarks.cli import Measured, Run, Script
from benchmarks.stores import StoreEnv
from partialstore._arrays import sharded, zarr3

InnerRule = Callable[[Sequence[int], Sequence[int], int], list[int]]
#: Local disk, for raw TensorStore's kvstore and reading a save's layouts (any root:
#: both take absolute paths).
_LOCAL = StoreEnv("local", "/")


def _no_inner_chunks(shape: Sequence[int], chunks: Sequence[int], itemsize: int) -> list[int]:
    return list(chunks)


def _rule(limit: str) -> InnerRule:
    """The inner-chunk shape rule for ``limit``: ``"none"`` or a maximum count per chunk."""
    if limit == "none":
        return _no_inner_chunks
    return functools.partial(sharded.inner_chunks, max_count=int(limit))


def _trees(quick: bool) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    big, side = ((2048, 1024), 512) if quick else ((16384, 4096), 2048)
    return {
        f"one {big[0]}x{big[1]} float32": {"a": rng.standard_normal(big, dtype=np.float32)},
        f"8 x {side}x{side} float32": {
            f"w{i}": rng.standard_normal((side, side), dtype=np.float32) for i in range(8)
        },
    }


def _timed_save(
    root: Path, tree: dict[str, np.ndarray], rule: InnerRule, keep: bool = False
) -> tuple[float, Path]:
    path = root / uuid.uuid4().hex
    zarr3.inner_chunks = rule  # what the save's zarr3 writer calls
    start = time.perf_counter()
    partialstore.save(str(path), tree)
    spent = time.perf_counter() - start
    if not keep:
        _remove(root, path.name)
    return spent, path


def _remove(root: Path, name: str) -> None:
    for written in root.glob(f"{name}*"):  # the checkpoint and its staging folder
        shutil.rmtree(written)


def _timed_raw_write(root: Path, tree: dict[str, np.ndarray], layouts: list[Any]) -> float:
    """Raw TensorStore writing ``tree`` with ``layouts``, each array its own zarr3 array."""
    name = uuid.uuid4().hex
    start = time.perf_counter()
    sources = baselines.raw_write(_LOCAL.kvstore(str(root / name)), tree, layouts)
    spent = time.perf_counter() - start
    _remove(root, name)
    if set(sources) != {"partialstore"}:
        raise RuntimeError(f"raw TensorStore did not find the save's layout: {sources}")
    return spent


def _warm_up(
    root: Path, tree: dict[str, np.ndarray], rule: InnerRule
) -> tuple[list[list[int]], list[Any]]:
    """Save ``tree`` once, untimed; the stored chunk and inner shape of a leaf, and the layouts.

    Taken from the save itself: the save path picks the chunks (a 16 MiB array
    is split into 4 MiB chunks to write in parallel), not the benchmark. Every
    leaf of a tree here has the same shape, so any leaf's layout is the tree's.
    The layouts are the save's ``zarr.json`` files, for raw TensorStore.
    """
    seen: list[list[list[int]]] = []

    def recording(shape: Sequence[int], chunks: Sequence[int], itemsize: int) -> list[int]:
        inner = rule(shape, chunks, itemsize)
        seen.append([list(chunks), list(inner)])
        return inner

    _, path = _timed_save(root, tree, recording, keep=True)
    layouts = baselines.discover_layouts(_LOCAL, f"{path}.partial_save")
    _remove(root, path.name)
    _timed_raw_write(root, tree, layouts)  # TensorStore's own warm-up for this layout
    return seen[0], layouts


def measure(run: Run) -> Measured:
    limits = [x.strip() for x in run.args.limits.split(",") if x.strip()]
    rounds = run.args.rounds or (2 if run.args.quick else 15)
    root = Path(run.scratch) / "inner"
    root.mkdir()
    real = zarr3.inner_chunks
    rows = []
    try:
        for name, tree in _trees(run.args.quick).items():
            times: dict[str, list[float]] = {limit: [] for limit in limits}
            raw: dict[str, list[float]] = {limit: [] for limit in limits}
            # The warm-up (imports, TensorStore contexts, page cache) records the layout.
            warmed = {limit: _warm_up(root, tree, _rule(limit)) for limit in limits}
            for _ in range(rounds):
                for limit in limits:
                    times[limit].append(_timed_save(root, tree, _rule(limit))[0])
                    raw[limit].append(_timed_raw_write(root, tree, warmed[limit][1]))
            layout = {limit: shapes for limit, (shapes, _) in warmed.items()}
            rows.append({"tree": name, "times_s": times, "raw_s": raw, "layout": layout})
    finally:
        zarr3.inner_chunks = real
    return Measured(config={"limits": limits, "rounds": rounds}, body={"rows": rows}, status=0)


def render(result: dict[str, Any]) -> str:
    out = ["## Saves on local disk against the inner-chunk limit", ""]
    out += [
        "| tree | limit | chunk, inner chunk (each leaf) | median save | vs none "
        "| raw TensorStore, same layout | vs none |"
    ]
    out += ["|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        saves = {k: statistics.median(v) for k, v in row["times_s"].items()}
        raws = {k: statistics.median(v) for k, v in row["raw_s"].items()}
        for limit, median in saves.items():
            out.append(
                f"| {row['tree']} | {limit} | {row['layout'][limit]} | "
                f"{median * 1e3:.0f} ms | {_against(median, saves.get('none'))} | "
                f"{raws[limit] * 1e3:.0f} ms | {_against(raws[limit], raws.get('none'))} |"
            )
    return "\n".join([*out, ""])


def _against(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else ""


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limits",
        default="none,256,64,32,16",
        help="inner chunks per chunk at most ('none': no inner chunks); default none,256,64,32,16",
    )
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 15; quick: 2)")


SCRIPT = Script(
    name="inner_chunks",
    description="Save time on local disk against the limit on inner chunks per chunk.",
    stores=("local",),
    add_arguments=_add_arguments,
    measure=measure,
    render=render,
)


def main(argv: list[str] | None = None) -> int:
    return SCRIPT.main(argv)


if __name__ == "__main__":
    sys.exit(main())
