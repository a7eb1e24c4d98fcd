"""Chunk objects of zarr3 arrays read through the Backend contract, and size probes.

A backend without a TensorStore kvstore (memory, generic fsspec) gets the
chunk objects a read needs copied into a private in-memory kvstore, which
TensorStore then decodes (:mod:`partialstore._arrays.zarr3`). A chunk object
with inner chunks (zarr3's ``sharding_indexed`` codec) of which a read needs
only some is not copied whole: one ranged read fetches its index, further
ranged reads only the inner chunks needed (neighbours merged into one read),
and a smaller object holding just those, with an index of its own, goes
into memory. So these backends, too, read little more than a load returns.

Every size comes from the format (docs/format.md, §11: plain ``bytes``
codec, maybe a CRC, every inner chunk inside the array stored whole), so a
chunk object shorter than that, or an index that points elsewhere or fails
its CRC, is reported as damage before anything large is allocated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from partialstore._arrays.descriptors import Index, Zarr3Leaf
from partialstore._arrays.packing import crc32c
from partialstore._arrays.sharded import iter_chunk_keys, stored_min_bytes
from partialstore._runtime.aio import settle_all
from partialstore.backend import Backend, join_key
from partialstore.errors import CorruptCheckpointError, NotFoundError

__all__ = ["Layout", "check_last_chunk", "fetch_chunks", "fetch_key", "layout_of"]

# Chunk reads of one array through a backend without a kvstore run in this
# many workers at most (the caller's semaphore bounds the total across arrays).
_FETCH_WORKERS = 64

# A read of more bytes than this through TensorStore's own kvstore first
# checks that its last chunk is stored at full size (see check_last_chunk).
_PROBE_BYTES = 64 << 20

# Chunk objects with more inner chunks than this are copied whole: their
# index alone would be large (partialstore writes at most 256).
_MAX_INDEXED = 1 << 16

# An index entry of an inner chunk that is not stored.
_MISSING = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an array's chunk objects hold its elements.

    Attributes:
      inner: the inner chunk shape (the chunk shape itself without inner chunks).
      inner_bytes: stored bytes of one inner chunk (its elements, maybe a CRC).
      indexed: whether chunk objects hold inner chunks and an index.
    """

    inner: tuple[int, ...]
    inner_bytes: int
    indexed: bool


def layout_of(store: ts.TensorStore, leaf: Zarr3Leaf) -> Layout:
    """The :class:`Layout` of the opened array ``store`` that ``leaf`` describes."""
    shape = store.chunk_layout.read_chunk.shape  # None for a 0-d array
    inner = tuple(1 if n is None else n for n in shape) if shape is not None else ()
    codecs: list[dict[str, Any]] = store.spec().to_json()["metadata"]["codecs"]
    indexed = codecs[0]["name"] == "sharding_indexed"
    chain = codecs[0]["configuration"]["codecs"] if indexed else codecs
    crc = 4 if any(codec["name"] == "crc32c" for codec in chain) else 0
    return Layout(inner, math.prod(inner) * leaf.storage.itemsize + crc, indexed)


def _position(key: str) -> list[int]:
    return [int(p) for p in key.split("/")[1:]]


def _min_bytes(leaf: Zarr3Leaf, layout: Layout, key: str) -> int:
    """Fewest bytes the chunk object ``key`` (``c/<i>/<j>...``) of ``leaf`` can hold."""
    return stored_min_bytes(leaf, layout.inner, _position(key))


def _lacks(where: str, key: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"Array {where!r} lacks {key!r}. The checkpoint is damaged or incomplete."
    )


def _short_chunk(where: str, key: str, size: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"Array {where!r}: chunk {key!r} holds fewer than the {size} bytes its metadata "
        "says a chunk holds. The checkpoint is damaged."
    )


async def _read(backend: Backend, where: str, key: str, start: int, end: int) -> bytes:
    try:
        value = await backend.read(join_key(where, key), start=start, end=end)
    except NotFoundError:
        raise _lacks(where, key) from None
    if len(value) != end - start:
        raise _short_chunk(where, key, end)
    return value


async def fetch_key(
    backend: Backend,
    root: str,
    path: str,
    key: str,
    memory: ts.KvStore,
    semaphore: asyncio.Semaphore,
    min_size: int = 0,
) -> None:
    """Copy object ``key`` of array ``<root>/<path>`` whole into ``memory``."""
    async with semaphore:
        try:
            value = await backend.read(join_key(root, path, key))
        except NotFoundError:
            raise _lacks(join_key(root, path), key) from None
        if len(value) < min_size:
            raise _short_chunk(join_key(root, path), key, min_size)
        await memory.write(key, value)


