"""Checking ``storage_options`` before any backend uses them.

Every backend refuses, at once and with :class:`InvalidInputError`, a key
it does not know (suggesting the closest known one: ``"endpont_url"`` ->
did you mean ``'endpoint_url'``?) and a value of the wrong type
(``single_writer="yes"``). Options partialstore reads itself:

- ``single_writer`` (bool, every backend, default False): the user's promise
  that one writer uses the store. Backends with an atomic create keep it
  only for uniformity; :class:`~partialstore.backends.fsspec.FsspecBackend`
  relies on it to create without one.
- ``deadline`` (seconds, S3 and GCS, default 90): how long one backend call
  may take, retries included; then it fails (an attempt still running is
  cut off, so raise it where one object takes longer than that to move).
- ``retries`` (int >= 0, S3 and GCS, default 10): how many times one
  backend call retries a transient failure (see
  :mod:`partialstore.backends._retry`).

The S3 and GCS backends also know every option s3fs / gcsfs take (their
constructors' parameters, read from the installed versions), and the keys
of s3fs's ``client_kwargs`` and ``config_kwargs``.

Example:
    >>> options = {"single_writer": True, "endpoint_url": "http://127.0.0.1:9000"}
    >>> pop_single_writer(options)
    True
    >>> reject_options(options, "MemoryBackend", "memory://x")
    Traceback (most recent call last):
    partialstore.errors.InvalidInputError: ...endpoint_url...
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

from partialstore.errors import InvalidInputError

from ._retry import DEFAULT_DEADLINE, DEFAULT_RETRIES, RetryPolicy

__all__ = [
    "check_options",
    "init_parameters",
    "parameters",
    "pop_retry_policy",
    "pop_single_writer",
    "reject_options",
    "suggest",
]

# fsspec's own options, accepted by every fsspec filesystem (DirCache, instance cache).
FSSPEC_BASE: dict[str, type | tuple[type, ...]] = {
    "use_listings_cache": bool,
    "listings_expiry_time": (int, float),
    "max_paths": int,
    "skip_instance_cache": bool,
}


def suggest(name: str, known: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the known name closest to ``name``, or ``""``.

    Example:
        >>> suggest("endpont_url", ["endpoint_url", "key"])
        " Did you mean 'endpoint_url'?"
    """
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def pop_single_writer(options: dict[str, Any]) -> bool:
    """Remove ``single_writer`` from ``options`` (a private copy) and return it.

    Raises:
      InvalidInputError: the value is not a bool (``"false"`` would be truthy).

    Example:
        >>> options = {"single_writer": True}
        >>> pop_single_writer(options), options
        (True, {})
    """
    single_writer = options.pop("single_writer", False)
    if not isinstance(single_writer, bool):
        raise InvalidInputError(
            f"storage option single_writer must be a bool, got {single_writer!r}."
        )
    return single_writer


def pop_retry_policy(options: dict[str, Any], url: str) -> RetryPolicy:
    """Remove ``deadline`` and ``retries`` from ``options`` and return their policy.

    Raises:
      InvalidInputError: ``deadline`` is not a positive number of seconds, or
        ``retries`` not an int >= 0.

    Example:
        >>> pop_retry_policy({"deadline": 5, "retries": 2}, "s3://b")
        RetryPolicy(deadline=5.0, retries=2, base_delay=0.25, max_delay=16.0)
    """
    deadline = options.pop("deadline", DEFAULT_DEADLINE)
    retries = options.pop("retries", DEFAULT_RETRIES)
    number = isinstance(deadline, int | float) and not isinstance(deadline, bool)
    if not number or not math.isfinite(deadline) or deadline <= 0:
        raise InvalidInputError(
            f"storage option deadline for {url} must be a positive number of seconds, "
            f"got {deadline!r}."
        )
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise InvalidInputError(
            f"storage option retries for {url} must be an int >= 0, got {retries!r}."
        )
    return RetryPolicy(deadline=float(deadline), retries=retries)


def reject_options(options: Mapping[str, Any], owner: str, url: str) -> None:
    """Raise if ``options`` (what is left after ``single_writer``) is not empty.

    Example:
        >>> reject_options({}, "LocalBackend", "/tmp/ckpts")  # nothing left over: no error
    """
    for name in sorted(options):
        raise InvalidInputError(
            f"{owner} takes no storage options besides single_writer, got {name!r} for "
            f"{url!r}.{suggest(name, ['single_writer'])}"
        )


def init_parameters(cls: type, *, stop: type = object) -> set[str]:
    """Named parameters of ``__init__`` along ``cls``'s MRO (up to ``stop``).

    Example:
        >>> from fsspec.implementations.local import LocalFileSystem
        >>> "auto_mkdir" in init_parameters(LocalFileSystem)
        True
    """
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is stop or klass is object:
            break
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= parameters(init) - {"self"}
    return names


def parameters(function: Any) -> set[str]:
    """Names of ``function``'s named parameters (not ``*args`` / ``**kwargs``).

    Example:
        >>> sorted(parameters(lambda a, *b, c=1, **d: None))
        ['a', 'c']
    """
    found = inspect.signature(function).parameters.values()
    return {p.name for p in found if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _type_names(expected: type | tuple[type, ...]) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(kind.__name__ for kind in kinds)


def check_options(
    options: Mapping[str, Any],
    known: Mapping[str, type | tuple[type, ...] | None],
    *,
    owner: str,
    url: str,
    open_ended: bool = False,
) -> None:
    """Refuse unknown keys and values of the wrong type in ``options``.

    ``known`` maps each accepted key to its type(s), or None for any value;
    ``None`` values are always accepted (they mean "the default"). With
    ``open_ended`` (a filesystem that forwards unknown keys elsewhere) only
    keys very close to a known one are refused, as likely typos.

    Example:
        >>> check_options({"endpont_url": "x"}, {"endpoint_url": str}, owner="S3Backend",
        ...               url="s3://b")
        Traceback (most recent call last):
        partialstore.errors.InvalidInputError: ... Did you mean 'endpoint_url'?...
    """
    for name, value in options.items():
        if not isinstance(name, str):
            raise InvalidInputError(f"storage_options keys must be str, got {name!r} for {url}.")
        if name not in known:
            hint = suggest(name, known)
            strict_miss = not open_ended
            typo = open_ended and difflib.get_close_matches(name, list(known), n=1, cutoff=0.8)
            if strict_miss or typo:
                raise InvalidInputError(
                    f"{owner} does not know storage option {name!r} (for {url}).{hint} "
                    f"Known options: {', '.join(sorted(known))}."
                )
            continue
        expected = known[name]
        if expected is None or value is None:
            continue
        bad_bool = isinstance(value, bool) and bool not in _as_tuple(expected)
        if bad_bool or not isinstance(value, expected):
            raise InvalidInputError(
                f"storage option {name!r} for {url} must be {_type_names(expected)}, "
                f"got {type(value).__name__} {value!r}."
            )


def _as_tuple(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)
