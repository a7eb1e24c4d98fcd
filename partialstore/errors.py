"""Exceptions raised by partialstore, grouped by what a handler would do.

Every exception derives from :class:`PartialStoreError` and from the built-in
that callers already catch, so ``except FileExistsError`` and
``except FileNotFoundError`` keep working::

    PartialStoreError
    ├── AlreadyExistsError            (FileExistsError)  something is already there
    │   └── CheckpointFinalizedError                     a finalized checkpoint is at the path
    ├── NotFoundError                 (FileNotFoundError, KeyError)  nothing is there
    │   ├── SessionDiscardedError                        a discard removed the session meanwhile
    │   └── NotFinalizedError                            a session is open there, not finalized yet
    ├── ConflictError                                    a concurrent writer changed it first
    ├── InvalidInputError             (ValueError)       the caller passed something wrong
    │   └── UnsupportedLeafError      (TypeError)        a tree leaf cannot be saved
    ├── CorruptCheckpointError        (ValueError)       stored bytes or manifests are bad
    ├── UnsupportedOperationError     (NotImplementedError)  the store cannot do this
    ├── ProcessLostError              (RuntimeError)     another process of the JAX job died
    └── BackendError                  (OSError)          the store failed
        ├── TransientBackendError                        ... and retrying may help
        └── OutcomeUnknownError                          ... a write may or may not have landed

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import partialstore
    >>> path = f"{tmp.name}/step_10"
    >>> partialstore.save(path, {"step": 1})
    >>> partialstore.finalize(path)
    >>> try:
    ...     partialstore.save(path, {"step": 2})
    ... except partialstore.errors.CheckpointFinalizedError as err:
    ...     print("already published; pick a new path")  # also a FileExistsError
    already published; pick a new path
    >>> tmp.cleanup()
"""

from __future__ import annotations

__all__ = [
    "AlreadyExistsError",
    "BackendError",
    "CheckpointFinalizedError",
    "ConflictError",
    "CorruptCheckpointError",
    "InvalidInputError",
    "NotFinalizedError",
    "NotFoundError",
    "OutcomeUnknownError",
    "PartialStoreError",
    "ProcessLostError",
    "SessionDiscardedError",
    "TransientBackendError",
    "UnsupportedLeafError",
    "UnsupportedOperationError",
]


class PartialStoreError(Exception):
    """Base of every error partialstore raises on purpose."""


class AlreadyExistsError(PartialStoreError, FileExistsError):
    """An exclusive create found the key already present."""


class CheckpointFinalizedError(AlreadyExistsError):
    """A save or finalize found a finalized checkpoint (or a sealed session) at the path."""


class NotFoundError(PartialStoreError, FileNotFoundError, KeyError):
    """A key, checkpoint or partial-save session does not exist."""

    # KeyError.__str__ quotes its argument; keep the readable OSError form.
    __str__ = FileNotFoundError.__str__


class NotFinalizedError(NotFoundError):
    """No finalized checkpoint at a path where a partial-save session is open.

    Call ``finalize`` (or ``discard``) first; the checkpoint does not exist
    until then.
    """


class SessionDiscardedError(NotFoundError):
    """A concurrent ``discard`` removed the session a save was being committed to.

    The save is not part of any session or checkpoint; repeating it starts a
    new session.
    """


class ConflictError(PartialStoreError):
    """A conditional write lost to a concurrent writer (version mismatch)."""


class InvalidInputError(PartialStoreError, ValueError):
    """An argument is malformed: a bad path, key, URL or option."""


class UnsupportedLeafError(InvalidInputError, TypeError):
    """A PyTree leaf has a type partialstore cannot save."""


class CorruptCheckpointError(PartialStoreError, ValueError):
    """Stored data is inconsistent: bad manifest, checksum mismatch, escaping path."""


class UnsupportedOperationError(PartialStoreError, NotImplementedError):
    """The backend lacks the capability this operation needs."""


class ProcessLostError(PartialStoreError, RuntimeError):
    """Another process of the JAX job died, hung, or lost the coordination service."""


class BackendError(PartialStoreError, OSError):
    """The storage service or filesystem failed in a way partialstore cannot classify."""


class TransientBackendError(BackendError):
    """A failure that may succeed when retried (timeouts, throttling, 5xx)."""


class OutcomeUnknownError(BackendError):
    """A mutating call could not find out whether it took effect.

    Raised when the store stopped answering after a write may have landed
    (a lost response, then no way to read the object back): the save or
    finalize may or may not be in the checkpoint. Look (``partialstore.load``,
    ``metadata``) or repeat the call once the store answers again: every
    operation recognises its own earlier writes.
    """
