"""How each dtype partialstore saves is stored, and its name read back.

Which dtypes can be saved, and their stable names (``"float32"``,
``"bfloat16"``, ``"int4"``; byte order is not part of a name), is the one rule
table in :mod:`partialstore._pytree.dtype_rules`, re-exported here. Data is
always stored little-endian and loaded in native order, so a ``'>f4'`` array
round-trips by value as ``"float32"``.

Most types are stored in zarr3 under their own ``data_type`` name. The
ml_dtypes types TensorStore's zarr3 driver does not know (checked against
tensorstore 0.1.86: ``float8_e4m3``, ``float6_*``, ``uint4``, ``uint2``,
``int1``, ``uint1``, ``complex32``, ``bcomplex32``) are stored as their raw
bytes viewed as an unsigned integer of the same width, so every element
keeps its bit pattern and the array keeps its shape (chunking and partial
reads work unchanged); the descriptor records both names.

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

import numpy as np

from partialstore._pytree.dtype_rules import (
    DTYPES_BY_NAME,
    MAX_RANK,
    NUMPY_DTYPE_NAMES,
    SUPPORTED_DTYPE_NAMES,
    check_array_supported,
    dtype_name,
)
from partialstore.errors import CorruptCheckpointError

__all__ = [
    "MAX_RANK",
    "SUPPORTED_DTYPE_NAMES",
    "check_array_supported",
    "dtype_from_name",
    "dtype_name",
    "storage_dtype_name",
]

# data_type names TensorStore's zarr3 driver accepts (probed on 0.1.86).
# Anything else is stored as raw same-width unsigned integers.
_ZARR3_NATIVE = frozenset(
    (
        *NUMPY_DTYPE_NAMES,
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

_UNSIGNED_OF_WIDTH = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


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
        return DTYPES_BY_NAME[name]
    except (KeyError, TypeError):
        raise CorruptCheckpointError(
            f"Unknown dtype name {name!r} in a checkpoint descriptor; known names are "
            f"{sorted(DTYPES_BY_NAME)}. The checkpoint is damaged or was written by a newer "
            "version."
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
