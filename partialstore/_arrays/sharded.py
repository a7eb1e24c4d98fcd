"""Chunk layouts of zarr3 arrays: regular (:func:`choose_chunks`) and sharded.

A sharded array's grid lines include every shard edge, so every shard is
whole chunks (see :func:`shard_chunks`). Each stored chunk object is split
into inner chunks (zarr3's ``sharding_indexed`` codec, see
:func:`inner_chunks`), so a load with another sharding reads only the
inner chunks its shards cross, by ranged reads.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

from partialstore._arrays.descriptors import Index, Zarr3Leaf
from partialstore._pytree.shards import ShardedArray

__all__ = [
    "MAX_INNER_CHUNKS",
    "MIN_INNER_BYTES",
    "choose_chunks",
    "chunk_keys",
    "inner_chunks",
    "iter_chunk_keys",
    "shard_chunks",
    "stored_min_bytes",
]

#: Inner chunks are at least this large: each costs the writer some
#: encoding work, the index 16 bytes and a partial read one ranged request,
#: while 16 KiB still splits a 1 MiB array 8 ways along each of two axes.
MIN_INNER_BYTES = 16 << 10

#: A stored chunk holds at most this many inner chunks (a 16 MiB chunk: 256 KiB
#: ones). Writing a chunk costs time per inner chunk, and fewer, larger ones
#: are fewer ranged reads; 64 = 8 x 8 still splits a chunk 8 ways along each
#: of two axes, so a load over 8 processes reads what it returns
#: (``python -m benchmarks.inner_chunks`` for the save time, 32 and 256
#: measured too; ``benchmarks.load_bytes`` for the bytes; benchmarks/README.md).
MAX_INNER_CHUNKS = 64


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


def inner_chunks(
    shape: Sequence[int],
    chunks: Sequence[int],
    itemsize: int,
    *,
    min_bytes: int = MIN_INNER_BYTES,
    max_count: int = MAX_INNER_CHUNKS,
) -> list[int]:
    """Inner chunk shape for stored chunks of shape ``chunks``: each edge divides the chunk's.

    Repeatedly splits the axis whose inner edge covers the largest fraction
    of the array (halving where it can, else the next divisor down), while
    an inner chunk keeps at least ``min_bytes`` and a chunk at most
    ``max_count`` of them. Loads shard arrays into equal parts along any
    axis, mostly by powers of two; splitting every axis alike keeps an
    inner chunk within one such part for as many parts as sizes allow, so
    a load reads little more than it returns. Returns ``chunks`` itself
    when nothing can be split.

    Example:
        >>> inner_chunks([65536, 4096], [1024, 4096], 4)
        [1024, 64]
        >>> inner_chunks([512, 512], [512, 512], 4)
        [64, 64]
        >>> inner_chunks([100], [100], 1)
        [100]
    """
    inner = [max(1, int(c)) for c in chunks]
    count = 1
    while count * 2 <= max_count:
        candidates = [a for a in range(len(inner)) if inner[a] > 1]
        if not candidates:
            break
        axis = max(candidates, key=lambda a: (inner[a] / max(1, shape[a]), -a))
        edge = _largest_divisor_at_most(int(chunks[axis]), inner[axis] // 2)
        smaller = math.prod(inner) // inner[axis] * edge
        if smaller * itemsize < min_bytes or edge < 1:
            break
        count = count * inner[axis] // edge
        if count > max_count:
            break
        inner[axis] = edge
    return inner


def iter_chunk_keys(leaf: Zarr3Leaf, index: Index) -> Iterator[str]:
    """Lazily yield the keys of the chunks (``default`` encoding, ``/``) that ``index`` touches.

    Lazy because a damaged array may claim more chunks than memory holds:
    the caller stops at the first one that is missing.

    Example:
        >>> from partialstore._arrays.descriptors import parse
        >>> leaf = parse({"format": "zarr3", "path": "data/s1/a00000", "dtype": "float32",
        ...               "shape": [10, 4], "chunks": [5, 4]})
        >>> list(iter_chunk_keys(leaf, Index(((0, 8), (0, 4)), None)))
        ['c/0/0', 'c/1/0']
    """
    if not leaf.shape:
        yield "c"
        return
    axes = []
    for (lo, hi), chunk in zip(index.box, leaf.chunks, strict=True):
        if hi <= lo:
            return
        axes.append(range(lo // chunk, (hi - 1) // chunk + 1))
    for position in itertools.product(*axes):
        yield "c/" + "/".join(map(str, position))


def chunk_keys(leaf: Zarr3Leaf, index: Index) -> list[str]:
    """Keys of the chunks (``default`` encoding, ``/`` separator) that ``index`` touches.

    Example:
        >>> from partialstore._arrays.descriptors import parse
        >>> leaf = parse({"format": "zarr3", "path": "data/s1/a00000", "dtype": "float32",
        ...               "shape": [10, 4], "chunks": [5, 4]})
        >>> chunk_keys(leaf, Index(((0, 8), (0, 4)), None))
        ['c/0/0', 'c/1/0']
    """
    return list(iter_chunk_keys(leaf, index))


def stored_min_bytes(leaf: Zarr3Leaf, inner: Sequence[int], position: Sequence[int]) -> int:
    """Fewest bytes the chunk object at grid ``position`` holds, with inner chunks ``inner``.

    Every inner chunk that reaches into the array is stored whole (``bytes``
    codec, maybe a CRC after it), and the index and CRCs only add to that;
    without inner chunks (``inner`` equal to ``leaf.chunks``) it is one whole chunk.

    Example:
        >>> from partialstore._arrays.descriptors import parse
        >>> leaf = parse({"format": "zarr3", "path": "data/s1/a00000", "dtype": "float32",
        ...               "shape": [10, 4], "chunks": [8, 4]})
        >>> stored_min_bytes(leaf, [2, 4], [0, 0]), stored_min_bytes(leaf, [2, 4], [1, 0])
        (128, 32)
    """
    count = 1
    for n, chunk, edge, p in zip(leaf.shape, leaf.chunks, inner, position, strict=True):
        inside = max(0, min(chunk, n - p * chunk))
        count *= -(-inside // edge)
    return count * math.prod(inner) * leaf.storage.itemsize
