"""partialstore: transactional partial saving of JAX PyTree checkpoints to any store.

Build one checkpoint from many partial saves, from one process or many, then
publish it with one atomic ``finalize`` that moves no array byte, on local
disk, memory, S3, GCS or any fsspec filesystem::

    import partialstore

    path = "s3://bucket/run/step_100"
    partialstore.save(path, {"params": params, "step": 100})
    response = partialstore.save_async(path, {"opt_state": opt_state})
    response.result()
    partialstore.finalize(path)
    state = partialstore.load(path)

This file is the whole public surface. Names resolve on first use, so
``import partialstore.backend`` (e.g. in a third-party backend) does not pay
for importing JAX and TensorStore.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from partialstore import errors
    from partialstore._api import discard, finalize, gc, load, metadata, save, save_async, verify
    from partialstore._commit.loading import CheckpointMetadata, LeafMetadata
    from partialstore._commit.verifying import DamagedLeaf, VerifyReport
    from partialstore._lifecycle.manager import CheckpointManager
    from partialstore._lifecycle.sessions import SessionInfo
    from partialstore._pytree.abstract import SavedNode
    from partialstore._pytree.shardings import SavedSharding
    from partialstore._runtime.ordering import AsyncResponse, UnobservedSaveError
    from partialstore._runtime.stats import OperationStats, add_stats_listener
    from partialstore.backend import Backend, Capabilities
    from partialstore.registry import configure_storage, open_backend, register_backend

_EXPORTS = {
    "save": "partialstore._api",
    "save_async": "partialstore._api",
    "finalize": "partialstore._api",
    "load": "partialstore._api",
    "metadata": "partialstore._api",
    "discard": "partialstore._api",
    "gc": "partialstore._api",
    "verify": "partialstore._api",
    "AsyncResponse": "partialstore._runtime.ordering",
    "UnobservedSaveError": "partialstore._runtime.ordering",
    "OperationStats": "partialstore._runtime.stats",
    "SavedNode": "partialstore._pytree.abstract",
    "SavedSharding": "partialstore._pytree.shardings",
    "add_stats_listener": "partialstore._runtime.stats",
    "CheckpointMetadata": "partialstore._commit.loading",
    "LeafMetadata": "partialstore._commit.loading",
    "VerifyReport": "partialstore._commit.verifying",
    "DamagedLeaf": "partialstore._commit.verifying",
    "CheckpointManager": "partialstore._lifecycle.manager",
    "SessionInfo": "partialstore._lifecycle.sessions",
    "Backend": "partialstore.backend",
    "Capabilities": "partialstore.backend",
    "configure_storage": "partialstore.registry",
    "open_backend": "partialstore.registry",
    "register_backend": "partialstore.registry",
}

__all__ = [
    "AsyncResponse",
    "Backend",
    "Capabilities",
    "CheckpointManager",
    "CheckpointMetadata",
    "DamagedLeaf",
    "LeafMetadata",
    "OperationStats",
    "SavedNode",
    "SavedSharding",
    "SessionInfo",
    "UnobservedSaveError",
    "VerifyReport",
    "add_stats_listener",
    "configure_storage",
    "discard",
    "errors",
    "finalize",
    "gc",
    "load",
    "metadata",
    "open_backend",
    "register_backend",
    "save",
    "save_async",
    "verify",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "errors":
        return importlib.import_module("partialstore.errors")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'partialstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
