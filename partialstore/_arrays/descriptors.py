"""Array descriptors: what the manifest records per leaf, and their validation.

A descriptor is a JSON object. Its path is relative to the checkpoint root
and must name an object of a save directory, ``data/<save-id>/<name>``: the
manifest is data read from a store, so a damaged or hostile one must not make
a load read (or a gc delete) anything outside the checkpoint. :func:`parse`
rejects unknown formats, absolute paths, ``..``/``.``/empty segments,
backslashes and paths outside ``data/`` with
:class:`~partialstore.errors.CorruptCheckpointError`. Every number is checked
before anything uses it: shapes and chunks are at most :data:`MAX_RANK`
non-negative ints whose product (in bytes) is at most :data:`MAX_ARRAY_BYTES`,
chunks lie within the shape, packed offsets are aligned and ``nbytes`` equals
the shape's size, so no read allocates from an unchecked number.

Two formats (see :mod:`partialstore._arrays.arrays` for when each is used)::

    {"format": "zarr3", "path": "data/<sid>/a00003", "dtype": "bfloat16",
     "storage_dtype": "bfloat16", "shape": [4096, 4096], "chunks": [2048, 4096],
     "checksum": "crc32c"}
    {"format": "packed", "path": "data/<sid>/packed-0000.bin", "offset": 128,
     "nbytes": 48, "dtype": "float32", "shape": [3, 4], "crc32c": 2868146129}

Example:
    >>> descriptor = {"format": "packed", "path": "data/s1/packed-0000.bin", "offset": 128,
    ...               "nbytes": 48, "dtype": "float32", "shape": [3, 4], "crc32c": 2868146129}
    >>> leaf = parse(descriptor)  # Zarr3Leaf or PackedLeaf, or raises
    >>> type(leaf).__name__, leaf.offset, leaf.shape
    ('PackedLeaf', 128, (3, 4))
    >>> descriptor_nbytes(descriptor)
    48
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from partialstore._arrays.dtypes import MAX_RANK, dtype_from_name, dtype_name
from partialstore._arrays.packing import ALIGN, PackedLeaf
from partialstore._pytree.keypaths import short_repr
from partialstore.backend import validate_key
from partialstore.errors import CorruptCheckpointError, InvalidInputError

__all__ = [
    "DATA_PREFIX",
    "FORMAT_PACKED",
    "FORMAT_ZARR3",
    "MAX_ARRAY_BYTES",
    "Index",
    "Leaf",
    "PackedLeaf",
    "Zarr3Leaf",
    "check_save_dir",
    "descriptor_nbytes",
    "encode",
    "normalize_index",
    "parse",
]

FORMAT_ZARR3 = "zarr3"
FORMAT_PACKED = "packed"
#: Every array path lives below this top-level directory of the checkpoint.
DATA_PREFIX = "data"

# One clean segment: no "/", backslash or NUL, and not "." or "..".
_SEGMENT = r"(?!\.\.?(?:/|\Z))[^/\\\x00]+"
# data/<save-id>/<name>[/...]: a relative key of an object inside a save directory.
_DATA_PATH = re.compile(rf"{DATA_PREFIX}(?:/{_SEGMENT}){{2,}}")

#: Largest array a descriptor may describe, in bytes (zero-length dimensions
#: counted as 1, so an empty array cannot hide huge other dimensions).
#: TensorStore indexes at most 2**62 elements; numpy arrays stay below 2**63 bytes.
MAX_ARRAY_BYTES = 2**62


@dataclasses.dataclass(frozen=True)
class Zarr3Leaf:
    """A validated zarr3 descriptor; ``storage`` is the zarr3 data type on disk."""

    path: str
    dtype: np.dtype[Any]
    storage: np.dtype[Any]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    #: The zarr3 checksum codec the array was written with (``"crc32c"``), or None.
    checksum: str | None = None

    def encode(self) -> dict[str, Any]:
        """The JSON form stored in records and manifests (keys sorted as on disk).

        Example:
            >>> f4 = np.dtype("float32")
            >>> Zarr3Leaf("data/s/a", f4, f4, (3, 4), (3, 4), "crc32c").encode()["chunks"]
            [3, 4]
        """
        return {
            "checksum": self.checksum,
            "chunks": list(self.chunks),
            "dtype": dtype_name(self.dtype),
            "format": FORMAT_ZARR3,
            "path": self.path,
            "shape": list(self.shape),
            "storage_dtype": dtype_name(self.storage),
        }

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array in memory.

        Example:
            >>> f4 = np.dtype("float32")
            >>> Zarr3Leaf("data/s/a", f4, f4, (3, 4), (3, 4)).nbytes
            48
        """
        return math.prod(self.shape) * self.dtype.itemsize


Leaf = Zarr3Leaf | PackedLeaf


