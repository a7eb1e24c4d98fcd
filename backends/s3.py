"""S3 backend (``s3://bucket/prefix``) through s3fs's async API.

Every operation is one or a few plain S3 requests issued through s3fs's
aiobotocore client, forwarded to s3fs's own loop thread
(:mod:`partialstore.backends._fsspec_async`), so methods may be awaited from
any event loop. Backends opened with equal options share one
``S3FileSystem`` (``skip_instance_cache=True``, pooled by
:mod:`partialstore.backends._bucket`): endpoints and credentials never leak
between backends opened with different options, and fsspec's listing cache
is never consulted.

How the contract maps onto S3:

- ``create``: ``PutObject`` (or ``CompleteMultipartUpload`` past 100 MiB)
  with ``If-None-Match: *``. S3 answers 412 ``PreconditionFailed`` when the
  key exists -> :class:`AlreadyExistsError`; when the object holds this
  create's own bytes after an attempt that may have landed,
  :class:`OutcomeUnknownError`. A 409 ``ConditionalRequestConflict`` (a
  conflicting operation was in flight; AWS says the write did not happen)
  is retried like a 503.
- ``write``: a plain ``PutObject`` (S3 replaces objects atomically).
  ``write(..., if_version=etag)`` sends ``If-Match: <etag>``; 412, 409 or a
  vanished key -> :class:`ConflictError`. ``read_versioned`` returns the ETag.
- ``list``: ``ListObjectsV2`` without delimiter (S3 listings are strongly
  consistent); zero-byte "directory" placeholders (keys ending in ``/``) are
  not keys and are dropped. ``list_children`` uses the ``/`` delimiter.
- ``delete_prefix``: list, then ``DeleteObjects`` in batches of 1000.
- ``rename``: not offered (``atomic_rename=False``): S3 has no rename, a
  "rename" copies every byte and is not atomic.

Storage options (all optional) are s3fs's: ``endpoint_url``, ``key``,
``secret``, ``token``, ``anon``, ``profile``, ``client_kwargs`` (e.g.
``{"region_name": ...}``), ``config_kwargs``... Without them the standard AWS
chain applies (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``~/.aws``, instance roles; ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` for
the endpoint). partialstore's own options are ``single_writer`` (kept as
:attr:`S3Backend.single_writer`), ``deadline`` and ``retries``. Unknown
options and wrong value types are refused (:mod:`._service_options`).

TensorStore (:meth:`S3Backend.kvstore_spec`) reaches the same bytes with its
``s3`` driver, with the same identity s3fs uses, named explicitly (no
default-chain probing, so no C++ log lines): see
:mod:`partialstore.backends._s3_credentials`. Explicit keys that differ from
the environment reach TensorStore through an anonymous in-memory file
(``memfd``), never a file on disk.

Failures are retried in one place, under the storage options ``deadline``
(seconds, default 90) and ``retries`` (default 10): see
:mod:`partialstore.backends._retry`. botocore and s3fs make one attempt per
request, TensorStore's log requests retry once, and its arrays get a
``s3_request_retries`` schedule that fits in the deadline
(:meth:`S3Backend.tensorstore_context`).

Example:
    >>> from partialstore import registry
    >>> from partialstore._runtime.aio import run
    >>> backend = registry.open_backend(
    ...     "s3://bucket/ckpts",
    ...     {"endpoint_url": "http://127.0.0.1:5000", "key": "k", "secret": "s"},
    ... )
    >>> type(backend).__name__, backend.bucket, backend.root  # nothing sent yet
    ('S3Backend', 'bucket', 'ckpts')
    >>> spec = backend.kvstore_spec("data/abc")
    >>> spec["driver"], spec["bucket"], spec["path"], spec["endpoint"]
    ('s3', 'bucket', 'ckpts/data/abc/', 'http://127.0.0.1:5000')
    >>> backend.tensorstore_context()["s3_request_retries"]["max_retries"]  # storage option
    10
    >>> run(backend.close())
"""

from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from partialstore import observe
from partialstore.backend import validate_key
from partialstore.errors import AlreadyExistsError, BackendError, ConflictError, OutcomeUnknownError

from ._bucket import BucketBackend
from ._retry import Attempt, Kind, note_failure, transport_kind
from ._s3_credentials import (
    RESOLVE,
    SecretFile,
    endpoint_of,
    region_of,
    resolve_credentials,
    static_credentials,
)
from ._s3_errors import client_error_code, map_s3_error, retry_kind
from ._service_options import check_s3_nested, s3_options
from ._tensorstore_requests import (
    CREATED,
    FAST_RETRIES,
    REFUSED_AFTER_RESEND,
    FastRequestError,
    TensorStoreRequests,
)

__all__ = ["S3Backend", "map_s3_error"]

T = TypeVar("T")

