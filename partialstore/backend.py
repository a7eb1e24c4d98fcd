"""The storage contract: the only thing partialstore's core knows about a store.

The transaction logic (log, manifest, finalize) is written against
:class:`Backend` alone. It asks a backend for its :class:`Capabilities` and
picks its commit strategy from them; it never asks which store it is on.

Keys are ``/``-separated strings relative to the backend's root URL, with no
leading or trailing ``/``, no empty segment and no ``.``/``..`` segment
(:func:`validate_key` checks this). A "prefix" names a directory-like group:
``list("a/b")`` returns every key that starts with ``"a/b/"``.

Rules every implementation keeps (the conformance suite in
:mod:`partialstore.testing.conformance` checks them):

- ``create`` is atomic: of N concurrent creators of one key exactly one
  succeeds, the others get :class:`AlreadyExistsError`, and the winner's
  bytes are intact. A backend that cannot promise this sets
  ``capabilities.atomic_create = False`` and its ``create`` raises
  :class:`UnsupportedOperationError`; it never checks-then-writes.
- ``write`` replaces atomically: a reader sees the old or the new bytes.
- ``list`` is strongly consistent with every write that has returned, and
  sorted; with ``start_after`` it returns only the keys after that key.
- ``rename`` exists only where the store renames atomically and without
  replacing; elsewhere it raises :class:`UnsupportedOperationError`.
- Compare-and-swap (``write(..., if_version=...)`` and ``read_versioned``)
  is optional: the core's save, finalize and load never call it. It is kept
  for callers that need one writer to win an update of a shared object (a
  run index over many checkpoints); a backend offers it only where
  ``capabilities.compare_and_swap`` is True, and otherwise raises
  :class:`UnsupportedOperationError` and writes nothing.
- ``single_writer`` is the user's promise, given as a storage option, that
  exactly one process ever writes under this root. The core then accepts a
  backend without atomic create (whose ``create`` checks, then writes).
- Methods are coroutines that may be awaited from any event loop in any
  thread: an implementation never binds itself to the loop of its first
  caller (fsspec's async filesystems run on their own loop thread, so a
  backend forwards to that loop instead).

A backend from the registry, driven synchronously.

Example:
    >>> from partialstore import registry
    >>> from partialstore._runtime.aio import run
    >>> backend = registry.open_backend("memory://backend-doc")
    >>> run(backend.create("log/00000001.json", b"{}"))
    >>> run(backend.list("log"))
    ['log/00000001.json']
"""

from __future__ import annotations

import abc
import builtins
import dataclasses
from typing import Any

from partialstore.errors import InvalidInputError, UnsupportedOperationError

