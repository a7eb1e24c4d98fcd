"""Small leaves packed into a few objects, and read back with coalesced ranged reads.

A save with a thousand tiny leaves (biases, step counters, scalars) should
cost a handful of objects, not a thousand: on object stores every object is
a request with tens of milliseconds of latency, and even on local disk every
file is a create and an fsync. So every leaf below a size threshold is
copied into ``packed-NNNN.bin`` objects (split at about ``pack_bytes``),
each written with one ``backend.write``.

Pack layout: leaves back to back in save order, each as little-endian,
C-order bytes, starting at an offset aligned to :data:`ALIGN` bytes (so a
numpy view of a whole pack is aligned for every dtype); gaps are zeros. Each
leaf carries a CRC-32C (Castagnoli, as in zarr3's ``crc32c`` codec and GCS)
of exactly its own bytes.

Reads group the wanted leaves by pack and merge neighbours (gap at most
:data:`COALESCE_GAP`) into one ranged read, so a load of a thousand tiny
leaves is about one request per pack.

Example:
    >>> arrays = [np.arange(3, dtype=np.float32), np.ones(1024, np.int32)]
    >>> plan = plan_packs([(0, 12), (1, 4096)], pack_bytes=64 << 20)
    >>> [(m.index, m.offset) for m in plan[0]]
    [(0, 0), (1, 64)]
    >>> data, crcs = build_pack(arrays, plan[0])
    >>> leaves = [PackedLeaf("p.bin", m.offset, m.nbytes, a.dtype, a.shape, crc)
    ...           for m, a, crc in zip(plan[0], arrays, crcs)]
    >>> [(r.start, r.end) for r in coalesce(list(enumerate(leaves)))]  # one ranged read
    [(0, 4160)]
    >>> decode_range(data, coalesce(list(enumerate(leaves)))[0])[0]
    (0, array([0., 1., 2.], dtype=float32))
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import google_crc32c
import numpy as np

from partialstore._pytree.dtype_rules import dtype_name
from partialstore.errors import CorruptCheckpointError

__all__ = [
    "ALIGN",
    "COALESCE_GAP",
    "PackMember",
    "PackedLeaf",
    "ReadRange",
    "build_pack",
    "coalesce",
    "crc32c",
    "decode_range",
    "little_endian",
    "plan_packs",
]

#: Offset alignment of leaves inside a pack: a cache line, and a multiple
#: of every itemsize (complex128 is 16 bytes).
ALIGN = 64

#: Neighbouring leaves of one pack closer than this are fetched in one
#: ranged read. An object-store request's latency buys more than 1 MiB of
#: transfer on a fast link, so skipping up to 1 MiB of unwanted bytes is
#: cheaper than a second request (the estimate is in benchmarks/README.md,
#: "Figures behind code decisions").
COALESCE_GAP = 1 << 20


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data`` as an unsigned int (hardware accelerated).

    google_crc32c only takes ``bytes`` (not memoryviews), so callers slice
    bytes; every leaf it sees is small.
    """
    return int(google_crc32c.value(data))


