"""Leaf rules: which values partialstore saves, how they are snapshotted and inlined.

Used by :mod:`partialstore._pytree.tree`. A leaf is one of these kinds:

=================  ==========================================================
kind               what is stored
=================  ==========================================================
``"array"``        ``np.ndarray`` of a numeric dtype (bool, int, uint, float,
                   complex, and the ml_dtypes types, e.g. bfloat16, float8_*,
                   int4; the rules: :mod:`partialstore._pytree.dtype_rules`)
``"jax_array"``    ``jax.Array``, copied to host
``"np_scalar"``    numpy scalar (``np.float32(1)``), stored as a 0-d array
``"int"``          Python ``int`` of any size (subclasses such as ``IntEnum``
                   are stored as plain ``int``)
``"float"``        Python ``float``, bit-exact including ``nan``, ``inf``, -0.0
``"bool"``         Python ``bool`` (kept distinct from ``int``)
``"str"``          Python ``str`` (UTF-8 encodable)
``"none"``         ``None``
=================  ==========================================================

Everything else is refused with :class:`~partialstore.errors.UnsupportedLeafError`
naming the key path: ``bytes`` (as in Orbax), ``complex``, sets, arbitrary
objects, object/str/bytes/datetime/structured arrays, masked arrays, PRNG key
arrays (save ``jax.random.key_data(key)`` instead) and traced values.

The inline kinds have a JSON form (:func:`encode_inline` /
:func:`decode_value`) that round-trips every value exactly.

Example:
    >>> check_dtype(np.float32) is None
    True
    >>> decode_value("float", encode_inline("float", float("nan")))
    nan
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterable
from typing import Any, Protocol

import jax
import numpy as np

from partialstore._pytree.dtype_rules import check_dtype, check_rank
from partialstore._pytree.keypaths import KeyPath, check_str, format_path, short_repr
from partialstore.errors import CorruptCheckpointError, InvalidInputError, UnsupportedLeafError

__all__ = [
    "ARRAY_KINDS",
    "INLINE_KINDS",
    "LEAF_KINDS",
    "check_dtype",
    "classify_leaf",
    "decode_value",
    "encode_inline",
    "fallback_leaf_kind",
    "is_sharded_across_processes",
    "snapshot",
    "start_host_copy",
    "type_name",
    "value_from_array",
]

ARRAY_KINDS = frozenset({"array", "jax_array", "np_scalar"})
INLINE_KINDS = frozenset({"int", "float", "bool", "str", "none"})
LEAF_KINDS = ARRAY_KINDS | INLINE_KINDS

# Ints in this range are plain JSON numbers; larger ones are stored as hex
# strings so that no JSON reader rounds them and Python's 4300-digit
# int<->decimal limit never applies.
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_HEX_INT = re.compile(r"-?0x[0-9a-f]+")
_HEX_BITS = re.compile(r"[0-9a-f]{16}")


def type_name(obj: Any) -> str:
    """Return ``module.QualName`` of ``obj``'s type, for messages and node records."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _unsupported(path: KeyPath, obj: Any, why: str) -> UnsupportedLeafError:
    return UnsupportedLeafError(
        f"Cannot save the leaf at {format_path(path)!r} of type {type_name(obj)}: {why}"
    )


def _array_problem(obj: Any) -> str | None:
    """Why the array ``obj`` (numpy or jax) cannot be saved, by the one rule table."""
    return check_dtype(obj.dtype) or check_rank(tuple(obj.shape))


class _Device(Protocol):
    """What is read of a ``jax.Device`` (jaxlib ships it without type stubs)."""

    @property
    def platform(self) -> str: ...


def _is_host_backed(array: jax.Array) -> bool:
    # np.asarray of an array in host memory is a zero-copy view of the jax
    # buffer; only those need an extra copy to be a true snapshot. Device
    # arrays come back as a fresh host buffer that jax never mutates.
    if array.sharding.memory_kind in ("pinned_host", "unpinned_host"):
        return True
    devices: Iterable[_Device] = array.sharding.device_set
    return any(device.platform == "cpu" for device in devices)


def _check_jax_array(obj: jax.Array, path: KeyPath) -> None:
    if isinstance(obj, jax.core.Tracer):
        raise _unsupported(
            path, obj, "it is a traced value; call save outside of jit/vmap/grad transforms."
        )
    if jax.numpy.issubdtype(obj.dtype, jax.dtypes.extended):
        raise _unsupported(
            path,
            obj,
            f"dtype {obj.dtype} is a JAX extended dtype (e.g. a PRNG key); "
            "save jax.random.key_data(key) instead.",
        )
    if obj.is_deleted():
        raise _unsupported(path, obj, "the array has been deleted or donated.")
    problem = _array_problem(obj)
    if problem is not None:
        raise _unsupported(path, obj, problem)


