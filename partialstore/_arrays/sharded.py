"""Chunk layouts of zarr3 arrays: regular (:func:`choose_chunks`) and sharded.

A sharded array's grid lines include every shard edge, so every shard is
whole chunks (see :func:`shard_chunks`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from partialstore._pytree.shards import ShardedArray

__all__ = ["choose_chunks", "shard_chunks"]


def choose_chunks(shape: Sequence[int], itemsize: int, target: int) -> list[int]:
    """Chunk shape of about ``target`` bytes, splitting leading dimensions first.

    Trailing dimensions stay whole while they fit, so a chunk is one
    contiguous run of the C-order array; chunk counts are balanced
    (1000 rows at 600 per chunk become 2 x 500, not 600 + 400).

    Example:
        >>> choose_chunks([65536, 4096], 4, 16 << 20)
        [1024, 4096]
    """
    chunks = [max(1, int(n)) for n in shape]
    for axis in range(len(chunks)):
        row = itemsize * math.prod(chunks[axis + 1 :])
        if row * chunks[axis] <= target:
            break
        per_chunk = max(1, target // row)
        count = -(-chunks[axis] // per_chunk)
        chunks[axis] = -(-chunks[axis] // count)
    return chunks


def _largest_divisor_at_most(n: int, limit: int) -> int:
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for c in (d, n // d):
                if best < c <= limit:
                    best = c
    return best


def shard_chunks(array: ShardedArray, target: int) -> list[int]:
    """Chunk shape of at most about ``target`` bytes whose grid lines include every shard edge.

    Along each axis the chunk divides the gcd of all interior shard edges,
    so every shard is a union of whole chunks and no chunk has two writers.

    Example:
        >>> import numpy as np
        >>> f32 = np.dtype("float32")
        >>> shard_chunks(ShardedArray((16, 3), f32, ((0, 4, 8, 12, 16), (0, 3)), []), 1 << 20)
        [4, 3]
    """
    chunks: list[int] = []
    for n, edges in zip(array.shape, array.boundaries, strict=True):
        interior = [e for e in edges if 0 < e < n]
        chunks.append(max(1, math.gcd(*interior) if interior else n))
    itemsize = array.dtype.itemsize
    for axis in range(len(chunks)):
        row = itemsize * math.prod(chunks[axis + 1 :])
        if row * chunks[axis] <= target:
            break
        chunks[axis] = _largest_divisor_at_most(chunks[axis], max(1, target // row))
    return chunks
