"""A plain-Python reference model of partialstore's semantics, for ``tests/test_model.py``.

The model follows the "Semantics" section of the README, not the code:

- a save's tree is merged over the session's tree in commit order: a leaf
  replaces whatever was at its key path, a container replaces a leaf or a
  container of another kind, and containers of the same kind (dict/dict,
  list/list, tuple/tuple) merge key by key (index by index for sequences);
- ``custom_metadata`` dicts merge key by key, nested dicts too, later values
  winning;
- ``load`` gives back dicts, lists and tuples, numpy arrays bit-exact and
  scalars as the type saved.

Each model leaf is a :class:`Stored`: the saved value (arrays copied,
``jax.Array`` kept as numpy) and the number of the save that wrote it, so
the model also knows which saves a finalized checkpoint no longer uses (what
``gc`` may delete).

The second half holds the hypothesis strategies the state machine draws
from: tiny trees over small key alphabets (so replacements are frequent),
leaves of every supported kind with bit patterns a lossy round trip would
change (NaN payloads, -0.0, subnormals, ints past 64 bits), and inputs that
``save`` must refuse.

Example::

    first = snapshot({"a": {"x": 1}}, save=0)
    second = snapshot({"a": {"y": np.int8(2)}}, save=1)
    merged = merge(first, second)                 # {"a": {"x": 1, "y": np.int8(2)}}
    assert_exact(merged, partialstore.load(path))
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from partialstore import LeafMetadata

__all__ = [
    "INT_KEYS",
    "KEYS",
    "Stored",
    "array_kind_saves",
    "arrays",
    "assert_exact",
    "assert_json_exact",
    "assert_leaf",
    "bad_custom_metadata",
    "count_leaves",
    "custom_metadata",
    "dict_paths",
    "dicts",
    "json_values",
    "kind_of",
    "leaf_values",
    "merge",
    "merge_metadata",
    "metadata_tree",
    "numpy_scalars",
    "select",
    "snapshot",
    "states",
    "subtree",
    "subtrees",
    "unsupported_leaves",
    "without_mixed_keys",
]

# Small alphabets, so later saves hit earlier keys (replacements) often. A
# dict's keys are all str or all int, but merged saves may mix them.
KEYS = ("a", "b", "c")
INT_KEYS = (0, 1)


@dataclasses.dataclass(frozen=True, eq=False)
class Stored:
    """One leaf of the model: the value as saved and the number of the save that wrote it.

    A ``jax.Array`` is kept as a numpy copy (``load`` gives numpy back) with ``jax`` set.
    """

    value: Any
    save: int
    jax: bool = False


def snapshot(state: Any, save: int) -> Any:
    """Copy a user state into the model, tagging every leaf with ``save``.

    Example::

        snapshot({"w": np.ones(2)}, save=3)["w"].save   # 3
    """
    if type(state) is dict:
        return {key: snapshot(value, save) for key, value in state.items()}
    if type(state) in (list, tuple):
        return type(state)(snapshot(value, save) for value in state)
    if isinstance(state, np.ndarray):
        return Stored(state.copy(), save)
    if isinstance(state, jax.Array):
        return Stored(np.array(state), save, jax=True)
    return Stored(state, save)


def merge(old: Any, new: Any) -> Any:
    """The README's replacement rule: ``new`` (a later save) over ``old``.

    Example::

        merge({"a": [1, 2]}, {"a": [3]})   # {"a": [3, 2]} (same kind: index by index)
        merge({"a": [1, 2]}, {"a": {}})    # {"a": {}} (another kind replaces)
    """
    if isinstance(new, Stored) or type(old) is not type(new):
        return new
    if type(new) is dict:
        merged = dict(old)
        for key, value in new.items():
            merged[key] = merge(old[key], value) if key in old else value
        return merged
    items = list(old)
    for index, value in enumerate(new):
        if index < len(items):
            items[index] = merge(items[index], value)
        else:
            items.append(value)
    return type(new)(items)


def merge_metadata(old: Any, new: Any) -> Any:
    """``custom_metadata`` merging: nested dicts merge, anything else is replaced.

    Example::

        merge_metadata({"a": {"x": 1}, "b": 1}, {"a": {"y": 2}})  # {"a": {"x": 1, "y": 2}, "b": 1}
    """
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    merged = dict(old)
    for key, value in new.items():
        merged[key] = merge_metadata(old[key], value) if key in old else value
    return merged


def leaves(tree: Any) -> Iterator[Stored]:
    """Every :class:`Stored` leaf of a model tree."""
    if isinstance(tree, Stored):
        yield tree
        return
    children = tree.values() if type(tree) is dict else tree
    for child in children:
        yield from leaves(child)


def count_leaves(tree: Any) -> int:
    """Number of leaves a save records (``None`` is a leaf, an empty container is not)."""
    return sum(1 for _ in leaves(tree))


def _is_array_kind(value: Any) -> bool:
    return isinstance(value, np.ndarray | np.generic)


def array_kind_saves(saves: list[Any], tree: Any) -> tuple[set[int], set[int]]:
    """Which saves ``gc`` must and may delete, given each save's tree and the merged tree.

    A save whose array leaves all were replaced is wholly unused. It must be
    deleted if it wrote some array bytes; if its arrays were all zero-size
    whether a data directory exists is not specified, so it may be deleted.

    Example::

        must, may = array_kind_saves([snapshot({"w": np.ones(1)}, 0)], {})   # {0}, {0}
    """
    used = {leaf.save for leaf in leaves(tree) if _is_array_kind(leaf.value)}
    must: set[int] = set()
    may: set[int] = set()
    for number, saved in enumerate(saves):
        arrays = [leaf.value for leaf in leaves(saved) if _is_array_kind(leaf.value)]
        if not arrays or number in used:
            continue
        may.add(number)
        if any(np.asarray(array).nbytes > 0 for array in arrays):
            must.add(number)
    return must, may


def kind_of(tree: Any) -> str:
    """``"leaf"``, ``"dict"``, ``"list"`` or ``"tuple"``."""
    return "leaf" if isinstance(tree, Stored) else type(tree).__name__


def dict_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Key paths below the root reachable through dicts only (leaves and containers)."""
    if type(tree) is not dict:
        return []
    found: list[tuple[str, ...]] = []
    for key, child in tree.items():
        found.append((*prefix, key))
        found.extend(dict_paths(child, (*prefix, key)))
    return found