def _bad(descriptor: Any, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"Bad array descriptor {short_repr(descriptor)}: {why}. The checkpoint manifest is damaged."
    )


def _int(descriptor: Any, value: object, what: str, minimum: int) -> int:
    if type(value) is int and minimum <= value <= MAX_ARRAY_BYTES:
        return value  # the common case, checked first: manifests hold many
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not minimum <= value <= MAX_ARRAY_BYTES
    ):
        raise _bad(
            descriptor,
            f"{what} must be an integer in [{minimum}, 2**62], got {short_repr(value, 40)}",
        )
    return value


def _ints(descriptor: Any, value: Any, what: str, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) > MAX_RANK:
        raise _bad(descriptor, f"{what} must be a list of at most {MAX_RANK} integers")
    for v in value:  # a plain loop: this runs for every leaf of a manifest
        if type(v) is not int or not minimum <= v <= MAX_ARRAY_BYTES:
            _int(descriptor, v, what, minimum)  # raises the message
    return tuple(value)


def _shape(descriptor: Any, dtype: np.dtype[Any]) -> tuple[int, ...]:
    shape = _ints(descriptor, descriptor.get("shape"), "shape", 0)
    size = dtype.itemsize
    for n in shape:
        if n > 1:
            size *= n
    if size > MAX_ARRAY_BYTES:
        raise _bad(descriptor, f"shape {list(shape)} of {dtype} is larger than 2**62 bytes")
    return shape


def _check_path(descriptor: Any, path: Any) -> str:
    if not isinstance(path, str) or not _DATA_PATH.fullmatch(path):
        raise _bad(
            descriptor,
            f"path {short_repr(path, 80)} is not a clean relative key of an object below "
            f"'{DATA_PREFIX}/<save-id>/' (no '.', '..' or empty segments, no backslash or NUL)",
        )
    return path


def _dtype(descriptor: Any, field: str, default: Any = None) -> np.dtype[Any]:
    try:
        return dtype_from_name(descriptor.get(field, default))
    except CorruptCheckpointError as error:
        raise _bad(descriptor, f"{field}: {error}") from None


def parse(descriptor: Any) -> Leaf:
    """Validate ``descriptor`` and return it as a :class:`Zarr3Leaf` or :class:`PackedLeaf`.

    The decoder of the descriptors' JSON form (:func:`encode` is the encoder):
    every check of a descriptor is here.

    An already parsed :class:`Zarr3Leaf` or :class:`PackedLeaf` is returned as it is.

    Example:
        >>> parse({"format": "packed", "path": "../x"})
        Traceback (most recent call last):
        partialstore.errors.CorruptCheckpointError: Bad array descriptor ...

    Raises:
      CorruptCheckpointError: anything malformed, including escaping paths,
        unknown dtypes and out-of-range numbers.
    """
    if isinstance(descriptor, Zarr3Leaf | PackedLeaf):
        return descriptor
    if not isinstance(descriptor, dict):
        raise _bad(descriptor, "it is not a JSON object")
    kind = descriptor.get("format")
    if kind not in (FORMAT_ZARR3, FORMAT_PACKED):
        raise _bad(descriptor, f"unknown format {short_repr(kind, 40)} (known: 'zarr3', 'packed')")
    path = _check_path(descriptor, descriptor.get("path"))
    dtype = _dtype(descriptor, "dtype")
    shape = _shape(descriptor, dtype)
    if kind == FORMAT_PACKED:
        return _packed(descriptor, path, dtype, shape)
    chunks = _ints(descriptor, descriptor.get("chunks"), "chunks", 1)
    if len(chunks) != len(shape):
        raise _bad(descriptor, f"chunks {list(chunks)} and shape {list(shape)} differ in rank")
    if any(c > max(n, 1) for c, n in zip(chunks, shape, strict=True)):
        raise _bad(descriptor, f"chunks {list(chunks)} exceed shape {list(shape)}")
    storage = _dtype(descriptor, "storage_dtype", descriptor["dtype"])
    if storage.itemsize != dtype.itemsize:
        raise _bad(descriptor, f"storage dtype {storage} is not as wide as {dtype}")
    checksum = descriptor.get("checksum")
    if checksum is not None and not isinstance(checksum, str):
        raise _bad(descriptor, f"checksum must be a codec name or null, got {short_repr(checksum)}")
    return Zarr3Leaf(path, dtype, storage, shape, chunks, checksum)


