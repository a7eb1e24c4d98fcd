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
  key exists -> :class:`AlreadyExistsError`. S3 may answer 409
  ``ConditionalRequestConflict`` when a conflicting operation on the same key
  was in flight; AWS documents that the write did not happen and must be
  retried, so ``create`` retries it a few times (then 412 or success decides)
  and raises :class:`TransientBackendError` if the conflict persists.
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
the endpoint). partialstore's own option ``single_writer`` is accepted and
kept as :attr:`S3Backend.single_writer`.

TensorStore (:meth:`S3Backend.kvstore_spec`) reaches the same bytes with its
``s3`` driver. Its spec cannot carry an access key, so credentials are passed
as: ``{"type": "anonymous"}`` for ``anon``; ``{"type": "profile"}`` for a
``profile`` option; ``{"type": "environment"}`` when explicit ``key``/
``secret`` equal the ``AWS_*`` environment variables; otherwise, for explicit
keys, a credentials file in a private temporary directory (mode 0600, removed
by :meth:`S3Backend.close` or at exit) named by a ``profile`` credential.
Without explicit credentials TensorStore uses its default AWS chain.

Example::

    from partialstore import registry
    backend = registry.open_backend(
        "s3://bucket/ckpts", {"endpoint_url": "http://127.0.0.1:5000", "key": "k", "secret": "s"}
    )
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from typing import Any

from partialstore.backends._bucket import BucketBackend
from partialstore.backends._s3_errors import client_error_code, map_s3_error
from partialstore.backends._tensorstore_requests import TensorStoreRequests

from partialstore.backend import validate_key
from partialstore.errors import (
    AlreadyExistsError,
    BackendError,
    ConflictError,
    TransientBackendError,
)

__all__ = ["S3Backend", "map_s3_error"]

_DELETE_BATCH = 1000  # DeleteObjects' limit
_DELETE_CONCURRENCY = 8
_CONFLICT_RETRIES = 6