def subtree(tree: Any, path: tuple[str, ...]) -> Any:
    """The model subtree at a dict-key path, or ``None`` if the path is not there."""
    for key in path:
        if type(tree) is not dict or key not in tree:
            return None
        tree = tree[key]
    return tree


def select(tree: Any, paths: list[tuple[str, ...]]) -> Any:
    """What ``load(select=paths)`` returns, or ``None`` if a path is not in ``tree``.

    The selected subtrees keep their place: ``select(t, [("a", "b")])`` is
    ``{"a": {"b": t["a"]["b"]}}``.
    """
    result: Any = {}
    for path in paths:
        found = subtree(tree, path)
        if found is None:
            return None
        for key in reversed(path):
            found = {key: found}
        result = merge(result, found)
    return result


def without_mixed_keys(tree: Any) -> Any:
    """The tree less the int keys of dicts that mix int and str keys.

    Merged saves may build such a dict (``{0: x}`` then ``{"a": y}``); jax
    cannot flatten one, so a ``load`` target can only name a part of it.

    Example::

        without_mixed_keys({0: 1, "a": {1: 2}})   # {"a": {1: 2}}
    """
    if isinstance(tree, Stored):
        return tree
    if type(tree) is dict:
        mixed = len({type(key) for key in tree}) > 1
        return {k: without_mixed_keys(v) for k, v in tree.items() if not (mixed and type(k) is int)}
    return type(tree)(without_mixed_keys(value) for value in tree)


def _leaf_metadata(value: Any, from_jax: bool) -> LeafMetadata:
    if isinstance(value, np.ndarray):
        return LeafMetadata("jax_array" if from_jax else "array", value.shape, value.dtype.name)
    if isinstance(value, np.generic):
        return LeafMetadata("np_scalar", (), value.dtype.name)
    kind = "none" if value is None else type(value).__name__
    return LeafMetadata(kind, (), None)