def _packed(descriptor: Any, path: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Leaf:
    offset = _int(descriptor, descriptor.get("offset"), "offset", 0)
    if offset % ALIGN:
        raise _bad(descriptor, f"offset {offset} is not a multiple of {ALIGN}")
    nbytes = _int(descriptor, descriptor.get("nbytes"), "nbytes", 0)
    if nbytes != math.prod(shape) * dtype.itemsize:
        raise _bad(descriptor, f"nbytes {nbytes} does not match shape {list(shape)} of {dtype}")
    if offset + nbytes > MAX_ARRAY_BYTES:
        raise _bad(descriptor, f"bytes [{offset}, {offset + nbytes}) lie beyond 2**62")
    crc = _int(descriptor, descriptor.get("crc32c"), "crc32c", 0)
    if crc > 0xFFFFFFFF:
        raise _bad(descriptor, f"crc32c {crc} does not fit in 32 bits")
    return PackedLeaf(path, offset, nbytes, dtype, shape, crc)


def encode(leaf: Leaf) -> dict[str, Any]:
    """The JSON form of a typed descriptor; :func:`parse` decodes it back.

    Example:
        >>> descriptor = {"format": "packed", "path": "data/s1/packed-0000.bin", "offset": 128,
        ...               "nbytes": 48, "dtype": "float32", "shape": [3, 4], "crc32c": 7}
        >>> encode(parse(descriptor)) == descriptor
        True
    """
    return leaf.encode()


def descriptor_nbytes(descriptor: dict[str, Any] | Leaf) -> int:
    """Bytes of the whole array a descriptor stands for (its in-memory size).

    Example:
        >>> descriptor_nbytes({"format": "zarr3", "path": "data/s1/a00000", "dtype": "float32",
        ...                    "shape": [3, 4], "chunks": [3, 4]})
        48

    Raises:
      CorruptCheckpointError: the descriptor is malformed.
    """
    return parse(descriptor).nbytes


def check_save_dir(save_dir: str) -> str:
    """Return ``save_dir`` if it is a clean key below ``data/``, else raise InvalidInputError."""
    try:
        validate_key(save_dir)
    except InvalidInputError as error:
        raise InvalidInputError(f"Bad save directory: {error}") from None
    if save_dir.split("/", 1)[0] != DATA_PREFIX or "/" not in save_dir:
        raise InvalidInputError(
            f"Save directory {save_dir!r} must be below '{DATA_PREFIX}/' (e.g. 'data/<save-id>')."
        )
    return save_dir


@dataclasses.dataclass(frozen=True)
class Index:
    """A read's index as a step-1 bounding ``box`` plus the stepped slices inside it.

    ``inner`` is None when every step is 1 (the box is the answer).
    """

    box: tuple[tuple[int, int], ...]
    inner: tuple[slice, ...] | None

    def box_slices(self) -> tuple[slice, ...]:
        """The box as slices, for TensorStore or numpy indexing."""
        return tuple(slice(lo, hi) for lo, hi in self.box)

    def is_whole(self, shape: tuple[int, ...]) -> bool:
        """Whether the index selects all of an array of ``shape``, in order."""
        return self.inner is None and all(
            lo == 0 and hi == n for (lo, hi), n in zip(self.box, shape, strict=True)
        )

    def apply_inner(self, box_array: np.ndarray) -> np.ndarray:
        """Apply ``inner`` to the array read for the box (a C-contiguous result)."""
        if self.inner is None:
            return box_array
        return np.ascontiguousarray(box_array[self.inner])


def normalize_index(index: Any, shape: tuple[int, ...]) -> Index:
    """Turn ``None`` or a tuple of slices (Python semantics) into an :class:`Index`.

    Missing trailing slices mean whole dimensions. TensorStore indexes
    absolute coordinates (-1 is not "the last"), so slices are resolved
    against ``shape`` here and steps are applied by numpy after the read.

    Example:
        >>> normalize_index((slice(-2, None),), (10, 3)).box
        ((8, 10), (0, 3))

    Raises:
      InvalidInputError: ``index`` is not a tuple/list of at most ``len(shape)`` slices.
    """
    if index is None:
        return Index(tuple((0, n) for n in shape), None)
    if not isinstance(index, tuple | list) or len(index) > len(shape):
        raise InvalidInputError(
            f"Index {index!r} must be a tuple of at most {len(shape)} slices for shape {shape}."
        )
    box: list[tuple[int, int]] = []
    inner: list[slice] = []
    stepped = False
    for axis, size in enumerate(shape):
        item = index[axis] if axis < len(index) else slice(None)
        if not isinstance(item, slice):
            raise InvalidInputError(f"Index {index!r} must hold only slices, got {item!r}.")
        picked = range(*item.indices(size))
        if len(picked) == 0:
            box.append((0, 0))
            inner.append(slice(0, 0))
            continue
        first, last = picked[0], picked[-1]
        lo, hi = min(first, last), max(first, last) + 1
        box.append((lo, hi))
        stop = last - lo + (1 if picked.step > 0 else -1)
        inner.append(slice(first - lo, stop if stop >= 0 else None, picked.step))
        stepped = stepped or picked.step != 1
    return Index(tuple(box), tuple(inner) if stepped else None)
