"""Maps URL schemes to backend classes, so the core never imports a backend by name.

Built-in backends live in ``partialstore.backends`` and are named here by
module path only; they are imported on first use. Third-party backends
register with :func:`register_backend` or the ``partialstore.backends``
entry-point group (value ``"module:Class"``).

A backend factory is called as ``factory(url, storage_options)`` and returns
a :class:`~partialstore.backend.Backend` rooted at ``url``.

Example:
    >>> from partialstore import registry
    >>> backend = registry.open_backend("memory://ckpts")
    >>> type(backend).__name__
    'MemoryBackend'
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Mapping
from importlib import metadata as importlib_metadata
from typing import Any

from partialstore.backend import Backend
from partialstore.errors import InvalidInputError

__all__ = ["builtin_target", "open_backend", "register_backend", "scheme_of"]

BackendFactory = Callable[[str, Mapping[str, Any]], Backend]

# Scheme -> "module:attribute" of the factory, resolved lazily.
_BUILTIN: dict[str, str] = {
    "": "partialstore.backends.local:LocalBackend",
    "file": "partialstore.backends.local:LocalBackend",
    "memory": "partialstore.backends.memory:MemoryBackend",
    "s3": "partialstore.backends.s3:S3Backend",
    "s3a": "partialstore.backends.s3:S3Backend",
    "gs": "partialstore.backends.gcs:GCSBackend",
    "gcs": "partialstore.backends.gcs:GCSBackend",
}
# Any scheme nobody claims goes to the generic fsspec backend.
_FALLBACK = "partialstore.backends.fsspec:FsspecBackend"

_registered: dict[str, BackendFactory] = {}
_lock = threading.Lock()
# Scheme -> its built-in target, or None if something else serves it; an
# entry-point scan costs milliseconds and resolving a path asks every call.
_builtin_cache: dict[str, str | None] = {}


def scheme_of(url: str | os.PathLike[str]) -> str:
    """Return the URL scheme of ``url`` (``""`` for a plain local path).

    Example:
        >>> scheme_of("s3://bucket/x")
        's3'
        >>> scheme_of("/tmp/x")
        ''
    """
    text = os.fspath(url)
    if "://" not in text:
        return ""
    return text.split("://", 1)[0].lower()


def register_backend(scheme: str, factory: BackendFactory) -> None:
    """Use ``factory`` for URLs with ``scheme``, ahead of the built-in backends.

    Example:
        >>> from partialstore.backends.memory import MemoryBackend
        >>> def my_backend(url: str, options: dict) -> MemoryBackend:
        ...     return MemoryBackend(url.replace("mystore://", "memory://"), options)
        >>> register_backend("mystore", my_backend)
        >>> type(open_backend("mystore://scratch")).__name__
        'MemoryBackend'
    """
    if not scheme or "://" in scheme:
        raise InvalidInputError(f"Backend scheme must be a bare name like 's3', got {scheme!r}.")
    with _lock:
        _registered[scheme.lower()] = factory
        _builtin_cache.clear()


def _load(target: str) -> BackendFactory:
    module_name, _, attribute = target.partition(":")
    factory: BackendFactory = getattr(importlib.import_module(module_name), attribute)
    return factory


def _entry_point(scheme: str) -> BackendFactory | None:
    for entry in importlib_metadata.entry_points(group="partialstore.backends"):
        if entry.name == scheme:
            factory: BackendFactory = entry.load()
            return factory
    return None


def builtin_target(scheme: str) -> str | None:
    """The built-in backend (``"module:Class"``) serving ``scheme``, or ``None``.

    ``None`` when a registered factory or an entry point claims the scheme,
    or when no built-in backend does (the generic fsspec backend serves it).
    Spellings whose schemes share a built-in target (``s3``/``s3a``,
    ``gs``/``gcs``, ``""``/``file``) reach the same store.

    Example:
        >>> builtin_target("s3a") == builtin_target("s3")  # unless either is overridden
        True
    """
    with _lock:
        if scheme in _builtin_cache:
            return _builtin_cache[scheme]
        overridden = scheme in _registered
    if not overridden and scheme:
        overridden = _entry_point(scheme) is not None
    target = None if overridden else _BUILTIN.get(scheme)
    with _lock:
        if scheme not in _registered:  # a registration meanwhile wins
            _builtin_cache[scheme] = target
    return target


def aliases(target: str) -> list[str]:
    """Every scheme whose built-in backend is ``target``, in registry order.

    Example:
        >>> aliases("partialstore.backends.s3:S3Backend")
        ['s3', 's3a']
    """
    return [scheme for scheme, builtin in _BUILTIN.items() if builtin == target]


def factory_for(scheme: str) -> BackendFactory:
    """Return the backend factory for ``scheme`` (registered, entry point, built-in, fsspec)."""
    with _lock:
        factory = _registered.get(scheme)
    if factory is not None:
        return factory
    factory = _entry_point(scheme) if scheme else None
    if factory is not None:
        return factory
    return _load(_BUILTIN.get(scheme, _FALLBACK))


def open_backend(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> Backend:
    """Open the backend that serves ``url``, rooted at ``url``.

    Args:
      url: a local path, ``os.PathLike``, or URL (``file://``, ``memory://``,
        ``s3://``, ``gs://``, or any fsspec protocol).
      storage_options: passed to the backend (endpoint, credentials, ...).

    Raises:
      InvalidInputError: ``url`` is empty or not a string/path.
    """
    if not isinstance(url, str | os.PathLike):
        raise InvalidInputError(f"Expected a path or URL string, got {type(url).__name__}.")
    text = os.fspath(url)
    if not text:
        raise InvalidInputError("Path or URL must not be empty.")
    return factory_for(scheme_of(text))(text, dict(storage_options or {}))