__all__ = ["Backend", "Capabilities", "join_key", "validate_key"]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend truly guarantees; the core chooses its protocol from this.

    Attributes:
      atomic_create: ``create`` is an atomic exclusive create (one winner).
      atomic_rename: ``rename`` moves a whole prefix atomically, never replacing.
      compare_and_swap: ``write(..., if_version=...)`` and ``read_versioned`` work
        (optional: nothing in the core needs it; see the module docstring).

    What the user promises rather than the store guarantees is not here:
    that is :attr:`Backend.single_writer`.

    Example:
        >>> Capabilities(atomic_create=True).compare_and_swap
        False
    """

    atomic_create: bool
    atomic_rename: bool = False
    compare_and_swap: bool = False


def validate_key(key: str, *, allow_empty: bool = False) -> str:
    """Return ``key`` if it is a well-formed relative key, else raise.

    Example:
        >>> validate_key("data/abc/packed.bin")
        'data/abc/packed.bin'
        >>> validate_key("../x")
        Traceback (most recent call last):
        partialstore.errors.InvalidInputError: Storage key '../x' is not a clean relative key: ...
    """
    if not isinstance(key, str):
        raise InvalidInputError(f"Storage key must be a str, got {type(key).__name__}: {key!r}.")
    if key == "":
        if allow_empty:
            return key
        raise InvalidInputError("Storage key must not be empty.")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\x00" in key:
        raise InvalidInputError(
            f"Storage key {key!r} is not a clean relative key: no leading or trailing '/', "
            "no empty, '.' or '..' segments, no NUL."
        )
    return key


def join_key(*parts: str) -> str:
    """Join key segments with ``/``, skipping empty ones.

    Example:
        >>> join_key("ckpt.partial_save", "log", "00000001.json")
        'ckpt.partial_save/log/00000001.json'
    """
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Backend(abc.ABC):
    """Abstract storage backend rooted at one URL.

    Subclasses implement the abstract coroutines and declare
    :attr:`capabilities` honestly. Optional operations (``rename``,
    versioned writes) have defaults that raise
    :class:`UnsupportedOperationError`; a backend overrides them exactly when
    it sets the matching capability.
    """

    #: Root URL of this backend (what ``registry.open_backend`` was given).
    url: str

    #: The user's promise (storage option ``single_writer=True``) that exactly one
    #: process ever writes under :attr:`url`. Backends set it from their options;
    #: the core accepts a store without ``capabilities.atomic_create`` only when
    #: it is True. It never changes what a backend guarantees.
    single_writer: bool = False

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """The guarantees this backend offers."""

    @abc.abstractmethod
    async def create(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` only if ``key`` is absent, atomically.

        Raises:
          AlreadyExistsError: ``key`` exists (also when another creator won a race).
          UnsupportedOperationError: the store cannot create atomically.
        """

    @abc.abstractmethod
    async def write(self, key: str, data: bytes, *, if_version: str | None = None) -> None:
        """Write ``data`` at ``key``, atomically replacing any previous value.

        With ``if_version`` (only where ``capabilities.compare_and_swap``),
        the write happens only if the stored version still equals it.

        Raises:
          ConflictError: ``if_version`` no longer matches.
          UnsupportedOperationError: ``if_version`` given without compare-and-swap.
        """

    @abc.abstractmethod
    async def read(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        """Return the bytes at ``key`` (``[start, end)`` when given).

        Raises:
          NotFoundError: ``key`` does not exist.
        """

    @abc.abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether an object exists at exactly ``key``."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> None:
        """Delete every key under ``prefix`` (directory semantics)."""

    @abc.abstractmethod
    async def list(self, prefix: str = "", *, start_after: str | None = None) -> list[str]:
        """Every key under ``prefix`` (directory semantics), sorted, root-relative.

        With ``start_after`` (a root-relative key, which need not exist),
        only the keys that sort strictly after it (S3 ``StartAfter``; on GCS
        ``startOffset``, which is inclusive, minus that key). Stores that
        list server-side send it with the request, so listing the tail of a
        long prefix costs what the tail holds.
        """

    # ``builtins.list``: inside the class body ``list`` names the method above.
    async def list_children(self, prefix: str = "") -> builtins.list[str]:
        """Names of the immediate children under ``prefix`` (keys and sub-prefixes), sorted.

        The default derives them from :meth:`list`; stores with delimiter
        listings override it.
        """
        base = f"{prefix}/" if prefix else ""
        names = {key[len(base) :].split("/", 1)[0] for key in await self.list(prefix)}
        return sorted(names)

    async def rename(self, src_prefix: str, dst_prefix: str) -> None:
        """Atomically move everything under ``src_prefix`` to ``dst_prefix``.

        Never replaces: fails if ``dst_prefix`` exists.

        Raises:
          AlreadyExistsError: ``dst_prefix`` exists.
          NotFoundError: ``src_prefix`` does not exist.
          UnsupportedOperationError: the store has no atomic rename.
        """
        raise UnsupportedOperationError(
            f"{type(self).__name__} at {self.url} has no atomic rename "
            "(capabilities.atomic_rename is False); partialstore commits with a manifest instead."
        )

    async def read_versioned(self, key: str) -> tuple[bytes, str]:
        """Return ``(data, version)`` for use with ``write(..., if_version=version)``.

        Optional: only where ``capabilities.compare_and_swap``.

        Raises:
          NotFoundError: ``key`` does not exist.
          UnsupportedOperationError: the store has no compare-and-swap.
        """
        raise UnsupportedOperationError(
            f"{type(self).__name__} at {self.url} has no compare-and-swap writes."
        )

    def kvstore_spec(self, prefix: str) -> dict[str, Any] | None:
        """TensorStore kvstore JSON reaching the bytes under ``prefix``, or ``None``.

        ``None`` means TensorStore cannot reach this store; the core then
        moves array bytes through :meth:`read` and :meth:`write`.
        """
        return None

    def tensorstore_context(self) -> dict[str, Any] | None:
        """Extra TensorStore context resources to open ``kvstore_spec`` with, or ``None``.

        The array layer builds its TensorStore context from this (retry and
        credential settings of S3 and GCS).
        """
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections; the backend is unusable afterwards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
