"""What a command prints: one JSON document (``--json``) or rich text, and progress bars.

A command hands :meth:`Output.result` both forms of its answer: the JSON
data, and a function that renders it for people. With ``--json`` stdout
holds exactly one JSON document (nothing else is ever printed there);
without it the rendering goes to stdout. Progress bars go to stderr, only
when stderr is a terminal and ``--json`` is off, so pipes and scripts never
see them. Errors are printed by :func:`error` as one line on stderr.

Example:
    >>> out = Output(json_mode=True)
    >>> out.result({"deleted": []}, lambda console: console.print("nothing"))
    {"deleted": []}
    >>> with out.progress("verifying") as advance:
    ...     advance(1, 2)  # no bar: --json is on
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["Advance", "Output", "error", "human_bytes", "to_json"]

#: A progress callback: ``(done, total)`` in bytes.
Advance = Callable[[int, int], None]


def to_json(value: Any) -> Any:
    """``value`` with tuples as lists and non-str dict keys as strings (JSON-ready).

    Example:
        >>> to_json({1: (2, 3)})
        {'1': [2, 3]}
    """
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def human_bytes(n: int) -> str:
    """``n`` bytes in binary units, e.g. ``'4.0 MiB'``.

    Example:
        >>> human_bytes(512), human_bytes(3 << 20)
        ('512 B', '3.0 MiB')
    """
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def error(message: str) -> None:
    """Print ``partialstore: error: <message>`` as one line on stderr."""
    one_line = " ".join(str(message).split())
    print(f"partialstore: error: {one_line}", file=sys.stderr, flush=True)


class Output:
    """Where a command's answer and progress go (``json_mode``: ``--json``)."""

    def __init__(self, *, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.console = Console(soft_wrap=True, highlight=False)
        self.stderr = Console(stderr=True)

    def result(self, data: Any, render: Callable[[Console], None]) -> None:
        """Print ``data`` as one JSON document with ``--json``, else ``render`` it."""
        if self.json_mode:
            sys.stdout.write(json.dumps(to_json(data), sort_keys=False) + "\n")
            sys.stdout.flush()
        else:
            render(self.console)

    def show_progress(self) -> bool:
        """Whether progress bars are drawn: stderr is a terminal and ``--json`` is off."""
        return not self.json_mode and self.stderr.is_terminal

    @contextlib.contextmanager
    def progress(self, description: str) -> Iterator[Advance]:
        """A byte progress bar on stderr; yields the ``(done, total)`` callback to feed it.

        The callback may be called from any thread. Without a terminal (or
        with ``--json``) it does nothing.
        """
        if not self.show_progress():
            yield lambda done, total: None
            return
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.stderr,
            transient=True,
        )
        task = bar.add_task(description, total=None)
        with bar:
            yield lambda done, total: bar.update(task, completed=done, total=total)
