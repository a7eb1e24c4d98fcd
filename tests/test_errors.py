"""Pins partialstore's error tree: every class, its bases, and the built-in catches."""

from __future__ import annotations

import pytest

from partialstore import errors

# class name -> the exact bases it must have (order matters for the MRO).
TREE: dict[str, tuple[type, ...]] = {
    "PartialStoreError": (Exception,),
    "AlreadyExistsError": (errors.PartialStoreError, FileExistsError),
    "CheckpointFinalizedError": (errors.AlreadyExistsError,),
    "NotFoundError": (errors.PartialStoreError, FileNotFoundError, KeyError),
    "ConflictError": (errors.PartialStoreError,),
    "InvalidInputError": (errors.PartialStoreError, ValueError),
    "UnsupportedLeafError": (errors.InvalidInputError, TypeError),
    "CorruptCheckpointError": (errors.PartialStoreError, ValueError),
    "UnsupportedOperationError": (errors.PartialStoreError, NotImplementedError),
    "BackendError": (errors.PartialStoreError, OSError),
    "TransientBackendError": (errors.BackendError,),
    "OutcomeUnknownError": (errors.BackendError,),
    "SessionDiscardedError": (errors.NotFoundError,),
    "NotFinalizedError": (errors.NotFoundError,),
    "ProcessLostError": (errors.PartialStoreError, RuntimeError),
}

# class -> built-ins an existing ``except`` clause may use to catch it.
CAUGHT_BY: dict[type[Exception], tuple[type[BaseException], ...]] = {
    errors.AlreadyExistsError: (FileExistsError, OSError),
    errors.CheckpointFinalizedError: (FileExistsError, errors.AlreadyExistsError),
    errors.NotFoundError: (FileNotFoundError, KeyError, LookupError, OSError),
    errors.InvalidInputError: (ValueError,),
    errors.UnsupportedLeafError: (TypeError, ValueError, errors.InvalidInputError),
    errors.CorruptCheckpointError: (ValueError,),
    errors.UnsupportedOperationError: (NotImplementedError, RuntimeError),
    errors.BackendError: (OSError,),
    errors.TransientBackendError: (OSError, errors.BackendError),
    errors.OutcomeUnknownError: (OSError, errors.BackendError),
    errors.SessionDiscardedError: (FileNotFoundError, errors.NotFoundError),
    errors.NotFinalizedError: (FileNotFoundError, errors.NotFoundError),
}


def test_exported_names_are_exactly_the_tree() -> None:
    assert sorted(errors.__all__) == sorted(TREE)


@pytest.mark.parametrize("name", sorted(TREE))
def test_bases(name: str) -> None:
    cls = getattr(errors, name)
    assert cls.__bases__ == TREE[name]
    assert issubclass(cls, errors.PartialStoreError)
    assert cls.__doc__, f"{name} needs a docstring saying when it is raised"


@pytest.mark.parametrize("cls", list(CAUGHT_BY), ids=lambda c: c.__name__)
def test_builtin_except_clauses_catch_it(cls: type[Exception]) -> None:
    for builtin in CAUGHT_BY[cls]:
        with pytest.raises(builtin):
            raise cls("boom")
        try:
            raise cls("boom")
        except builtin as caught:  # the way existing user code catches it
            assert isinstance(caught, errors.PartialStoreError)


def test_conflict_is_not_mistaken_for_a_builtin_outcome() -> None:
    # A lost compare-and-swap must not be swallowed by `except OSError` or `except ValueError`.
    assert not issubclass(errors.ConflictError, OSError | ValueError | KeyError)
    assert not issubclass(errors.AlreadyExistsError, errors.NotFoundError)
    assert not issubclass(errors.NotFoundError, errors.AlreadyExistsError)


def test_not_found_reads_like_an_os_error() -> None:
    err = errors.NotFoundError("Cannot read 'k' under memory://x: no such key.")
    # KeyError would quote the message; the tree keeps the readable form.
    assert str(err) == "Cannot read 'k' under memory://x: no such key."


def test_os_error_fields_survive() -> None:
    err = errors.AlreadyExistsError(17, "File exists", "/tmp/x")
    assert err.errno == 17 and err.filename == "/tmp/x"
    assert isinstance(err, FileExistsError)
