"""What the S3 and GCS backends share: one bucket, one prefix, one fsspec filesystem.

:class:`BucketBackend` holds the parts of an object-store backend that do
not depend on the service: splitting ``scheme://bucket/prefix``, the storage
options (``single_writer`` is partialstore's; the rest go to the fsspec
filesystem), mapping keys to
object names, and the operations whose logic is the same on both services
(ranged reads, ``exists``, listings, ``delete``, unconditional writes).
Backends opened with equal options share one filesystem (see
:class:`_FilesystemPool`): a checkpoint path usually differs from the last
one only in its prefix, and a new aiobotocore or aiohttp client takes a
noticeable time before its first request (benchmarks/README.md, "Figures
behind code decisions"). Filesystems are built with
``skip_instance_cache=True``, so endpoints and credentials never leak
between backends opened with different options.
Every call reaches the filesystem's loop thread through
:mod:`partialstore.backends._fsspec_async`, so methods may be awaited from
any event loop. Every public method is one bounded call
(:mod:`partialstore.backends._retry`): its attempts are retried in one
place, under the storage options ``deadline`` and ``retries``, and the
clients below are built not to retry on their own.

A subclass supplies the service's requests and error mapping: the
``_`` hooks below, plus ``create``, conditional writes, ``delete_prefix``,
``kvstore_spec`` and ``close``.

Example:
    >>> class MyBackend(BucketBackend):
    ...     _schemes = ("my",)
    ...     _url_scheme = "my"
    ...     _url_form = "a my://bucket[/prefix]"
    ...     _service = "My"
    ...     ...
"""

from __future__ import annotations

import abc
import builtins
import json
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, TypeVar

from partialstore.backend import Backend, Capabilities, join_key, validate_key
from partialstore.errors import (
    InvalidInputError,
    NotFoundError,
    PartialStoreError,
    TransientBackendError,
)

from ._fsspec_async import on_loop
from ._options import check_options, pop_retry_policy, pop_single_writer
from ._retry import Attempt, Call, Kind, run_bounded, transport_kind

__all__ = ["BucketBackend", "split_bucket_url"]

T = TypeVar("T")


def split_bucket_url(url: str, owner: type[BucketBackend]) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``, for a URL in one of ``owner``'s schemes.

    Example:
        >>> from partialstore.backends.gcs import GCSBackend
        >>> split_bucket_url("gs://b/run1/", GCSBackend)
        ('b', 'run1')
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in owner._schemes:
        raise InvalidInputError(f"{owner.__name__} needs {owner._url_form} URL, got {url!r}.")
    rest = rest.rstrip("/")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InvalidInputError(f"{owner._service} URL {url!r} has no bucket name.")
    prefix = prefix.strip("/")
    validate_key(prefix, allow_empty=True)
    return bucket, prefix


class _FilesystemPool:
    """Filesystems shared by the backends opened with equal options, reference counted.

    A backend takes its filesystem in ``__init__`` and gives it back in
    ``close``; the last backend to give one back closes it (the subclass's
    ``_close_fs``). Equal means same backend class and same options (compared
    as sorted JSON, ``repr`` for values JSON cannot hold).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[type, str], list[Any]] = {}  # key -> [fs, users]

    @staticmethod
    def key(owner: type, options: Mapping[str, Any]) -> tuple[type, str]:
        return owner, json.dumps(options, sort_keys=True, default=repr)

    def acquire(self, key: tuple[type, str], make: Callable[[], Any]) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = [make(), 0]
            entry[1] += 1
            return entry[0]

    def release(self, key: tuple[type, str]) -> bool:
        """Drop one user of ``key``'s filesystem; whether it was the last one."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            entry[1] -= 1
            if entry[1] > 0:
                return False
            del self._entries[key]
            return True


_pool = _FilesystemPool()
# Pool keys whose endpoint has answered in this process: from then on a
# refused connection is a restart to ride out, not a wrong address.
_reached: set[tuple[type, str]] = set()


