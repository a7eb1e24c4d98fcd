"""The skeleton every benchmark script shares: options, output folder, run, report.

A script describes itself with a :class:`Script` (its name, its own options,
how it measures, how it renders its tables and draws its plot);
:func:`run_script` does the rest, the same way for every script:

1. parse the options shared by all scripts (``--quick``, ``--stores``,
   ``--out``, ``--publish``; with ``systems``, also ``--systems``, ``--reps``,
   ``--budget-s`` and ``--tmp-dir``) and the script's own;
2. make the output folder and a scratch folder (removed afterwards), and
   describe the machine;
3. call the script's ``measure``;
4. write ``<name>.json`` (every raw figure), ``<name>.md`` (the tables, also
   printed on stdout) and ``<name>.png`` (the plot, where the script draws one)
   into ``--out``, next to ``<name>-workers.log``;
5. with ``--publish``, copy the table and the plot (never the raw JSON or the
   log) into ``benchmarks/latest/``, the summary kept in git.

The default ``--out`` is ``benchmarks/results/`` of the checkout, which git
ignores: raw results never end up in a commit by accident.

Example::

    def measure(run: Run) -> Measured:
        rows = [{"x": 1}]
        return Measured(config={"stores": run.args.stores}, body={"rows": rows}, status=0)

    SCRIPT = Script(
        name="demo", description="A demo.", stores=("local",), add_arguments=lambda p: None,
        measure=measure, render=lambda result: "## Demo",
    )
    run_script(SCRIPT, ["--quick", "--out", "/tmp/demo"])  # writes /tmp/demo/demo.json, .md
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import network, report
from benchmarks.common import REPO_ROOT, machine_description
from benchmarks.runner import PlanResult, run_plan

# Raw results go here by default; .gitignore lists it.
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# The summary kept in git: markdown tables and plots only.
LATEST_DIR = REPO_ROOT / "benchmarks" / "latest"
FORMAT = 1
QUICK_HELP = "tiny sizes and 2 repetitions: a smoke run of seconds (what CI runs)"
_STORE_HELP = {
    "local": "local (temp folder)",
    "s3": "s3 (moto server started on 127.0.0.1)",
    "gcs": "gcs (fake-gcs-server started on 127.0.0.1)",
}


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """Split ``"a,b"`` and check every item is in ``allowed``.

    Example::

        parse_list("local,s3", ("local", "s3", "gcs"), "store")  # ['local', 's3']
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"unknown or missing {what}(s) {unknown}; choose from {', '.join(allowed)}"
        )
    return items


def add_list_option(
    parser: argparse.ArgumentParser, flag: str, allowed: tuple[str, ...], what: str, help: str
) -> None:
    """A comma-separated option whose value is parsed into a checked list (default: all).

    Example::

        add_list_option(parser, "--series", ("bytes", "saves"), "series", "series to run")
        parser.parse_args(["--series", "saves"]).series  # ['saves']
    """
    parser.add_argument(
        flag,
        default=",".join(allowed),
        type=lambda text: parse_list(text, allowed, what),
        help=f"comma-separated {help} (default: {','.join(allowed)})",
    )


def _add_measure_arguments(parser: argparse.ArgumentParser, systems: tuple[str, ...]) -> None:
    # The options of the scripts that run systems in worker processes.
    add_list_option(parser, "--systems", systems, "system", "systems to measure")
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions per figure (default 3; quick: 2)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="time budget in seconds per point and system (all repetitions together); "
        "larger points predicted to exceed it are reported as skipped "
        "(default 150; quick: 30)",
    )
    parser.add_argument(
        "--tmp-dir",
        default=None,
        help="parent folder of the local-disk store (default: the system temp folder)",
    )


@dataclasses.dataclass(frozen=True)
class Outputs:
    """The files of one run of script ``name`` in ``folder``.

    Example::

        Outputs(Path("/tmp/bench"), "throughput").path(".json")  # /tmp/bench/throughput.json
    """

    folder: Path
    name: str

    def path(self, suffix: str) -> Path:
        """``<folder>/<name><suffix>``: ``.json``, ``.md``, ``.png`` or ``-workers.log``."""
        return self.folder / f"{self.name}{suffix}"


@dataclasses.dataclass
class Run:
    """What a script's ``measure`` gets: parsed options, output files, scratch folder."""

    args: argparse.Namespace
    out: Outputs
    scratch: str
    machine: dict[str, Any]
    started: float  # time.monotonic() at the start of the run

    def plan(self, groups: list[tuple[str, list[dict[str, Any]]]], **kwargs: Any) -> PlanResult:
        """:func:`benchmarks.runner.run_plan` on this run's stores, systems, scratch and log.

        Example::

            events, workers, store_info, unavailable = run.plan(
                groups, label="finalize", timeout_for=lambda jobs: 600.0
            )
        """
        return run_plan(
            groups,
            stores=self.args.stores,
            systems=self.args.systems,
            tmp_root=self.scratch,
            log_path=str(self.out.path("-workers.log")),
            profile=getattr(self.args, "profile", None),
            **kwargs,
        )