def little_endian(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """``dtype`` with little-endian byte order (ml_dtypes and 1-byte types unchanged)."""
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big"):
        return dtype.newbyteorder("<")
    return dtype


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


@dataclasses.dataclass(frozen=True)
class PackMember:
    """Where leaf ``index`` (position in the save's array list) sits in a pack."""

    index: int
    offset: int
    nbytes: int


def plan_packs(sizes: Sequence[tuple[int, int]], pack_bytes: int) -> list[list[PackMember]]:
    """Lay out ``(index, nbytes)`` leaves into packs of about ``pack_bytes`` each.

    Leaves keep their order; a pack is closed when the next leaf would push
    it past ``pack_bytes`` (a leaf larger than that gets a pack of its own).

    Example:
        >>> plan_packs([(0, 10), (1, 10)], pack_bytes=64)
        [[PackMember(index=0, offset=0, nbytes=10)], [PackMember(index=1, offset=0, nbytes=10)]]
    """
    packs: list[list[PackMember]] = []
    current: list[PackMember] = []
    end = 0
    for index, nbytes in sizes:
        offset = _aligned(end)
        if current and offset + nbytes > pack_bytes:
            packs.append(current)
            current, offset = [], 0
        current.append(PackMember(index, offset, nbytes))
        end = offset + nbytes
    if current:
        packs.append(current)
    return packs


def build_pack(
    arrays: Sequence[np.ndarray], members: Sequence[PackMember]
) -> tuple[bytes, list[int]]:
    """Return the bytes of one pack and the CRC-32C of each member's bytes.

    ``arrays[m.index]`` goes to ``m.offset`` as little-endian C-order bytes.
    """
    pieces: list[bytes] = []
    crcs = []
    end = 0
    for member in members:
        array = arrays[member.index]
        raw = array.astype(little_endian(array.dtype), copy=False).tobytes(order="C")
        pieces.append(bytes(member.offset - end))
        pieces.append(raw)
        crcs.append(crc32c(raw))
        end = member.offset + member.nbytes
    return b"".join(pieces), crcs


@dataclasses.dataclass(frozen=True)
class PackedLeaf:
    """A validated packed-leaf descriptor: read ``nbytes`` at ``offset`` of ``path``."""

    path: str
    offset: int
    nbytes: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    crc32c: int

    def encode(self) -> dict[str, Any]:
        """The JSON form stored in records and manifests (keys sorted as on disk).

        Example:
            >>> PackedLeaf("data/s/packed-0000.bin", 0, 4, np.dtype("<f4"), (), 7).encode()["dtype"]
            'float32'
        """
        return {
            "crc32c": self.crc32c,
            "dtype": dtype_name(self.dtype),
            "format": "packed",
            "nbytes": self.nbytes,
            "offset": self.offset,
            "path": self.path,
            "shape": list(self.shape),
        }


@dataclasses.dataclass
class ReadRange:
    """One ranged read of ``[start, end)`` of ``path`` serving ``members`` (request id, leaf)."""

    path: str
    start: int
    end: int
    members: list[tuple[int, PackedLeaf]]


def coalesce(leaves: Sequence[tuple[int, PackedLeaf]], gap: int = COALESCE_GAP) -> list[ReadRange]:
    """Merge reads of leaves in the same pack that lie within ``gap`` bytes of each other.

    Zero-byte leaves need no read and are left out; the caller builds them directly.

    See the module docstring for an example.
    """
    ranges: list[ReadRange] = []
    ordered = sorted(
        ((i, leaf) for i, leaf in leaves if leaf.nbytes),
        key=lambda item: (item[1].path, item[1].offset),
    )
    for request_id, leaf in ordered:
        last = ranges[-1] if ranges else None
        if last is not None and last.path == leaf.path and leaf.offset <= last.end + gap:
            last.end = max(last.end, leaf.offset + leaf.nbytes)
            last.members.append((request_id, leaf))
        else:
            ranges.append(
                ReadRange(leaf.path, leaf.offset, leaf.offset + leaf.nbytes, [(request_id, leaf)])
            )
    return ranges


def decode_range(
    data: bytes, read: ReadRange, where: str | None = None
) -> list[tuple[int, np.ndarray]]:
    """Check and copy every member of ``read`` out of ``data`` (the bytes read for it).

    Each returned array is a fresh, writable, native-byte-order array that
    does not keep ``data`` alive. ``where`` names the pack in messages (its
    full key; ``read.path`` by default).

    See the module docstring for an example.

    Raises:
      CorruptCheckpointError: ``data`` is short (object truncated) or a
        member's CRC-32C does not match.
    """
    where = read.path if where is None else where
    if len(data) != read.end - read.start:
        raise CorruptCheckpointError(
            f"Packed object {where!r} is truncated: asked for bytes [{read.start}, "
            f"{read.end}) and got {len(data)} bytes. The checkpoint is damaged."
        )
    out = []
    for request_id, leaf in read.members:
        start = leaf.offset - read.start
        raw = data[start : start + leaf.nbytes]
        actual = crc32c(raw)
        if actual != leaf.crc32c:
            raise CorruptCheckpointError(
                f"Checksum mismatch in {where!r} at bytes [{leaf.offset}, "
                f"{leaf.offset + leaf.nbytes}): stored crc32c {leaf.crc32c:#010x}, computed "
                f"{actual:#010x}. The checkpoint is damaged."
            )
        stored = np.frombuffer(raw, dtype=little_endian(leaf.dtype)).reshape(leaf.shape)
        # A copy: writable, native order, and it does not pin ``data``.
        out.append((request_id, stored.astype(leaf.dtype, copy=True)))
    return out
