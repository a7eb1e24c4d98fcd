"""The commands on a training run's root: ``ls``, ``latest``, ``sweep``, ``rm``.

Each opens a :class:`partialstore.CheckpointManager` on the root (no
retention: an operator's command never deletes more than it names) and goes
through its public methods.

Example:
    >>> from partialstore._cli.framework import COMMANDS
    >>> [name for name in ("ls", "latest", "sweep", "rm") if name in COMMANDS]
    ['ls', 'latest', 'sweep', 'rm']
    >>> parse_duration("90s"), parse_duration("2h"), parse_duration("1.5d")
    (90.0, 7200.0, 129600.0)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import re
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

import partialstore
from partialstore._cli import exitcodes
from partialstore._cli.framework import command
from partialstore._cli.output import Output, human_bytes
from partialstore.errors import InvalidInputError, NotFoundError

__all__ = ["parse_duration"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with an optional unit ``s``, ``m``, ``h`` or ``d``.

    See the module docstring for examples.

    Raises:
      InvalidInputError: not a duration.
    """
    match = _DURATION.match(text)
    if match is None:
        raise InvalidInputError(
            f"--older-than {text!r} is not a duration: write a number with a unit, e.g. "
            "90s, 30m, 2h or 7d."
        )
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="the run's root path or URL (its steps are under it)")


@contextlib.contextmanager
def _manager(args: argparse.Namespace) -> Iterator[partialstore.CheckpointManager]:
    with partialstore.CheckpointManager(args.root, storage_options=args.storage_options) as manager:
        yield manager


def _age_s(finalized: str | None, now: datetime.datetime) -> float | None:
    if finalized is None:
        return None
    when = datetime.datetime.fromisoformat(finalized)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (now - when).total_seconds())


def _step_row(manager: partialstore.CheckpointManager, step: int, now: Any) -> dict[str, Any]:
    from partialstore._cli.rendering import leaf_nbytes, walk

    meta = manager.metadata(step)
    return {
        "step": step,
        "state": "finalized",
        "path": manager.path(step),
        "saves": len(meta.saves),
        "bytes": sum(leaf_nbytes(leaf) for _, leaf in walk(meta.tree)),
        "age_s": _age_s(meta.finalized, now),
    }


def _session_row(info: partialstore.SessionInfo) -> dict[str, Any]:
    return {
        "step": info.step,
        "state": "sealed" if info.sealed else "open",
        "path": info.path,
        "saves": info.saves,
        "bytes": info.nbytes,
        "age_s": info.age_s,
    }


def _render_rows(console: Console, root: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=root, title_justify="left")
    for name in ("step", "state", "saves", "size", "age"):
        table.add_column(name, justify="right" if name != "state" else "left")
    for row in rows:
        age = "" if row["age_s"] is None else f"{row['age_s']:.0f} s"
        size = human_bytes(row["bytes"])
        table.add_row(str(row["step"]), row["state"], str(row["saves"]), size, age)
    console.print(table)


@command("ls", "list a run's steps and open sessions (saves, size, age)", arguments=_root)
def ls(args: argparse.Namespace, out: Output) -> int:
    """``partialstore ls ROOT``: finalized steps and unfinalized sessions, by step."""
    now = datetime.datetime.now(datetime.UTC)
    with _manager(args) as manager:
        steps = manager.steps()
        rows: list[dict[str, Any]] = []
        with out.progress("reading steps") as advance:
            for done, step in enumerate(steps, 1):
                rows.append(_step_row(manager, step, now))
                advance(done, len(steps))
        rows += [_session_row(info) for info in manager.sessions()]
    rows.sort(key=lambda row: row["step"])
    out.result({"root": args.root, "steps": rows}, lambda c: _render_rows(c, args.root, rows))
    return exitcodes.OK


@command("latest", "print the latest finalized step of a run", arguments=_root)
def latest(args: argparse.Namespace, out: Output) -> int:
    """``partialstore latest ROOT``: the step number (exit 4 when none is finalized)."""
    with _manager(args) as manager:
        step = manager.latest_step()
        path = None if step is None else manager.path(step)
    if step is None:
        raise NotFoundError(f"No finalized step under {args.root}.")
    out.result(
        {"root": args.root, "step": step, "path": path},
        lambda console: console.print(str(step), markup=False),
    )
    return exitcodes.OK


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    _root(parser)
    parser.add_argument(
        "--older-than",
        required=True,
        help="discard sessions idle at least this long (e.g. 90s, 30m, 2h, 7d)",
    )


@command("sweep", "discard a run's abandoned sessions", arguments=_sweep_arguments)
def sweep(args: argparse.Namespace, out: Output) -> int:
    """``partialstore sweep ROOT --older-than 2h``: discard idle unfinalized sessions."""
    older_than = parse_duration(args.older_than)
    with _manager(args) as manager:
        swept = manager.sweep(older_than)
    rows = [_session_row(info) for info in swept]

    def render(console: Console) -> None:
        console.print(f"{args.root}: discarded {len(rows)} sessions", markup=False)
        for row in rows:
            console.print(f"  step {row['step']}: {row['path']}", markup=False)

    out.result({"root": args.root, "discarded": rows}, render)
    return exitcodes.OK


def _rm_arguments(parser: argparse.ArgumentParser) -> None:
    _root(parser)
    parser.add_argument("--step", type=int, required=True, help="the finalized step to delete")
    parser.add_argument("--force", action="store_true", help="also delete the latest step")


@command("rm", "delete a finalized step of a run", arguments=_rm_arguments)
def rm(args: argparse.Namespace, out: Output) -> int:
    """``partialstore rm ROOT --step N``: delete step N (the latest only with ``--force``)."""
    with _manager(args) as manager:
        path = manager.path(args.step)
        manager.delete_step(args.step, force=args.force)
    out.result(
        {"root": args.root, "step": args.step, "path": path, "deleted": True},
        lambda console: console.print(f"{path}: deleted", markup=False),
    )
    return exitcodes.OK