class BucketBackend(Backend):
    """Backend over one bucket and prefix of an object store reached through fsspec.

    Args:
      url: ``<scheme>://bucket[/prefix]``, the scheme one of ``_schemes``.
      storage_options: the filesystem's options plus ``single_writer``.

    Example:
        >>> from partialstore.backends.s3 import S3Backend
        >>> backend = S3Backend("s3://bucket/run1", {"endpoint_url": "http://127.0.0.1:9000"})
        >>> backend.bucket, backend.root  # nothing is sent before the first call
        ('bucket', 'run1')
        >>> from partialstore._runtime.aio import run
        >>> run(backend.close())
    """

    _schemes: ClassVar[tuple[str, ...]]  # accepted URL schemes, the canonical one first
    _url_scheme: ClassVar[str]  # the scheme used in error messages
    _url_form: ClassVar[str]  # "an s3://bucket[/prefix]", for errors
    _service: ClassVar[str]  # "S3", "GCS"
    # Exceptions the filesystem's constructor raises for bad options.
    _bad_option_errors: ClassVar[tuple[type[Exception], ...]] = (TypeError,)

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.bucket, self.root = split_bucket_url(url, type(self))
        options = dict(storage_options or {})
        check_options(options, self._known_options(), owner=type(self).__name__, url=url)
        self._check_nested_options(options, url)
        self.single_writer = pop_single_writer(options)
        self._policy = pop_retry_policy(options, url)
        # Filesystems are shared through _pool only: see the module docstring.
        options.pop("skip_instance_cache", None)
        options.pop("asynchronous", None)
        self._options = options
        self._pool_key: tuple[type, str] | None = None
        self._bucket_seen = False
        pool_key = _pool.key(type(self), options)
        try:
            self._fs = _pool.acquire(pool_key, lambda: self._make_fs(options))
        except self._bad_option_errors as err:
            raise InvalidInputError(f"Bad storage_options for {url}: {err}") from err
        except Exception as err:  # e.g. no credentials where the client looks at once
            raise self._map_error(err, "open", url) from err
        self._pool_key = pool_key
        self._reach_key = pool_key

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(atomic_create=True, atomic_rename=False, compare_and_swap=True)

    # -- hooks --------------------------------------------------------------------

    @abc.abstractmethod
    def _make_fs(self, options: dict[str, Any]) -> Any:
        """The fsspec filesystem, built with ``skip_instance_cache=True`` and ``options``."""

    @abc.abstractmethod
    def _known_options(self) -> Mapping[str, Any]:
        """Every storage option this backend accepts, name -> type(s) or None."""

    def _check_nested_options(self, options: Mapping[str, Any], url: str) -> None:
        """Check options nested inside options (s3fs's ``client_kwargs``, ...)."""

    @abc.abstractmethod
    def _endpoint_label(self) -> str:
        """The service endpoint, for messages ("http://127.0.0.1:9000", "AWS S3 us-east-1")."""

    @abc.abstractmethod
    def _unreachable_hint(self) -> str:
        """What to check when the endpoint cannot be reached."""

    @abc.abstractmethod
    def _service_kind(self, err: BaseException) -> Kind | None:
        """What the service's answer behind ``err`` means for a retry (None: no answer)."""

    @abc.abstractmethod
    async def _bucket_exists(self) -> bool:
        """Whether the bucket exists (one request; the service's error if it cannot tell)."""

    @abc.abstractmethod
    async def _close_fs(self) -> None:
        """Close the filesystem's sessions (called once its last backend closes)."""

    async def close(self) -> None:
        """Give the shared filesystem back; the last backend using it closes it."""
        key, self._pool_key = self._pool_key, None
        if key is not None and _pool.release(key):
            await self._close_fs()

    @abc.abstractmethod
    def _map_error(self, err: BaseException, action: str, where: str) -> Exception:
        """The service's failure ``err`` of ``action`` on ``where``, as partialstore's error."""

    @abc.abstractmethod
    async def _get_range(self, full: str, range_header: str | None) -> bytes:
        """The bytes of object ``full`` (an HTTP ``Range`` header value, or all)."""

    @abc.abstractmethod
    def _range_not_satisfiable(self, err: BaseException) -> bool:
        """Whether ``err`` is the service's answer to a range starting past the end."""

    @abc.abstractmethod
    async def _read_versioned(self, full: str) -> tuple[bytes, str]:
        """Object ``full`` and the version token that ``write(if_version=...)`` takes."""

    @abc.abstractmethod
    async def _write_if(self, full: str, data: bytes, if_version: str) -> None:
        """Replace ``full`` only if its version is ``if_version``, else :class:`ConflictError`."""

    @abc.abstractmethod
    async def _head(self, full: str) -> None:
        """Ask for object ``full``'s metadata; raise the service's error if it is missing."""

    @abc.abstractmethod
    async def _delete_object(self, full: str) -> None:
        """Delete object ``full`` (a missing object may raise the service's not-found)."""

    @abc.abstractmethod
    async def _list_raw(
        self, prefix: str, delimiter: str | None, start_after: str | None = None
    ) -> tuple[list[str], list[str]]:
        """All object names and common prefixes under the object prefix ``prefix``.

        With ``start_after`` (a full object name), only those after it.
        """

    def _missing_bucket(self, err: BaseException) -> bool:
        """Whether a not-found ``err`` of a delete means the bucket, not the object, is missing."""
        return False

    # -- plumbing -----------------------------------------------------------------

    def _key(self, key: str) -> str:
        return join_key(self.root, validate_key(key))

    def _dir(self, prefix: str) -> str:
        """The object prefix (with trailing ``/``, or ``""`` for the bucket root) of ``prefix``."""
        full = join_key(self.root, validate_key(prefix, allow_empty=True))
        return f"{full}/" if full else ""

    def _full_name(self, key: str) -> str:
        """The object name of root-relative ``key``, unchecked (a start-after bound)."""
        return f"{self.root}/{key}" if self.root else key

    def _where(self, key: str) -> str:
        return f"{self._url_scheme}://{self.bucket}/{key}"

    def _relative(self, full: str) -> str:
        return full[len(self.root) + 1 :] if self.root else full

    async def _on_fs(self, coro_fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``coro_fn()`` on the filesystem's loop thread, awaited from any loop."""
        return await on_loop(self._fs.loop, coro_fn)

    def _classify(self, err: BaseException) -> Kind:
        """What a failed attempt means for the retry loop (see :class:`Kind`)."""
        if isinstance(err, PartialStoreError) and not isinstance(err, TransientBackendError):
            return Kind.PERMANENT  # not found, exists, conflict, denied, no credentials
        kind = self._service_kind(err) or transport_kind(err)
        if kind is None:
            return Kind.AMBIGUOUS if isinstance(err, TransientBackendError) else Kind.PERMANENT
        return kind

    async def _bounded(
        self, action: str, where: str, attempt: Callable[[Attempt], Awaitable[T]], *, mutating: bool
    ) -> T:
        """One backend call: ``attempt`` retried under this backend's :class:`RetryPolicy`.

        ``attempt`` may raise the service's own exceptions; they are mapped
        with :meth:`_map_error` (``action`` on ``where``) before the loop sees
        them.
        """
        key = self._reach_key

        async def mapped(state: Attempt) -> T:
            try:
                return await attempt(state)
            except PartialStoreError:
                raise
            except Exception as err:
                raise self._map_error(err, action, where) from err

        call = Call(
            action=action,
            where=where,
            mutating=mutating,
            endpoint=self._endpoint_label(),
            reached=lambda: key in _reached,
            mark_reached=lambda: _reached.add(key),
            hint=self._unreachable_hint(),
        )
        return await run_bounded(self._policy, call, mapped, classify=self._classify)

    # -- writes -------------------------------------------------------------------

    async def write(self, key: str, data: bytes, *, if_version: str | None = None) -> None:
        full = self._key(key)

        async def attempt(state: Attempt) -> None:
            if if_version is not None:
                await self._write_if(full, data, if_version)
            else:
                await self._put(full, data)

        await self._bounded("write", self._where(full), attempt, mutating=True)

    async def _put(self, full: str, data: bytes) -> None:
        """Replace object ``full`` (both services replace atomically on a plain upload)."""
        fs = self._fs
        await self._on_fs(lambda: fs._pipe_file(f"{self.bucket}/{full}", data))

    # -- reads --------------------------------------------------------------------

    async def read(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        full = self._key(key)
        for name, value in (("start", start), ("end", end)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise InvalidInputError(f"Read {name} must be a non-negative int, got {value!r}.")
        first = start or 0
        if end is not None and end <= first:
            if not await self.exists(key):
                raise NotFoundError(f"Cannot read {self._where(full)}: no such object.")
            return b""
        range_header = None
        if first or end is not None:
            range_header = f"bytes={first}-{'' if end is None else end - 1}"

        async def attempt(state: Attempt) -> bytes:
            if range_header is None:
                return await self._read_whole(state, key, full)
            try:
                return await self._get_range(full, range_header)
            except Exception as err:
                if self._range_not_satisfiable(err):
                    return b""  # the range starts past the end: Python slicing gives b""
                raise

        return await self._bounded("read", self._where(full), attempt, mutating=False)

    async def _read_whole(self, state: Attempt, key: str, full: str) -> bytes:
        """One attempt at reading object ``full`` (``key``) whole."""
        return await self._get_range(full, None)

    async def read_versioned(self, key: str) -> tuple[bytes, str]:
        full = self._key(key)
        return await self._bounded(
            "read", self._where(full), lambda state: self._read_versioned(full), mutating=False
        )

    async def exists(self, key: str) -> bool:
        full = self._key(key)
        where = self._where(full)
        found = await self._bounded(
            "check existence of",
            where,
            lambda state: self._exists_attempt(state, key, full),
            mutating=False,
        )
        if found:
            self._bucket_seen = True
        elif not self._bucket_seen:
            await self._confirm_bucket("check existence of", where)
        return found

    async def _exists_attempt(self, state: Attempt, key: str, full: str) -> bool:
        """One attempt at telling whether object ``full`` (``key``) exists."""
        try:
            await self._head(full)
        except Exception as err:
            mapped = self._map_error(err, "check existence of", self._where(full))
            if isinstance(mapped, NotFoundError):
                return False
            raise mapped from err
        return True

    async def _confirm_bucket(self, action: str, where: str) -> None:
        """Raise :class:`NotFoundError` if the bucket is missing (asked once per backend).

        A missing object and a missing bucket look alike to a HEAD request;
        without this check a save to a mistyped bucket would only fail at its
        first write, with a less clear message.
        """

        async def attempt(state: Attempt) -> bool:
            try:
                return await self._bucket_exists()
            except Exception as err:
                mapped = self._map_error(err, action, where)
                if self._classify(mapped) is Kind.PERMANENT:
                    # Cannot tell (no permission to look at buckets, only at
                    # objects): the object requests will say what is wrong.
                    return True
                raise mapped from err

        if not await self._bounded(action, where, attempt, mutating=False):
            raise NotFoundError(
                f"Cannot {action} {where}: the bucket {self.bucket!r} does not exist at "
                f"{self._endpoint_label()}. Create it, or check the bucket name in the URL."
            )
        self._bucket_seen = True

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> list[str]:
        after = None if start_after is None else self._full_name(start_after)
        names, _ = await self._bounded_list(self._dir(prefix), None, after)
        # A name ending in "/" is a console-made folder placeholder, not data.
        return sorted(self._relative(n) for n in names if not n.endswith("/"))

    # ``builtins.list``: inside the class body ``list`` names the method above.
    async def _bounded_list(
        self, base: str, delimiter: str | None, start_after: str | None = None
    ) -> tuple[builtins.list[str], builtins.list[str]]:
        return await self._bounded(
            "list",
            self._where(base),
            lambda state: self._list_raw(base, delimiter, start_after),
            mutating=False,
        )

    async def list_children(self, prefix: str = "") -> builtins.list[str]:
        base = self._dir(prefix)
        names, dirs = await self._bounded_list(base, "/")
        children = {n[len(base) :] for n in names} | {d[len(base) :].rstrip("/") for d in dirs}
        children.discard("")
        return sorted(children)

    # -- deletes ------------------------------------------------------------------

    async def delete(self, key: str) -> None:
        full = self._key(key)
        where = self._where(full)

        async def attempt(state: Attempt) -> None:
            try:
                await self._delete_object(full)
            except Exception as err:
                mapped = self._map_error(err, "delete", where)
                if not isinstance(mapped, NotFoundError) or self._missing_bucket(err):
                    raise mapped from err

        await self._bounded("delete", where, attempt, mutating=True)