async def check_last_chunk(
    backend: Backend, root: str, path: str, leaf: Zarr3Leaf, index: Index, layout: Layout
) -> None:
    """Before a large read, check that the last chunk it needs is stored at full size.

    TensorStore allocates a read's whole result before it reads a chunk, and
    aborts the process when that fails; a shape inflated alike in the manifest
    and ``zarr.json`` must not get that far. The read's last chunk exists at
    full size only if the array really extends that far: one small ranged
    read proves it (with inner chunks, "full size" counts those inside the array).
    """
    box_bytes = math.prod(hi - lo for lo, hi in index.box) * leaf.dtype.itemsize
    if box_bytes <= _PROBE_BYTES:
        return
    last = [(hi - 1) // chunk for (_, hi), chunk in zip(index.box, leaf.chunks, strict=True)]
    key = "c/" + "/".join(map(str, last))
    size = _min_bytes(leaf, layout, key)
    await _read(backend, join_key(root, path), key, size - 1, size)


def _grid(leaf: Zarr3Leaf, layout: Layout) -> list[int]:
    """Inner chunks per chunk along each axis."""
    return [c // i for c, i in zip(leaf.chunks, layout.inner, strict=True)]


def _needed(
    leaf: Zarr3Leaf, layout: Layout, key: str, members: Sequence[tuple[int, Zarr3Leaf, Index]]
) -> set[int]:
    """Inner chunks (C-order numbers) of chunk ``key`` that ``members`` read."""
    grid = _grid(leaf, layout)
    origin = [p * c for p, c in zip(_position(key), leaf.chunks, strict=True)]
    needed: set[int] = set()
    for _, _, index in members:
        axes = []
        for (lo, hi), o, c, i in zip(index.box, origin, leaf.chunks, layout.inner, strict=True):
            lo, hi = max(lo, o) - o, min(hi, o + c) - o
            axes.append(range(lo // i, (hi - 1) // i + 1) if hi > lo else range(0))
        for sub in itertools.product(*axes):
            needed.add(int(np.ravel_multi_index(sub, grid)) if grid else 0)
    return needed


async def _fetch_inner(
    backend: Backend,
    where: str,
    key: str,
    needed: set[int],
    count: int,
    layout: Layout,
    memory: ts.KvStore,
    size: int,
) -> None:
    """Copy only inner chunks ``needed`` of chunk object ``key`` (``size`` bytes) into memory."""
    body = size - 16 * count - 4
    index = await _read(backend, where, key, body, size)
    if crc32c(index[:-4]) != int.from_bytes(index[-4:], "little"):
        raise CorruptCheckpointError(
            f"Array {where!r}: the index of chunk {key!r} fails its CRC-32C. The checkpoint "
            "is damaged."
        )
    spans = np.frombuffer(index[:-4], "<u8").reshape(count, 2)
    wanted = sorted((int(spans[k, 0]), k) for k in needed)
    if any(
        int(spans[k, 1]) != layout.inner_bytes or offset + layout.inner_bytes > body
        for offset, k in wanted
    ):
        raise _lacks(where, f"{key} (an inner chunk it needs)")
    runs = _runs([offset for offset, _ in wanted], layout.inner_bytes)
    parts = await settle_all([_read(backend, where, key, lo, hi) for lo, hi in runs])
    data = b"".join(parts)
    new_index = np.full((count, 2), _MISSING, "<u8")
    starts = list(itertools.accumulate((hi - lo for lo, hi in runs), initial=0))
    for offset, k in wanted:
        run = next(r for r, (lo, hi) in enumerate(runs) if lo <= offset < hi)
        new_index[k] = (starts[run] + offset - runs[run][0], layout.inner_bytes)
    raw_index = new_index.tobytes()
    await memory.write(key, data + raw_index + crc32c(raw_index).to_bytes(4, "little"))


def _runs(offsets: Sequence[int], length: int) -> list[tuple[int, int]]:
    """Sorted ``offsets`` of ``length``-byte pieces merged into ``(start, end)`` runs."""
    runs: list[tuple[int, int]] = []
    for offset in offsets:
        if runs and runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], offset + length)
        else:
            runs.append((offset, offset + length))
    return runs


async def fetch_chunks(
    backend: Backend,
    root: str,
    path: str,
    members: Sequence[tuple[int, Zarr3Leaf, Index]],
    memory: ts.KvStore,
    semaphore: asyncio.Semaphore,
    layout: Layout,
) -> None:
    """Copy what ``members`` need of the chunk objects of ``<root>/<path>`` into ``memory``.

    A few workers pull keys from one lazy iterator, so a damaged array that
    claims billions of chunks costs one failed read, not a list of billions.
    """

    def unique_keys() -> Iterator[str]:
        seen: set[str] = set()
        for _, leaf, index in members:
            for key in iter_chunk_keys(leaf, index):
                if key not in seen:
                    seen.add(key)
                    yield key

    keys = unique_keys()  # shared: next() never awaits, so workers cannot interleave in it
    leaf = members[0][1]  # one array: the same chunks for every member
    where = join_key(root, path)

    async def worker() -> None:
        for key in keys:
            size = _min_bytes(leaf, layout, key)
            count = math.prod(_grid(leaf, layout))
            if layout.indexed and count <= _MAX_INDEXED:
                stored = size // (math.prod(layout.inner) * leaf.storage.itemsize)
                needed = _needed(leaf, layout, key, members)
                if len(needed) < stored:
                    exact = stored * layout.inner_bytes + 16 * count + 4
                    async with semaphore:
                        await _fetch_inner(
                            backend, where, key, needed, count, layout, memory, exact
                        )
                    continue
            await fetch_key(backend, root, path, key, memory, semaphore, size)

    await settle_all([worker() for _ in range(_FETCH_WORKERS)])
