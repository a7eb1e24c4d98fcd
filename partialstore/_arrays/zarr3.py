"""One leaf as one zarr3 array, written and read by TensorStore on any backend.

Where the backend offers a TensorStore kvstore (``kvstore_spec``: local
``file``, ``s3``, ``gcs``), TensorStore talks to the store directly and
writes/reads chunks in parallel. Where it does not (memory, generic fsspec),
the same zarr3 bytes go through the backend: TensorStore encodes into a
private in-memory kvstore whose keys are then moved with ``backend.write``;
a load fetches ``zarr.json`` plus only the chunks that intersect the index
(of those, only the inner chunks it needs: :mod:`partialstore._arrays.fetching`)
with ``backend.read`` and lets TensorStore decode them from memory. Either
way the stored bytes are identical, so a checkpoint can be copied between
stores with any tool.

Chunks are regular, ``default`` key encoding (``c/0/1``), codecs
``bytes`` (little-endian) then optionally ``crc32c``. Arrays written now put
inner chunks in each chunk object (zarr3's ``sharding_indexed`` codec, inner
shape from :func:`~partialstore._arrays.sharded.inner_chunks`), so TensorStore
reads only the inner chunks a load needs, by ranged reads; arrays written
before (one plain chunk per object) read as ever. Every chunk is stored
even when all zeros, and loads open with ``fill_missing_data_reads=False``,
so a lost chunk is reported as damage instead of read as zeros.

:mod:`partialstore._arrays.arrays` has a runnable example of writing and
reading arrays.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import weakref
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import tensorstore as ts

from partialstore._arrays import fetching
from partialstore._arrays.descriptors import Index, Zarr3Leaf
from partialstore._arrays.dtypes import dtype_from_name, dtype_name, storage_dtype_name
from partialstore._arrays.sharded import (
    choose_chunks,
    chunk_keys,
    inner_chunks,
    shard_chunks,
)
from partialstore._pytree.shards import ShardedArray
from partialstore._runtime.aio import settle_all
from partialstore.backend import Backend, join_key
from partialstore.errors import (
    AlreadyExistsError,
    BackendError,
    CorruptCheckpointError,
    TransientBackendError,
)

__all__ = ["choose_chunks", "chunk_keys", "read_array_group", "write_array"]

T = TypeVar("T")

# One piece of an array to write: the box it covers (None: the whole array) and its data.
_Part = tuple[tuple[tuple[int, int], ...] | None, np.ndarray]

# One TensorStore context per backend, so saves and loads share its
# connection pools, credentials and I/O concurrency limits.
_contexts: weakref.WeakKeyDictionary[Backend, ts.Context] = weakref.WeakKeyDictionary()


def backend_context(backend: Backend) -> ts.Context:
    """The TensorStore context for ``backend`` (built from ``tensorstore_context()``, cached)."""
    context = _contexts.get(backend)
    if context is None:
        extra = backend.tensorstore_context()
        context = ts.Context(extra) if extra is not None else ts.Context()
        _contexts[backend] = context
    return context


def backend_kvstore(backend: Backend, key: str) -> dict[str, Any] | None:
    """``backend.kvstore_spec(key)`` with a directory-style trailing ``/``, or None."""
    spec = backend.kvstore_spec(key)
    if spec is None:
        return None
    spec = dict(spec)
    if spec.get("path") and not str(spec["path"]).endswith("/"):
        spec["path"] = f"{spec['path']}/"
    return spec


def _metadata(
    shape: Sequence[int],
    storage: str,
    chunks: Sequence[int],
    logical: str,
    checksum: bool,
    inner: Sequence[int],
) -> dict[str, Any]:
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if checksum:
        codecs.append({"name": "crc32c"})
    if list(inner) != list(chunks):
        # Each chunk object holds inner chunks and an index of where each
        # lies, so a load reads just the inner chunks its shards cross. The
        # index always has its CRC: a damaged one would send reads astray.
        index_codecs = [codecs[0], {"name": "crc32c"}]
        configuration = {
            "chunk_shape": list(inner),
            "codecs": codecs,
            "index_codecs": index_codecs,
            "index_location": "end",
        }
        codecs = [{"name": "sharding_indexed", "configuration": configuration}]
    return {
        "shape": list(shape),
        "data_type": storage,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "codecs": codecs,
        # Tells other tools what a raw-bytes storage type (uint8 for uint4) means.
        "attributes": {"partialstore_dtype": logical},
    }


def _store_view(array: np.ndarray, storage: str) -> np.ndarray:
    """The array TensorStore writes: native byte order, viewed as the storage type."""
    if array.dtype.byteorder not in "=|":
        array = array.astype(array.dtype.newbyteorder("="))
    if storage != dtype_name(array.dtype):
        array = array.view(np.dtype(storage))
    return array


def ts_error(error: Exception, action: str, *, reading: bool) -> Exception:
    """Translate a TensorStore error (a ValueError whose text starts with a status code)."""
    text = str(error)
    code = text.split(":", 1)[0].strip()
    message = f"{action}: {text}"
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"):
        return TransientBackendError(message)
    if code == "ALREADY_EXISTS":
        return AlreadyExistsError(message)
    if reading and code in (
        "NOT_FOUND",
        "DATA_LOSS",
        "FAILED_PRECONDITION",
        "INVALID_ARGUMENT",
        "OUT_OF_RANGE",
    ):
        return CorruptCheckpointError(f"{message}. The checkpoint is damaged or incomplete.")
    return BackendError(message)


async def write_array(
    backend: Backend,
    root: str,
    path: str,
    array: np.ndarray | ShardedArray,
    *,
    memory: ts.Context | None,
    chunk_bytes: int,
    checksum: bool,
    semaphore: asyncio.Semaphore,
    primary: bool = True,
) -> Zarr3Leaf:
    """Write ``array`` as the zarr3 array ``<root>/<path>`` and return its descriptor.

    ``memory`` is the caller's private in-memory context, used when the
    backend has no kvstore (shared by the arrays of one save). A
    :class:`~partialstore._pytree.shards.ShardedArray` is one process's part of a
    global array: its chunks tile every shard, only its own shards are
    written, and only the ``primary`` process writes ``zarr.json`` (the
    others assume the same metadata instead of reading it, so no process
    waits for another).
    """
    logical = dtype_name(array.dtype)
    storage = storage_dtype_name(logical)
    chunks, parts = _layout(array, storage, chunk_bytes)
    inner = inner_chunks(array.shape, chunks, np.dtype(dtype_from_name(storage)).itemsize)
    kvstore = backend_kvstore(backend, join_key(root, path))
    via_backend = kvstore is None
    if kvstore is None:
        context = memory if memory is not None else ts.Context()
        kvstore = {"driver": "memory", "path": f"{path}/"}
    else:
        context = backend_context(backend)
    spec = {
        "driver": "zarr3",
        "kvstore": kvstore,
        "metadata": _metadata(array.shape, storage, chunks, logical, checksum, inner),
        "store_data_equal_to_fill_value": True,
    }
    action = f"Writing a {logical}{list(array.shape)} array to {join_key(root, path)!r}"
    try:
        await _write_store(spec, parts, context, via_backend=via_backend, primary=primary)
    except ValueError as error:
        raise ts_error(error, action, reading=False) from None
    if via_backend:
        await _move_to_backend(backend, root, path, context, semaphore, metadata=primary)
    return Zarr3Leaf(
        path,
        dtype_from_name(logical),
        dtype_from_name(storage),
        tuple(array.shape),
        tuple(chunks),
        "crc32c" if checksum else None,
    )


def _layout(
    array: np.ndarray | ShardedArray, storage: str, chunk_bytes: int
) -> tuple[list[int], list[_Part]]:
    """The chunk shape of ``array`` and its parts to write (its own shards, or all of it)."""
    if isinstance(array, ShardedArray):
        chunks = shard_chunks(array, chunk_bytes)
        return chunks, [(box, _store_view(data, storage)) for box, data in array.shards]
    chunks = choose_chunks(array.shape, array.dtype.itemsize, chunk_bytes)
    return chunks, [(None, _store_view(array, storage))]


async def _write_store(
    spec: dict[str, Any],
    parts: list[_Part],
    context: ts.Context,
    *,
    via_backend: bool,
    primary: bool,
) -> None:
    """Open the zarr3 array ``spec`` and write ``parts`` (and, if ``primary``, zarr.json)."""
    if via_backend:
        # A private memory kvstore is empty, so every process may create there.
        store = await ts.open(spec, create=True, context=context)
        await _write_parts(store, parts)
        return
    # No metadata round trips before the chunks: TensorStore's create reads
    # zarr.json (expecting a miss) and writes it before any chunk, two
    # requests in series per array on every save. The save directory is
    # fresh, so nothing is there to check; zarr.json goes up alongside the
    # chunks, and only the log record makes any of it part of a checkpoint.
    store = await ts.open(spec, open=True, assume_metadata=True, context=context)
    jobs = [_write_parts(store, parts)]
    if primary:
        jobs.append(_write_zarr_json(store, spec["kvstore"], context))
    await settle_all(jobs)


async def _write_parts(store: ts.TensorStore, parts: list[_Part]) -> None:
    """Write each ``(box, data)`` part (``box`` None: the whole array) into ``store``."""
    writes = []
    for box, data in parts:
        target = store if box is None else store[tuple(slice(lo, hi) for lo, hi in box)]
        # Let TensorStore encode straight from the caller's buffer instead of
        # first copying it into its chunk cache: a copy less, and faster
        # (figures: benchmarks/README.md, "Figures behind code decisions").
        # Safe because write_arrays' caller keeps the arrays unchanged until
        # it returns, and the store (with the default zero-byte cache pool)
        # is dropped when write_array returns.
        writes.append(target.write(data, can_reference_source_data_indefinitely=True))
    await settle_all(writes)


async def _write_zarr_json(
    store: ts.TensorStore, kvstore: dict[str, Any], context: ts.Context
) -> None:
    """Write the ``zarr.json`` that ``store`` (opened with ``assume_metadata``) describes.

    The metadata is TensorStore's own, from the store's spec, in the compact
    sorted JSON that TensorStore itself writes.
    """
    metadata = store.spec().to_json()["metadata"]
    body = json.dumps(metadata, sort_keys=True, separators=(",", ":"), allow_nan=False)
    kv = await ts.KvStore.open(kvstore, context=context)
    await kv.write("zarr.json", body.encode())


async def _move_to_backend(
    backend: Backend,
    root: str,
    path: str,
    context: ts.Context,
    semaphore: asyncio.Semaphore,
    *,
    metadata: bool = True,
) -> None:
    """Move every key TensorStore wrote under ``path`` in memory to the backend.

    Without ``metadata``, ``zarr.json`` is dropped: another process writes it.
    """
    memory = await ts.KvStore.open({"driver": "memory", "path": f"{path}/"}, context=context)
    keys = [key.decode() for key in await memory.list()]
    if not metadata:
        await memory.delete_range(ts.KvStore.KeyRange("zarr.json", "zarr.json\x00"))
        keys = [key for key in keys if key != "zarr.json"]

    async def move(key: str) -> None:
        async with semaphore:
            value = (await memory.read(key)).value
            await backend.write(join_key(root, path, key), value)
            # Drop each chunk once moved, so memory holds about one copy at a time.
            await memory.delete_range(ts.KvStore.KeyRange(key, key + "\x00"))

    await settle_all([move(key) for key in keys])


def _check_store(store: ts.TensorStore, leaf: Zarr3Leaf, where: str) -> None:
    # The stored chunk objects (shards, with inner chunks) are TensorStore's write chunks.
    chunk_shape = store.chunk_layout.write_chunk.shape  # None for a 0-d array
    found = (
        tuple(store.shape),
        store.dtype.numpy_dtype,
        tuple(chunk_shape) if chunk_shape is not None else (),
    )
    wanted = (leaf.shape, leaf.storage, leaf.chunks)
    if found != wanted:
        raise CorruptCheckpointError(
            f"Array {where!r} holds shape {found[0]}, dtype {found[1]}, chunks {found[2]} but "
            f"the manifest says shape {wanted[0]}, dtype {wanted[1]}, chunks {wanted[2]}. The "
            "checkpoint is damaged."
        )


def _tiling_box(boxes: Sequence[tuple[tuple[int, int], ...]]) -> tuple[tuple[int, int], ...] | None:
    """The bounding box of ``boxes`` if they tile it (disjoint, no gaps), else None.

    Example:
        >>> _tiling_box([((0, 4), (0, 2)), ((0, 4), (2, 4))])
        ((0, 4), (0, 4))
        >>> _tiling_box([((0, 4), (0, 2)), ((0, 4), (3, 4))]) is None
        True
    """
    if len(boxes) < 2 or not boxes[0]:
        return None
    bound = tuple(
        (min(b[a][0] for b in boxes), max(b[a][1] for b in boxes)) for a in range(len(boxes[0]))
    )

    def volume(box: tuple[tuple[int, int], ...]) -> int:
        return math.prod(max(0, hi - lo) for lo, hi in box)

    if sum(volume(b) for b in boxes) != volume(bound) or volume(bound) == 0:
        return None
    for first, second in itertools.combinations(boxes, 2):
        if all(max(a[0], b[0]) < min(a[1], b[1]) for a, b in zip(first, second, strict=True)):
            return None  # they overlap
    return bound


async def _read_box(
    store: ts.TensorStore, leaf: Zarr3Leaf, box: tuple[tuple[int, int], ...], where: str
) -> np.ndarray:
    try:
        array = await store[tuple(slice(lo, hi) for lo, hi in box)].read()
    except ValueError as error:
        raise ts_error(error, f"Reading array {where!r}", reading=True) from None
    return array.view(leaf.dtype) if leaf.storage != leaf.dtype else array


async def _read_members(
    store: ts.TensorStore, members: Sequence[tuple[int, Zarr3Leaf, Index]], where: str
) -> list[tuple[int, np.ndarray]]:
    """Read each member's index; members that tile one box (one process's shards) in one read.

    One read of the whole box lets TensorStore fetch each chunk object's
    inner chunks together (one request per object where the box covers it)
    instead of once per shard.
    """
    bound = _tiling_box([index.box for _, _, index in members])
    if bound is not None:  # (read_array_group probed the box's last chunk)
        whole = await _read_box(store, members[0][1], bound, where)
        out = []
        for request_id, _, index in members:
            part = whole[
                tuple(
                    slice(lo - o, hi - o) for (lo, hi), (o, _) in zip(index.box, bound, strict=True)
                )
            ]
            out.append((request_id, index.apply_inner(np.array(part))))
        return out

    async def read_one(request_id: int, leaf: Zarr3Leaf, index: Index) -> tuple[int, np.ndarray]:
        return request_id, index.apply_inner(await _read_box(store, leaf, index.box, where))

    return await settle_all([read_one(*member) for member in members])


async def read_array_group(
    backend: Backend,
    root: str,
    path: str,
    members: Sequence[tuple[int, Zarr3Leaf, Index]],
    *,
    memory: ts.Context | None,
    semaphore: asyncio.Semaphore,
) -> list[tuple[int, np.ndarray]]:
    """Open ``<root>/<path>`` once and read every ``(request id, leaf, index)`` of it.

    Returns ``(request id, array)`` pairs; each array is fresh and writable.
    """
    where = join_key(root, path)
    kvstore = backend_kvstore(backend, where)
    via_backend = kvstore is None
    if kvstore is None:
        context = memory if memory is not None else ts.Context()
        kvstore = {"driver": "memory", "path": f"{path}/"}
    else:
        context = backend_context(backend)
    spec = {"driver": "zarr3", "kvstore": kvstore, "fill_missing_data_reads": False}
    try:
        if via_backend:
            fetched = await ts.KvStore.open(kvstore, context=context)
            # zarr.json first: the chunks to fetch are only known to be real
            # once the manifest's shape and chunks match the array's metadata.
            await fetching.fetch_key(backend, root, path, "zarr.json", fetched, semaphore)
        try:
            store = await ts.open(spec, open=True, read=True, context=context)
        except ValueError as error:
            raise ts_error(error, f"Opening array {where!r}", reading=True) from None
        for _, leaf, _ in members:
            _check_store(store, leaf, where)
        layout = fetching.layout_of(store, members[0][1])
        if via_backend:
            await fetching.fetch_chunks(backend, root, path, members, fetched, semaphore, layout)
        else:
            bound = _tiling_box([index.box for _, _, index in members])
            boxes = [m[2] for m in members] if bound is None else [Index(bound, None)]
            leaf = members[0][1]
            await settle_all(
                [fetching.check_last_chunk(backend, root, path, leaf, i, layout) for i in boxes]
            )

        return await _read_members(store, members, where)
    finally:
        if via_backend:
            scratch = await ts.KvStore.open({"driver": "memory"}, context=context)
            await scratch.delete_range(ts.KvStore.KeyRange(f"{path}/", f"{path}0"))
