"""Stable names for the dtypes partialstore can save, and how each is stored.

A descriptor names a leaf's dtype with a string that does not depend on the
platform, numpy version or byte order: numpy's name for its builtin numeric
types (``"float32"``, ``"complex128"``, ``"bool"``) and ml_dtypes' name for
its types (``"bfloat16"``, ``"float8_e4m3fn"``, ``"int4"``, ...). Byte order
is not part of the name: data is always stored little-endian and loaded in
native order, so a ``'>f4'`` array round-trips by value as ``"float32"``.

Most types are stored in zarr3 under their own ``data_type`` name. The
ml_dtypes types TensorStore's zarr3 driver does not know (checked against
tensorstore 0.1.86: ``float8_e4m3``, ``float6_*``, ``uint4``, ``uint2``,
``int1``, ``uint1``, ``complex32``, ``bcomplex32``) are stored as their raw
bytes viewed as an unsigned integer of the same width, so every element
keeps its bit pattern and the array keeps its shape (chunking and partial
reads work unchanged); the descriptor records both names.

Rejected with :class:`~partialstore.errors.UnsupportedLeafError`: object,
string, bytes, structured/void, datetime64/timedelta64, and ``longdouble``
(its bytes are x87 80-bit on x86 but IEEE quad elsewhere, so they would not
mean the same number on another machine; convert to float64).

Example:
    >>> import ml_dtypes
    >>> dtype_name(np.dtype(">f4"))
    'float32'
    >>> dtype_from_name("bfloat16") == ml_dtypes.bfloat16
    True
    >>> storage_dtype_name("uint4")
    'uint8'
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from partialstore.errors import CorruptCheckpointError, UnsupportedLeafError

__all__ = [
    "MAX_RANK",
    "SUPPORTED_DTYPE_NAMES",
    "check_array_supported",
    "dtype_from_name",
    "dtype_name",
    "storage_dtype_name",
]

#: TensorStore indexes at most 32 dimensions; numpy allows 64.
MAX_RANK = 32

_NUMPY_NAMES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)

# Every ml_dtypes scalar type we know of; the ones missing from the
# installed ml_dtypes version are skipped below rather than failing import.
_ML_NAMES = (
    "bfloat16",
    "float8_e3m4",
    "float8_e4m3",
    "float8_e4m3b11fnuz",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float6_e2m3fn",
    "float6_e3m2fn",
    "float4_e2m1fn",
    "int1",
    "int2",
    "int4",
    "uint1",
    "uint2",
    "uint4",
    "complex32",
    "bcomplex32",
)

# data_type names TensorStore's zarr3 driver accepts (probed on 0.1.86).
# Anything else is stored as raw same-width unsigned integers.
_ZARR3_NATIVE = frozenset(
    (
        *_NUMPY_NAMES,
        "bfloat16",
        "float8_e3m4",
        "float8_e4m3b11fnuz",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn",
        "int2",
        "int4",
    )
)

_BY_NAME: dict[str, np.dtype[Any]] = {name: np.dtype(name) for name in _NUMPY_NAMES}
_BY_NAME.update(
    {name: np.dtype(getattr(ml_dtypes, name)) for name in _ML_NAMES if hasattr(ml_dtypes, name)}
)
# ml_dtypes types share numpy's 'V' kind and even reuse type chars (bfloat16
# and uint1 are both 'E'), so they are told apart by scalar type only.
_ML_NAME_BY_TYPE: dict[type, str] = {
    _BY_NAME[name].type: name for name in _ML_NAMES if name in _BY_NAME
}

#: Every dtype name :func:`dtype_from_name` accepts.
SUPPORTED_DTYPE_NAMES: frozenset[str] = frozenset(_BY_NAME)

_UNSIGNED_OF_WIDTH = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}

_WHY_NOT = {
    "O": "Python objects have no portable byte representation",
    "U": "strings are not array data; save them as metadata or encode them to uint8",
    "S": "byte strings are not array data; view them as uint8",
    "M": "datetime64 has no stable storage here; save .astype('int64') and the unit",
    "m": "timedelta64 has no stable storage here; save .astype('int64') and the unit",
    "V": "structured/void records are not supported; save each field as its own leaf",
}


def dtype_name(dtype: Any) -> str:
    """Return the stable storage name of ``dtype`` (byte order is not part of it).

    Example:
        >>> dtype_name(np.float32)
        'float32'
        >>> dtype_name(np.dtype(">i2"))
        'int16'
        >>> dtype_name(ml_dtypes.float8_e4m3fn)
        'float8_e4m3fn'

    Raises:
      UnsupportedLeafError: object, string, void/structured, datetime or
        longdouble dtypes (the message names the dtype and what to do).
    """
    try:
        dt: np.dtype[Any] = np.dtype(dtype)
    except TypeError as error:
        raise UnsupportedLeafError(f"{dtype!r} is not a numpy dtype: {error}") from None
    ml_name = _ML_NAME_BY_TYPE.get(dt.type)
    if ml_name is not None:
        return ml_name
    if dt.kind in "biufc" and dt.names is None and dt.subdtype is None:
        name = dt.name
        if name in _BY_NAME and _BY_NAME[name] == dt.newbyteorder("="):
            return name
        raise UnsupportedLeafError(
            f"dtype {dt} ({name}) cannot be saved: its bytes mean different numbers on "
            "different platforms; convert it to float64/complex128 first."
        )
    reason = _WHY_NOT.get(dt.kind, "it is not a numeric dtype")
    raise UnsupportedLeafError(f"dtype {dt!s} cannot be saved: {reason}.")


def dtype_from_name(name: str) -> np.dtype[Any]:
    """Return the native-order numpy dtype stored under ``name``.

    Example:
        >>> dtype_from_name("int4")
        dtype(int4)

    Raises:
      CorruptCheckpointError: ``name`` is not a dtype name partialstore writes
        (a damaged manifest, or one written by a newer version).
    """
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise CorruptCheckpointError(
            f"Unknown dtype name {name!r} in a checkpoint descriptor; known names are "
            f"{sorted(_BY_NAME)}. The checkpoint is damaged or was written by a newer version."
        ) from None


def storage_dtype_name(name: str) -> str:
    """Return the zarr3 ``data_type`` that holds dtype ``name`` on disk.

    It is ``name`` itself where TensorStore's zarr3 driver supports it, else
    the unsigned integer of the same width holding the raw bit patterns.

    Example:
        >>> storage_dtype_name("bfloat16")
        'bfloat16'
        >>> storage_dtype_name("complex32")
        'uint32'
    """
    if name in _ZARR3_NATIVE:
        return name
    return _UNSIGNED_OF_WIDTH[dtype_from_name(name).itemsize]


def check_array_supported(array: Any) -> None:
    """Raise :class:`UnsupportedLeafError` unless ``array`` can be saved as an array leaf.

    Called before anything is written, so a bad leaf fails a save cleanly.

    Example:
        >>> check_array_supported(np.zeros(3))  # ok
        >>> check_array_supported(np.array(["a", "b"]))
        Traceback (most recent call last):
        partialstore.errors.UnsupportedLeafError: dtype <U1 cannot be saved: strings are not ...
    """
    if not isinstance(array, np.ndarray):
        raise UnsupportedLeafError(
            f"Expected a numpy array, got {type(array).__module__}.{type(array).__qualname__}."
        )
    dtype_name(array.dtype)
    if array.ndim > MAX_RANK:
        raise UnsupportedLeafError(
            f"Array of shape {array.shape} has {array.ndim} dimensions; at most {MAX_RANK} "
            "are supported (TensorStore's limit). Reshape it first."
        )