def metadata_tree(tree: Any) -> Any:
    """What ``metadata(path).tree`` holds: the tree with a LeafMetadata at every leaf."""
    if isinstance(tree, Stored):
        return Stored(_leaf_metadata(tree.value, tree.jax), tree.save)
    if type(tree) is dict:
        return {key: metadata_tree(value) for key, value in tree.items()}
    return type(tree)(metadata_tree(value) for value in tree)


def _same_float(expected: float, actual: Any) -> bool:
    return type(actual) is float and struct.pack("<d", expected) == struct.pack("<d", actual)


def assert_leaf(expected: Any, actual: Any, where: str) -> None:
    """Assert one loaded leaf is the saved value: same type, and the same bits.

    Example::

        assert_leaf(np.float32(1), np.float32(1), "w")
    """
    if isinstance(expected, np.ndarray | np.generic):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape}"
        assert actual.tobytes() == expected.tobytes(), f"{where}: {actual!r} != {expected!r}"
    elif type(expected) is float:
        assert _same_float(expected, actual), f"{where}: {actual!r} != {expected!r}"
    else:
        assert type(actual) is type(expected), f"{where}: {actual!r} != {expected!r}"
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def assert_exact(expected: Any, actual: Any, where: str = "<root>", *, leaf: Any = None) -> None:
    """Assert a loaded tree equals a model tree: container types, keys, leaves bit-exact.

    ``leaf(expected_value, actual, where)`` checks each leaf (default: numpy
    arrays and scalars by type, dtype, shape and bytes; floats by bits;
    other scalars by type and value).
    """
    check = leaf or assert_leaf
    if isinstance(expected, Stored):
        check(expected.value, actual, where)
        return
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if type(expected) is dict:
        assert set(actual) == set(expected), f"{where}: keys {set(actual)} != {set(expected)}"
        for key, value in expected.items():
            assert_exact(value, actual[key], f"{where}/{key}", leaf=check)
        return
    assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
    for index, value in enumerate(expected):
        assert_exact(value, actual[index], f"{where}[{index}]", leaf=check)


