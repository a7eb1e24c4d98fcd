"""Where a checkpoint and its partial-save session live on a backend.

A checkpoint path ``<parent>/<name>`` is served by the backend rooted at
``<parent>``. The session's staging prefix is ``<name>.partial_save`` where
the backend renames atomically (finalize then renames it to ``<name>``), and
``<name>`` itself where it cannot (finalize then publishes by creating
``<name>/partialstore.json``). See DESIGN.md, "On-disk layout".

Example::

    loc = resolve("s3://bucket/run1/step_100", {"endpoint_url": "http://127.0.0.1:5000"})
    loc.final_prefix    # "step_100"
    loc.staging_prefix  # "step_100" (S3 has no atomic rename)
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Mapping
from typing import Any

from partialstore import registry
from partialstore.backend import Backend, join_key
from partialstore.errors import InvalidInputError

__all__ = ["MANIFEST_NAME", "STAGING_SUFFIX", "Location", "resolve"]

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


_backends: dict[tuple[str, str], Backend] = {}
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
    if name in ("", ".", "..") or name.endswith(STAGING_SUFFIX):
        raise InvalidInputError(
            f"Checkpoint path {text!r} must end in a checkpoint name (not '', '.', '..' "
            f"or a name ending in {STAGING_SUFFIX!r})."
        )
    return parent, name


def _backend_for(parent: str, storage_options: Mapping[str, Any] | None) -> Backend:
    # Backends hold connection pools (s3fs/gcsfs sessions): share one per root
    # and options instead of paying a new TLS/session set-up on every call.
    options_key = json.dumps(dict(storage_options or {}), sort_keys=True, default=repr)
    cache_key = (parent, options_key)
    with _backends_lock:
        backend = _backends.get(cache_key)
        if backend is None:
            backend = registry.open_backend(parent, storage_options)
            _backends[cache_key] = backend
        return backend


def resolve(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> Location:
    """Resolve a checkpoint path (local path or URL) to its :class:`Location`.

    Example::

        resolve("/tmp/ckpt").staging_prefix  # "ckpt.partial_save" on local disk

    Raises:
      InvalidInputError: the path is empty or names no checkpoint.
    """
    parent, name = _split(path)
    backend = _backend_for(parent, storage_options)
    staging = name + STAGING_SUFFIX if backend.capabilities.atomic_rename else name
    return Location(
        path=os.fspath(path), backend=backend, final_prefix=name, staging_prefix=staging
    )