@dataclasses.dataclass
class Measured:
    """What ``measure`` returns: the run's configuration, its results, its exit status."""

    config: dict[str, Any]
    body: dict[str, Any]
    status: int


@dataclasses.dataclass(frozen=True)
class Script:
    """One benchmark script: its name, its own options and its steps.

    ``systems`` non-empty adds ``--systems``, ``--reps``, ``--budget-s`` and
    ``--tmp-dir``. ``render`` turns the result into markdown; ``plot``, where
    given, draws the result into the PNG path it is handed.
    """

    name: str
    description: str
    stores: tuple[str, ...]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    measure: Callable[[Run], Measured]
    render: Callable[[dict[str, Any]], str]
    plot: Callable[[dict[str, Any], str], None] | None = None
    systems: tuple[str, ...] = ()
    quick_help: str = QUICK_HELP
    scratch_prefix: str = "partialstore-bench-"

    def parser(self) -> argparse.ArgumentParser:
        """The script's full option parser (shared options first)."""
        parser = argparse.ArgumentParser(
            prog=f"python -m benchmarks.{self.name}", description=self.description
        )
        parser.add_argument("--quick", action="store_true", help=self.quick_help)
        stores = ", ".join(_STORE_HELP.get(s, s) for s in self.stores)
        add_list_option(parser, "--stores", self.stores, "store", f"stores: {stores}")
        summary = "the markdown table and the plot" if self.plot else "the markdown table"
        parser.add_argument(
            "--out",
            type=Path,
            default=RESULTS_DIR,
            help=f"folder for the raw JSON, the worker log and {summary} "
            "(default: benchmarks/results/ of the checkout, ignored by git)",
        )
        parser.add_argument(
            "--publish",
            nargs="?",
            type=Path,
            const=LATEST_DIR,
            default=None,
            metavar="DIR",
            help=f"also copy {summary} (not the raw JSON) into DIR "
            "(default: benchmarks/latest/, the summary kept in git); not with --quick",
        )
        if self.systems:
            _add_measure_arguments(parser, self.systems)
            network.add_network_arguments(parser)
        self.add_arguments(parser)
        return parser

    def main(self, argv: list[str] | None = None) -> int:
        """Run the script (its module's ``main``): measure, print, write; the exit status.

        Raw results go to ``--out`` (default ``benchmarks/results/``, ignored by git).

        Example::

            from benchmarks import throughput

            throughput.SCRIPT.main(["--quick", "--stores", "local", "--out", "/tmp/bench"])
        """
        return run_script(self, argv)


def run_script(script: Script, argv: list[str] | None = None) -> int:
    """Parse ``argv``, measure, write and print the report; return the exit status.

    Example::

        run_script(SCRIPT, ["--quick", "--stores", "local", "--out", "/tmp/bench"])
    """
    parser = script.parser()
    args = parser.parse_args(argv)
    if args.publish is not None and args.quick:
        parser.error("--publish keeps a full run's summary; --quick figures mean nothing")
    if script.systems:
        args.reps = args.reps or (2 if args.quick else 3)
        args.budget_s = args.budget_s or (30.0 if args.quick else 150.0)
        # Every store under every network profile: s3, s3@20ms, ... (benchmarks.network).
        args.profile = network.profile_of(args)
        args.stores = network.store_labels(args.stores, args.network, args.profile)
    out = Outputs(Path(args.out), script.name)
    out.folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    scratch = tempfile.mkdtemp(prefix=script.scratch_prefix, dir=getattr(args, "tmp_dir", None))
    try:
        run = Run(args, out, scratch, machine_description(scratch), started)
        measured = script.measure(run)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    command = " ".join([f"python -m benchmarks.{script.name}", *(argv or sys.argv[1:])])
    result = {
        "benchmark": script.name,
        "format": FORMAT,
        "command": command,
        "quick": bool(args.quick),
        "config": measured.config,
        "machine": run.machine,
        **measured.body,
        "elapsed_s": time.monotonic() - run.started,
    }
    write_outputs(script, result, out, publish=args.publish)
    return measured.status


def write_outputs(
    script: Script, result: dict[str, Any], out: Outputs, *, publish: Path | None = None
) -> list[Path]:
    """Print the tables; write the JSON, the tables and the plot; copy the summary to publish.

    Returns the files written into ``out`` (the JSON first).

    Example::

        write_outputs(SCRIPT, result, Outputs(Path("/tmp/bench"), "demo"))
    """
    tables = script.render(result)
    report.write_json(str(out.path(".json")), result)
    out.path(".md").write_text(tables + "\n")
    print(tables, flush=True)
    written = [out.path(".json"), out.path(".md")]
    if script.plot is not None:
        script.plot(result, str(out.path(".png")))
        written.append(out.path(".png"))
    if publish is not None:
        publish.mkdir(parents=True, exist_ok=True)
        for summary in written[1:]:
            shutil.copyfile(summary, publish / summary.name)
    names = [str(path) for path in written]
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    print(
        f"\nWrote {listed}" + (f"; copied the summary to {publish}" if publish else ""),
        file=sys.stderr,
    )
    return written
