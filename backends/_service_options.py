"""The storage options each service backend knows, read from the installed s3fs / gcsfs.

A backend checks its options against these tables before it builds a
client (:func:`partialstore.backends._options.check_options`), so a typo
such as ``"endpont_url"`` or ``"endpoint"`` fails at once instead of being
swallowed by a constructor's ``**kwargs`` and leaving the backend talking to
the wrong place. The names come from the constructors' signatures, so a new
s3fs / gcsfs parameter is accepted without a change here; the types are
partialstore's, for the options that matter most.

Example:
    >>> from partialstore.backends._options import check_options
    >>> options = {"endpoint_url": "http://127.0.0.1:9000", "config_kwargs": {"retries": 3}}
    >>> check_options(options, s3_options(), owner="S3Backend", url="s3://b")
    >>> check_s3_nested(options, "s3://b")
    Traceback (most recent call last):
    partialstore.errors.InvalidInputError: storage option config_kwargs['retries'] for s3://b ...
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from partialstore.errors import InvalidInputError

from ._options import (
    FSSPEC_BASE,
    check_options,
    init_parameters,
    parameters,
)

__all__ = ["check_s3_nested", "fsspec_options", "gcs_options", "s3_options"]

Schema = dict[str, type | tuple[type, ...] | None]

# partialstore's own options on the object stores (see _options).
OURS: Schema = {"single_writer": bool, "deadline": (int, float), "retries": int}

_S3_TYPES: Schema = {
    "anon": bool,
    "endpoint_url": str,
    "key": str,
    "secret": str,
    "token": str,
    "username": str,
    "password": str,
    "profile": str,
    "use_ssl": bool,
    "client_kwargs": dict,
    "config_kwargs": dict,
    "s3_additional_kwargs": dict,
    "session_vars": dict,
    "requester_pays": bool,
    "version_aware": bool,
    "cache_regions": bool,
    "max_concurrency": int,
    "default_block_size": int,
    "fixed_upload_size": bool,
}

_GCS_TYPES: Schema = {
    "project": str,
    "access": str,
    "endpoint_url": str,
    "requester_pays": (bool, str),
    "session_kwargs": dict,
    "timeout": (int, float),
    "version_aware": bool,
    "consistency": str,
    "default_location": str,
    "block_size": int,
}


def _schema(names: set[str], types: Schema) -> Schema:
    schema: Schema = dict.fromkeys(names)
    schema.update({name: kind for name, kind in types.items() if name in names})
    schema.update(FSSPEC_BASE)
    schema.update(OURS)
    return schema


@functools.cache
def s3_options() -> Schema:
    """Every storage option the S3 backend accepts, with its type where checked.

    Example:
        >>> "endpoint_url" in s3_options()
        True
    """
    import aiobotocore.session
    import s3fs

    names = init_parameters(s3fs.S3FileSystem, stop=s3fs.S3FileSystem.__mro__[1])
    # s3fs passes its other keyword arguments to aiobotocore's AioSession.
    names |= init_parameters(aiobotocore.session.AioSession)
    names -= {"loop"}  # a backend runs s3fs on fsspec's own loop thread
    return _schema(names, _S3_TYPES)


@functools.cache
def gcs_options() -> Schema:
    """Every storage option the GCS backend accepts, with its type where checked.

    Example:
        >>> "token" in gcs_options()
        True
    """
    from gcsfs.core import GCSFileSystem

    names = init_parameters(GCSFileSystem) - {"loop"}
    return _schema(names, _GCS_TYPES)


@functools.cache
def _client_kwargs() -> Schema:
    import botocore.session

    names = parameters(botocore.session.Session.create_client)
    names -= {"self", "service_name", "config"}  # s3fs passes its own config (config_kwargs)
    schema: Schema = dict.fromkeys(names, str)
    schema.update({"use_ssl": bool, "verify": (bool, str)})
    return schema


@functools.cache
def _config_kwargs() -> Schema:
    import botocore.config
    from aiobotocore.config import AioConfig

    names = set(botocore.config.Config.OPTION_DEFAULTS) | init_parameters(AioConfig)
    schema: Schema = dict.fromkeys(names)
    schema.update({"connect_timeout": (int, float), "read_timeout": (int, float)})
    return schema


def check_s3_nested(options: Mapping[str, Any], url: str) -> None:
    """Check the keys inside s3fs's ``client_kwargs`` and ``config_kwargs``.

    ``config_kwargs["retries"]`` is refused: the backend retries itself
    (storage options ``retries`` / ``deadline``), and botocore's retries
    would multiply with its own.

    Example:
        >>> check_s3_nested({"client_kwargs": {"region_name": "eu-west-1"}}, "s3://b")
    """
    for outer, schema in (("client_kwargs", _client_kwargs()), ("config_kwargs", _config_kwargs())):
        inner = options.get(outer) or {}
        if "retries" in inner and outer == "config_kwargs":
            raise InvalidInputError(
                f"storage option config_kwargs['retries'] for {url} is not used: partialstore "
                "retries S3 requests itself (one layer, with backoff and a deadline). Use the "
                "storage options 'retries' and 'deadline' instead."
            )
        check_options(inner, schema, owner=f"S3Backend's {outer}", url=url)


def fsspec_options(cls: type, *, strict: bool) -> Schema:
    """Storage options of fsspec filesystem class ``cls``, plus ``single_writer``.

    Example:
        >>> from fsspec.implementations.local import LocalFileSystem
        >>> fsspec_options(LocalFileSystem, strict=True)
        {'auto_mkdir': None, ...}
    """
    from fsspec.spec import AbstractFileSystem

    schema: Schema = dict.fromkeys(init_parameters(cls, stop=AbstractFileSystem) - {"loop"})
    schema.update(FSSPEC_BASE)
    schema["single_writer"] = bool
    if not strict:
        schema["asynchronous"] = bool
    return schema