def classify_leaf(obj: Any, path: KeyPath) -> str | None:
    """Return the leaf kind of ``obj``, or ``None`` if it may be a pytree node.

    ``None`` is returned for plain dicts, lists and tuples and for every type
    this module does not know; the caller asks ``jax.tree_util`` whether it is
    a node and otherwise calls :func:`fallback_leaf_kind`.

    Example:
        >>> classify_leaf(np.float32(1), ())
        'np_scalar'
        >>> classify_leaf({}, ()) is None
        True

    Raises:
      UnsupportedLeafError: an array, numpy scalar or str that cannot be saved.
    """
    if obj is None:
        return "none"
    if isinstance(obj, jax.Array):
        _check_jax_array(obj, path)
        return "jax_array"
    if isinstance(obj, np.ndarray):
        if isinstance(obj, np.ma.MaskedArray):
            raise _unsupported(
                path, obj, "masked arrays would lose their mask; save data and mask apart."
            )
        problem = _array_problem(obj)
        if problem is not None:
            raise _unsupported(path, obj, problem)
        return "array"
    if isinstance(obj, np.generic):
        problem = check_dtype(obj.dtype)
        if problem is not None:
            raise _unsupported(path, obj, problem)
        return "np_scalar"
    cls = type(obj)
    if cls is bool:
        return "bool"
    if cls is int:
        return "int"
    if cls is float:
        return "float"
    if cls is str:
        return _check_str_leaf(obj, path)
    return None


def _check_str_leaf(obj: str, path: KeyPath) -> str:
    reason = check_str(obj)
    if reason is not None:
        raise _unsupported(path, obj, f"the string {reason}.")
    return "str"


def fallback_leaf_kind(obj: Any, path: KeyPath) -> str:
    """Kind of an object jax does not treat as a node: a scalar subclass, or refuse it.

    Example:
        >>> import enum
        >>> fallback_leaf_kind(enum.IntEnum("E", "A").A, ())
        'int'

    Raises:
      UnsupportedLeafError: anything that is not a scalar subclass.
    """
    if isinstance(obj, bool):
        return "bool"
    if isinstance(obj, int):
        return "int"
    if isinstance(obj, float):
        return "float"
    if isinstance(obj, str):
        return _check_str_leaf(obj, path)
    if isinstance(obj, bytes | bytearray | memoryview):
        raise _unsupported(path, obj, "bytes are not supported (as in Orbax); use a uint8 array.")
    if isinstance(obj, complex):
        raise _unsupported(path, obj, "Python complex is not supported; use np.complex128(x).")
    if isinstance(obj, dict | list | tuple):
        raise _unsupported(
            path,
            obj,
            "this container subclass is not a registered pytree node; convert it to a plain "
            "dict/list/tuple or register it with jax.tree_util.",
        )
    raise _unsupported(
        path,
        obj,
        "supported leaves are arrays, numpy/Python scalars, str and None; "
        "register container classes with jax.tree_util.",
    )


def is_sharded_across_processes(obj: jax.Array) -> bool:
    """Whether this process holds only part of ``obj`` (a multi-process global array).

    Such a leaf is snapshotted as its owned shards
    (:func:`partialstore._pytree.shards.snapshot_shards`), not as one host array.
    """
    return not obj.is_fully_addressable and not obj.is_fully_replicated


def start_host_copy(obj: jax.Array) -> None:
    """Start the device-to-host copy of ``obj`` without waiting for it.

    Example:
        >>> x = jax.numpy.ones(3)
        >>> start_host_copy(x)  # a later snapshot(...) finds the bytes on host
    """
    if obj.is_fully_addressable and not _is_host_backed(obj):
        obj.copy_to_host_async()


def _snapshot_jax(obj: jax.Array, copy_arrays: bool) -> np.ndarray:
    source = obj if obj.is_fully_addressable else obj.addressable_data(0)
    host = np.asarray(source)
    if copy_arrays and _is_host_backed(obj):
        host = np.array(host, copy=True)
    return host