def assert_json_exact(expected: Any, actual: Any, where: str = "custom_metadata") -> None:
    """Assert two JSON values are equal with the same types (1 is not 1.0 nor True)."""
    assert type(actual) is type(expected), f"{where}: {actual!r} != {expected!r}"
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{where}: {actual!r} != {expected!r}"
        for key, value in expected.items():
            assert_json_exact(value, actual[key], f"{where}/{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for index, value in enumerate(expected):
            assert_json_exact(value, actual[index], f"{where}[{index}]")
    elif isinstance(expected, float):
        assert _same_float(expected, actual), f"{where}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


# --- strategies -------------------------------------------------------------------------

DTYPES = (np.dtype(np.float32), np.dtype(np.int8), np.dtype(np.bool_), np.dtype(ml_dtypes.bfloat16))
SHAPES = ((), (0,), (1,), (3,), (2, 2), (0, 3))
# One leaf at the packing threshold (1 MiB) now and then, so zarr3 arrays are
# in play too; its bytes come from a seed (hypothesis buffers are small).
LARGE_SHAPE = (1 << 18,)
# Bit patterns a lossy round trip would change: quiet NaNs of both signs,
# a signalling NaN, a NaN with a payload, -0.0, +inf, the smallest subnormal.
SPECIAL_BITS = {
    "float32": (0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FC0BEEF, 0x80000000, 0x7F800000, 1),
    "bfloat16": (0x7FC0, 0xFFC0, 0x7F81, 0x7FD5, 0x8000, 0x7F80, 1),
}


def _elements(dtype: np.dtype) -> st.SearchStrategy[int]:
    """Raw bit patterns of one element of ``dtype``, special ones often."""
    if dtype == np.bool_:
        return st.integers(0, 1)
    anything = st.integers(0, 2 ** (8 * dtype.itemsize) - 1)
    special = SPECIAL_BITS.get(dtype.name)
    return anything | st.sampled_from(special) if special else anything


def _from_bits(bits: list[int], dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    unsigned = np.dtype(f"u{dtype.itemsize}")
    return np.array(bits, dtype=unsigned).view(dtype).reshape(shape)


def _large(dtype: np.dtype, seed: int) -> np.ndarray:
    size = math.prod(LARGE_SHAPE)
    raw = np.random.default_rng(seed).bytes(size * dtype.itemsize)
    if dtype == np.bool_:
        return (np.frombuffer(raw[:size], np.uint8) & 1).astype(np.bool_).reshape(LARGE_SHAPE)
    return np.frombuffer(raw, dtype).reshape(LARGE_SHAPE).copy()


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """A small array of one of DTYPES, any bit pattern (NaN payloads too); 1 MiB at times."""
    dtype = draw(st.sampled_from(DTYPES))
    if draw(st.integers(0, 15)) == 0:
        return _large(dtype, draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.sampled_from(SHAPES))
    size = math.prod(shape)
    return _from_bits(draw(st.lists(_elements(dtype), min_size=size, max_size=size)), dtype, shape)


@st.composite
def numpy_scalars(draw: st.DrawFn) -> np.generic:
    """A numpy scalar of one of DTYPES, any bit pattern."""
    dtype = draw(st.sampled_from(DTYPES))
    return _from_bits([draw(_elements(dtype))], dtype, ())[()]


_INTS = st.sampled_from([0, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**70]) | st.integers(
    -1000, 1000
)
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=3)


def _float_of_bits(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


# NaNs of either sign and other payloads, signalling ones included, -0.0 and
# the infinities: the values a lossy round trip would change.
_SPECIAL_FLOATS = st.sampled_from(
    [
        _float_of_bits(bits)
        for bits in (
            0x7FF8000000000000,
            0xFFF8000000000000,
            0x7FF0000000000001,
            0x7FF8DEADBEEF0001,
            0x8000000000000000,
            0x7FF0000000000000,
            0xFFF0000000000000,
        )
    ]
)
python_scalars = st.one_of(st.none(), st.booleans(), _INTS, st.floats() | _SPECIAL_FLOATS, _TEXT)
# Empty containers are built fresh for each use, never shared between saves.
empty_containers = st.one_of(st.builds(dict), st.builds(list), st.builds(tuple))
# Arrays in half the leaves: they are what checkpoints hold.
leaf_values = st.one_of(
    arrays(), arrays(), arrays().map(jnp.asarray), numpy_scalars(), python_scalars, python_scalars
)
leaf_or_empty = st.one_of(leaf_values, empty_containers)
keys = st.sampled_from(KEYS)
int_keys = st.sampled_from(INT_KEYS)


def dicts(children: st.SearchStrategy[Any], **sizes: int) -> st.SearchStrategy[dict[Any, Any]]:
    """Dicts keyed by KEYS or, less often, by INT_KEYS."""
    return st.one_of(
        st.dictionaries(keys, children, **sizes),
        st.dictionaries(keys, children, **sizes),
        st.dictionaries(int_keys, children, **sizes),
    )


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        dicts(children, max_size=3),
        st.lists(children, max_size=3),
        st.lists(children, max_size=2).map(tuple),
    )


subtrees = st.recursive(leaf_or_empty, _containers, max_leaves=6)
# Mostly a dict at the root, as training states are; now and then anything
# (a list, a leaf), which replaces the whole session tree or is merged into.
states = st.one_of(*[dicts(subtrees, max_size=3)] * 5, subtrees)

_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3),
)
json_values = st.recursive(
    _json_scalars,
    lambda children: st.one_of(
        st.dictionaries(keys, children, max_size=2),
        st.dictionaries(keys, children, min_size=1, max_size=2),
        st.lists(children, max_size=2),
    ),
    max_leaves=4,
)
# JSON object keys are str: an int key would come back as a str.
custom_metadata = st.none() | st.dictionaries(keys, json_values, max_size=3)

# Leaves save refuses (TypeError naming the key path), and custom_metadata it
# refuses (ValueError): neither may write anything.
unsupported_leaves = st.sampled_from(
    [
        lambda: {1, 2},
        lambda: b"raw",
        lambda: 1j,
        lambda: np.array(["text"]),
        lambda: np.array([object()], dtype=object),
        lambda: object(),
    ]
).map(lambda make: make())
bad_custom_metadata = st.sampled_from(
    [
        lambda: ["not", "a", "dict"],
        lambda: "text",
        lambda: {"a": object()},
        lambda: {"a": {"b": float("nan")}},
        lambda: {"a": b"raw"},
    ]
).map(lambda make: make())
