"""In-process memory backend (``memory://name/...``), for tests and scratch work.

One process-wide store is shared by every :class:`MemoryBackend`, like
fsspec's memory filesystem: two backends opened on ``memory://x`` see the
same keys. A single lock guards the store, which makes ``create`` and
``rename`` truly atomic here, and versioned writes a plain counter check.
Nothing survives the process, and other processes never see the store.

Example:
    >>> from partialstore import registry
    >>> from partialstore._runtime.aio import run

    >>> backend = registry.open_backend("memory://scratch")
    >>> run(backend.create("log/00000001.json", b"{}"))
    >>> run(backend.list("log"))
    ['log/00000001.json']
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping
from typing import Any

from partialstore import observe
from partialstore.backend import Backend, Capabilities, join_key, validate_key
from partialstore.errors import (
    AlreadyExistsError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
)

from ._options import pop_single_writer, reject_options

__all__ = ["MemoryBackend"]

# Full key -> (bytes, version). Shared by every instance in the process.
_store: dict[str, tuple[bytes, int]] = {}
_lock = threading.Lock()
_versions = itertools.count(1)

_CAPABILITIES = Capabilities(atomic_create=True, atomic_rename=True, compare_and_swap=True)


class MemoryBackend(Backend):
    """Backend over the process-wide memory store, rooted at ``memory://<root>``.

    Args:
      url: ``memory://name`` or ``memory://name/sub/dir``.
      storage_options: only ``single_writer`` (accepted for uniformity; this
        backend creates atomically regardless).

    Example:
        >>> backend = MemoryBackend("memory://demo", {})
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any]) -> None:
        if not url.startswith("memory://"):
            raise InvalidInputError(f"MemoryBackend needs a memory:// URL, got {url!r}.")
        options = dict(storage_options)
        self.single_writer = pop_single_writer(options)
        reject_options(options, "MemoryBackend", url)
        self.url = url
        root = url[len("memory://") :].strip("/")
        if root:
            validate_key(root)
        self._root = root

    @property
    def capabilities(self) -> Capabilities:
        return _CAPABILITIES

    def _full(self, key: str) -> str:
        return join_key(self._root, validate_key(key))

    def _full_prefix(self, prefix: str) -> str:
        """The full-key prefix (ending in ``/``, or ``""`` for the whole store)."""
        validate_key(prefix, allow_empty=True)
        base = join_key(self._root, prefix)
        return f"{base}/" if base else ""

    def _missing(self, key: str, action: str) -> NotFoundError:
        return NotFoundError(f"Cannot {action} {key!r} under {self.url}: no such key.")

    async def create(self, key: str, data: bytes) -> None:
        observe.count_request()
        full = self._full(key)
        value = bytes(data)
        with _lock:
            if full in _store:
                raise AlreadyExistsError(
                    f"Cannot create {key!r} under {self.url}: it already exists."
                )
            _store[full] = (value, next(_versions))

    async def write(self, key: str, data: bytes, *, if_version: str | None = None) -> None:
        observe.count_request()
        full = self._full(key)
        value = bytes(data)
        with _lock:
            if if_version is not None:
                current = _store.get(full)
                if current is None or str(current[1]) != if_version:
                    raise ConflictError(
                        f"Conditional write of {key!r} under {self.url} lost: its version is "
                        f"{'absent' if current is None else current[1]}, expected {if_version}. "
                        "Re-read it and retry."
                    )
            _store[full] = (value, next(_versions))

    async def read(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        observe.count_request()
        full = self._full(key)
        for name, value in (("start", start), ("end", end)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise InvalidInputError(f"Read {name} must be a non-negative int, got {value!r}.")
        with _lock:
            entry = _store.get(full)
        if entry is None:
            raise self._missing(key, "read")
        data = entry[0]
        return data if start is None and end is None else data[start:end]

    async def read_versioned(self, key: str) -> tuple[bytes, str]:
        observe.count_request()
        full = self._full(key)
        with _lock:
            entry = _store.get(full)
        if entry is None:
            raise self._missing(key, "read")
        return entry[0], str(entry[1])

    async def exists(self, key: str) -> bool:
        observe.count_request()
        full = self._full(key)
        with _lock:
            return full in _store

    async def delete(self, key: str) -> None:
        observe.count_request()
        full = self._full(key)
        with _lock:
            _store.pop(full, None)

    async def delete_prefix(self, prefix: str) -> None:
        observe.count_request()
        base = self._full_prefix(prefix)
        with _lock:
            for full in [k for k in _store if k.startswith(base)]:
                del _store[full]

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> list[str]:
        observe.count_request()
        base = self._full_prefix(prefix)
        strip = len(self._root) + 1 if self._root else 0
        with _lock:
            found = [k[strip:] for k in _store if k.startswith(base)]
        return sorted(k for k in found if start_after is None or k > start_after)

    async def rename(self, src_prefix: str, dst_prefix: str) -> None:
        observe.count_request()
        src = self._full_prefix(validate_key(src_prefix))
        dst = self._full_prefix(validate_key(dst_prefix))
        if src.startswith(dst) or dst.startswith(src):
            raise InvalidInputError(
                f"Cannot rename {src_prefix!r} to {dst_prefix!r} under {self.url}: "
                "one contains the other."
            )
        with _lock:
            moving = [k for k in _store if k.startswith(src)]
            if not moving:
                raise self._missing(src_prefix, "rename")
            # A key named exactly like the target blocks it too, as a file does on disk.
            if dst[:-1] in _store or any(k.startswith(dst) for k in _store):
                raise AlreadyExistsError(
                    f"Cannot rename {src_prefix!r} to {dst_prefix!r} under {self.url}: "
                    "the target already exists."
                )
            for full in moving:
                _store[dst + full[len(src) :]] = _store.pop(full)
