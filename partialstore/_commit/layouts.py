"""Load targets that restore the saved layout: the abstract tree of a checkpoint.

:meth:`partialstore.CheckpointMetadata.abstract_tree` builds, from the
checked manifest entries, a tree that ``load(path, target=...)`` reads
back as it was saved: each ``jax_array`` leaf a ``jax.ShapeDtypeStruct``
with its saved ``NamedSharding`` (:mod:`partialstore._pytree.shardings`)
on this job's devices or a given mesh, numpy leaves as numpy placeholders,
inline leaves as their values, inside containers that flatten to the
stored key paths (:mod:`partialstore._pytree.abstract`).

Example:
    >>> import numpy as np
    >>> from partialstore._commit.entries import LeafEntry
    >>> from partialstore._arrays.descriptors import parse
    >>> data = parse({"format": "packed", "path": "data/" + "0" * 32 + "/packed-0000.bin",
    ...               "offset": 0, "nbytes": 12, "dtype": "float32", "shape": [3],
    ...               "crc32c": 0})
    >>> leaves = [LeafEntry((("key", "w"),), "array", data),
    ...           LeafEntry((("key", "step"),), "int", None, 3)]
    >>> target = abstract_target({}, leaves, None)
    >>> target["step"], target["w"].shape, target["w"].strides
    (3, (3,), (0,))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from partialstore._commit.entries import LeafEntry
from partialstore._pytree import abstract
from partialstore._pytree.keypaths import KeyPath, format_path
from partialstore._pytree.shardings import SavedSharding
from partialstore._pytree.tree import Node

__all__ = ["SavedSharding", "abstract_target"]


def abstract_target(nodes: Mapping[KeyPath, Node], leaves: Sequence[LeafEntry], mesh: Any) -> Any:
    """The abstract tree of ``leaves`` in ``nodes`` (rules: ``CheckpointMetadata.abstract_tree``).

    Raises:
      InvalidInputError: a saved mesh needs more devices than this job has,
        or ``mesh`` lacks a saved axis or does not divide a leaf.
    """
    values = {leaf.path: _abstract_leaf(leaf, mesh) for leaf in leaves}
    return abstract.build_abstract(nodes, values)


def _abstract_leaf(leaf: LeafEntry, mesh: Any) -> Any:
    if leaf.data is None:
        return leaf.value
    shape, dtype = leaf.data.shape, leaf.data.dtype
    if leaf.kind != "jax_array":
        # Zero-strided and read-only: no memory, and load gives numpy back.
        return np.broadcast_to(np.zeros((), dtype), shape)
    import jax  # deferred: numpy-only checkpoints should not pay for jax

    sharding: jax.sharding.Sharding
    if leaf.sharding is not None:
        sharding = leaf.sharding.to_jax(format_path(leaf.path), shape, mesh)
    elif mesh is not None:  # replicated over the caller's mesh
        sharding = jax.sharding.NamedSharding(mesh, _untyped(jax.sharding.PartitionSpec)())
    else:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return _untyped(jax.ShapeDtypeStruct)(shape, dtype, sharding=sharding)


def _untyped(constructor: Any) -> Any:
    """``constructor`` as ``Any``: jax leaves ``PartitionSpec``/``ShapeDtypeStruct`` untyped."""
    return constructor
