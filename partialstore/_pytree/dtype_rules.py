"""Which arrays partialstore saves: the one rule table for dtypes and ranks.

Every array leaf (numpy array, numpy scalar, ``jax.Array``) is checked
against these rules once, when :func:`partialstore._pytree.tree.flatten`
classifies it at snapshot time, so a bad leaf fails a save before anything
is written. A savable dtype has a stable name that does not depend on the
platform, numpy version or byte order: numpy's name for its builtin numeric
types (``"float32"``, ``"complex128"``, ``"bool"``) and ml_dtypes' name for
its types (``"bfloat16"``, ``"float8_e4m3fn"``, ``"int4"``, ``"uint4"``, ...).
How each is stored is :mod:`partialstore._arrays.dtypes`' business.

Refused: object, string, bytes, structured/void, datetime64/timedelta64, and
``longdouble`` (its bytes are x87 80-bit on x86 but IEEE quad elsewhere, so
they would not mean the same number on another machine), and arrays of more
than :data:`MAX_RANK` dimensions.

Example:
    >>> import ml_dtypes
    >>> dtype_name(np.dtype(">f4")), dtype_name(ml_dtypes.uint4)
    ('float32', 'uint4')
    >>> check_dtype(np.dtype(object))
    'object arrays hold ...'
    >>> check_dtype(np.float32) is None
    True
"""

from __future__ import annotations

import functools
from typing import Any

import ml_dtypes
import numpy as np

from partialstore.errors import UnsupportedLeafError

__all__ = [
    "DTYPES_BY_NAME",
    "MAX_RANK",
    "NUMPY_DTYPE_NAMES",
    "SUPPORTED_DTYPE_NAMES",
    "check_array_supported",
    "check_dtype",
    "check_rank",
    "dtype_name",
]

#: TensorStore indexes at most 32 dimensions; numpy allows 64.
MAX_RANK = 32

NUMPY_DTYPE_NAMES = (
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

DTYPES_BY_NAME: dict[str, np.dtype[Any]] = {name: np.dtype(name) for name in NUMPY_DTYPE_NAMES}
DTYPES_BY_NAME.update(
    {name: np.dtype(getattr(ml_dtypes, name)) for name in _ML_NAMES if hasattr(ml_dtypes, name)}
)
# ml_dtypes types share numpy's 'V' kind and even reuse type chars (bfloat16
# and uint1 are both 'E'), so they are told apart by scalar type only.
_ML_NAME_BY_TYPE: dict[type, str] = {
    DTYPES_BY_NAME[name].type: name for name in _ML_NAMES if name in DTYPES_BY_NAME
}

#: Every dtype name partialstore saves (and reads back).
SUPPORTED_DTYPE_NAMES: frozenset[str] = frozenset(DTYPES_BY_NAME)


@functools.lru_cache(maxsize=256)
def _classify(dtype: np.dtype[Any]) -> tuple[str, str | None]:
    """``(name, None)`` for a savable dtype, ``("", why)`` for one that is not."""
    ml_name = _ML_NAME_BY_TYPE.get(dtype.type)
    if ml_name is not None:
        return ml_name, None
    if dtype.kind in "biufc" and dtype.names is None and dtype.subdtype is None:
        name = dtype.name
        if name in DTYPES_BY_NAME and DTYPES_BY_NAME[name] == dtype.newbyteorder("="):
            return name, None
        return "", f"dtype {dtype} has no TensorStore equivalent (e.g. long double); cast it."
    if dtype.kind == "O":
        return "", "object arrays hold arbitrary Python objects; use a numeric dtype."
    if dtype.kind in "US":
        return "", f"string arrays (dtype {dtype}) are not supported; store a Python str instead."
    return "", (
        f"dtype {dtype} is not a numeric dtype; only bool/int/uint/float/complex are supported."
    )


def check_dtype(dtype: Any) -> str | None:
    """Return why arrays of ``dtype`` cannot be saved, or ``None`` if they can.

    Example:
        >>> check_dtype(np.dtype("datetime64[D]"))
        'dtype datetime64[D] is not a numeric dtype; only bool/int/uint/float/complex are ...'
    """
    return _classify(np.dtype(dtype))[1]


def check_rank(shape: tuple[int, ...]) -> str | None:
    """Return why an array of ``shape`` cannot be saved (too many dimensions), or ``None``.

    Example:
        >>> check_rank((2, 3)) is None
        True
    """
    if len(shape) <= MAX_RANK:
        return None
    return (
        f"Array of shape {shape} has {len(shape)} dimensions; at most {MAX_RANK} "
        "are supported (TensorStore's limit). Reshape it first."
    )


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
      UnsupportedLeafError: a dtype :func:`check_dtype` refuses (the message
        names the dtype and what to do).
    """
    try:
        dt: np.dtype[Any] = np.dtype(dtype)
    except TypeError as error:
        raise UnsupportedLeafError(f"{dtype!r} is not a numpy dtype: {error}") from None
    name, why = _classify(dt)
    if why is not None:
        raise UnsupportedLeafError(why)
    return name


def check_array_supported(array: Any) -> None:
    """Raise :class:`UnsupportedLeafError` unless ``array`` can be saved as an array leaf.

    Example:
        >>> check_array_supported(np.zeros(3))  # ok
        >>> check_array_supported(np.array(["a", "b"]))
        Traceback (most recent call last):
        partialstore.errors.UnsupportedLeafError: string arrays (dtype <U1) are not supported; ...
    """
    if not isinstance(array, np.ndarray):
        raise UnsupportedLeafError(
            f"Expected a numpy array, got {type(array).__module__}.{type(array).__qualname__}."
        )
    dtype_name(array.dtype)
    why = check_rank(array.shape)
    if why is not None:
        raise UnsupportedLeafError(why)
