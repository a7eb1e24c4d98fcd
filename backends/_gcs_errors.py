"""How GCS failures (gcsfs, aiohttp, google-auth) map onto partialstore's error tree.

gcsfs raises ``FileNotFoundError`` for 404, ``FileExistsError`` for 412,
``OSError("Forbidden")`` for 403, ``requests.exceptions.ProxyError`` for 502
and its own ``HttpError`` (with ``code``) for the rest; aiohttp and
google-auth errors pass through. :func:`map_gcs_error` turns them into
partialstore's errors, and :func:`retry_kind` tells the retry loop what an
answer means.

Example:
    >>> from gcsfs.retry import HttpError
    >>> err = HttpError({"code": 404, "message": "No such object"})
    >>> map_gcs_error(err, "read", "gs://bucket/key")  # a caller raises it ``from err``
    NotFoundError('Cannot read gs://bucket/key: no such object or bucket.')
"""

from __future__ import annotations

import logging

from partialstore.errors import (
    AlreadyExistsError,
    BackendError,
    ConflictError,
    NotFoundError,
    TransientBackendError,
)

from ._retry import Kind, causes, http_kind

__all__ = ["map_gcs_error", "retry_kind", "status_of"]


class _DropRangeNotSatisfiable(logging.Filter):
    """Drop gcsfs's ERROR log (with traceback) for an HTTP 416.

    ``read(key, start=size)`` asks GCS for a range past the end; GCS answers
    416, which this backend turns into ``b""`` like a Python slice. gcsfs
    logs every non-retriable HTTP error before raising it, so without this
    filter an ordinary empty read would print a traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and status_of(error) == 416)


logging.getLogger("gcsfs").addFilter(_DropRangeNotSatisfiable())


def status_of(err: BaseException) -> int | None:
    """The HTTP status gcsfs or aiohttp attached to ``err``, or None.

    Example:
        >>> from gcsfs.retry import HttpError
        >>> status_of(HttpError({"code": 429, "message": "rate"}))
        429
    """
    code = getattr(err, "code", None)
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.isdigit():
        return int(code)
    status = getattr(err, "status", None)
    return status if isinstance(status, int) else None


def map_gcs_error(
    err: BaseException, action: str, where: str, endpoint: str = "storage.googleapis.com"
) -> Exception:
    """Translate a gcsfs/aiohttp/google-auth failure of ``action`` on ``where``.

    ``endpoint`` names the service in messages that need it.

    See the module docstring for an example.
    """
    import aiohttp
    import google.auth.exceptions

    if isinstance(err, (NotFoundError, AlreadyExistsError, ConflictError, BackendError)):
        return err
    status = status_of(err)
    detail = f"{type(err).__name__}: {str(err)[:300]}"
    if isinstance(err, FileNotFoundError) or status == 404:
        if action in ("list", "create", "write"):
            # Listings and uploads only answer 404 for a missing bucket.
            return NotFoundError(
                f"Cannot {action} {where}: the bucket does not exist at {endpoint}. Create it, "
                "or check the bucket name in the URL."
            )
        return NotFoundError(f"Cannot {action} {where}: no such object or bucket.")
    if isinstance(err, google.auth.exceptions.DefaultCredentialsError):
        return BackendError(
            f"Cannot {action} {where} at {endpoint}: no Google credentials found. Set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account file, run `gcloud auth "
            "application-default login`, or pass 'token' in storage_options (a service-account "
            f"file, or 'anon' for a public bucket) ({detail})."
        )
    if isinstance(err, FileExistsError) or status == 412:
        return AlreadyExistsError(f"Cannot {action} {where}: a precondition failed (412).")
    transient_types: tuple[type[BaseException], ...] = (
        TimeoutError,
        aiohttp.ClientError,
        ConnectionError,
    )
    try:
        import requests

        transient_types += (requests.exceptions.RequestException,)
    except ImportError:  # pragma: no cover - gcsfs depends on requests
        pass
    if isinstance(err, transient_types) or (
        status is not None and (status >= 500 or status in (408, 429))
    ):
        return TransientBackendError(
            f"{action.capitalize()} {where} failed; retrying may help ({detail})."
        )
    if status in (401, 403) or "Forbidden" in str(err):
        return BackendError(
            f"Cannot {action} {where} at {endpoint}: access denied; check the credentials "
            f"and the bucket's permissions ({detail})."
        )
    return BackendError(f"{action.capitalize()} {where} failed ({detail}).")


def retry_kind(err: BaseException) -> Kind | None:
    """What GCS's answer behind ``err`` means for a retry, or None when GCS did not answer.

    Example:
        >>> from gcsfs.retry import HttpError
        >>> retry_kind(HttpError({"code": 503}))
        <Kind.REJECTED: 'rejected'>
    """
    import aiohttp
    import requests
    from gcsfs.retry import HttpError

    for cause in causes(err):
        if isinstance(cause, HttpError | aiohttp.ClientResponseError):
            return http_kind(status_of(cause))
        if isinstance(cause, requests.exceptions.ProxyError):
            return Kind.AMBIGUOUS  # how gcsfs reports an HTTP 502
    return None
