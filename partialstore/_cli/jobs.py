"""The commands that run jobs: ``demo`` (the main job) and ``bench`` (a benchmark script).

Example:
    >>> from partialstore._cli.framework import COMMANDS
    >>> COMMANDS["bench"].common, COMMANDS["demo"].common
    (False, True)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from partialstore._cli import exitcodes
from partialstore._cli.framework import command
from partialstore._cli.output import Output, error

__all__ = ["BENCHMARKS"]

BENCHMARKS = ("finalize_latency", "throughput", "time_to_error")


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url", nargs="?", help="the run's root path or URL (default: a temp folder)"
    )
    parser.add_argument(
        "--emulator",
        choices=("s3", "gcs"),
        help="start a local S3 (moto) or GCS (fake-gcs-server) on 127.0.0.1 and use it",
    )
    parser.add_argument("--scale", type=int, default=1, help="width multiplier of the model")


@command(
    "demo",
    "a training job that checkpoints each step, is killed, resumes, and is verified",
    arguments=_demo_arguments,
)
def demo(args: argparse.Namespace, out: Output) -> int:
    """``partialstore demo``: see :mod:`partialstore._cli.demo`.

    It reports as it goes; with ``--json`` it prints only the seconds each phase took.
    """
    from partialstore._cli.demo import run_demo

    timings = run_demo(
        args.url,
        storage_options=args.storage_options,
        emulator=args.emulator,
        scale=args.scale,
        echo=(lambda line: None) if out.json_mode else print,
    )
    out.result({"seconds": timings}, lambda console: None)  # already printed as it went
    return exitcodes.OK


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=BENCHMARKS)
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")


@command(
    "bench",
    "run a benchmark script (from a source checkout)",
    arguments=_bench_arguments,
    common=False,
)
def bench(args: argparse.Namespace, out: Output) -> int:
    """``partialstore bench NAME ARGS...``: run ``benchmarks/NAME.py`` of a source checkout."""
    del out
    # The benchmark scripts live beside the package in a source checkout; the
    # console script's sys.path does not hold the checkout, so add it.
    checkout = Path(__file__).resolve().parents[2]  # partialstore/_cli/jobs.py
    if (checkout / "benchmarks").is_dir() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        module = importlib.import_module(f"benchmarks.{args.name}")
    except ModuleNotFoundError as missing:
        if missing.name not in ("benchmarks", f"benchmarks.{args.name}"):
            raise
        error(
            "partialstore bench runs the scripts in benchmarks/ of a source checkout: "
            "run it from the repository root."
        )
        return exitcodes.USAGE
    return int(module.main(args.args) or 0)
