"""The ``partialstore`` command: operate on checkpoints from a shell.

``partialstore info PATH``, ``verify PATH``, ``gc PATH``, ``discard PATH``,
``demo`` (the main job) and ``bench NAME`` (a benchmark script). Every
command but ``bench`` takes ``--json`` (one JSON document on stdout),
``--storage-options JSON`` and ``-v``. Errors print one line on stderr,
``partialstore: error: <message>``, and exit with their family's code
(:mod:`partialstore._cli.exitcodes`); only an unexpected error with ``-v``
prints a traceback. Commands are registered in
:mod:`partialstore._cli.framework`; this module parses and dispatches.

Example:
    >>> main(["--version"])
    Traceback (most recent call last):
    SystemExit: 0
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from typing import Any

import partialstore
from partialstore._cli import exitcodes
from partialstore._cli.framework import COMMANDS
from partialstore._cli.output import Output, error
from partialstore.errors import InvalidInputError

__all__ = ["COMMAND_MODULES", "build_parser", "main", "parse_storage_options"]

#: Modules whose ``@command`` functions make up the command line, in ``--help`` order.
COMMAND_MODULES = ("partialstore._cli.commands", "partialstore._cli.runs", "partialstore._cli.jobs")


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """Parse ``--storage-options``: a JSON object, or None when not given.

    Example:
        >>> parse_storage_options('{"endpoint_url": "http://127.0.0.1:9000"}')
        {'endpoint_url': 'http://127.0.0.1:9000'}
        >>> parse_storage_options("[1]")
        Traceback (most recent call last):
        partialstore.errors.InvalidInputError: --storage-options must be a JSON object ...

    Raises:
      InvalidInputError: ``text`` is not JSON, or not a JSON object.
    """
    if text is None:
        return None
    example = """e.g. '{"endpoint_url": "http://127.0.0.1:9000", "deadline": 30}'"""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as bad:
        raise InvalidInputError(
            f"--storage-options is not valid JSON ({bad.msg} at character {bad.pos}): pass a "
            f"JSON object, {example}."
        ) from None
    if not isinstance(value, dict):
        raise InvalidInputError(
            f"--storage-options must be a JSON object of backend options, got a "
            f"{type(value).__name__}: pass {example}."
        )
    return value


def _common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--json``, ``--storage-options``, ``-v``: before the command or after it.

    After the command (``top=False``) they default to absent, so that an
    option given before the command is not reset by the command's parser.
    """
    unset: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout", **unset
    )
    parser.add_argument(
        "--storage-options",
        metavar="JSON",
        help="backend options as a JSON object (endpoint_url, key, secret, deadline, ...)",
        **unset,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print the traceback of an unexpected error",
        **unset,
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of every registered command, with the exit code table as epilog."""
    for module in COMMAND_MODULES:
        importlib.import_module(module)  # registers its commands
    parser = argparse.ArgumentParser(
        prog="partialstore",
        description=__doc__.splitlines()[0],
        epilog=exitcodes.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"partialstore {partialstore.__version__}"
    )
    _common_options(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.arguments(sub)
        if cmd.common:
            _common_options(sub, top=False)
    return parser


def _fail(failure: BaseException, verbose: bool) -> int:
    """Report ``failure`` in one line on stderr (plus a traceback if unexpected and verbose)."""
    code = exitcodes.exit_code_for(failure)
    if isinstance(failure, KeyboardInterrupt):
        error("interrupted")
    elif exitcodes.is_known(failure):
        error(str(failure) or type(failure).__name__)
    else:
        hint = "" if verbose else " (unexpected: run with -v for the traceback)"
        error(f"{type(failure).__name__}: {failure}{hint}")
        if verbose:
            traceback.print_exception(failure, file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the ``partialstore`` command line; return the exit status.

    Usage errors exit with status 2 (``SystemExit`` from argparse), as does
    ``--help``/``--version`` with 0.
    """
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    try:
        args.storage_options = parse_storage_options(getattr(args, "storage_options", None))
        out = Output(json_mode=bool(getattr(args, "json", False)))
        return COMMANDS[args.command](args, out)
    except (Exception, KeyboardInterrupt) as failure:
        return _fail(failure, verbose)


if __name__ == "__main__":
    sys.exit(main())
