"""Where a checkpoint and its partial-save session live on a backend.

A checkpoint path ``<parent>/<name>`` is served by the backend rooted at
``<parent>``. The session's staging prefix is ``<name>.partial_save`` where
the backend renames atomically (finalize then renames it to ``<name>``), and
``<name>`` itself where it cannot (finalize then publishes by creating
``<name>/partialstore.json``). See docs/protocol.md.

Example:
    >>> loc = resolve("s3://bucket/run1/step_100", {"endpoint_url": "http://127.0.0.1:5000"})
    >>> loc.final_prefix
    'step_100'
    >>> loc.staging_prefix  # S3 has no atomic rename
    'step_100'
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Hashable, Mapping
from typing import Any

from partialstore import registry
from partialstore.backend import Backend, join_key
from partialstore.errors import InvalidInputError

__all__ = [
    "MANIFEST_NAME",
    "STAGING_SUFFIX",
    "Location",
    "canonical_root",
    "freeze_options",
    "job_wide_name",
    "resolve",
]

MANIFEST_NAME = "partialstore.json"
STAGING_SUFFIX = ".partial_save"
LOG_DIR = "log"
DATA_DIR = "data"


@dataclasses.dataclass(frozen=True)
class Location:
    """A resolved checkpoint path: its backend and the key prefixes it uses."""

    path: str
    backend: Backend
    final_prefix: str
    staging_prefix: str
    #: The checkpoint's identity in this process, whatever the spelling of
    #: ``path``: (canonical backend root, name, frozen storage options).
    key: tuple[str, str, Hashable] | None = None

    @property
    def uses_rename(self) -> bool:
        """Whether finalize publishes by renaming the staging prefix."""
        return self.staging_prefix != self.final_prefix

    @property
    def manifest_key(self) -> str:
        """The key whose existence means "finalized"."""
        return join_key(self.final_prefix, MANIFEST_NAME)

    @property
    def staging_manifest_key(self) -> str:
        return join_key(self.staging_prefix, MANIFEST_NAME)

    @property
    def log_prefix(self) -> str:
        return join_key(self.staging_prefix, LOG_DIR)

    def data_dir(self, save_id: str) -> str:
        """Directory of one save's arrays, relative to the checkpoint root."""
        return f"{DATA_DIR}/{save_id}"


# Built-in backends whose URLs name the same store in several spellings.
_LOCAL = "partialstore.backends.local:LocalBackend"
_MEMORY = "partialstore.backends.memory:MemoryBackend"
_BUCKETS = ("partialstore.backends.s3:S3Backend", "partialstore.backends.gcs:GCSBackend")

#: A backend's cache key: its canonical root and its frozen storage options.
BackendKey = tuple[str, Hashable]

_backends: dict[BackendKey, Backend] = {}
_backends_lock = threading.Lock()


def _split(path: str | os.PathLike[str]) -> tuple[str, str]:
    """Split a checkpoint path into (parent URL, final name)."""
    if not isinstance(path, str | os.PathLike):
        raise InvalidInputError(
            f"Checkpoint path must be a str or os.PathLike, got {type(path).__name__}."
        )
    text = os.fspath(path)
    if not text.strip():
        raise InvalidInputError("Checkpoint path must not be empty.")
    if registry.scheme_of(text) == "":
        text = os.path.abspath(os.path.expanduser(text))
        parent, name = os.path.split(text)
    else:
        scheme, rest = text.split("://", 1)
        rest = rest.rstrip("/")
        parent, _, name = rest.rpartition("/")
        parent = f"{scheme}://{parent}"
    if name.endswith(STAGING_SUFFIX) and name != STAGING_SUFFIX:
        # One spelling per checkpoint: the suffix names the session's staging
        # prefix on stores that rename, so accepting it would give a
        # checkpoint two names (and two queues) in this process.
        raise InvalidInputError(
            f"Checkpoint path {text!r} names a partial-save session (it ends in "
            f"{STAGING_SUFFIX!r}): pass the checkpoint's own path, "
            f"{text[: -len(STAGING_SUFFIX)]!r} (partialstore.orbax accepts both, as Orbax does)."
        )
    if name in ("", ".", "..") or name.endswith(STAGING_SUFFIX):
        raise InvalidInputError(
            f"Checkpoint path {text!r} must end in a checkpoint name (not '', '.', '..' "
            f"or a name ending in {STAGING_SUFFIX!r})."
        )
    return parent, name


