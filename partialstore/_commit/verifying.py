"""Verifying a finalized checkpoint: read every stored byte and check every checksum.

What a checkpoint holds and what is checked:

- the manifest (``partialstore.json``) is decoded with every check of
  :mod:`partialstore._commit.records`; damage there raises, since without it
  no leaf can be found;
- inline leaves (Python scalars, strings, ``None``) live in the manifest
  itself and are checked with it;
- **packed** leaves are read and checked against the CRC-32C their
  descriptor records (:mod:`partialstore._arrays.packing`);
- **zarr3** leaves are read chunk by chunk through TensorStore: ``zarr.json``
  must match the manifest's shape, dtype and chunks, every chunk must exist
  (a missing chunk is damage, never read as zeros), and a chunk saved with
  zarr3's ``crc32c`` codec is checked against it. A leaf saved with
  ``checksum=False`` has no checksum to check: its chunks are still read and
  decoded (wrong sizes and missing chunks are found), but a flipped bit is
  not; the report lists such leaves in ``unchecksummed``.

A damaged leaf is recorded (its key path and why) and verification goes on,
so one run names every damaged leaf. Memory stays bounded: a large leaf is
read in slabs of whole chunk rows of about :data:`SLAB_BYTES`, and the
reads in flight hold at most :data:`READ_BUDGET` bytes together.

Example:
    >>> import numpy as np
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import partialstore
    >>> from partialstore._commit.location import resolve
    >>> from partialstore._runtime.aio import run
    >>> path = f"{tmp.name}/ckpt"
    >>> partialstore.save(path, {"w": np.ones((512, 1024), np.float32), "b": np.zeros(3)})
    >>> partialstore.finalize(path)
    >>> report = run(verify_checkpoint(resolve(path)))
    >>> report.ok, report.arrays, report.nbytes, report.damaged
    (True, 2, 2097176, [])
    >>> tmp.cleanup()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence

from partialstore._arrays import arrays
from partialstore._arrays.descriptors import Leaf, PackedLeaf, Zarr3Leaf
from partialstore._arrays.packing import coalesce
from partialstore._commit.loading import read_manifest
from partialstore._commit.location import Location
from partialstore._commit.records import LeafEntry
from partialstore._pytree.keypaths import format_path
from partialstore._runtime.aio import settle_all
from partialstore.errors import CorruptCheckpointError

__all__ = [
    "CONCURRENT_READS",
    "READ_BUDGET",
    "SLAB_BYTES",
    "DamagedLeaf",
    "Progress",
    "VerifyReport",
    "verify_checkpoint",
]

#: A zarr3 leaf is read in slabs of whole chunk rows of about this many bytes
#: (at least one row), so verifying a huge leaf never holds it all in memory.
SLAB_BYTES = 64 << 20

#: Reads in flight hold at most this many bytes together (a larger slab or
#: pack runs alone), so memory stays bounded however large the leaves are...
READ_BUDGET = 256 << 20

#: ... and at most this many reads run at once, so many small leaves are
#: still read in parallel without opening a connection per leaf.
CONCURRENT_READS = 32

#: Called with ``(bytes checked so far, bytes to check in all)`` as reads finish.
Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class DamagedLeaf:
    """One leaf that failed verification: its key path (as printed) and why."""

    path: str
    reason: str


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The result of verifying a checkpoint.

    Attributes:
      path: the checkpoint path verified.
      leaves: leaves in the checkpoint (inline values included).
      arrays: array leaves read.
      nbytes: array bytes read and checked (in memory size).
      damaged: the leaves that failed, in manifest order; empty when all match.
      unchecksummed: array leaves saved without a checksum (read and decoded,
        but a changed bit in them cannot be detected).
    """

    path: str
    leaves: int
    arrays: int
    nbytes: int
    damaged: list[DamagedLeaf]
    unchecksummed: list[str]

    @property
    def ok(self) -> bool:
        """True when no leaf is damaged."""
        return not self.damaged