class S3Backend(BucketBackend):
    """Backend over one S3 bucket and prefix.

    Args:
      url: ``s3://bucket[/prefix]`` (``s3a://`` accepted).
      storage_options: s3fs options (``endpoint_url``, ``key``, ``secret``,
        ``client_kwargs``, ...) plus ``single_writer``.

    Example::

        backend = S3Backend("s3://bucket/run1", {"endpoint_url": "http://127.0.0.1:9000"})
        await backend.create("log/00000001.json", b"{}")
    """

    _schemes = ("s3", "s3a")
    _url_scheme = "s3"
    _url_form = "an s3://bucket[/prefix]"
    _service = "S3"

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, storage_options)
        self._credentials_dir: str | None = None
        self._cleanup: weakref.finalize[Any, Any] | None = None
        # The log's requests (create, full reads, listings) go through
        # TensorStore when it can take them: see _tensorstore_requests.
        self._fast = TensorStoreRequests(lambda: self.kvstore_spec(""))

    # -- plumbing -----------------------------------------------------------------

    def _make_fs(self, options: dict[str, Any]) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **options)

    def _map_error(self, err: BaseException, action: str, where: str) -> Exception:
        return map_s3_error(err, action, where)

    async def _s3(self, method: str, **kwargs: Any) -> Any:
        fs = self._fs
        return await self._on_fs(lambda: fs._call_s3(method, Bucket=self.bucket, **kwargs))

    # -- writes -------------------------------------------------------------------

    async def create(self, key: str, data: bytes) -> None:
        full = self._key(key)
        created = await self._fast.create_if_absent(key, data)
        if created:
            return
        if created is False and await self.exists(key):
            raise AlreadyExistsError(
                f"Cannot create {self._where(full)}: the object already exists "
                "(If-None-Match: * failed)."
            )
        # Unanswered, or refused with nothing there (S3 says 404 for a missing
        # bucket): s3fs sends it again and reports what S3 says.
        fs = self._fs
        path = f"{self.bucket}/{full}"
        for attempt in range(_CONFLICT_RETRIES):
            try:
                await self._on_fs(lambda: fs._pipe_file(path, data, mode="create"))
                return
            except Exception as err:
                code = client_error_code(err)
                if code == "ConditionalRequestConflict" and attempt + 1 < _CONFLICT_RETRIES:
                    # 409: a concurrent operation on this key was in flight and
                    # our write did not happen; AWS says to retry (a multipart
                    # upload from scratch, which _pipe_file does after aborting).
                    # Jitter keeps the retrying racers apart.
                    await asyncio.sleep(0.05 * 2**attempt * (0.5 + random.random()))
                    continue
                if code in ("PreconditionFailed", "412") or isinstance(err, FileExistsError):
                    raise AlreadyExistsError(
                        f"Cannot create {self._where(full)}: the object already exists "
                        "(If-None-Match: * failed)."
                    ) from err
                raise map_s3_error(err, "create", self._where(full)) from err
        raise TransientBackendError(  # pragma: no cover - loop always returns or raises
            f"Creating {self._where(full)} kept conflicting with concurrent writers."
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
            raise map_s3_error(err, "write", self._where(full)) from err

    # -- reads --------------------------------------------------------------------

    async def read(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        if start is None and end is None:
            data = await self._fast.read(validate_key(key))
            if data is not None:
                return data
        # Ranges, unusual keys, and missing objects (s3fs says why: no such key, or bucket).
        return await super().read(key, start=start, end=end)

    async def exists(self, key: str) -> bool:
        found = await self._fast.exists(validate_key(key))
        return await super().exists(key) if found is None else found

    async def list(self, prefix: str = "") -> list[str]:
        prefix = validate_key(prefix, allow_empty=True)
        names = await self._fast.list(f"{prefix}/" if prefix else "")
        if names is None:
            return await super().list(prefix)
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

    async def _list_raw(self, prefix: str, delimiter: str | None) -> tuple[list[str], list[str]]:
        fs = self._fs

        async def pages() -> tuple[list[str], list[str]]:
            await fs.set_session()
            client = await fs.get_s3(self.bucket)
            paginator = client.get_paginator("list_objects_v2")
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            keys: list[str] = []
            dirs: list[str] = []
            async for page in paginator.paginate(**kwargs):
                keys.extend(item["Key"] for item in page.get("Contents", ()))
                dirs.extend(item["Prefix"] for item in page.get("CommonPrefixes", ()))
            return keys, dirs

        try:
            return await self._on_fs(pages)
        except Exception as err:
            raise map_s3_error(err, "list", self._where(prefix)) from err

    # -- deletes ------------------------------------------------------------------

    async def _delete_object(self, full: str) -> None:
        await self._s3("delete_object", Key=full)

    def _missing_bucket(self, err: BaseException) -> bool:
        return client_error_code(err) == "NoSuchBucket"

    async def delete_prefix(self, prefix: str) -> None:
        base = self._dir(prefix)
        keys, _ = await self._list_raw(base, None)
        batches = [keys[i : i + _DELETE_BATCH] for i in range(0, len(keys), _DELETE_BATCH)]
        limit = asyncio.Semaphore(_DELETE_CONCURRENCY)

        async def delete_batch(batch: list[str]) -> None:
            async with limit:
                try:
                    out = await self._s3(
                        "delete_objects",
                        Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                    )
                except Exception as err:
                    raise map_s3_error(err, "delete objects under", self._where(base)) from err
                errors = [e for e in out.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
                if errors:
                    first = errors[0]
                    raise BackendError(
                        f"Deleting {len(errors)} objects under {self._where(base)} failed, "
                        f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                    )

        await asyncio.gather(*(delete_batch(b) for b in batches))

    # -- TensorStore --------------------------------------------------------------

    def _endpoint(self) -> str | None:
        client_kwargs = self._options.get("client_kwargs") or {}
        return (
            self._options.get("endpoint_url")
            or client_kwargs.get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )

    def _region(self) -> str | None:
        client_kwargs = self._options.get("client_kwargs") or {}
        config_kwargs = self._options.get("config_kwargs") or {}
        return (
            client_kwargs.get("region_name")
            or config_kwargs.get("region_name")
            or self._options.get("region_name")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
        )

    def _tensorstore_credentials(self) -> dict[str, Any] | None:
        opts = self._options
        if opts.get("anon"):
            return {"type": "anonymous"}
        key = opts.get("key") or opts.get("username")
        secret = opts.get("secret") or opts.get("password")
        token = opts.get("token")
        if not (key and secret):
            if opts.get("profile"):
                return {"type": "profile", "profile": str(opts["profile"])}
            return None  # TensorStore's default chain, like botocore's
        env = os.environ
        if (
            env.get("AWS_ACCESS_KEY_ID") == key
            and env.get("AWS_SECRET_ACCESS_KEY") == secret
            and env.get("AWS_SESSION_TOKEN") == token
        ):
            return {"type": "environment"}
        return self._credentials_file(str(key), str(secret), token)

    def _credentials_file(self, key: str, secret: str, token: str | None) -> dict[str, Any]:
        if self._credentials_dir is None:
            # mkdtemp makes the directory 0700; the files inside are 0600.
            directory = tempfile.mkdtemp(prefix="partialstore-aws-")
            lines = [
                "[partialstore]",
                f"aws_access_key_id = {key}",
                f"aws_secret_access_key = {secret}",
            ]
            if token:
                lines.append(f"aws_session_token = {token}")
            for name, text in (("credentials", "\n".join(lines) + "\n"), ("config", "")):
                fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(text)
            self._credentials_dir = directory
            self._cleanup = weakref.finalize(self, shutil.rmtree, directory, True)
        return {
            "type": "profile",
            "profile": "partialstore",
            "credentials_file": os.path.join(self._credentials_dir, "credentials"),
            "config_file": os.path.join(self._credentials_dir, "config"),
        }

    def kvstore_spec(self, prefix: str) -> dict[str, Any] | None:
        """TensorStore ``s3`` kvstore for the bytes under ``prefix``.

        Example::

            ts.KvStore.open(backend.kvstore_spec("data/abc")).result()
        """
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
        credentials = self._tensorstore_credentials()
        if credentials is not None:
            spec["aws_credentials"] = credentials
        return spec

    async def _close_fs(self) -> None:
        fs = self._fs
        creator = getattr(fs, "_s3creator", None)
        if creator is not None and fs._s3 is not None:
            fs._s3 = None
            await self._on_fs(lambda: creator.__aexit__(None, None, None))

    async def close(self) -> None:
        await super().close()
        if self._cleanup is not None:
            self._cleanup()
