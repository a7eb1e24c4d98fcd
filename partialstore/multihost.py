"""Multi-process saves: sharded snapshots, chunk layout, and coordination.

In a multi-process JAX job (``jax.distributed.initialize`` called) every
process calls ``save`` with the same global tree, in the same order. Each
process snapshots and writes only the shards it owns (``replica_id == 0``,
so a replicated shard is written once) into the same zarr3 arrays, whose
chunks tile every shard exactly, so no two processes ever write one chunk.
The primary process (index 0) also writes the small and process-local
leaves, collects every process's outcome, appends the one log record and
tells the others how it went; finalize runs on the primary alone.

Coordination uses the key-value store of JAX's distributed coordination
service: the primary publishes, the others block on a key (in a thread, so
partialstore's event loop keeps running). Failures travel as messages, so a
process whose write fails makes every process's ``save`` raise instead of
leaving the others waiting at a barrier. With one process (or without
``jax.distributed``) nothing here talks to anyone.

Example::

    if is_multiprocess():
        save_id = await broadcast(op_key(path, "save_id"), uuid4().hex if is_primary() else None)
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import os
import threading
from typing import Any

import numpy as np

from partialstore import errors

__all__ = [
    "ShardedArray",
    "broadcast",
    "decode_outcome",
    "encode_outcome",
    "gather_to_primary",
    "is_multiprocess",
    "is_primary",
    "next_op",
    "process_count",
    "process_index",
    "shard_chunks",
    "snapshot_shards",
]

#: How long a process waits for another (seconds); ``PARTIALSTORE_MULTIHOST_TIMEOUT_S``
#: overrides it. A save of a large sharded tree may take minutes on every process.
DEFAULT_TIMEOUT_S = 1800.0


def _global_state() -> Any:
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover - jax is a dependency
        return None
    return distributed.global_state


def _client() -> Any:
    state = _global_state()
    if state is None or state.client is None or (state.num_processes or 1) <= 1:
        return None
    return state.client


def is_multiprocess() -> bool:
    """Whether ``jax.distributed`` is initialized with more than one process."""
    return _client() is not None


def process_count() -> int:
    """Number of processes in the job (1 without ``jax.distributed``)."""
    state = _global_state()
    return int(state.num_processes) if is_multiprocess() else 1


def process_index() -> int:
    """This process's index (0 without ``jax.distributed``)."""
    state = _global_state()
    return int(state.process_id) if is_multiprocess() else 0


def is_primary() -> bool:
    """Whether this process writes metadata and log records (index 0)."""
    return process_index() == 0


def _timeout_ms() -> int:
    return int(float(os.environ.get("PARTIALSTORE_MULTIHOST_TIMEOUT_S", DEFAULT_TIMEOUT_S)) * 1000)


_counters: dict[str, int] = {}
_counters_lock = threading.Lock()


def next_op(path: str) -> str:
    """A key prefix unique to the next collective operation on ``path``.

    Every process calls save/finalize on a path in the same order, so the
    per-path counter gives the same prefix everywhere. Every process must
    spell ``path`` the same way.
    """
    digest = hashlib.sha256(path.encode()).hexdigest()[:24]
    with _counters_lock:
        number = _counters.get(digest, 0)
        _counters[digest] = number + 1
    return f"partialstore/{digest}/{number}"


async def _get(key: str) -> str:
    client = _client()
    try:
        return await asyncio.to_thread(client.blocking_key_value_get, key, _timeout_ms())
    except Exception as error:  # jaxlib raises its own XlaRuntimeError on timeout
        raise TimeoutError(
            f"Process {process_index()} waited in vain for {key!r} from another process of "
            f"the JAX job ({error}). Did every process call the same partialstore functions "
            "on the same path, in the same order?"
        ) from error


async def broadcast(key: str, value: str | None) -> str:
    """Return the primary's ``value`` on every process (others pass ``None``)."""
    if is_primary():
        assert value is not None
        await asyncio.to_thread(_client().key_value_set, key, value)
        return value
    return await _get(key)


async def gather_to_primary(key: str, value: str) -> list[str] | None:
    """Send ``value`` to the primary; it gets every process's value in order, others None."""
    await asyncio.to_thread(_client().key_value_set, f"{key}/{process_index()}", value)
    if not is_primary():
        return None
    return [await _get(f"{key}/{i}") for i in range(process_count())]


_ERROR_TYPES = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.PartialStoreError)
}


def encode_outcome(error: BaseException | None, result: str = "") -> str:
    """``"ok:<result>"``, or the error's type and message for :func:`decode_outcome`."""
    if error is None:
        return f"ok:{result}"
    return f"error:{type(error).__name__}:{error}"


def decode_outcome(text: str, where: str) -> str:
    """Return the result of an ``"ok:..."`` outcome, or raise the error it names.

    partialstore's own errors keep their type (a seal is
    :class:`~partialstore.errors.CheckpointFinalizedError` everywhere); others
    become :class:`~partialstore.errors.PartialStoreError`.
    """
    kind, _, rest = text.partition(":")
    if kind == "ok":
        return rest
    name, _, message = rest.partition(":")
    cls = _ERROR_TYPES.get(name, errors.PartialStoreError)
    raise cls(f"{where} failed on another process of the JAX job: {name}: {message}")


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

    Example::

        shard_chunks(ShardedArray((16, 3), f32, ((0, 4, 8, 12, 16), (0, 3)), []), 1 << 20)
        # [4, 3]
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
