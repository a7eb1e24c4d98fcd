"""Local filesystem backend: plain paths and ``file://`` URLs.

How each primitive keeps the contract on a POSIX filesystem:

- ``create``: write a temp file in the target directory, fsync it, then
  ``os.link(tmp, final)``. ``link`` fails with ``EEXIST`` atomically, so of
  many creators exactly one wins, and the winner's file appears whole.
- ``write``: temp file, fsync, ``os.replace``, fsync of the directory.
- ``rename``: ``renameat2(..., RENAME_NOREPLACE)`` through libc, because plain
  ``os.rename`` silently replaces an empty target directory. Whether the
  filesystem supports it is probed once per device at construction;
  ``capabilities.atomic_rename`` reports the answer.
- Versioned writes: the version is the SHA-256 of the content, checked and
  replaced under an exclusive ``flock`` on the key's directory, which other
  processes (and other threads, through their own descriptors) respect.
  Plain writes and deletes take the same lock, so they order with CAS.

Temp files are named ``.<name>.tmp-<32 hex>`` and never listed. A local
filesystem cannot hold a key and a prefix of the same name (``a`` and
``a/b``); that raises :class:`~partialstore.errors.BackendError`. ``file://``
URLs are taken literally (no percent-decoding), as fsspec does.

The durable file writes live in ``_local_files`` and the probing of
``renameat2`` and ``flock`` support in ``_local_probe``; this module maps
the contract onto them.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from partialstore import registry
    >>> from partialstore._runtime.aio import run
    >>> backend = registry.open_backend(f"{tmp.name}/ckpts")
    >>> run(backend.create("run1/log/00000001.json", b"{}"))
    >>> run(backend.read("run1/log/00000001.json"))
    b'{}'
    >>> tmp.cleanup()
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import hashlib
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from partialstore import observe
from partialstore.backend import Backend, Capabilities, validate_key
from partialstore.errors import (
    AlreadyExistsError,
    BackendError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PartialStoreError,
    TransientBackendError,
    UnsupportedOperationError,
)

from ._local_files import (
    create_file,
    dir_lock,
    fsync_dir,
    is_temp_name,
    makedirs_durable,
    replace_file,
)
from ._local_probe import (
    ProbeCache,
    find_renameat2,
    probe,
    rename_noreplace,
)
from ._options import pop_single_writer, reject_options

# The file helpers are re-exported: callers (and the fsspec backend's users)
# have always found them here.
__all__ = [
    "LocalBackend",
    "create_file",
    "is_temp_name",
    "makedirs_durable",
    "replace_file",
    "root_from_url",
]

T = TypeVar("T")

_TRANSIENT = {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT}
# Create attempts when a concurrent delete_prefix removes the directory under us.
_CREATE_ATTEMPTS = 5
# Module globals, read at each construction, so a test can simulate a libc
# without renameat2 (and start from an empty cache).
_RENAMEAT2 = find_renameat2()
_probe_cache: ProbeCache = {}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _check_range(start: int | None, end: int | None) -> None:
    for name, value in (("start", start), ("end", end)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise InvalidInputError(f"Read {name} must be a non-negative int, got {value!r}.")


def root_from_url(url: str) -> str:
    """The absolute directory a local URL names (``file://`` or a plain path).

    Example:
        >>> root_from_url("file:///tmp/ckpts")
        '/tmp/ckpts'
    """
    path = url
    if path.lower().startswith("file://"):
        path = path[len("file://") :]
        if path.startswith("localhost/"):
            path = path[len("localhost") :]
    if not path:
        raise InvalidInputError(f"Local URL {url!r} names no directory.")
    return os.path.abspath(os.path.expanduser(path))


class LocalBackend(Backend):
    """Backend over a local (POSIX) directory.

    Args:
      url: a plain path or ``file://`` URL; the directory need not exist yet.
      storage_options: only ``single_writer`` (accepted for uniformity; this
        backend creates atomically regardless).

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> backend = LocalBackend(f"{tmp.name}/ckpts", {})
        >>> backend.single_writer
        False
        >>> tmp.cleanup()
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any]) -> None:
        options = dict(storage_options)
        single_writer = pop_single_writer(options)
        reject_options(options, "LocalBackend", url)
        self.single_writer = single_writer
        self.url = url
        self.root = root_from_url(url)
        self._renameat2 = _RENAMEAT2
        atomic_rename, flock_ok = probe(self.root, self._renameat2, _probe_cache)
        self._capabilities = Capabilities(
            atomic_create=True,
            atomic_rename=atomic_rename,
            compare_and_swap=flock_ok,
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    # ------------------------------------------------------------------ helpers

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *validate_key(key).split("/"))

    def _prefix_path(self, prefix: str) -> str:
        validate_key(prefix, allow_empty=True)
        return os.path.join(self.root, *prefix.split("/")) if prefix else self.root

    def _error(self, exc: OSError, action: str, key: str) -> Exception:
        where = f"{action} {key!r} under {self.root}"
        if isinstance(exc, FileNotFoundError):
            return NotFoundError(f"Cannot {where}: no such key.")
        if isinstance(exc, FileExistsError):
            return AlreadyExistsError(f"Cannot {where}: it already exists.")
        if isinstance(exc, NotADirectoryError | IsADirectoryError):
            return BackendError(
                f"Cannot {where}: a key and a prefix of the same name cannot both exist on a "
                f"local filesystem ({exc})."
            )
        if exc.errno in _TRANSIENT:
            return TransientBackendError(f"Cannot {where} (retry may help): {exc}")
        return BackendError(f"Cannot {where}: {exc}")

    async def _call(self, action: str, key: str, function: Callable[[], T]) -> T:
        observe.count_request()  # one file-system operation
        try:
            return await asyncio.to_thread(function)
        except OSError as exc:
            if isinstance(exc, PartialStoreError):
                raise
            raise self._error(exc, action, key) from exc

    # ------------------------------------------------------------------ contract

    async def create(self, key: str, data: bytes) -> None:
        path = self._path(key)
        await self._call("create", key, lambda: self._create(key, path, data))

    def _create(self, key: str, path: str, data: bytes) -> None:
        directory = os.path.dirname(path)
        for attempt in range(_CREATE_ATTEMPTS):
            makedirs_durable(directory)
            try:
                create_file(path, data)
                return
            except FileExistsError:
                raise AlreadyExistsError(
                    f"Cannot create {key!r} under {self.root}: it already exists."
                ) from None
            except FileNotFoundError:
                # A concurrent delete_prefix removed the directory; make it again.
                if attempt + 1 == _CREATE_ATTEMPTS:
                    raise

    async def write(self, key: str, data: bytes, *, if_version: str | None = None) -> None:
        path = self._path(key)
        if if_version is not None and not self._capabilities.compare_and_swap:
            raise UnsupportedOperationError(
                f"Cannot write {key!r} with if_version under {self.root}: this filesystem "
                "refused directory locks (flock), so compare-and-swap is unavailable."
            )
        await self._call("write", key, lambda: self._write(key, path, data, if_version))

    def _write(self, key: str, path: str, data: bytes, if_version: str | None) -> None:
        directory = os.path.dirname(path)
        makedirs_durable(directory)
        check = None if if_version is None else lambda: self._check_version(key, path, if_version)
        replace_file(path, data, lock=self._maybe_lock(directory), check=check)

    def _maybe_lock(self, directory: str) -> contextlib.AbstractContextManager[None]:
        if self._capabilities.compare_and_swap:
            return dir_lock(directory)
        return contextlib.nullcontext()

    def _check_version(self, key: str, path: str, expected: str) -> None:
        try:
            with open(path, "rb") as handle:
                current: str | None = _digest(handle.read())
        except (FileNotFoundError, IsADirectoryError):
            current = None
        if current != expected:
            raise ConflictError(
                f"Conditional write of {key!r} under {self.root} lost: the stored version is "
                f"{current or 'absent'}, expected {expected}. Re-read it and retry."
            )

    async def read(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        path = self._path(key)
        _check_range(start, end)
        return await self._call("read", key, lambda: self._read(key, path, start, end))

    def _read(self, key: str, path: str, start: int | None, end: int | None) -> bytes:
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below; open errors mapped here
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(f"Cannot read {key!r} under {self.root}: no such key.") from None
        with handle:
            if start:
                handle.seek(start)
            if end is None:
                return handle.read()
            return handle.read(max(end - (start or 0), 0))

    async def read_versioned(self, key: str) -> tuple[bytes, str]:
        data = await self.read(key)
        return data, _digest(data)

    async def exists(self, key: str) -> bool:
        path = self._path(key)
        return await asyncio.to_thread(os.path.isfile, path)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await self._call("delete", key, lambda: self._delete(path))

    def _delete(self, path: str) -> None:
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            return
        # No directory fsync: a delete that a crash undoes is harmless here
        # (gc deletes again), and gc deletes many files.
        missing = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
        with contextlib.suppress(*missing), self._maybe_lock(directory):
            os.unlink(path)

    async def delete_prefix(self, prefix: str) -> None:
        path = self._prefix_path(prefix)
        await self._call("delete prefix", prefix, lambda: self._delete_tree(path))

    @staticmethod
    def _delete_tree(path: str) -> None:
        def ignore_missing(_function: Any, _path: str, exc: Any) -> None:
            error = exc[1] if isinstance(exc, tuple) else exc
            if not isinstance(error, FileNotFoundError):
                raise error

        for attempt in range(_CREATE_ATTEMPTS):
            if not os.path.isdir(path):
                return
            try:
                if sys.version_info >= (3, 12):
                    shutil.rmtree(path, onexc=ignore_missing)
                else:
                    shutil.rmtree(path, onerror=ignore_missing)
                return
            except OSError as exc:
                # A concurrent writer added a file after rmtree emptied a directory.
                if exc.errno != errno.ENOTEMPTY or attempt + 1 == _CREATE_ATTEMPTS:
                    raise

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> list[str]:
        path = self._prefix_path(prefix)
        return await self._call("list", prefix, lambda: self._list(path, start_after or ""))

    # ``builtins.list``: inside the class body ``list`` names the method above.
    def _list(self, base: str, start_after: str = "") -> builtins.list[str]:
        """Keys under ``base`` that sort after ``start_after``, sorted.

        A directory has no server-side start: every name of a directory that
        may hold such keys is read, but only the keys after ``start_after``
        are built and sorted, and a subdirectory whose keys all sort before
        it is not read at all (a log of version 3 keeps its records in
        folders of a thousand, so its tail costs one folder's read).
        """
        keys: list[str] = []
        root_len = len(self.root.rstrip(os.sep)) + 1
        for directory, dirs, files in os.walk(base):
            relative = directory[root_len:].replace(os.sep, "/")
            head = f"{relative}/" if relative else ""
            if start_after:
                dirs[:] = [d for d in dirs if _may_follow(f"{head}{d}/", start_after)]
            for name in files:
                key = head + name
                if key > start_after and not is_temp_name(name):
                    keys.append(key)
        return sorted(keys)

    async def rename(self, src_prefix: str, dst_prefix: str) -> None:
        validate_key(src_prefix)
        validate_key(dst_prefix)
        if not self._capabilities.atomic_rename:
            await super().rename(src_prefix, dst_prefix)
            return
        if f"{dst_prefix}/".startswith(f"{src_prefix}/") or f"{src_prefix}/".startswith(
            f"{dst_prefix}/"
        ):
            raise InvalidInputError(
                f"Cannot rename {src_prefix!r} to {dst_prefix!r} under {self.root}: "
                "one contains the other."
            )
        src, dst = self._prefix_path(src_prefix), self._prefix_path(dst_prefix)
        await self._call("rename", src_prefix, lambda: self._rename(src_prefix, src, dst))

    def _rename(self, src_prefix: str, src: str, dst: str) -> None:
        if not os.path.isdir(src):
            raise NotFoundError(f"Cannot rename {src_prefix!r} under {self.root}: no such prefix.")
        makedirs_durable(os.path.dirname(dst))
        assert self._renameat2 is not None  # atomic_rename is False without it
        try:
            rename_noreplace(self._renameat2, src, dst)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise AlreadyExistsError(
                    f"Cannot rename {src_prefix!r} to {dst!r}: the target already exists "
                    "(rename never replaces)."
                ) from None
            if exc.errno == errno.ENOENT:
                raise NotFoundError(
                    f"Cannot rename {src_prefix!r} under {self.root}: no such prefix."
                ) from None
            raise
        fsync_dir(os.path.dirname(dst))
        fsync_dir(os.path.dirname(src))

    def kvstore_spec(self, prefix: str) -> dict[str, Any] | None:
        """TensorStore ``file`` kvstore for the directory under ``prefix``.

        Example:
            >>> LocalBackend("/tmp/c", {}).kvstore_spec("data/x")
            {'driver': 'file', 'path': '/tmp/c/data/x/'}
        """
        return {"driver": "file", "path": self._prefix_path(prefix).rstrip(os.sep) + "/"}


def _may_follow(folder: str, start_after: str) -> bool:
    """Whether a key under ``folder`` (ending in ``/``) may sort after ``start_after``.

    Example:
        >>> _may_follow("log/00012/", "log/00012/00012345.json")  # the folder of the start
        True
        >>> _may_follow("log/00011/", "log/00012/00012345.json")  # every key sorts before
        False
        >>> _may_follow("log/00013/", "log/00012/00012345.json")
        True
    """
    return folder > start_after or start_after.startswith(folder)
