"""Array I/O: how the leaf arrays of one save become bytes in a store, and come back.

Every array of a save lands under ``<root>/<save_dir>/`` in one of two forms,
chosen by size:

- **zarr3** (``nbytes >= pack_threshold``): one zarr3 array per leaf, named
  from a counter (``a00000``, ``a00001``, ...; never from user keys), written
  by TensorStore straight to the store when the backend offers a
  ``kvstore_spec``. Large arrays are split along their leading dimensions
  into chunks of about :data:`CHUNK_BYTES`, which TensorStore writes and
  reads in parallel. Chunks are plain little-endian bytes followed by a
  zarr3 ``crc32c`` checksum, so zarr3 readers open them without
  partialstore: TensorStore reads every dtype; zarr-python 3.1.6 reads the
  numpy dtypes but not bfloat16/float8 (no such zarr data types there yet).
  A ``jax.Array`` sharded across the processes of a JAX job is always
  zarr3, with chunks that tile its shards; each process writes its own
  shards (see :mod:`partialstore._runtime.multihost`).
- **packed** (leaves below :data:`PACK_THRESHOLD`, 1 MiB): copied into a few
  ``packed-NNNN.bin`` objects with one write each; see
  :mod:`partialstore._arrays.packing`.

Backends without a TensorStore kvstore (``kvstore_spec`` returns ``None``:
memory, generic fsspec) get exactly the same bytes: TensorStore encodes each
array into an in-memory kvstore and its keys are moved with
``backend.write``; on load the needed keys are fetched back with
``backend.read`` (for a partial read only the chunks that intersect the
index) into a memory kvstore that TensorStore decodes. One codec path for
every store.

Descriptors (one typed :data:`~partialstore._arrays.descriptors.Leaf` per
leaf, stored in the manifest as the JSON its ``encode()`` gives) hold paths
relative to the checkpoint root, so a checkpoint stays valid when
its root is renamed or copied::

    {"format": "zarr3", "path": "data/<sid>/a00003", "dtype": "bfloat16",
     "storage_dtype": "bfloat16", "shape": [4096, 4096], "chunks": [2048, 4096],
     "checksum": "crc32c"}
    {"format": "packed", "path": "data/<sid>/packed-0000.bin", "offset": 128,
     "nbytes": 48, "dtype": "float32", "shape": [3, 4], "crc32c": 2868146129}

Checksums cost writes little (they are bound by fsync) and reads one extra
pass over the bytes (figures: benchmarks/README.md, "Figures behind code
decisions"). A checkpoint that silently loads flipped bits is worse than a
slower load, so checksums are on by default (``checksum=False`` turns them
off for a save; loads read either).

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from partialstore import registry
    >>> from partialstore._runtime.aio import run
    >>> backend = registry.open_backend(f"{tmp.name}/root")
    >>> x = np.arange(12, dtype=np.float32).reshape(3, 4)
    >>> y = np.arange(1 << 16, dtype=np.float32).reshape(-1, 64)
    >>> descriptors = run(write_arrays(backend, "ckpt.partial_save", "data/s1", [x, y],
    ...                                pack_threshold=1024))
    >>> [d.encode()["format"] for d in descriptors]  # x is packed, y is a zarr3 array
    ['packed', 'zarr3']
    >>> x2, y_top = run(read_arrays(backend, "ckpt.partial_save",
    ...                             [(descriptors[0], None), (descriptors[1], (slice(0, 2),))]))
    >>> np.array_equal(x2, x), np.array_equal(y_top, y[:2])
    (True, True)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from partialstore._arrays import packing, zarr3
from partialstore._arrays.descriptors import (
    Index,
    Leaf,
    PackedLeaf,
    Zarr3Leaf,
    check_save_dir,
    descriptor_nbytes,
    normalize_index,
    parse,
)
from partialstore._arrays.dtypes import dtype_from_name, dtype_name
from partialstore._pytree.shards import ShardedArray
from partialstore._runtime.aio import settle_all
from partialstore.backend import Backend, join_key
from partialstore.errors import CorruptCheckpointError, NotFoundError

__all__ = [
    "CHUNK_BYTES",
    "MIN_SPLIT_CHUNK_BYTES",
    "PACK_BYTES",
    "PACK_THRESHOLD",
    "SPLIT_CHUNKS",
    "descriptor_nbytes",
    "dtype_from_name",
    "dtype_name",
    "read_arrays",
    "write_arrays",
]

#: Target bytes per zarr3 chunk. Writes get faster up to 16 MiB chunks and
#: reads peak at 4-16 MiB, falling when too few chunks overlap (figures:
#: benchmarks/README.md, "Figures behind code decisions"). 16 MiB is at the
#: top for both, keeps object-store requests large, and leaves enough chunks
#: for a sharded load to read only its part.
CHUNK_BYTES = 16 << 20

#: A save whose large arrays are few and small still gets this many chunks
#: (of at least MIN_SPLIT_CHUNK_BYTES), so TensorStore encodes and writes
#: them on every core (4 x 4 MiB chunks beat one 16 MiB chunk; figures:
#: benchmarks/README.md, "Figures behind code decisions"), while saves with
#: enough chunks already keep 16 MiB chunks.
SPLIT_CHUNKS = 4
MIN_SPLIT_CHUNK_BYTES = 4 << 20

#: Leaves smaller than this are packed. A zarr3 leaf has fixed work (two
#: files, fsyncs, a TensorStore open) before its bytes, which on object
#: stores becomes one or two requests whose latency buys about 1 MiB of
#: transfer; per-leaf figures are in benchmarks/README.md, "Figures behind
#: code decisions". Packing stops paying around 1-2 MiB, and packed leaves give up only
#: partial reads (a shard of a < 1 MiB leaf is read whole, which is cheap)
#: and readability by plain zarr tools. So: below 1 MiB, pack.
PACK_THRESHOLD = 1 << 20

#: Packs are split at about this size, so big saves write several in parallel.
PACK_BYTES = 64 << 20

#: A packed read longer than this first checks that the object is that long
#: (see :func:`_check_pack_reaches`); shorter ones are allocated as they are.
_PROBE_ABOVE = packing.COALESCE_GAP

#: At most this many backend reads/writes of one call run at once, so a
#: save of 10,000 chunks through fsspec does not open 10,000 connections.
BACKEND_CONCURRENCY = 64


async def write_arrays(
    backend: Backend,
    root: str,
    save_dir: str,
    arrays: Sequence[np.ndarray | ShardedArray],
    *,
    pack_threshold: int = PACK_THRESHOLD,
    chunk_bytes: int | None = None,
    pack_bytes: int = PACK_BYTES,
    checksum: bool = True,
    primary: bool = True,
) -> list[Leaf]:
    """Write every array of one save under ``join_key(root, save_dir)``; return descriptors.

    Arrays of at least ``pack_threshold`` bytes become zarr3 arrays (``a00000``,
    ... by position), written concurrently; smaller ones are packed into
    ``packed-NNNN.bin`` objects. ``chunk_bytes`` defaults to :data:`CHUNK_BYTES`
    (read per call); ``checksum`` adds zarr3's ``crc32c`` codec (packed leaves
    always carry a CRC-32C). With ``primary=False`` (a secondary process of a
    multi-process save) only the :class:`ShardedArray` entries are written,
    always as zarr3 without ``zarr.json``, and only their descriptors return.
    The caller must not modify the arrays until this returns (example: module docstring).

    Raises:
      InvalidInputError: ``save_dir`` is not a clean key under ``data/``.
      BackendError: the store failed.
    """
    # Dtypes and ranks were checked once, when the tree was snapshot
    # (partialstore._pytree.dtype_rules); the arrays here come from that snapshot.
    save_dir = check_save_dir(save_dir)
    descriptors: list[Leaf | None] = [None] * len(arrays)
    small = _small_leaves(arrays, pack_threshold)
    jobs: list[Awaitable[None]] = []
    if primary:
        packs = enumerate(packing.plan_packs(small, pack_bytes))
        jobs += [_write_pack(backend, root, save_dir, n, arrays, m, descriptors) for n, m in packs]
    packed_ids = {i for i, _ in small}
    target, split_target = _chunk_targets(arrays, packed_ids, chunk_bytes)
    # A private in-memory kvstore for backends without one; creating it allocates nothing.
    write = functools.partial(
        zarr3.write_array,
        memory=ts.Context(),
        checksum=checksum,
        semaphore=asyncio.Semaphore(BACKEND_CONCURRENCY),
        primary=primary,
    )

    async def write_large(i: int) -> None:
        path = join_key(save_dir, f"a{i:05d}")
        chunks = target if isinstance(arrays[i], ShardedArray) else split_target
        descriptors[i] = await write(backend, root, path, arrays[i], chunk_bytes=chunks)

    jobs.extend(
        write_large(i)
        for i in range(len(arrays))
        if i not in packed_ids and (primary or isinstance(arrays[i], ShardedArray))
    )
    await settle_all(jobs)
    return [d for d in descriptors if d is not None]


def _small_leaves(
    arrays: Sequence[np.ndarray | ShardedArray], pack_threshold: int
) -> list[tuple[int, int]]:
    """``(position, nbytes)`` of the leaves to pack: numpy arrays under ``pack_threshold``.

    Shards are never packed: every process writes its own into one zarr3 array.
    """
    return [
        (i, a.nbytes)
        for i, a in enumerate(arrays)
        if a.nbytes < pack_threshold and not isinstance(a, ShardedArray)
    ]


def _chunk_targets(
    arrays: Sequence[np.ndarray | ShardedArray], packed_ids: set[int], chunk_bytes: int | None
) -> tuple[int, int]:
    """Chunk sizes for shards (the plain target) and for this process's own large arrays.

    Shards keep the plain target (every process must choose the same chunks);
    the numpy arrays that are not packed get chunks small enough to split them.
    """
    target = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    local_large = sum(
        a.nbytes
        for i, a in enumerate(arrays)
        if i not in packed_ids and not isinstance(a, ShardedArray)
    )
    return target, min(target, max(MIN_SPLIT_CHUNK_BYTES, local_large // SPLIT_CHUNKS))


async def _write_pack(
    backend: Backend,
    root: str,
    save_dir: str,
    number: int,
    arrays: Sequence[Any],
    members: list[packing.PackMember],
    descriptors: list[Leaf | None],
) -> None:
    """Write pack ``number`` of a save (``members`` of ``arrays``) and fill in their descriptors."""
    path = join_key(save_dir, f"packed-{number:04d}.bin")
    # Copying and checksumming up to PACK_BYTES would stall the event loop.
    data, crcs = await asyncio.to_thread(packing.build_pack, arrays, members)
    await backend.write(join_key(root, path), data)
    for member, crc in zip(members, crcs, strict=True):
        array = arrays[member.index]
        descriptors[member.index] = PackedLeaf(
            path,
            member.offset,
            member.nbytes,
            dtype_from_name(dtype_name(array.dtype)),  # native order, as parse gives
            tuple(array.shape),
            crc,
        )


async def read_arrays(
    backend: Backend,
    root: str,
    requests: Sequence[tuple[dict[str, Any] | Leaf, tuple[slice, ...] | None]],
) -> list[np.ndarray]:
    """Read each ``(descriptor, index)``; ``index`` None is the whole array, else slices.

    A descriptor is the stored dict or a :class:`Leaf` already parsed from one.

    All reads run concurrently. A zarr3 array is opened once per call even
    when several requests (shards) hit it; packed leaves of one pack object
    are fetched with a few coalesced ranged reads. Every byte is checked:
    zarr3 chunks by their ``crc32c`` codec (when saved with one), packed
    leaves against the descriptor's CRC-32C. Indexes follow Python slice
    semantics (negative bounds and steps allowed). Results are fresh,
    writable, native-byte-order arrays.

    See the module docstring for an example.

    Raises:
      CorruptCheckpointError: a descriptor is malformed (unknown format, path
        outside ``data/``, ``..`` segment, absolute path, bad shape); stored
        data is missing, has another shape or dtype, or fails its checksum.
      InvalidInputError: an index is not a tuple of slices for the array's rank.
      BackendError: the store failed.
    """
    leaves = [(parse(descriptor), index) for descriptor, index in requests]
    normalized = [(leaf, normalize_index(index, leaf.shape)) for leaf, index in leaves]
    results: list[np.ndarray | None] = [None] * len(normalized)
    semaphore = asyncio.Semaphore(BACKEND_CONCURRENCY)
    memory = ts.Context()

    packed: list[tuple[int, PackedLeaf]] = []
    groups: dict[str, list[tuple[int, Zarr3Leaf, Index]]] = {}
    for request_id, (leaf, index) in enumerate(normalized):
        if isinstance(leaf, Zarr3Leaf):
            groups.setdefault(leaf.path, []).append((request_id, leaf, index))
        elif leaf.nbytes == 0:
            results[request_id] = np.zeros(leaf.shape, leaf.dtype)[index.box_slices()]
        else:
            packed.append((request_id, leaf))

    async def read_group(path: str, members: list[tuple[int, Zarr3Leaf, Index]]) -> None:
        for request_id, array in await zarr3.read_array_group(
            backend, root, path, members, memory=memory, semaphore=semaphore
        ):
            results[request_id] = array

    jobs: list[Awaitable[None]] = [
        _read_packed(backend, root, read, semaphore, normalized, results)
        for read in packing.coalesce(packed)
    ]
    jobs.extend(read_group(path, members) for path, members in groups.items())
    await settle_all(jobs)
    return [r for r in results if r is not None]


async def _read_packed(
    backend: Backend,
    root: str,
    read: packing.ReadRange,
    semaphore: asyncio.Semaphore,
    normalized: list[tuple[Leaf, Index]],
    results: list[np.ndarray | None],
) -> None:
    key = join_key(root, read.path)
    async with semaphore:
        try:
            if read.end - read.start > _PROBE_ABOVE:
                await _check_pack_reaches(backend, key, read.end)
            data = await backend.read(key, start=read.start, end=read.end)
        except NotFoundError:
            raise CorruptCheckpointError(
                f"Packed object {key!r} named by the manifest is missing. The checkpoint is "
                "damaged or incomplete."
            ) from None
    if len(data) > packing.COALESCE_GAP:
        decoded = await asyncio.to_thread(packing.decode_range, data, read, key)
    else:
        decoded = packing.decode_range(data, read, key)
    for request_id, array in decoded:
        index = normalized[request_id][1]
        if index.is_whole(array.shape):
            results[request_id] = array
        else:
            # Copy the selection so the result does not pin the whole leaf.
            results[request_id] = np.array(index.apply_inner(array[index.box_slices()]))


async def _check_pack_reaches(backend: Backend, key: str, end: int) -> None:
    """Raise unless the object at ``key`` holds at least ``end`` bytes.

    A store may allocate a ranged read's whole length before reading (a local
    file read does), so a damaged offset or size must not reach one unchecked:
    reading the range's last byte first costs one small request and proves the
    object is that large.
    """
    if len(await backend.read(key, start=end - 1, end=end)) != 1:
        raise CorruptCheckpointError(
            f"Packed object {key!r} is shorter than the {end} bytes the manifest says it "
            "holds. The checkpoint is damaged."
        )