def snapshot(
    kind: str, obj: Any, copy_arrays: bool
) -> tuple[np.ndarray | None, int | float | bool | str | None]:
    """Return ``(array, value)`` for a leaf already classified as ``kind``.

    Array kinds give a host array and ``None``; inline kinds ``None`` and the
    plain Python value (``IntEnum`` members become ``int`` and so on).

    Example:
        >>> snapshot("np_scalar", np.int8(3), True)
        (array(3, dtype=int8), None)
        >>> snapshot("str", "hi", True)
        (None, 'hi')
    """
    if kind == "jax_array":
        return _snapshot_jax(obj, copy_arrays), None
    if kind == "array":
        return (np.array(obj, copy=True) if copy_arrays else np.asarray(obj)), None
    if kind == "np_scalar":
        return np.array(obj), None
    if kind == "bool":
        return None, bool(obj)
    if kind == "int":
        return None, int(obj)
    if kind == "float":
        return None, float(obj)
    if kind == "str":
        return None, str(obj)
    return None, None


def encode_inline(kind: str, value: Any) -> Any:
    """Return the JSON form of an inline leaf's value.

    Finite floats are JSON numbers (Python's repr round-trips them exactly);
    ``inf``/``-inf`` become ``{"float": "inf"}``/``{"float": "-inf"}`` and NaN
    ``{"float": "nan", "bits": "<16 hex digits>"}`` so sign and payload
    survive. Ints outside the signed 64-bit range become ``{"int": "0x..."}``.

    Example:
        >>> encode_inline("int", 2**70)
        {'int': '0x400000000000000000'}
    """
    if kind == "none":
        return None
    if kind == "bool":
        return bool(value)
    if kind == "str":
        return str(value)
    if kind == "int":
        number = int(value)
        return number if _INT64_MIN <= number <= _INT64_MAX else {"int": hex(number)}
    if kind == "float":
        real = float(value)
        if math.isfinite(real):
            return real
        if math.isnan(real):
            bits = struct.unpack("<Q", struct.pack("<d", real))[0]
            return {"float": "nan", "bits": f"{bits:016x}"}
        return {"float": "inf" if real > 0 else "-inf"}
    raise InvalidInputError(f"Leaf kind {kind!r} is not stored inline; it has no JSON value.")


def _bad_value(kind: str, obj: Any) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"Stored value {short_repr(obj)} is not a valid {kind!r} leaf value."
    )


def decode_value(kind: str, obj: Any) -> int | float | bool | str | None:
    """Inverse of :func:`encode_inline`: the Python value of an inline leaf.

    Example:
        >>> decode_value("float", {"float": "-inf"})
        -inf
        >>> decode_value("int", 3)
        3

    Raises:
      CorruptCheckpointError: unknown kind, or ``obj`` does not fit ``kind``.
    """
    if kind == "none":
        if obj is not None:
            raise _bad_value(kind, obj)
        return None
    if kind == "bool":
        if not isinstance(obj, bool):
            raise _bad_value(kind, obj)
        return obj
    if kind == "str":
        if not isinstance(obj, str):
            raise _bad_value(kind, obj)
        return obj
    if kind == "int":
        if isinstance(obj, int) and not isinstance(obj, bool):
            return obj
        text = obj.get("int") if isinstance(obj, dict) and len(obj) == 1 else None
        if isinstance(text, str) and _HEX_INT.fullmatch(text):
            return int(text, 16)
        raise _bad_value(kind, obj)
    if kind == "float":
        # encode_inline writes every finite float as a JSON float ("2.0"), so an
        # int, or a non-finite number from a lenient parser, is damage.
        if type(obj) is float and math.isfinite(obj):
            return obj
        if isinstance(obj, dict) and obj.get("float") in ("inf", "-inf") and len(obj) == 1:
            return math.inf if obj["float"] == "inf" else -math.inf
        if isinstance(obj, dict) and obj.get("float") == "nan" and set(obj) <= {"float", "bits"}:
            bits = obj.get("bits", "7ff8000000000000")
            if isinstance(bits, str) and _HEX_BITS.fullmatch(bits):
                number: float = struct.unpack("<d", struct.pack("<Q", int(bits, 16)))[0]
                if math.isnan(number):
                    return number
        raise _bad_value(kind, obj)
    raise CorruptCheckpointError(f"Stored leaf kind {short_repr(kind)} is not an inline kind.")


def value_from_array(kind: str, array: np.ndarray) -> Any:
    """Return the value a loaded array leaf stands for: numpy scalars come back as such.

    Example:
        >>> value_from_array("np_scalar", np.array(1.5, np.float32))
        np.float32(1.5)
        >>> value_from_array("array", np.zeros(2))
        array([0., 0.])
    """
    if kind == "np_scalar":
        return array[()]
    return array
