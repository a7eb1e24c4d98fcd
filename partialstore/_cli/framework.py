"""The command registry: a command is one function plus its ``@command(...)`` line.

A command function takes the parsed arguments and an
:class:`~partialstore._cli.output.Output` and returns its exit code; it
raises partialstore's errors as they come (``cli.main`` turns them into one
line on stderr and the family's exit code). Every command gets the common
options (``--json``, ``--storage-options``, ``-v``) unless registered with
``common=False``; ``args.storage_options`` is then already a dict (or None).

Adding a command is one function and its decorator line, e.g. in
:mod:`partialstore._cli.commands` (or a new module, see below)::

    def _root(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("root", help="the run's root path or URL")

    @command("latest", "print the latest finalized step of a run", arguments=_root)
    def latest(args: argparse.Namespace, out: Output) -> int:
        manager = partialstore.CheckpointManager(args.root, storage_options=args.storage_options)
        with manager:
            step = manager.latest_step()
        if step is None:
            raise NotFoundError(f"No finalized step under {args.root}.")  # exit code 4
        out.result({"root": args.root, "step": step}, lambda console: console.print(step))
        return exitcodes.OK

Long work draws a bar with ``with out.progress("deleting") as advance:``,
calling ``advance(done, total)`` (from any thread). A command in a new
module also needs that module named in
``partialstore._cli.cli.COMMAND_MODULES`` (importing it registers its
commands). A new error class needs no change here: it gets its family's
exit code (:mod:`partialstore._cli.exitcodes`).

Example:
    >>> @command("hello", "say hello", registry={})
    ... def hello(args, out):
    ...     return 0
    >>> hello.name, hello.common
    ('hello', True)
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from partialstore._cli.output import Output

__all__ = ["COMMANDS", "Command", "Run", "command"]

#: A command's body: ``(parsed arguments, output) -> exit code``.
Run = Callable[[argparse.Namespace, Output], int]


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


@dataclasses.dataclass(frozen=True)
class Command:
    """A registered subcommand of ``partialstore``."""

    name: str
    help: str
    run: Run
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    common: bool = True

    def __call__(self, args: argparse.Namespace, out: Output) -> int:
        return self.run(args, out)


#: Every registered command by name, in registration order (the order of ``--help``).
COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    help: str,
    *,
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments,
    common: bool = True,
    registry: dict[str, Command] | None = None,
) -> Callable[[Run], Command]:
    """Register the decorated function as the subcommand ``name``.

    ``arguments`` adds the command's own arguments to its parser; ``common``
    adds ``--json``, ``--storage-options`` and ``-v``. ``registry`` defaults
    to :data:`COMMANDS` (see the module docstring for examples).

    Raises:
      ValueError: ``name`` is registered already.
    """
    table = COMMANDS if registry is None else registry

    def register(run: Run) -> Command:
        if name in table:
            raise ValueError(f"partialstore command {name!r} is registered twice.")
        table[name] = Command(name, help, run, arguments, common)
        return table[name]

    return register
