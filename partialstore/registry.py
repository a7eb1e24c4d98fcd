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

import dataclasses
import difflib
import importlib
import os
import threading
from collections.abc import Callable, Mapping
from importlib import metadata as importlib_metadata
from typing import Any

from partialstore.backend import Backend
from partialstore.errors import InvalidInputError

__all__ = [
    "builtin_target",
    "configure_storage",
    "configured_options",
    "open_backend",
    "register_backend",
    "scheme_of",
]

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
      storage_options: passed to the backend (endpoint, credentials, ...), merged
        over those :func:`configure_storage` gave for ``url``.

    Raises:
      InvalidInputError: ``url`` is empty or not a string/path.
    """
    if not isinstance(url, str | os.PathLike):
        raise InvalidInputError(f"Expected a path or URL string, got {type(url).__name__}.")
    text = os.fspath(url)
    if not text:
        raise InvalidInputError("Path or URL must not be empty.")
    return factory_for(scheme_of(text))(text, configured_options(text, storage_options))


# -- storage options given once (configure_storage) ------------------------------------

#: Bucket backends open no connection when constructed, so configure_storage
#: can check options by building one; "local" and "memory" take only this.
_LOCAL_OPTIONS = ("single_writer",)
_CHECK_BUCKET = "partialstore-configure-check"


@dataclasses.dataclass(frozen=True)
class _Configured:
    options: dict[str, Any]
    #: The backend built to check the options, kept: its pooled client is
    #: the one later backends with the same options share.
    checked_with: Backend | None


#: (canonical scheme, prefix or None for the whole protocol) -> options.
_configured: dict[tuple[str, str | None], _Configured] = {}


def _canonical_scheme(scheme: str) -> str:
    target = _BUILTIN.get(scheme)
    if target is None or scheme in _registered:
        return scheme
    return next(s for s in aliases(target) if s != "file")


def _configure_key(prefix: str) -> tuple[str, str | None]:
    """(canonical scheme, normalized prefix): ``None`` as prefix means the whole protocol."""
    if "://" not in prefix and "/" not in prefix and os.sep not in prefix:
        if not prefix.replace("-", "").replace("+", "").replace(".", "").isalnum():
            raise InvalidInputError(
                f"configure_storage needs a protocol name ('s3', 'gs', as fsspec.config.conf "
                f"is keyed) or a URL or path prefix, got {prefix!r}."
            )
        return _canonical_scheme(prefix.lower()), None
    return _url_key(prefix)


def _url_key(url: str) -> tuple[str, str]:
    scheme = _canonical_scheme(scheme_of(url))
    rest = url.split("://", 1)[1] if "://" in url else url
    if scheme == "":  # local paths: one spelling, as the backend reads them
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        return "", os.path.abspath(os.path.expanduser(rest)) if rest else ""
    return scheme, "/".join(part for part in rest.split("/") if part)


def _check_configured(prefix: str, key: tuple[str, str | None], options: dict[str, Any]) -> Any:
    """Refuse bad options now; return the backend built to check them (or None)."""
    scheme, rest = key
    target = None if scheme in _registered else _BUILTIN.get(scheme)
    if target is None:
        return None  # another backend: it checks its options when first opened
    if target.endswith(":LocalBackend"):
        for name in options:
            if name not in _LOCAL_OPTIONS:
                close = difflib.get_close_matches(str(name), _LOCAL_OPTIONS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise InvalidInputError(
                    f"Local paths take no storage options besides single_writer, got {name!r} "
                    f"in configure_storage({prefix!r}, ...).{hint}"
                )
        return None
    url = f"{scheme}://{rest if rest else _CHECK_BUCKET}"
    return factory_for(scheme)(url, dict(options))


def configure_storage(prefix: str, storage_options: Mapping[str, Any] | None) -> None:
    """Give storage options once for every path under ``prefix``, so calls need only the path.

    ``prefix`` is a protocol name (``"s3"``, ``"gs"``: every path of that
    store, as ``fsspec.config.conf`` is keyed) or a URL or path prefix
    (``"s3://bucket/runs"``), matched on whole path components, whatever its
    spelling (``s3a://`` is ``s3://``, ``gcs://`` is ``gs://``). A call's
    options are built from every entry that matches its path, the protocol's
    first and then by prefix length, each merged over the previous (key by
    key; nested dicts such as ``client_kwargs`` too), then the call's own
    ``storage_options`` over those. ``None`` removes the entry.

    The options of the built-in backends are checked now, so a typo
    (``endpont_url``) is refused here, with the closest known option.

    Example:
        >>> configure_storage("s3://bucket/runs", {"endpoint_url": "http://127.0.0.1:9000"})
        >>> configured_options("s3://bucket/runs/step_1", {"retries": 3})
        {'endpoint_url': 'http://127.0.0.1:9000', 'retries': 3}
        >>> configure_storage("s3://bucket/runs", None)
        >>> configure_storage("s3", {"endpont_url": "http://127.0.0.1:9000"})
        Traceback (most recent call last):
        partialstore.errors.InvalidInputError: ... Did you mean 'endpoint_url'?...

    Raises:
      InvalidInputError: a bad prefix, or options the backend refuses.
    """
    if not isinstance(prefix, str) or not prefix.strip():
        raise InvalidInputError(f"configure_storage needs a non-empty prefix, got {prefix!r}.")
    key = _configure_key(prefix)
    if storage_options is None:
        with _lock:
            _configured.pop(key, None)
        return
    if not isinstance(storage_options, Mapping):
        raise InvalidInputError(
            f"storage_options for {prefix!r} must be a dict, got {type(storage_options).__name__}."
        )
    options = dict(storage_options)
    checked = _check_configured(prefix, key, options)
    with _lock:
        _configured[key] = _Configured(options, checked)


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for name, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(name), Mapping):
            merged[name] = _merged(merged[name], value)
        else:
            merged[name] = value
    return merged


def configured_options(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The options a call on ``url`` uses: configured ones, then ``storage_options`` over them.

    Example:
        >>> configured_options("memory://x", {"single_writer": True})
        {'single_writer': True}
    """
    scheme, rest = _url_key(os.fspath(url))
    with _lock:
        entries = [(k[1], c.options) for k, c in _configured.items() if k[0] == scheme]
    matching = sorted(
        (
            (p, o)
            for p, o in entries
            if p is None or p == "" or rest == p or rest.startswith(p + "/")
        ),
        key=lambda entry: -1 if entry[0] is None else len(entry[0]),
    )
    options: dict[str, Any] = {}
    for _, configured in matching:
        options = _merged(options, configured)
    return _merged(options, storage_options or {})
