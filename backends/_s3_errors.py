"""How S3 failures (botocore, s3fs, aiohttp) map onto partialstore's error tree.

s3fs turns a botocore ``ClientError`` into a built-in ``OSError`` and keeps
the original as ``__cause__``; the S3 error code ("NoSuchKey",
"PreconditionFailed", "SlowDown", ...) is read from there, so the mapping
does not depend on s3fs's own translation table.

Example:
    >>> from botocore.exceptions import ClientError
    >>> err = ClientError({"Error": {"Code": "NoSuchKey", "Message": "no such key"},
    ...                    "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetObject")
    >>> map_s3_error(err, "read", "s3://bucket/key")  # a caller raises it ``from err``
    NotFoundError('Cannot read s3://bucket/key: no such object.')
"""

from __future__ import annotations

from typing import Any

from partialstore.errors import (
    AlreadyExistsError,
    BackendError,
    ConflictError,
    NotFoundError,
    TransientBackendError,
)

from ._retry import Kind, http_kind

__all__ = ["client_error_code", "http_status", "map_s3_error", "retry_kind"]

# Error codes that mean "try again later" (throttling, server trouble).
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ConditionalRequestConflict",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchBucket"})
# Codes of a request S3 declined without applying it: retrying is safe.
_REJECTED_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ServiceUnavailable",
        "ConditionalRequestConflict",
    }
)
_AMBIGUOUS_CODES = frozenset({"InternalError", "RequestTimeout", "RequestTimeoutException"})


def _client_error(err: BaseException) -> Any:
    """The botocore ``ClientError`` behind ``err`` (s3fs wraps it as ``__cause__``)."""
    from botocore.exceptions import ClientError

    seen: BaseException | None = err
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ClientError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def client_error_code(err: BaseException) -> str | None:
    """The S3 error code (``"NoSuchKey"``, ``"PreconditionFailed"``, ...) behind ``err``.

    Falls back to the HTTP status as a string when the response had no body
    (HEAD requests), and to ``None`` when no S3 response is involved.
    """
    client_error = _client_error(err)
    if client_error is None:
        return None
    response = getattr(client_error, "response", None) or {}
    code = (response.get("Error") or {}).get("Code")
    if code:
        return str(code)
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return str(status) if status else None


def http_status(err: BaseException) -> int | None:
    """The HTTP status of the S3 response behind ``err``, or None.

    Example:
        >>> from botocore.exceptions import ClientError
        >>> slow_down_error = ClientError(
        ...     {"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
        ...      "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
        >>> http_status(slow_down_error)
        503
    """
    client_error = _client_error(err)
    if client_error is None:
        return None
    response = getattr(client_error, "response", None) or {}
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return int(status) if status else None


def retry_kind(err: BaseException) -> Kind | None:
    """What S3's answer behind ``err`` means for a retry, or None when S3 did not answer.

    Example:
        >>> from botocore.exceptions import ClientError
        >>> slow_down_error = ClientError(
        ...     {"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
        ...      "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
        >>> retry_kind(slow_down_error)
        <Kind.REJECTED: 'rejected'>
    """
    code = client_error_code(err)
    if code in _REJECTED_CODES:
        return Kind.REJECTED
    if code in _AMBIGUOUS_CODES:
        return Kind.AMBIGUOUS
    return http_kind(http_status(err))


def map_s3_error(
    err: BaseException, action: str, where: str, endpoint: str = "AWS S3"
) -> Exception:
    """Translate an s3fs/botocore/aiohttp failure of ``action`` on ``where`` into our tree.

    ``endpoint`` names the service in messages that need it (missing
    bucket, missing credentials).

    See the module docstring for an example.
    """
    import aiohttp
    from botocore.exceptions import BotoCoreError, NoCredentialsError, PartialCredentialsError

    if isinstance(err, (NotFoundError, AlreadyExistsError, ConflictError, BackendError)):
        return err
    code = client_error_code(err)
    status = http_status(err)
    detail = f"{type(err).__name__}: {err}"
    if code == "NoSuchBucket":
        return NotFoundError(
            f"Cannot {action} {where}: the bucket does not exist at {endpoint}. Create it, or "
            f"check the bucket name in the URL ({detail})."
        )
    if code in _NOT_FOUND_CODES or (code is None and isinstance(err, FileNotFoundError)):
        return NotFoundError(f"Cannot {action} {where}: no such object.")
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return BackendError(
            f"Cannot {action} {where} at {endpoint}: no AWS credentials found (looked in "
            "storage_options, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and the "
            "shared credentials/config files, container and instance metadata). Pass 'key' and "
            "'secret' in storage_options, set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or use "
            f"'anon': True for a public bucket ({detail})."
        )
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return BackendError(
            f"Cannot {action} {where} at {endpoint}: access denied; check the credentials and "
            f"the bucket's permissions ({detail})."
        )
    if (
        code in _TRANSIENT_CODES
        or (status is not None and (status >= 500 or status == 429))
        or isinstance(err, (TimeoutError, aiohttp.ClientError, ConnectionError))
        or (code is None and isinstance(err, BotoCoreError))
    ):
        return TransientBackendError(
            f"{action.capitalize()} {where} failed; retrying may help ({detail})."
        )
    return BackendError(f"{action.capitalize()} {where} failed ({detail}).")
