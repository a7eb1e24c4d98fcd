"""Exit codes of the ``partialstore`` command: one per outcome a script may act on.

An error partialstore raises on purpose maps to its family's code by class
(the first match along its class hierarchy, so a subclass added later gets
its family's code); anything else is an internal error.

Example:
    >>> from partialstore import errors
    >>> exit_code_for(errors.CheckpointFinalizedError("finalized"))
    6
    >>> exit_code_for(errors.OutcomeUnknownError("lost"))
    9
    >>> exit_code_for(ZeroDivisionError())
    70
"""

from __future__ import annotations

from partialstore import errors

__all__ = [
    "BACKEND",
    "CORRUPT",
    "DAMAGED",
    "EXISTS",
    "INTERNAL",
    "INTERRUPTED",
    "INVALID",
    "NOT_FOUND",
    "OK",
    "OUTCOME_UNKNOWN",
    "PROCESS_LOST",
    "TABLE",
    "UNSUPPORTED",
    "USAGE",
    "epilog",
    "exit_code_for",
    "is_known",
]

OK = 0
DAMAGED = 1
USAGE = 2
INVALID = 3
NOT_FOUND = 4
CORRUPT = 5
EXISTS = 6
UNSUPPORTED = 7
BACKEND = 8
OUTCOME_UNKNOWN = 9
PROCESS_LOST = 10
NOT_FINALIZED = 11
INTERNAL = 70
INTERRUPTED = 130

#: Code and meaning, in the order ``--help`` and the README list them.
TABLE: list[tuple[int, str]] = [
    (OK, "success"),
    (DAMAGED, "verify found damaged leaves (listed)"),
    (USAGE, "usage error (unknown command or option, missing argument)"),
    (INVALID, "invalid input or options (InvalidInputError; --storage-options not a JSON object)"),
    (NOT_FOUND, "nothing there: no finalized checkpoint, no session (NotFoundError)"),
    (CORRUPT, "the checkpoint's manifest or records are damaged (CorruptCheckpointError)"),
    (EXISTS, "state forbids it: already finalized, concurrent change (AlreadyExists, Conflict)"),
    (UNSUPPORTED, "the store lacks a capability (UnsupportedOperationError)"),
    (BACKEND, "the store failed or is unreachable (BackendError, other OSError)"),
    (OUTCOME_UNKNOWN, "a write may or may not have landed: look, or repeat (OutcomeUnknownError)"),
    (PROCESS_LOST, "another process of the JAX job died (ProcessLostError)"),
    (NOT_FINALIZED, "a session is open there but not finalized yet (NotFinalizedError)"),
    (INTERNAL, "unexpected error (a bug: run with -v for the traceback)"),
    (INTERRUPTED, "interrupted (Ctrl-C)"),
]

# Most specific first: OutcomeUnknownError is a BackendError, which is an OSError.
_BY_CLASS: list[tuple[type[BaseException], int]] = [
    (errors.OutcomeUnknownError, OUTCOME_UNKNOWN),
    (errors.BackendError, BACKEND),
    (errors.InvalidInputError, INVALID),
    (errors.NotFinalizedError, NOT_FINALIZED),
    (errors.NotFoundError, NOT_FOUND),
    (errors.CorruptCheckpointError, CORRUPT),
    (errors.AlreadyExistsError, EXISTS),
    (errors.ConflictError, EXISTS),
    (errors.UnsupportedOperationError, UNSUPPORTED),
    (errors.ProcessLostError, PROCESS_LOST),
]


def is_known(error: BaseException) -> bool:
    """Whether ``error`` is an expected failure (printed in one line, no traceback)."""
    return isinstance(error, errors.PartialStoreError | OSError)


def exit_code_for(error: BaseException) -> int:
    """The exit code for ``error`` (see the module docstring for examples)."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    for cls, code in _BY_CLASS:
        if isinstance(error, cls):
            return code
    if isinstance(error, OSError):  # a local filesystem error outside partialstore's own
        return BACKEND
    return INTERNAL


def epilog() -> str:
    """The exit code table as ``--help`` prints it.

    Example:
        >>> epilog().splitlines()[1].split()[:2]
        ['0', 'success']
    """
    lines = ["exit codes:"]
    lines += [f"  {code:>3}  {meaning}" for code, meaning in TABLE]
    return "\n".join(lines)
