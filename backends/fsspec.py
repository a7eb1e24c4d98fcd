"""Generic backend over any fsspec filesystem not claimed by a dedicated backend.

The registry sends unknown URL schemes here (``local://`` reaches fsspec's
``LocalFileSystem``, ``sftp://`` its SFTP filesystem, ...); a filesystem
object can also be passed directly::

    import fsspec
    from .fsspec import FsspecBackend

    backend = FsspecBackend("memory://scratch", {}, fs=fsspec.filesystem("memory"))

Async filesystems (``fs.async_impl``) are driven through their coroutines,
forwarded to the filesystem's own loop so callers may await from any loop;
sync filesystems run in worker threads.

Atomic create is offered only where the filesystem truly guarantees it.
The allow-list (exact classes, since a subclass may change the semantics):

==========================================  ====================================
``fsspec...local.LocalFileSystem``          temp file + ``os.link`` (fails with
                                            EEXIST atomically; the file appears
                                            whole), as the local backend does
``s3fs.core.S3FileSystem``                  ``_pipe_file(mode="create")``: sends
                                            ``If-None-Match: *`` on PUT and on
                                            multipart completion (s3fs >= 2024.12)
``gcsfs.core.GCSFileSystem``                ``_pipe_file(mode="create")``: sends
                                            ``ifGenerationMatch=0`` on simple and
                                            resumable uploads
==========================================  ====================================

Not on the list: gcsfs's ``ExtendedGcsFileSystem`` (what ``gs://`` resolves
to by default in recent gcsfs), whose zonal-bucket upload path ignores
``mode="create"``.

Everything else (fsspec's memory filesystem included: its ``"xb"`` mode is
an exists check followed by a write) has ``atomic_create=False`` and its
``create`` raises :class:`~partialstore.errors.UnsupportedOperationError`,
unless the user opens it with the storage option ``single_writer=True``,
promising that only one writer ever touches the store; ``create`` then
checks and writes, which is only safe under that promise.

Overwrites use ``os.replace`` of a synced temp file on ``LocalFileSystem``
and ``pipe_file`` elsewhere: atomic on object stores (one PUT) and on the
memory filesystem (one dict assignment); on other filesystems as atomic as
their ``pipe_file`` is. There is no atomic rename (fsspec's ``mv`` copies
or replaces) and no compare-and-swap, and TensorStore is not given a
kvstore (``kvstore_spec`` is ``None``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem

from partialstore import observe
from partialstore.backend import Backend, Capabilities, validate_key
from partialstore.errors import (
    AlreadyExistsError,
    BackendError,
    InvalidInputError,
    NotFoundError,
    PartialStoreError,
    TransientBackendError,
    UnsupportedOperationError,
)

from . import _local_files as local_files
from ._options import check_options, pop_single_writer
from ._service_options import fsspec_options

__all__ = ["CREATE_STRATEGIES", "FsspecBackend"]

#: Exact filesystem class -> how ``create`` is made atomic on it.
CREATE_STRATEGIES: dict[str, str] = {
    "fsspec.implementations.local.LocalFileSystem": "link",
    "s3fs.core.S3FileSystem": "pipe_create",
    "gcsfs.core.GCSFileSystem": "pipe_create",
}


# Filesystems whose constructors pass unknown keywords only to fsspec's base
# class, which ignores them: every other key is refused as unknown.
_STRICT_OPTIONS = frozenset(
    {
        "fsspec.implementations.local.LocalFileSystem",
        "fsspec.implementations.memory.MemoryFileSystem",
    }
)


def _class_name(fs: fsspec.AbstractFileSystem | type) -> str:
    cls = fs if isinstance(fs, type) else type(fs)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_options(url: str, options: dict[str, Any]) -> None:
    """Refuse options the URL's filesystem does not take (a typo, a wrong type).

    Filesystems that forward unknown keywords elsewhere (sftp to paramiko,
    http to aiohttp, ...) only have near-misses of their known options
    refused.
    """
    if "::" in url:
        return  # chained URLs take per-protocol option dicts: the filesystems check
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise InvalidInputError(f"Cannot open an fsspec filesystem for {url!r}: {exc}") from exc
    strict = _class_name(cls) in _STRICT_OPTIONS
    check_options(
        options,
        fsspec_options(cls, strict=strict),
        owner=f"FsspecBackend ({cls.__name__})",
        url=url,
        open_ended=not strict,
    )


def _check_range(start: int | None, end: int | None) -> None:
    for name, value in (("start", start), ("end", end)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise InvalidInputError(f"Read {name} must be a non-negative int, got {value!r}.")


class FsspecBackend(Backend):
    """Backend over an fsspec filesystem, rooted at ``url``.

    Args:
      url: any fsspec URL (``local:///tmp/x``, ``memory://x``, ``sftp://host/x``).
      storage_options: passed to the filesystem constructor, except
        ``single_writer`` (bool, default False): the user's promise that
        one writer uses the store, which lets ``create`` work without an
        atomic create (exists check, then write).
      fs: an existing filesystem to use instead of building one from
        ``url``; then ``storage_options`` may only hold ``single_writer``.

    Raises:
      InvalidInputError: bad options, or an async filesystem bound to a
        caller's loop (``asynchronous=True``).

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> from partialstore._runtime.aio import run
        >>> backend = FsspecBackend(f"local://{tmp.name}/ckpts", {})
        >>> run(backend.create("log/00000001.json", b"{}"))
        >>> run(backend.list("log"))
        ['log/00000001.json']
        >>> run(backend.close())
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any],
        *,
        fs: fsspec.AbstractFileSystem | None = None,
    ) -> None:
        options = dict(storage_options)
        if fs is None:
            _check_options(url, options)
        single_writer = pop_single_writer(options)
        if fs is None:
            try:
                fs, root = fsspec.core.url_to_fs(url, **options)
            except (ImportError, ValueError, TypeError) as exc:
                raise InvalidInputError(
                    f"Cannot open an fsspec filesystem for {url!r}: {exc}"
                ) from exc
        else:
            if options:
                raise InvalidInputError(
                    f"FsspecBackend got a filesystem object and storage options {sorted(options)} "
                    f"for {url!r}; configure the filesystem instead."
                )
            root = fs._strip_protocol(url)
        if isinstance(fs, AsyncFileSystem) and getattr(fs, "asynchronous", False):
            raise InvalidInputError(
                f"{type(fs).__name__} for {url!r} was created with asynchronous=True and is "
                "bound to one event loop; pass an instance created with asynchronous=False."
            )
        self.url = url
        self.fs = fs
        self.single_writer = single_writer
        self.root: str = root.rstrip("/")
        self._async = bool(getattr(fs, "async_impl", False))
        self._strategy = CREATE_STRATEGIES.get(_class_name(fs))
        self._capabilities = Capabilities(
            atomic_create=self._strategy is not None,
            atomic_rename=False,
            compare_and_swap=False,
        )

    @property
    def _local(self) -> bool:
        return self._strategy == "link"

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    # ------------------------------------------------------------------ helpers

    def _path(self, key: str) -> str:
        validate_key(key)
        return f"{self.root}/{key}" if self.root else key

    def _prefix_path(self, prefix: str) -> str:
        validate_key(prefix, allow_empty=True)
        if not prefix:
            return self.root
        return f"{self.root}/{prefix}" if self.root else prefix

    def _key_of(self, path: str) -> str:
        path = self.fs._strip_protocol(path)
        root = self.fs._strip_protocol(self.root) if self.root else ""
        return path[len(root) :].lstrip("/") if root else path.lstrip("/")

    async def _fs(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call filesystem method ``name`` without blocking or binding the caller's loop."""
        if self._async:
            coroutine = getattr(self.fs, f"_{name}")(*args, **kwargs)
            future = asyncio.run_coroutine_threadsafe(coroutine, self.fs.loop)
            return await asyncio.wrap_future(future)
        return await asyncio.to_thread(getattr(self.fs, name), *args, **kwargs)

    async def _guard(self, action: str, key: str, coroutine: Any) -> Any:
        """Await ``coroutine``, mapping filesystem errors onto partialstore's error tree."""
        where = f"{action} {key!r} under {self.url}"
        observe.count_request()  # one filesystem call (fsspec's own retries are not seen)
        try:
            return await coroutine
        except PartialStoreError:
            raise
        except FileNotFoundError as exc:
            raise NotFoundError(f"Cannot {where}: no such key ({exc}).") from exc
        except (IsADirectoryError, NotADirectoryError) as exc:
            if action in ("read", "check", "delete"):
                raise NotFoundError(f"Cannot {where}: no such key ({exc}).") from exc
            raise BackendError(
                f"Cannot {where}: a key and a prefix of the same name cannot both exist on "
                f"this filesystem ({exc})."
            ) from exc
        except FileExistsError as exc:
            raise AlreadyExistsError(f"Cannot {where}: it already exists.") from exc
        except (TimeoutError, ConnectionError) as exc:
            raise TransientBackendError(f"Cannot {where} (retry may help): {exc!r}") from exc
        except OSError as exc:
            raise BackendError(f"Cannot {where}: {exc!r}") from exc

    # ------------------------------------------------------------------ contract

    async def create(self, key: str, data: bytes) -> None:
        """Write ``key`` only if absent.

        Atomic on the allow-listed filesystems (see the module docstring).
        Elsewhere it raises ``UnsupportedOperationError``, unless the
        backend was opened with ``single_writer=True``: then it checks
        existence and writes, which is correct only because the user
        promised that no other writer exists.
        """
        path = self._path(key)
        if self._strategy == "link":
            await self._guard("create", key, asyncio.to_thread(self._create_local, path, data))
        elif self._strategy == "pipe_create":
            await self._guard("create", key, self._fs("pipe_file", path, data, mode="create"))
        elif self.single_writer:
            if await self.exists(key):
                raise AlreadyExistsError(f"Cannot create {key!r} under {self.url}: it exists.")
            await self._guard("create", key, self._fs("pipe_file", path, bytes(data)))
        else:
            raise UnsupportedOperationError(
                f"Cannot create {key!r} under {self.url}: {_class_name(self.fs)} has no atomic "
                "create (only an exists check followed by a write, which two writers can both "
                "pass). Use a store with atomic create, or open it with storage option "
                "single_writer=True if exactly one process ever writes to it."
            )

    def _create_local(self, path: str, data: bytes) -> None:
        local_files.makedirs_durable(os.path.dirname(path))
        local_files.create_file(path, data)

    def _replace_local(self, path: str, data: bytes) -> None:
        local_files.makedirs_durable(os.path.dirname(path))
        local_files.replace_file(path, data)

    async def write(self, key: str, data: bytes, *, if_version: str | None = None) -> None:
        path = self._path(key)
        if if_version is not None:
            raise UnsupportedOperationError(
                f"Cannot write {key!r} with if_version under {self.url}: the generic fsspec "
                "backend has no compare-and-swap."
            )
        if self._local:
            await self._guard("write", key, asyncio.to_thread(self._replace_local, path, data))
        else:
            await self._guard("write", key, self._fs("pipe_file", path, bytes(data)))

    async def read(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        path = self._path(key)
        _check_range(start, end)
        if end is not None and end < (start or 0):
            end = start or 0  # an empty slice: fsspec would read a negative length
        data = await self._guard("read", key, self._fs("cat_file", path, start=start, end=end))
        return bytes(data)

    async def exists(self, key: str) -> bool:
        path = self._path(key)
        self.fs.invalidate_cache()
        return bool(await self._guard("check", key, self._fs("isfile", path)))

    async def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(NotFoundError):  # deleting a missing key is fine
            await self._guard("delete", key, self._fs("rm_file", path))
        self.fs.invalidate_cache()

    async def delete_prefix(self, prefix: str) -> None:
        base = self._prefix_path(prefix)
        if self._local:
            # Directories must go too, or an empty tree would linger.
            if await self._fs("isdir", base):
                with contextlib.suppress(NotFoundError):
                    await self._guard("delete prefix", prefix, self._fs("rm", base, recursive=True))
            return
        paths = await self._find(prefix)
        if paths:
            with contextlib.suppress(NotFoundError):  # a concurrent delete got there first
                await self._guard("delete prefix", prefix, self._fs("rm", paths))
        self.fs.invalidate_cache()

    async def _find(self, prefix: str) -> list[str]:
        """Full paths of the objects under ``prefix`` (directory semantics)."""
        base = self._prefix_path(prefix)
        self.fs.invalidate_cache()
        try:
            found = await self._guard("list", prefix, self._fs("find", base or "/"))
        except NotFoundError:
            return []
        paths: list[str] = []
        for path in found:
            key = self._key_of(path)
            # find() on a file returns the file itself; a prefix only matches below it.
            if prefix and not key.startswith(f"{prefix}/"):
                continue
            if local_files.is_temp_name(posixpath.basename(key)):
                continue
            paths.append(path)
        return paths

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> list[str]:
        # fsspec has no portable start-after listing: filter the full one.
        keys = sorted(self._key_of(path) for path in await self._find(prefix))
        return keys if start_after is None else [k for k in keys if k > start_after]
