"""The part of a globally sharded ``jax.Array`` that this process writes.

In a multi-process JAX job each process snapshots only the shards it owns
(``replica_id == 0``, so a replicated shard is written once), together with
every shard edge of the global sharding, so all processes derive the same
chunk grid (:func:`partialstore._arrays.sharded.shard_chunks`).

On one device the single shard is the whole array.

Example:
    >>> import jax
    >>> sharded = snapshot_shards(jax.numpy.arange(8.0), copy_arrays=True)
    >>> sharded.shape, [box for box, _ in sharded.shards], sharded.boundaries
    ((8,), [((0, 8),)], ((0, 8),))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["ShardedArray", "snapshot_shards"]


@dataclasses.dataclass
class ShardedArray:
    """The part of a global ``jax.Array`` that this process writes.

    ``shards`` are ``(box, host data)`` for each addressable shard with
    ``replica_id == 0``; ``boundaries`` are, per axis, every shard start and
    stop of the global sharding, so every process derives the same chunks.
    """

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    boundaries: tuple[tuple[int, ...], ...]
    shards: list[tuple[tuple[tuple[int, int], ...], np.ndarray]]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole global array."""
        return math.prod(self.shape) * self.dtype.itemsize

    def probe(self) -> np.ndarray:
        """An empty array of the same rank and dtype, for dtype and rank checks."""
        return np.empty((0,) * len(self.shape), self.dtype)


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def snapshot_shards(obj: Any, copy_arrays: bool) -> ShardedArray:
    """Copy to host the shards of ``obj`` (a ``jax.Array``) that this process writes."""
    shape = tuple(obj.shape)
    boundaries: list[set[int]] = [set() for _ in shape]
    for index in obj.sharding.devices_indices_map(shape).values():
        for axis, (start, stop) in enumerate(_box(index, shape)):
            boundaries[axis].update((start, stop))
    owned = [s for s in obj.addressable_shards if s.replica_id == 0]
    for shard in owned:
        shard.data.copy_to_host_async()
    shards = []
    for shard in owned:
        host = np.asarray(shard.data)
        if copy_arrays and shard.device.platform == "cpu":
            # On CPU np.asarray views the jax buffer; a snapshot must not.
            host = np.array(host, copy=True)
        shards.append((_box(shard.index, shape), host))
    return ShardedArray(
        shape, np.dtype(obj.dtype), tuple(tuple(sorted(b)) for b in boundaries), shards
    )