_DELETE_BATCH = 1000  # DeleteObjects' limit
_DELETE_CONCURRENCY = 8
_TS_RETRIES_METRIC = "/tensorstore/kvstore/s3/retries"
_AT_ONCE = {"limit": 64}
# One attempt per request in botocore: the backend's loop is the only retry layer.
_ONE_ATTEMPT = {"total_max_attempts": 1, "mode": "standard"}


class S3Backend(BucketBackend):
    """Backend over one S3 bucket and prefix.

    Args:
      url: ``s3://bucket[/prefix]`` (``s3a://`` accepted).
      storage_options: s3fs options (``endpoint_url``, ``key``, ``secret``,
        ``client_kwargs``, ...) plus ``single_writer``.

    The module docstring has an example; every call then talks to the
    bucket, e.g. ``await backend.create("log/00000001.json", b"{}")``.
    """

    _schemes = ("s3", "s3a")
    _url_scheme = "s3"
    _url_form = "an s3://bucket[/prefix]"
    _service = "S3"

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self._secrets: list[SecretFile] = []
        self._ts_credentials: dict[str, Any] | None = None
        self._ts_credentials_known = False
        super().__init__(url, storage_options)
        # The log's requests (create, full reads, listings) go through
        # TensorStore when it can take them: see _tensorstore_requests. Its
        # default of 32 at once would split a finalize's 64 record reads.
        context = {"s3_request_retries": dict(FAST_RETRIES), "s3_request_concurrency": _AT_ONCE}
        self._fast = TensorStoreRequests(self._fast_spec, context, _TS_RETRIES_METRIC)

    # -- plumbing -----------------------------------------------------------------

    def _known_options(self) -> Mapping[str, Any]:
        return s3_options()

    def _check_nested_options(self, options: Mapping[str, Any], url: str) -> None:
        check_s3_nested(options, url)

    def _make_fs(self, options: dict[str, Any]) -> Any:
        import s3fs

        config = {**(options.get("config_kwargs") or {}), "retries": dict(_ONE_ATTEMPT)}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **{**options, "config_kwargs": config})
        fs.retries = 1  # s3fs's own loop: one attempt (it would sleep and retry on top)
        return fs

    def _map_error(self, err: BaseException, action: str, where: str) -> Exception:
        return map_s3_error(err, action, where, self._endpoint_label())

    def _endpoint_label(self) -> str:
        endpoint = self._endpoint()
        return endpoint if endpoint else f"AWS S3 ({self._region() or 'default region'})"

    def _unreachable_hint(self) -> str:
        return (
            "storage_options['endpoint_url'] (or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) and "
            "that the service is running there"
        )

    def _service_kind(self, err: BaseException) -> Kind | None:
        return retry_kind(err)

    async def _bucket_exists(self) -> bool:
        try:
            # Through TensorStore when it can: no s3fs client to build first.
            if await self._fast.bucket_listed():
                return True
        except FastRequestError as err:
            if "NoSuchBucket" in str(err):
                return False
        try:
            await self._s3("head_bucket")
        except Exception as err:
            if client_error_code(err) in ("NoSuchBucket", "404", "NotFound"):
                return False
            raise
        return True

    async def _s3(self, method: str, **kwargs: Any) -> Any:
        fs = self._fs
        return await self._on_fs(lambda: fs._call_s3(method, Bucket=self.bucket, **kwargs))

    async def _via_fast(
        self, state: Attempt, request: Callable[[], Awaitable[T | None]], *, mutating: bool
    ) -> T | None:
        """TensorStore's answer, or None: the request is s3fs's (not sent, or it failed).

        After a failure the rest of this call goes through s3fs, which
        reports precisely what S3 says.
        """
        if state.skip_fast:
            return None
        try:
            return await request()
        except FastRequestError as err:
            state.skip_fast = True
            note_failure(state, transport_kind(err) or Kind.AMBIGUOUS, mutating)
            observe.count_resend()  # s3fs sends it again within this attempt
            return None

    # -- writes -------------------------------------------------------------------

    async def create(self, key: str, data: bytes) -> None:
        full = self._key(key)
        await self._bounded(
            "create",
            self._where(full),
            lambda state: self._create_attempt(state, key, full, data),
            mutating=True,
        )

    def _exists_error(self, full: str) -> AlreadyExistsError:
        return AlreadyExistsError(
            f"Cannot create {self._where(full)}: the object already exists "
            "(If-None-Match: * failed)."
        )

    async def _create_attempt(self, state: Attempt, key: str, full: str, data: bytes) -> None:
        fast = self._fast
        created = await self._via_fast(
            state, lambda: fast.create_if_absent(key, data), mutating=True
        )
        if created == CREATED:
            return
        if created is not None:
            await self._refused_create(state, key, full, data, created == REFUSED_AFTER_RESEND)
        # Unanswered, or refused with nothing there (S3 says 404 for a missing
        # bucket): s3fs sends it again and reports what S3 says. A 409
        # ConditionalRequestConflict (a concurrent operation on the key; AWS
        # says the write did not happen) is retried by the loop, with jitter.
        fs = self._fs
        try:
            await self._on_fs(lambda: fs._pipe_file(f"{self.bucket}/{full}", data, mode="create"))
        except Exception as err:
            if client_error_code(err) in ("PreconditionFailed", "412") or isinstance(
                err, FileExistsError
            ):
                raise self._exists_error(full) from err
            raise

    async def _refused_create(
        self, state: Attempt, key: str, full: str, data: bytes, resent: bool
    ) -> None:
        """TensorStore's create was refused (412, or 404: no bucket); return if nothing is there.

        After a resend (``resent``) the refusal may answer this create's own
        first attempt: other writers' bytes differ; the very same bytes leave
        the outcome unknown.
        """
        if not resent:
            if await self._exists_attempt(state, key, full):
                raise self._exists_error(full)
            return  # nothing there (S3 said 404, e.g. no bucket): s3fs tells why
        fast = self._fast
        existing = await self._via_fast(state, lambda: fast.read(key), mutating=False)
        if existing is None:
            state.maybe_applied = True  # unverified: a later 412 may be this create's own
            return
        if existing != bytes(data):
            raise self._exists_error(full)
        raise OutcomeUnknownError(
            f"Create {self._where(full)}: S3 refused it because the object exists, and it "
            "holds exactly this create's bytes: its first attempt may have landed with the "
            "answer lost (TensorStore resent it), or another writer created the same bytes. "
            "Look at the store before repeating."
        )

    async def _write_if(self, full: str, data: bytes, if_version: str) -> None:
        try:
            # One PUT (up to 5 GiB): If-Match is only honoured as a whole-request condition.
            await self._s3("put_object", Key=full, Body=data, IfMatch=if_version)
        except Exception as err:
            code = client_error_code(err)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise ConflictError(
                    f"Conditional write of {self._where(full)} failed: its version is no "
                    f"longer {if_version!r} (another writer changed it)."
                ) from err
            if code in ("NoSuchKey", "404"):
                raise ConflictError(
                    f"Conditional write of {self._where(full)} failed: the object was deleted "
                    f"since version {if_version!r} was read."
                ) from err
            raise

    # -- reads --------------------------------------------------------------------

    async def _read_whole(self, state: Attempt, key: str, full: str) -> bytes:
        fast = self._fast
        data = await self._via_fast(state, lambda: fast.read(key), mutating=False)
        if data is not None:
            return data
        # Unusual keys, and missing objects (s3fs says why: no such key, or bucket).
        return await self._get_range(full, None)

    async def _exists_attempt(self, state: Attempt, key: str, full: str) -> bool:
        fast = self._fast
        found = await self._via_fast(state, lambda: fast.exists(key), mutating=False)
        return await super()._exists_attempt(state, key, full) if found is None else found

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> list[str]:
        prefix = validate_key(prefix, allow_empty=True)
        base, fast_dir = self._dir(prefix), f"{prefix}/" if prefix else ""
        full_after = None if start_after is None else self._full_name(start_after)

        async def attempt(state: Attempt) -> list[str]:
            fast = self._fast  # its listing pages through the prefix: not for a tail
            ask = lambda: fast.list(fast_dir)  # noqa: E731
            names = None if start_after else await self._via_fast(state, ask, mutating=False)
            if names is not None:
                return names
            keys, _ = await self._list_raw(base, None, full_after)
            return sorted(self._relative(k) for k in keys)

        names = await self._bounded("list", self._where(base), attempt, mutating=False)
        # A name ending in "/" is a console-made folder placeholder, not data.
        return [name for name in names if not name.endswith("/")]

    async def _get(self, full: str, range_header: str | None) -> tuple[bytes, str]:
        extra = {"Range": range_header} if range_header else {}
        fs = self._fs

        async def get_and_read() -> tuple[bytes, str]:
            resp = await fs._call_s3("get_object", Bucket=self.bucket, Key=full, **extra)
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return data, str(resp.get("ETag", ""))

        return await self._on_fs(get_and_read)

    async def _get_range(self, full: str, range_header: str | None) -> bytes:
        data, _ = await self._get(full, range_header)
        return data

    def _range_not_satisfiable(self, err: BaseException) -> bool:
        return client_error_code(err) in ("InvalidRange", "416")

    async def _read_versioned(self, full: str) -> tuple[bytes, str]:
        return await self._get(full, None)  # the ETag is the version

    async def _head(self, full: str) -> None:
        await self._s3("head_object", Key=full)

    async def _list_raw(  # builtins.list: in this class ``list`` names a method
        self, prefix: str, delimiter: str | None, start_after: str | None = None
    ) -> tuple[builtins.list[str], builtins.list[str]]:
        fs = self._fs

        async def pages() -> tuple[list[str], list[str]]:
            await fs.set_session()
            client = await fs.get_s3(self.bucket)
            paginator = client.get_paginator("list_objects_v2")
            optional = {"Delimiter": delimiter, "StartAfter": start_after}
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            kwargs.update({name: value for name, value in optional.items() if value})
            keys: list[str] = []
            dirs: list[str] = []
            async for page in paginator.paginate(**kwargs):
                keys.extend(item["Key"] for item in page.get("Contents", ()))
                dirs.extend(item["Prefix"] for item in page.get("CommonPrefixes", ()))
            return keys, dirs

        return await self._on_fs(pages)

    # -- deletes ------------------------------------------------------------------

    async def _delete_object(self, full: str) -> None:
        await self._s3("delete_object", Key=full)

    def _missing_bucket(self, err: BaseException) -> bool:
        return client_error_code(err) == "NoSuchBucket"

    async def delete_prefix(self, prefix: str) -> None:
        base = self._dir(prefix)
        keys, _ = await self._bounded_list(base, None)
        batches = [keys[i : i + _DELETE_BATCH] for i in range(0, len(keys), _DELETE_BATCH)]
        limit = asyncio.Semaphore(_DELETE_CONCURRENCY)

        async def delete_batch(state: Attempt, batch: list[str]) -> None:
            out = await self._s3(
                "delete_objects",
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = [e for e in out.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise BackendError(
                    f"Deleting {len(errors)} objects under {self._where(base)} failed, "
                    f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )

        async def bounded_batch(batch: list[str]) -> None:
            async with limit:
                await self._bounded(
                    "delete objects under",
                    self._where(base),
                    lambda state: delete_batch(state, batch),
                    mutating=True,
                )

        await asyncio.gather(*(bounded_batch(b) for b in batches))

    # -- TensorStore --------------------------------------------------------------

    def _endpoint(self) -> str | None:
        return endpoint_of(self._options, os.environ)

    def _region(self) -> str | None:
        return region_of(self._options, os.environ)

    async def _credentials_for_tensorstore(self) -> dict[str, Any] | None:
        """TensorStore's ``aws_credentials`` for s3fs's identity (cached once known).

        Raises botocore's ``NoCredentialsError`` when there are none.
        """
        if not self._ts_credentials_known:
            found = static_credentials(self._options, os.environ, self._secrets)
            if found == RESOLVE:
                fs, options = self._fs, self._options
                found = await self._on_fs(lambda: resolve_credentials(fs, options))
            self._ts_credentials = found if isinstance(found, dict) else None
            self._ts_credentials_known = True
        return self._ts_credentials

    async def _fast_spec(self) -> dict[str, Any] | None:
        credentials = await self._credentials_for_tensorstore()
        return None if credentials is None else self._spec("", credentials)

    def _spec(self, prefix: str, credentials: dict[str, Any]) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "driver": "s3",
            "bucket": self.bucket,
            "path": self._dir(prefix),
            "use_conditional_write": True,
        }
        endpoint = self._endpoint()
        region = self._region()
        if endpoint:
            spec["endpoint"] = endpoint
            region = region or "us-east-1"  # TensorStore needs a region with an endpoint
        if region:
            spec["aws_region"] = region
        spec["aws_credentials"] = credentials
        return spec

    def kvstore_spec(self, prefix: str) -> dict[str, Any] | None:
        """TensorStore ``s3`` kvstore for the bytes under ``prefix``, or None.

        None when TensorStore cannot be given s3fs's credentials (explicit
        keys without ``memfd``) or botocore finds none: array bytes then go
        through s3fs, which reports the failure.

        See the module docstring for an example.
        """
        from fsspec.asyn import sync

        self._dir(prefix)  # validate before any request
        credentials = self._ts_credentials
        if not self._ts_credentials_known:
            try:
                credentials = sync(self._fs.loop, self._credentials_for_tensorstore)
            except Exception:
                return None  # s3fs, through read/write, says what is wrong
        return None if credentials is None else self._spec(prefix, credentials)

    def tensorstore_context(self) -> dict[str, Any] | None:
        """TensorStore's own retries for this backend's arrays, fitted to ``deadline``.

        See the module docstring for an example.
        """
        return {"s3_request_retries": self._policy.tensorstore_retries()}

    async def _close_fs(self) -> None:
        fs = self._fs
        creator = getattr(fs, "_s3creator", None)
        if creator is not None and fs._s3 is not None:
            fs._s3 = None
            await self._on_fs(lambda: creator.__aexit__(None, None, None))

    async def close(self) -> None:
        await super().close()
        for secret in self._secrets:
            secret.close()