def canonical_root(parent: str) -> str:
    """One spelling of the directory a backend root URL names (symlinks not followed).

    Mirrors how the built-in backends read their URLs: a plain path or
    ``file://`` URL becomes an absolute path (``~`` expanded); ``s3a://``
    becomes ``s3://`` and ``gcs://`` ``gs://``; slashes the backend strips
    around a bucket prefix or a memory root are stripped. Other schemes, and
    built-in ones that a registered backend overrides, keep their spelling.

    Example:
        >>> canonical_root("s3a://bucket/run/")
        's3://bucket/run'
        >>> canonical_root("file:///tmp/ckpts")
        '/tmp/ckpts'
    """
    scheme = registry.scheme_of(parent)
    target = registry.builtin_target(scheme)
    if target is None:
        return parent
    rest = parent.split("://", 1)[1] if "://" in parent else parent
    alias = next(s for s in registry.aliases(target) if registry.builtin_target(s) == target)
    if target == _LOCAL:
        if scheme and rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest:
            return parent  # names no directory: the backend says so
        path = os.path.abspath(os.path.expanduser(rest))
        return path if alias == "" else f"{alias}://{path}"
    if target == _MEMORY:
        return f"{alias}://{rest.strip('/')}"
    if target in _BUCKETS:
        bucket, _, prefix = rest.rstrip("/").partition("/")
        return f"{alias}://{bucket}/{prefix.strip('/')}".rstrip("/") if bucket else parent
    return parent


def _physical_root(root: str) -> str:
    # On local disk a symlinked parent names the same files as its target.
    if registry.builtin_target(registry.scheme_of(root)) == _LOCAL and "://" not in root:
        return os.path.realpath(root)
    return root


def job_wide_name(path: str | os.PathLike[str]) -> str:
    """The checkpoint's URL in canonical spelling, the same in every process of a job.

    Symlinks are not resolved (hosts may mount one store at different real
    paths), so processes that name a checkpoint through different symlinks
    get different names.

    Example:
        >>> job_wide_name("s3a://bucket//run/ckpt/")
        's3://bucket/run/ckpt'
    """
    parent, name = _split(path)
    return f"{canonical_root(parent).rstrip('/')}/{name}"


class _Identity:
    """An unhashable option value that is compared by identity (and kept alive)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def freeze_options(value: Any) -> Hashable:
    """A hashable form of ``storage_options``, equal exactly when the options are equal.

    Mappings compare regardless of key order; values compare with their type
    (``True`` is not ``1``: backends check types, and ``single_writer=1``
    must still be refused); other objects compare as they define it, or by
    identity if unhashable.

    Example:
        >>> freeze_options({"a": 1, "b": [2]}) == freeze_options({"b": [2], "a": 1})
        True
    """
    if isinstance(value, Mapping):
        items = [(freeze_options(k), freeze_options(v)) for k, v in value.items()]
        return ("mapping", tuple(sorted(items, key=repr)))
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(freeze_options(v) for v in value))
    if isinstance(value, set | frozenset):
        return ("set", frozenset(freeze_options(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("object", _Identity(value))
    return (f"{type(value).__module__}.{type(value).__qualname__}", value)


def _backend_for(
    root: str, options_key: Hashable, storage_options: Mapping[str, Any] | None
) -> Backend:
    # Backends hold connection pools (s3fs/gcsfs sessions): share one per root
    # and options instead of paying a new TLS/session set-up on every call;
    # every spelling of one root must also reach one backend (one set of locks).
    cache_key = (root, options_key)
    with _backends_lock:
        backend = _backends.get(cache_key)
        if backend is None:
            backend = registry.open_backend(root, storage_options)
            _backends[cache_key] = backend
        return backend


def resolve(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> Location:
    """Resolve a checkpoint path (local path or URL) to its :class:`Location`.

    Example:
        >>> resolve("/tmp/ckpt").staging_prefix  # on local disk
        'ckpt.partial_save'

    Raises:
      InvalidInputError: the path is empty or names no checkpoint.
    """
    parent, name = _split(path)
    canonical = canonical_root(parent)
    # Options given once (registry.configure_storage) for this checkpoint's
    # path, the call's own over them: one set of options per checkpoint.
    storage_options = registry.configured_options(
        f"{canonical.rstrip('/')}/{name}", storage_options
    )
    root = _physical_root(canonical)
    options_key = freeze_options(storage_options)
    backend = _backend_for(root, options_key, storage_options)
    staging = name + STAGING_SUFFIX if backend.capabilities.atomic_rename else name
    return Location(
        path=os.fspath(path),
        backend=backend,
        final_prefix=name,
        staging_prefix=staging,
        key=(root, name, options_key),
    )