def _slabs(leaf: Leaf) -> list[tuple[tuple[slice, ...] | None, int]]:
    """``(index, bytes)`` of reads covering ``leaf``: slabs of whole chunk rows of a zarr3 leaf."""
    if not isinstance(leaf, Zarr3Leaf) or not leaf.shape or leaf.nbytes <= SLAB_BYTES:
        return [(None, leaf.nbytes)]
    rows = leaf.shape[0]
    row_bytes = leaf.nbytes // rows
    step = max(1, SLAB_BYTES // max(row_bytes * leaf.chunks[0], 1)) * leaf.chunks[0]
    return [
        ((slice(start, start + step),), (min(start + step, rows) - start) * row_bytes)
        for start in range(0, rows, step)
    ]


class _Budget:
    """At most ``slots`` holders of at most ``nbytes`` bytes together (one larger holder alone)."""

    def __init__(self, nbytes: int, slots: int) -> None:
        self.total = nbytes
        self.free = nbytes
        self.slots = slots
        self.changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        """Wait until ``nbytes`` (capped at the whole budget) and a slot are free; hold them."""
        nbytes = min(nbytes, self.total)
        async with self.changed:
            await self.changed.wait_for(lambda: self.free >= nbytes and self.slots > 0)
            self.free -= nbytes
            self.slots -= 1
        try:
            yield
        finally:
            async with self.changed:
                self.free += nbytes
                self.slots += 1
                self.changed.notify_all()


class _Verifier:
    """Reads leaves within a memory budget, records damage and reports progress."""

    def __init__(self, location: Location, total: int, progress: Progress | None) -> None:
        self.location = location
        self.total = total
        self.done = 0
        self.progress = progress
        self.damage: dict[int, str] = {}
        self.budget = _Budget(READ_BUDGET, CONCURRENT_READS)

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more as checked and tell the progress callback."""
        self.done += nbytes
        if self.progress is not None:
            self.progress(self.done, self.total)

    async def _read(self, requests: list[tuple[Leaf, tuple[slice, ...] | None]]) -> None:
        backend, root = self.location.backend, self.location.final_prefix
        await arrays.read_arrays(backend, root, requests)

    async def leaf(self, number: int, data: Leaf) -> None:
        """Read every byte of one leaf; record why it is damaged, if it is."""
        left = data.nbytes
        for index, nbytes in _slabs(data):
            try:
                async with self.budget.hold(nbytes):
                    await self._read([(data, index)])
            except CorruptCheckpointError as error:
                self.damage[number] = str(error)
                break
            left -= nbytes
            self.advance(nbytes)
        self.advance(left)  # the rest of a damaged leaf is not read: count it as done

    async def packed(self, members: list[tuple[int, PackedLeaf]]) -> None:
        """Check the packed leaves of one coalesced range: one read when all are sound."""
        nbytes = sum(leaf.nbytes for _, leaf in members)
        try:
            async with self.budget.hold(nbytes):
                await self._read([(leaf, None) for _, leaf in members])
        except CorruptCheckpointError:
            pass  # find out which: each leaf by itself, below
        else:
            self.advance(nbytes)
            return
        for number, leaf in members:
            await self.leaf(number, leaf)


def _packed_groups(entries: list[tuple[int, Leaf]]) -> list[list[tuple[int, PackedLeaf]]]:
    """Packed leaves grouped as one load would read them (one ranged read per group)."""
    packed = [(n, leaf) for n, leaf in entries if isinstance(leaf, PackedLeaf)]
    return [read.members for read in coalesce(packed)]


async def verify_checkpoint(location: Location, progress: Progress | None = None) -> VerifyReport:
    """Read and check every byte of the finalized checkpoint at ``location``.

    ``progress`` is called on the I/O loop with ``(bytes done, bytes in all)``
    as leaves finish. See the module docstring for an example.

    Raises:
      NotFoundError: no finalized checkpoint at ``location``.
      CorruptCheckpointError: the manifest itself is damaged.
      BackendError: the store failed (not damage: nothing can be said about the bytes).
    """
    manifest = await read_manifest(location)
    leaves: Sequence[LeafEntry] = manifest.leaves
    entries = [(n, leaf.data) for n, leaf in enumerate(leaves) if leaf.data is not None]
    total = sum(data.nbytes for _, data in entries)
    verifier = _Verifier(location, total, progress)
    verifier.advance(0)  # tells the caller the total before the first read
    jobs = [verifier.packed(group) for group in _packed_groups(entries)]
    jobs += [verifier.leaf(n, data) for n, data in entries if isinstance(data, Zarr3Leaf)]
    await settle_all(jobs)
    return VerifyReport(
        path=location.path,
        leaves=len(leaves),
        arrays=len(entries),
        nbytes=total,
        damaged=[
            DamagedLeaf(format_path(leaves[n].path), reason)
            for n, reason in sorted(verifier.damage.items())
        ],
        unchecksummed=[
            format_path(leaves[n].path)
            for n, data in entries
            if isinstance(data, Zarr3Leaf) and data.checksum != "crc32c"
        ],
    )
