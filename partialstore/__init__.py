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

This file is the whole public surface.
"""

from partialstore import errors
from partialstore.api import discard, finalize, gc, load, metadata, save, save_async
from partialstore.backend import Backend, Capabilities
from partialstore.loading import CheckpointMetadata, LeafMetadata
from partialstore.ordering import AsyncResponse, UnobservedSaveError
from partialstore.registry import open_backend, register_backend

__all__ = [
    "AsyncResponse",
    "Backend",
    "Capabilities",
    "CheckpointMetadata",
    "LeafMetadata",
    "UnobservedSaveError",
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
]

__version__ = "0.1.0"
