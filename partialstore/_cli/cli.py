"""The ``partialstore`` command: ``demo`` and ``bench``.

From a shell: ``partialstore demo``, ``partialstore demo --emulator gcs`` or
``partialstore bench finalize_latency --quick`` (``tests/test_demo.py`` runs
the demo).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["main"]

_BENCHMARKS = ("finalize_latency", "throughput", "time_to_error")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="partialstore", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="save a model in pieces, finalize, load, verify")
    demo.add_argument("url", nargs="?", help="checkpoint path or URL (default: a temp folder)")
    demo.add_argument("--storage-options", help="JSON dict of backend options")
    demo.add_argument(
        "--emulator",
        choices=("s3", "gcs"),
        help="start a local S3 (moto) or GCS (fake-gcs-server) on 127.0.0.1 and use it",
    )
    demo.add_argument("--scale", type=int, default=1, help="width multiplier of the model")

    bench = commands.add_parser("bench", help="run a benchmark script (from a source checkout)")
    bench.add_argument("name", choices=_BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``partialstore`` command line; return the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from partialstore._cli import demo

        return demo.main(args)
    # The benchmark scripts live beside the package in a source checkout; the
    # console script's sys.path does not hold the checkout, so add it.
    checkout = Path(__file__).resolve().parents[2]  # partialstore/_cli/cli.py
    if (checkout / "benchmarks").is_dir() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        module = importlib.import_module(f"benchmarks.{args.name}")
    except ModuleNotFoundError as error:
        if error.name not in ("benchmarks", f"benchmarks.{args.name}"):
            raise
        print(
            "partialstore bench runs the scripts in benchmarks/ of a source checkout: "
            "run it from the repository root.",
            file=sys.stderr,
        )
        return 2
    return int(module.main(args.args) or 0)


if __name__ == "__main__":
    sys.exit(main())
