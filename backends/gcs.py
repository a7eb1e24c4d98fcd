"""Google Cloud Storage backend (``gs://bucket/prefix``, ``gcs://``) through gcsfs.

Every operation is one or a few GCS JSON-API requests issued through gcsfs's
aiohttp session, forwarded to gcsfs's loop thread
(:mod:`partialstore.backends._fsspec_async`), so methods may be awaited from
any event loop. Backends opened with equal options share one filesystem
(``skip_instance_cache=True``, pooled by :mod:`partialstore.backends._bucket`),
which never consults fsspec's listing cache.

The backend uses the plain ``gcsfs.core.GCSFileSystem`` class on purpose:
``gcsfs.GCSFileSystem`` is, by default, an experimental subclass that asks
every bucket for its type over gRPC before uploads; against an emulator (and
anywhere gRPC is blocked) each such call stalls for about 60 s. Zonal
("Rapid") buckets, which need that gRPC path, are therefore not supported;
standard and hierarchical-namespace buckets are.

How the contract maps onto GCS:

- ``create``: one multipart upload request with ``ifGenerationMatch=0``,
  whatever the size (creates are small records; a single request keeps the
  precondition and the bytes together, and fake-gcs-server ignores
  preconditions on resumable uploads); HTTP 412 -> :class:`AlreadyExistsError`.
  GCS decides the precondition atomically.
- ``write``: a plain upload, the same single multipart request without a
  precondition (objects are replaced atomically).
  ``write(..., if_version=generation)`` uploads with
  ``ifGenerationMatch=<generation>``; 412 or 404 -> :class:`ConflictError`.
  ``read_versioned`` returns the generation that was read.
- ``list``: ``objects.list`` by prefix (strongly consistent); names ending in
  ``/`` (folder placeholders) are dropped. ``list_children`` uses the ``/``
  delimiter.
- ``delete_prefix``: list, then batched deletes (JSON batch API on
  storage.googleapis.com; emulators have no batch API, so one DELETE each).
- ``rename``: not offered (``atomic_rename=False``): GCS renames copy bytes.

Storage options are gcsfs's (``project``, ``token``, ``endpoint_url``,
``requester_pays``, ...) plus partialstore's ``single_writer`` (kept as
:attr:`GCSBackend.single_writer`), ``deadline`` and ``retries``; unknown
options and wrong value types are refused (:mod:`._service_options`). An
emulator is reached with ``{"endpoint_url": "http://127.0.0.1:4443",
"token": "anon"}`` or the ``STORAGE_EMULATOR_HOST`` environment variable.

TensorStore (:meth:`GCSBackend.kvstore_spec`) reaches the bytes with its
``gcs`` driver, whose spec has no endpoint member: TensorStore only reaches a
non-Google endpoint through the environment variable
``TENSORSTORE_GCS_HTTP_URL`` (read whenever a kvstore is opened), and skips
the credential lookup when ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` is set. So with a
custom endpoint, ``kvstore_spec`` returns a spec only if
``TENSORSTORE_GCS_HTTP_URL`` names that same endpoint; otherwise it returns
``None`` (array bytes then go through ``read``/``write``) and logs once how to
enable TensorStore. Against real GCS, TensorStore uses Google's default
credentials.

Failures: every call is retried in one place, under the storage options
``deadline`` (seconds, default 90) and ``retries`` (default 10), see
:mod:`partialstore.backends._retry`. Each request is sent once by gcsfs (its
``retry_request`` loop, six attempts with up to 32 s sleeps, is bypassed),
with aiohttp timeouts for connecting and for a stalled response unless the
``requests_timeout`` option says otherwise; TensorStore's arrays get a
``gcs_request_retries`` schedule that fits in the deadline
(:meth:`GCSBackend.tensorstore_context`).

Example:
    >>> from partialstore import registry
    >>> from partialstore._runtime.aio import run
    >>> backend = registry.open_backend(
    ...     "gs://bucket/ckpts", {"endpoint_url": "http://127.0.0.1:4443", "token": "anon"}
    ... )
    >>> type(backend).__name__, backend.bucket, backend.root  # nothing sent yet
    ('GCSBackend', 'bucket', 'ckpts')
    >>> backend.tensorstore_context()["gcs_request_retries"]["max_retries"]  # storage option
    10
    >>> run(backend.close())
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from partialstore.errors import (
    AlreadyExistsError,
    BackendError,
    ConflictError,
)

from ._bucket import BucketBackend
from ._gcs_errors import map_gcs_error, retry_kind, status_of
from ._retry import Attempt, Kind
from ._service_options import gcs_options

__all__ = ["GCSBackend", "map_gcs_error"]

logger = logging.getLogger(__name__)

_GOOGLE_HOSTS = ("https://storage.googleapis.com", "https://www.googleapis.com")
_DELETE_BATCH = 100  # the JSON batch API's limit
_DELETE_CONCURRENCY = 16
_LIST_PAGE = 1000
_warned_endpoints: set[tuple[str | None, str | None]] = set()
# aiohttp limits for one request unless the user sets requests_timeout: the
# connection, and silence while waiting for data. No total limit: a large
# upload that keeps moving is not cut off (the call's deadline still is).
_CONNECT_TIMEOUT = 5.0
_STALL_TIMEOUT = 30.0


def _normalize_endpoint(url: str | None) -> str | None:
    if not url or url == "default":
        return None
    url = url.rstrip("/")
    return url if url.startswith(("http://", "https://")) else f"http://{url}"


class GCSBackend(BucketBackend):
    """Backend over one GCS bucket and prefix.

    Args:
      url: ``gs://bucket[/prefix]`` (``gcs://`` accepted).
      storage_options: gcsfs options (``project``, ``token``,
        ``endpoint_url``, ...) plus ``single_writer``.

    The module docstring has an example; every call then talks to the
    bucket, e.g. ``await backend.create("log/00000001.json", b"{}")``.
    """

    _schemes = ("gs", "gcs")
    _url_scheme = "gs"
    _url_form = "a gs://bucket[/prefix]"
    _service = "GCS"
    _bad_option_errors = (TypeError, ValueError)

    # -- plumbing -----------------------------------------------------------------

    def _known_options(self) -> Mapping[str, Any]:
        return gcs_options()

    def _make_fs(self, options: dict[str, Any]) -> Any:
        # The plain class, not gcsfs.GCSFileSystem: see the module docstring.
        import aiohttp
        from gcsfs.core import GCSFileSystem

        if options.get("requests_timeout") is None:
            stall = aiohttp.ClientTimeout(
                total=None, sock_connect=_CONNECT_TIMEOUT, sock_read=_STALL_TIMEOUT
            )
            options = {**options, "requests_timeout": stall}
        return GCSFileSystem(skip_instance_cache=True, **options)

    def _map_error(self, err: BaseException, action: str, where: str) -> Exception:
        return map_gcs_error(err, action, where, self._endpoint_label())

    def _endpoint_label(self) -> str:
        fs = getattr(self, "_fs", None)  # None while the filesystem is being built
        return str(fs._location) if fs is not None else self._endpoint() or _GOOGLE_HOSTS[0]

    def _unreachable_hint(self) -> str:
        return (
            "storage_options['endpoint_url'] (or STORAGE_EMULATOR_HOST) and that the service "
            "is running there"
        )

    def _service_kind(self, err: BaseException) -> Kind | None:
        return retry_kind(err)

    async def _bucket_exists(self) -> bool:
        try:
            await self._call("GET", "b/{}", self.bucket, json_out=True)
        except FileNotFoundError:
            return False
        return True

    async def _call(
        self, method: str, path: str, *args: str, json_out: bool = False, **kwargs: Any
    ) -> Any:
        """One gcsfs request, sent once: the backend's loop is the only retry layer."""
        fs = self._fs
        # gcsfs decorates _request with its own retry loop; __wrapped__ is the bare request.
        request = getattr(type(fs)._request, "__wrapped__", None)
        if request is None:  # pragma: no cover - a gcsfs without it keeps its own retries
            return await self._on_fs(
                lambda: fs._call(method, path, *args, json_out=json_out, **kwargs)
            )
        _, headers, _, contents = await self._on_fs(
            lambda: request(fs, method, path, *args, **kwargs)
        )
        return json.loads(contents) if json_out else (headers, contents)

    # -- writes -------------------------------------------------------------------

    async def create(self, key: str, data: bytes) -> None:
        full = self._key(key)

        async def attempt(state: Attempt) -> None:
            try:
                # One request carries body and precondition, whatever the size: see _upload.
                await self._upload(full, data, ifGenerationMatch="0")
            except Exception as err:
                if isinstance(err, FileExistsError) or status_of(err) == 412:
                    raise AlreadyExistsError(
                        f"Cannot create {self._where(full)}: the object already exists "
                        "(ifGenerationMatch=0 failed)."
                    ) from err
                raise

        await self._bounded("create", self._where(full), attempt, mutating=True)

    async def _put(self, full: str, data: bytes) -> None:
        # Not gcsfs's _pipe_file: its requests carry gcsfs's own retry loop.
        await self._upload(full, data)

    async def _write_if(self, full: str, data: bytes, if_version: str) -> None:
        if not str(if_version).isdigit():
            raise ConflictError(
                f"Conditional write of {self._where(full)}: {if_version!r} is not a GCS "
                "generation (use the version returned by read_versioned)."
            )
        try:
            await self._upload(full, data, ifGenerationMatch=str(if_version))
        except Exception as err:
            if isinstance(err, (FileExistsError, FileNotFoundError)) or status_of(err) in (
                412,
                404,
            ):
                raise ConflictError(
                    f"Conditional write of {self._where(full)} failed: its generation is no "
                    f"longer {if_version} (another writer changed or deleted it)."
                ) from err
            raise

    async def _upload(self, full: str, data: bytes, **params: str) -> dict[str, Any]:
        """One multipart (metadata + media) upload request with query ``params``.

        Every write goes through this single request, never through gcsfs's
        uploads (which retry on their own, and take the resumable path from
        50 MiB): a precondition and the bytes then travel and succeed or fail
        together, and fake-gcs-server, which ignores preconditions on
        resumable uploads, is held to the same rule as GCS. gcsfs's own
        uploads also only know ``ifGenerationMatch=0``, while compare-and-swap
        needs any generation.
        """
        from urllib.parse import quote

        fs = self._fs
        boundary = "==partialstore-boundary=="
        head = (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps({'name': full})}\r\n"
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        body = head + bytes(data) + f"\r\n--{boundary}--".encode()
        url = f"{fs._location}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o"
        uploaded: dict[str, Any] = await self._call(
            "POST",
            url,
            uploadType="multipart",
            headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
            data=body,
            json_out=True,
            **params,
        )
        return uploaded

    # -- reads --------------------------------------------------------------------

    async def _get(self, full: str, range_header: str | None, generation: str | None) -> bytes:
        fs = self._fs
        url = fs.url(f"{self.bucket}/{full}", generation=generation)
        headers = {"Range": range_header} if range_header else {}
        _, data = await self._call("GET", url, headers=headers)
        return bytes(data)

    async def _get_range(self, full: str, range_header: str | None) -> bytes:
        return await self._get(full, range_header, None)

    def _range_not_satisfiable(self, err: BaseException) -> bool:
        return status_of(err) == 416

    async def _read_versioned(self, full: str) -> tuple[bytes, str]:
        meta = await self._call("GET", "b/{}/o/{}", self.bucket, full, json_out=True)
        generation = str(meta["generation"])
        # Read exactly that generation, so data and version always agree.
        return await self._get(full, None, generation), generation

    async def _head(self, full: str) -> None:
        await self._call("GET", "b/{}/o/{}", self.bucket, full, fields="name")

    async def _list_raw(
        self, prefix: str, delimiter: str | None, start_after: str | None = None
    ) -> tuple[list[str], list[str]]:
        names: list[str] = []
        dirs: list[str] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"prefix": prefix, "maxResults": _LIST_PAGE}
            if delimiter:
                params["delimiter"] = delimiter
            if start_after is not None:
                # startOffset is inclusive: the bound itself is dropped below.
                params["startOffset"] = start_after
            if token:
                params["pageToken"] = token
            page = await self._call("GET", "b/{}/o", self.bucket, json_out=True, **params)
            names.extend(
                item["name"]
                for item in page.get("items", ())
                if start_after is None or item["name"] > start_after
            )
            dirs.extend(page.get("prefixes", ()))
            token = page.get("nextPageToken")
            if not token:
                return names, dirs

    # -- deletes ------------------------------------------------------------------

    async def _delete_object(self, full: str) -> None:
        await self._call("DELETE", "b/{}/o/{}", self.bucket, full)

    async def delete_prefix(self, prefix: str) -> None:
        base = self._dir(prefix)
        names, _ = await self._bounded_list(base, None)
        if not names:
            return
        fs = self._fs
        if fs.on_google:
            paths = [f"{self.bucket}/{n}" for n in names]
            batches = [paths[i : i + _DELETE_BATCH] for i in range(0, len(paths), _DELETE_BATCH)]

            def remove(batch: list[str]) -> Callable[[Attempt], Awaitable[Any]]:
                # One closure per batch (a lambda in the loop would see only the last).
                return lambda state: self._on_fs(lambda: fs._rm_files(batch))

            results = await asyncio.gather(
                *(
                    self._bounded(
                        "delete objects under", self._where(base), remove(b), mutating=True
                    )
                    for b in batches
                )
            )
            failures = [
                r
                for out in results
                for r in out
                if isinstance(r, Exception) and "404" not in str(r) and "No such" not in str(r)
            ]
            if failures:
                raise BackendError(
                    f"Deleting {len(failures)} objects under {self._where(base)} failed, "
                    f"e.g. {failures[0]}"
                )
            return
        # Emulators have no batch endpoint: one DELETE per object, bounded.
        limit = asyncio.Semaphore(_DELETE_CONCURRENCY)

        async def delete_one(name: str) -> None:
            async with limit:
                await self.delete(self._relative(name))

        await asyncio.gather(*(delete_one(n) for n in names))

    # -- TensorStore --------------------------------------------------------------

    def _endpoint(self) -> str | None:
        """The custom endpoint gcsfs talks to, or ``None`` for Google's."""
        endpoint = _normalize_endpoint(
            self._options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
        )
        if endpoint is None or endpoint.startswith(_GOOGLE_HOSTS):
            return None
        return endpoint

    def kvstore_spec(self, prefix: str) -> dict[str, Any] | None:
        """TensorStore ``gcs`` kvstore for the bytes under ``prefix``, or ``None``.

        ``None`` when gcsfs talks to a custom endpoint that TensorStore would
        not reach (``TENSORSTORE_GCS_HTTP_URL`` unset or different).

        What it returns depends on the environment (``TENSORSTORE_GCS_HTTP_URL``),
        so it has no doctest; the backend's tests cover both answers.
        """
        spec: dict[str, Any] = {"driver": "gcs", "bucket": self.bucket, "path": self._dir(prefix)}
        ours = self._endpoint()
        theirs = _normalize_endpoint(os.environ.get("TENSORSTORE_GCS_HTTP_URL"))
        if theirs is not None and theirs.startswith(_GOOGLE_HOSTS):
            theirs = None
        anonymous_emulator = (
            ours is not None
            and self._options.get("token") == "anon"
            and not os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING")
        )
        if ours == theirs and not anonymous_emulator:
            if self._options.get("requester_pays"):
                project = self._options.get("requester_pays")
                if not isinstance(project, str):
                    project = self._options.get("project") or self._fs.project
                spec["gcs_user_project"] = {"project_id": project}
            return spec
        if (ours, theirs) not in _warned_endpoints:
            _warned_endpoints.add((ours, theirs))
            logger.warning(
                "TensorStore cannot reach %s for %s (TENSORSTORE_GCS_HTTP_URL=%s, or no "
                "GOOGLE_AUTH_TOKEN_FOR_TESTING for anonymous access); array bytes "
                "will go through gcsfs instead. Set TENSORSTORE_GCS_HTTP_URL=%s (and "
                "GOOGLE_AUTH_TOKEN_FOR_TESTING for an emulator) to use TensorStore.",
                ours or "storage.googleapis.com",
                self.url,
                theirs or "<unset>",
                ours or "<unset>",
            )
        return None

    def tensorstore_context(self) -> dict[str, Any] | None:
        """TensorStore's own retries for this backend's arrays, fitted to ``deadline``.

        See the module docstring for an example.
        """
        return {"gcs_request_retries": self._policy.tensorstore_retries()}

    async def _close_fs(self) -> None:
        fs = self._fs
        session = getattr(fs, "_session", None)
        if session is not None and not session.closed:
            await self._on_fs(session.close)
