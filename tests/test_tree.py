"""Tests for the pytree layer (partialstore._pytree: tree, leaves, keypaths).

Storage is simulated the way the manifest stores records: paths and inline
values go through ``json.dumps``/``json.loads`` (strict JSON, UTF-8), arrays
are kept aside by index, then :func:`build_tree` rebuilds the tree.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import math
import struct
from typing import Any, NamedTuple

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from partialstore._pytree import tree
from partialstore._pytree.tree import (
    MAX_DEPTH,
    Leaf,
    Node,
    build_tree,
    decode_path,
    decode_value,
    encode_path,
    encode_value,
    flatten,
    format_path,
    is_ancestor,
    parse_selector,
    selector_matches,
    target_leaf_paths,
    value_from_array,
)
from partialstore.errors import (
    CorruptCheckpointError,
    InvalidInputError,
    UnsupportedLeafError,
)

# --------------------------------------------------------------------------- fixtures


class Moments(NamedTuple):
    mu: Any
    nu: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any
    step: Any
    name: str = dataclasses.field(default="run", metadata={"static": True})


@jax.tree_util.register_pytree_node_class
class Pair:
    """A custom node without keys: jax names its children FlattenedIndexKey(i)."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first = first
        self.second = second

    def tree_flatten(self) -> tuple[tuple[Any, Any], None]:
        return (self.first, self.second), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple[Any, Any]) -> Pair:
        return cls(*children)


class Weird:
    """An arbitrary class jax treats as a leaf."""


class PlainDict(dict):
    """A dict subclass nobody registered with jax."""


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _store_and_build(state: Any, *, copy_arrays: bool = True) -> Any:
    """flatten -> JSON records (+ arrays aside) -> decode -> build_tree."""
    leaves, nodes = flatten(state, copy_arrays=copy_arrays)
    arrays: dict[int, np.ndarray] = {}
    records: dict[str, Any] = {"nodes": [], "leaves": []}
    for node in nodes:
        records["nodes"].append(
            {"path": encode_path(node.path), "kind": node.kind, "type": node.type_name}
        )
    for i, leaf in enumerate(leaves):
        entry: dict[str, Any] = {"path": encode_path(leaf.path), "kind": leaf.kind}
        if leaf.kind in tree.ARRAY_KINDS:
            assert leaf.array is not None and leaf.value is None
            arrays[i] = leaf.array
            entry["ref"] = i
        else:
            assert leaf.array is None
            entry["value"] = encode_value(leaf)
        records["leaves"].append(entry)
    # Strict JSON (no NaN tokens) written as UTF-8: what any store can hold.
    text = json.dumps(records, allow_nan=False, ensure_ascii=False).encode("utf-8")
    loaded = json.loads(text.decode("utf-8"))
    node_map = {
        decode_path(e["path"]): Node(decode_path(e["path"]), e["kind"], e["type"])
        for e in loaded["nodes"]
    }
    values: dict[tree.KeyPath, Any] = {}
    for e in loaded["leaves"]:
        path = decode_path(e["path"])
        if "ref" in e:
            values[path] = value_from_array(e["kind"], arrays[e["ref"]])
        else:
            values[path] = decode_value(e["kind"], e["value"])
    return build_tree(node_map, values)


def _plain(x: Any) -> Any:
    """What build_tree is documented to return for ``x``."""
    if isinstance(x, Moments):
        return {"mu": _plain(x.mu), "nu": _plain(x.nu)}
    if isinstance(x, TrainState):
        return {"params": _plain(x.params), "step": _plain(x.step)}
    if isinstance(x, Pair):
        return [_plain(x.first), _plain(x.second)]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    if isinstance(x, jax.Array):
        return np.asarray(x)
    return x


def assert_same(got: Any, want: Any, where: str = "<root>") -> None:
    """Exact equality: same types, same key order-insensitive dicts, bit-equal numbers."""
    assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
    if isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys {set(got)} != {set(want)}"
        assert {type(k) for k in got} == {type(k) for k in want}, where
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k!r}")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, np.ndarray | np.generic):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), where
    elif isinstance(want, float):
        assert _bits(got) == _bits(want), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _round_trip(state: Any) -> None:
    assert_same(_store_and_build(state), _plain(state))


# --------------------------------------------------------------------------- round trips


def test_nested_containers_round_trip() -> None:
    state = {
        "params": {"dense": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3)}},
        "layers": [{"w": jnp.ones((2, 2))}, {"w": np.full((1,), 7, np.int64)}],
        "opt": Moments(mu={"w": np.ones(2)}, nu=(np.zeros(2), 3)),
        "train": TrainState(params=[1, 2.5], step=np.int32(4)),
        "pair": Pair("a", None),
        "shape": (2, 3),
    }
    _round_trip(state)


def test_empty_containers_and_none_round_trip() -> None:
    state = {
        "empty_dict": {},
        "empty_list": [],
        "empty_tuple": (),
        "nested": {"a": [{}, [], ()], "b": None},
        "none": None,
        "list_of_none": [None, None],
        "moments": Moments(mu={}, nu=None),
    }
    _round_trip(state)
    leaves, nodes = flatten(state)
    node_paths = {format_path(n.path): n.kind for n in nodes}
    assert node_paths["empty_dict"] == "dict"
    assert node_paths["empty_list"] == "list"
    assert node_paths["empty_tuple"] == "tuple"
    assert node_paths["moments"] == "namedtuple"
    assert [format_path(leaf.path) for leaf in leaves if leaf.kind == "none"] == [
        "list_of_none[0]",
        "list_of_none[1]",
        "moments.nu",
        "nested/b",
        "none",
    ]


@pytest.mark.parametrize("root", [{}, [], (), None, 5, "s", np.arange(3), [None]])
def test_root_of_any_kind_round_trips(root: Any) -> None:
    _round_trip(root)


def test_python_scalars_round_trip_exactly() -> None:
    negative_nan = -math.nan
    payload_nan = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000123))[0]
    state = {
        "nan": math.nan,
        "negative_nan": negative_nan,
        "payload_nan": payload_nan,
        "inf": math.inf,
        "neg_inf": -math.inf,
        "neg_zero": -0.0,
        "tiny": 5e-324,
        "third": 1 / 3,
        "big": 2**70,
        "neg_big": -(2**200),
        "int64_max": 2**63 - 1,
        "int64_min": -(2**63),
        "past_int64": 2**63,
        "true": True,
        "false": False,
        "one": 1,
        "zero": 0,
        "text": 'héllo ✓ \x00 "quoted" / slash',
        "empty": "",
    }
    _round_trip(state)
    leaves, _ = flatten(state)
    kinds = {format_path(leaf.path): leaf.kind for leaf in leaves}
    assert kinds["true"] == "bool" and kinds["one"] == "int" and kinds["zero"] == "int"
    assert kinds["neg_zero"] == "float"


def test_huge_int_beyond_decimal_conversion_limit_round_trips() -> None:
    # Python refuses int->decimal str past 4300 digits; the hex form has no limit.
    huge = 1 << 20000
    assert_same(_store_and_build({"n": huge}), {"n": huge})
    assert_same(_store_and_build({"n": -huge - 1}), {"n": -huge - 1})


def test_scalar_subclasses_are_stored_as_base_types() -> None:
    class Color(enum.IntEnum):
        RED = 1

    class Tag(str):
        pass

    leaves, _ = flatten({"c": Color.RED, "t": Tag("x")})
    assert [(leaf.kind, type(leaf.value)) for leaf in leaves] == [("int", int), ("str", str)]


@pytest.mark.parametrize(
    "scalar",
    [
        np.float32(1.5),
        np.float64(-0.0),
        np.float16(np.inf),
        np.int8(-3),
        np.uint64(2**64 - 1),
        np.int64(-(2**63)),
        np.bool_(True),
        np.complex64(1 - 2j),
        ml_dtypes.bfloat16(3.25),
        np.dtype(ml_dtypes.float8_e4m3fn).type(0.5),
        np.float32(np.nan),
    ],
    ids=lambda s: np.asarray(s).dtype.name,
)
def test_numpy_scalars_are_0d_arrays(scalar: Any) -> None:
    leaves, _ = flatten({"s": scalar})
    (leaf,) = leaves
    assert leaf.kind == "np_scalar"
    assert leaf.array is not None and leaf.array.shape == () and leaf.value is None
    assert leaf.array.dtype == np.asarray(scalar).dtype
    restored = value_from_array(leaf.kind, leaf.array)
    assert type(restored) is type(scalar)
    assert_same(_store_and_build({"s": scalar}), {"s": scalar})


def test_arrays_of_many_dtypes_round_trip() -> None:
    state = {
        name: np.arange(4).astype(dtype)
        for name, dtype in [
            ("bool", np.bool_),
            ("u8", np.uint8),
            ("i64", np.int64),
            ("f16", np.float16),
            ("c128", np.complex128),
            ("bf16", ml_dtypes.bfloat16),
            ("f8", ml_dtypes.float8_e5m2),
            ("i4", ml_dtypes.int4),
        ]
    }
    state["empty"] = np.zeros((0, 3), np.float32)
    state["fortran"] = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    state["jax_bf16"] = jnp.arange(3, dtype=jnp.bfloat16)
    _round_trip(state)


def test_int_dict_keys_round_trip_as_ints() -> None:
    state = {"by_int": {0: np.zeros(1), 7: "seven", -1: None}, "by_str": {"0": 1, "7": 2}}
    result = _store_and_build(state)
    assert_same(result, state)
    leaves, _ = flatten(state)
    paths = [leaf.path for leaf in leaves]
    assert (("key", "by_int"), ("key", 0)) in paths
    assert (("key", "by_str"), ("key", "0")) in paths


def test_leaf_order_matches_jax() -> None:
    state = {
        "b": [3, {"z": 1, "a": None}],
        "a": Moments(mu=2, nu=np.zeros(1)),
        10: "x",
    }
    state = {"ints": {2: 1, 1: 2, 10: 3}, "nested": state["b"], "nt": state["a"]}
    leaves, _ = flatten(state)
    jax_leaves = jax.tree_util.tree_leaves(state, is_leaf=lambda x: x is None)
    assert len(leaves) == len(jax_leaves)
    for leaf, original in zip(leaves, jax_leaves, strict=True):
        if leaf.kind in tree.ARRAY_KINDS:
            assert leaf.array is not None
            assert np.array_equal(leaf.array, original)
        else:
            assert leaf.value == original


def test_ordered_dict_keeps_key_entries() -> None:
    state = collections.OrderedDict([("z", 1), ("a", 2)])
    leaves, nodes = flatten(state)
    assert [leaf.path for leaf in leaves] == [(("key", "z"),), (("key", "a"),)]
    assert nodes[0].kind == "custom" and nodes[0].type_name == "collections.OrderedDict"
    assert _store_and_build(state) == {"z": 1, "a": 2}


# --------------------------------------------------------------------------- snapshots


def test_numpy_snapshot_is_independent_when_copying() -> None:
    source = np.arange(4.0)
    leaves, _ = flatten({"x": source})
    source[:] = -1
    assert leaves[0].array is not None
    assert leaves[0].array.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert not np.shares_memory(leaves[0].array, source)


def test_numpy_snapshot_shares_memory_without_copy() -> None:
    source = np.arange(4.0)
    leaves, _ = flatten({"x": source}, copy_arrays=False)
    assert leaves[0].array is not None
    assert np.shares_memory(leaves[0].array, source)


def test_numpy_subclass_snapshot_is_a_plain_ndarray() -> None:
    class Tagged(np.ndarray):
        pass

    leaves, _ = flatten({"m": np.arange(3).view(Tagged)})
    assert type(leaves[0].array) is np.ndarray


def test_jax_snapshot_survives_deleting_the_source() -> None:
    source = jnp.arange(5.0) * 2
    leaves, _ = flatten({"x": source})
    (leaf,) = leaves
    assert leaf.kind == "jax_array" and isinstance(leaf.array, np.ndarray)
    assert leaf.sharding == source.sharding
    source.delete()
    assert leaf.array.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_jax_snapshot_survives_donating_the_source() -> None:
    source = jnp.arange(1000.0)
    leaves, _ = flatten({"x": source})
    double = jax.jit(lambda a: a * 2, donate_argnums=0)
    result = double(source)
    result.block_until_ready()
    assert leaves[0].array is not None
    assert np.array_equal(leaves[0].array, np.arange(1000.0))


def test_jax_scalar_array_is_a_jax_array_leaf() -> None:
    leaves, _ = flatten({"s": jnp.float32(2.0)})
    assert leaves[0].kind == "jax_array" and leaves[0].shape == ()


def test_fully_replicated_sharded_array_snapshots() -> None:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    source = jax.device_put(np.arange(8.0), sharding)
    leaves, _ = flatten({"x": source})
    assert leaves[0].sharding == sharding
    assert np.array_equal(leaves[0].array, np.arange(8.0))


# --------------------------------------------------------------------------- refusals


def _prng_key() -> jax.Array:
    return jax.random.key(0)


def _deleted() -> jax.Array:
    x = jnp.ones(2)
    x.delete()
    return x


UNSUPPORTED: list[tuple[str, Any]] = [
    ("object", object()),
    ("weird", Weird()),
    ("set", {1, 2}),
    ("frozenset", frozenset()),
    ("bytes", b"raw"),
    ("bytearray", bytearray(b"raw")),
    ("complex", 1 + 2j),
    ("object_array", np.array([object()], dtype=object)),
    ("unicode_array", np.array(["a", "b"])),
    ("bytes_array", np.array([b"a"])),
    ("datetime_array", np.array(["2020-01-01"], dtype="datetime64[D]")),
    ("structured_array", np.zeros(2, dtype=[("a", "i4"), ("b", "f4")])),
    ("longdouble_array", np.zeros(2, dtype=np.longdouble)),
    ("masked_array", np.ma.masked_array([1, 2], mask=[0, 1])),
    ("np_str", np.str_("text")),
    ("np_bytes", np.bytes_(b"x")),
    ("np_datetime", np.datetime64("2020-01-01")),
    ("surrogate", "bad \ud800"),
    ("shape_dtype_struct", jax.ShapeDtypeStruct((2,), jnp.float32)),
    ("dict_subclass", PlainDict(a=1)),
    ("function", len),
]


@pytest.mark.parametrize(("name", "leaf"), UNSUPPORTED, ids=[n for n, _ in UNSUPPORTED])
def test_unsupported_leaf_names_its_path(name: str, leaf: Any) -> None:
    state = {"outer": [0, {"inner": Moments(mu=1, nu=leaf)}]}
    with pytest.raises(UnsupportedLeafError) as info:
        flatten(state)
    message = str(info.value)
    assert "outer[1]/inner.nu" in message
    assert type(leaf).__qualname__ in message


@pytest.mark.parametrize("make", [_prng_key, _deleted], ids=["prng_key", "deleted"])
def test_unusable_jax_arrays_are_refused(make: Any) -> None:
    with pytest.raises(UnsupportedLeafError, match=r"'opt/key'"):
        flatten({"opt": {"key": make()}})


def test_traced_values_are_refused() -> None:
    @jax.jit
    def save_inside(x: jax.Array) -> jax.Array:
        flatten({"x": x})
        return x

    with pytest.raises(UnsupportedLeafError, match="traced"):
        save_inside(jnp.ones(2))


def test_validation_happens_before_any_snapshot() -> None:
    # The bad leaf comes last in jax order; nothing may be returned or copied.
    with pytest.raises(UnsupportedLeafError, match="'z'"):
        flatten({"a": jnp.ones(3), "z": object()})


@pytest.mark.parametrize(
    ("state", "fragment"),
    [
        ({"p": {(1, 2): 1}}, "(1, 2)"),
        ({"p": {1.5: 1}}, "1.5"),
        ({"p": {True: 1}}, "True"),
        ({"p": {"a": 1, 0: 2}}, "all str or all int"),
        ({"p": {2**64: 1}}, "64-bit"),
        ({"p": {"\ud800": 1}}, "surrogate"),
    ],
)
def test_bad_dict_keys_are_refused(state: Any, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        flatten(state)
    assert "'p'" in str(info.value) and fragment in str(info.value)


def test_reference_cycle_is_refused() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(InvalidInputError, match="cycle"):
        flatten({"loop": loop})


def test_shared_subtrees_are_not_cycles() -> None:
    shared = {"w": np.ones(2)}
    _round_trip({"a": shared, "b": shared, "c": [shared, shared]})


def test_custom_key_class_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class MyKey:
        name: str

    class Box:
        def __init__(self, value: Any) -> None:
            self.value = value

    jax.tree_util.register_pytree_with_keys(
        Box,
        lambda b: (((MyKey("v"), b.value),), None),
        lambda _, children: Box(*children),
    )
    with pytest.raises(InvalidInputError, match="MyKey"):
        flatten({"box": Box(1)})


def test_deep_tree_does_not_hit_recursion_limit() -> None:
    deep: Any = 1
    for _ in range(MAX_DEPTH):
        deep = [deep]
    leaves, nodes = flatten(deep)
    assert len(leaves) == 1 and len(leaves[0].path) == MAX_DEPTH and len(nodes) == MAX_DEPTH
    # build_tree itself has no depth limit: rebuild a chain deeper than
    # Python's recursion limit from hand-made records.
    path: tuple[Any, ...] = ()
    chain = []
    for _ in range(1500):
        chain.append(Node(path=path, kind="list", type_name=None))
        path = (*path, ("idx", 0))
    rebuilt = build_tree({n.path: n for n in chain}, {path: 1})
    depth = 0
    while isinstance(rebuilt, list):
        rebuilt = rebuilt[0]
        depth += 1
    assert depth == 1500 and rebuilt == 1


# --------------------------------------------------------------------------- target paths


def test_target_paths_equal_flatten_paths() -> None:
    def sds(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    saved = {
        "params": {"w": np.ones((2, 3), np.float32), "b": np.zeros(1)},
        "by_int": {3: 1, 0: np.zeros(1)},
        "opt": Moments(mu=[np.ones(2)], nu=()),
        "train": TrainState(params={"b": np.ones(1)}, step=3),
        "pair": Pair(np.ones(1), None),
        "ordered": collections.OrderedDict([("z", 1), ("a", 2)]),
        "empty": {},
        "flag": True,
    }
    target = {
        "params": {"w": sds((2, 3)), "b": sds((1,))},
        "by_int": {3: 0, 0: sds((1,))},
        "opt": Moments(mu=[sds((2,))], nu=()),
        "train": TrainState(params={"b": sds((1,))}, step=0),
        "pair": Pair(sds((1,)), None),
        "ordered": collections.OrderedDict([("z", 0), ("a", 0)]),
        "empty": {},
        "flag": False,
    }
    leaves, _ = flatten(saved)
    paths, target_leaves, treedef = target_leaf_paths(target)
    assert paths == [leaf.path for leaf in leaves]
    leaf_of = dict(zip(paths, target_leaves, strict=True))
    assert isinstance(leaf_of[(("key", "by_int"), ("key", 0))], jax.ShapeDtypeStruct)
    assert leaf_of[(("key", "pair"), ("flat", 1))] is None
    by_path = {leaf.path: leaf for leaf in leaves}
    values = [by_path[p].array if by_path[p].array is not None else by_path[p].value for p in paths]
    restored = jax.tree_util.tree_unflatten(treedef, values)
    assert isinstance(restored["opt"], Moments) and restored["opt"].nu == ()
    assert isinstance(restored["train"], TrainState) and restored["train"].step == 3
    assert restored["pair"].second is None and restored["empty"] == {}
    assert list(restored["ordered"]) == ["z", "a"]


def test_target_with_bad_keys_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        target_leaf_paths({"a": 1, 0: 2})


# --------------------------------------------------------------------------- paths


def test_encode_decode_path_through_json() -> None:
    path = (("key", "params"), ("key", 0), ("idx", 3), ("attr", "mu"), ("flat", 1))
    encoded = encode_path(path)
    assert encoded == [["key", "params"], ["key", 0], ["idx", 3], ["attr", "mu"], ["flat", 1]]
    assert decode_path(json.loads(json.dumps(encoded))) == path
    assert decode_path([]) == ()


@pytest.mark.parametrize(
    "bad",
    [
        "params",
        {"key": "x"},
        [["key"]],
        [["key", "a", "b"]],
        [["nope", "a"]],
        [["idx", -1]],
        [["idx", "0"]],
        [["idx", True]],
        [["key", 1.5]],
        [["key", None]],
        [["attr", 3]],
        [["flat", 1.0]],
        [["key", 2**64]],
        ["key", "a"],
    ],
)
def test_decode_path_rejects_malformed(bad: Any) -> None:
    with pytest.raises(CorruptCheckpointError):
        decode_path(bad)


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ((), "<root>"),
        ((("key", "params"), ("key", "w")), "params/w"),
        ((("key", "opt"), ("idx", 0), ("attr", "mu"), ("key", "w")), "opt[0].mu/w"),
        ((("key", 0),), "0"),
        ((("key", "0"),), "'0'"),
        ((("key", "a/b"),), "'a/b'"),
        ((("key", ""),), "''"),
        ((("key", "layer-1_x"),), "layer-1_x"),
        ((("key", "p"), ("flat", 2)), "p[#2]"),
        ((("key", "p"), ("attr", "not ident")), "p.'not ident'"),
        ((("key", "p"), ("key", -3)), "p/-3"),
    ],
)
def test_format_path(path: tree.KeyPath, text: str) -> None:
    assert format_path(path) == text


def test_format_path_is_unambiguous_for_lookalike_keys() -> None:
    paths = [
        (("key", 0),),
        (("key", "0"),),
        (("idx", 0),),
        (("flat", 0),),
        (("attr", "a"),),
        (("key", "a"),),
        (("key", "a/b"),),
        (("key", "a"), ("key", "b")),
        (("key", "a.b"),),
        (("key", "a"), ("attr", "b")),
    ]
    assert len({format_path(p) for p in paths}) == len(paths)


def test_is_ancestor() -> None:
    a = (("key", "p"),)
    b = (("key", "p"), ("idx", 0))
    assert is_ancestor(a, b) and is_ancestor((), a)
    assert not is_ancestor(b, a) and not is_ancestor(a, a)
    assert not is_ancestor((("key", "q"),), b)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("kind", "bad"),
    [
        ("int", 1.5),
        ("int", True),
        ("int", "3"),
        ("int", {"int": "12"}),
        ("int", {"int": "0x1", "x": 1}),
        ("float", "nan"),
        ("float", True),
        ("float", {"float": "huge"}),
        ("float", {"float": "nan", "bits": "0000000000000000"}),
        ("float", {"float": "inf", "bits": "7ff0000000000000"}),
        ("bool", 1),
        ("str", 3),
        ("none", 0),
        ("array", None),
        ("mystery", 1),
    ],
)
def test_decode_value_rejects_malformed(kind: str, bad: Any) -> None:
    with pytest.raises(CorruptCheckpointError):
        decode_value(kind, bad)


def test_encoded_values_are_strict_json() -> None:
    for value in [math.nan, math.inf, -math.inf, 2**100, -(2**100)]:
        (leaf,), _ = flatten(value)
        text = json.dumps(encode_value(leaf), allow_nan=False)
        assert_same(decode_value(leaf.kind, json.loads(text)), value)


def test_encode_value_refuses_array_leaves() -> None:
    (leaf,), _ = flatten(np.ones(2))
    with pytest.raises(InvalidInputError):
        encode_value(leaf)


def test_leaf_shape_and_dtype() -> None:
    leaf = Leaf((), "array", np.zeros((2, 3), np.int8), None)
    assert leaf.shape == (2, 3) and leaf.dtype == np.int8
    inline = Leaf((), "int", None, 3)
    assert inline.shape is None and inline.dtype is None


def test_check_dtype() -> None:
    assert tree.check_dtype(np.float32) is None
    assert tree.check_dtype(ml_dtypes.bfloat16) is None
    assert "object" in (tree.check_dtype(object) or "")
    assert tree.check_dtype(np.longdouble) is not None


# --------------------------------------------------------------------------- build_tree


def test_build_tree_defaults_for_missing_nodes() -> None:
    values = {
        (("key", "a"), ("idx", 0)): 1,
        (("key", "a"), ("idx", 1)): 2,
        (("key", "b"), ("attr", "x")): 3,
        (("key", "c"), ("key", 5)): 4,
    }
    assert build_tree({}, values) == {"a": [1, 2], "b": {"x": 3}, "c": {5: 4}}


def test_build_tree_sequence_with_holes_becomes_index_dict() -> None:
    nodes = {(): Node((), "dict", None), (("key", "l"),): Node((("key", "l"),), "list", None)}
    values = {(("key", "l"), ("idx", 1)): "b", (("key", "l"), ("idx", 3)): "d"}
    assert build_tree(nodes, values) == {"l": {1: "b", 3: "d"}}


def test_build_tree_custom_nodes() -> None:
    _round_trip({"pair": Pair(1, Pair(2, 3)), "train": TrainState(params=(), step=1)})


def test_build_tree_is_independent_of_input_order() -> None:
    state = {"b": Moments(mu=[1, {}], nu={"y": 2, "x": 3}), "a": ()}
    leaves, nodes = flatten(state)
    values = {leaf.path: leaf.value for leaf in leaves}
    forward = build_tree({n.path: n for n in nodes}, values)
    backward = build_tree(
        {n.path: n for n in reversed(nodes)}, dict(reversed(list(values.items())))
    )
    assert forward == backward
    assert list(forward) == ["a", "b"] and list(forward["b"]) == ["mu", "nu"]
    assert list(forward["b"]["nu"]) == ["x", "y"]


def test_build_tree_empty_input() -> None:
    assert build_tree({}, {}) == {}


def test_build_tree_leaf_and_node_conflicts() -> None:
    p = (("key", "a"),)
    with pytest.raises(CorruptCheckpointError, match="both"):
        build_tree({p: Node(p, "dict", None)}, {p: 1})
    with pytest.raises(CorruptCheckpointError, match="both"):
        build_tree({}, {p: 1, (*p, ("key", "b")): 2})
    with pytest.raises(CorruptCheckpointError, match="root"):
        build_tree({}, {(): 1, p: 2})
    with pytest.raises(CorruptCheckpointError, match="different kinds"):
        build_tree({}, {(*p, ("key", 0)): 1, (*p, ("idx", 0)): 2})


# --------------------------------------------------------------------------- selectors


def test_parse_selector() -> None:
    assert parse_selector("params/layer1/0") == ("params", "layer1", "0")
    assert parse_selector("/params/") == ("params",)
    assert parse_selector("") == () and parse_selector("/") == ()
    assert parse_selector(("params", "layer1", 0)) == ("params", "layer1", 0)
    assert parse_selector(["a", ("idx", 2)]) == ("a", ("idx", 2))
    path = (("key", "a"), ("idx", 2))
    assert parse_selector(path) == path


@pytest.mark.parametrize("bad", ["a//b", ("a", 1.5), ("a", True), ("a", None), 3, b"a/b"])
def test_parse_selector_rejects(bad: Any) -> None:
    with pytest.raises(InvalidInputError):
        parse_selector(bad)


def test_selector_matches() -> None:
    w = (("key", "params"), ("key", "layer1"), ("idx", 0), ("key", "w"))
    assert selector_matches(parse_selector("params/layer1/0"), w)
    assert selector_matches(parse_selector(("params", "layer1", 0)), w)
    assert selector_matches(parse_selector("params"), w)
    assert selector_matches(parse_selector(""), w)
    assert selector_matches(parse_selector("params/layer1/0/w"), w)
    assert not selector_matches(parse_selector("params/layer1/1"), w)
    assert not selector_matches(parse_selector("params/layer1/0/w/extra"), w)
    assert not selector_matches(parse_selector("params/layer"), w)
    # An ancestor is not inside the selection unless asked for.
    parent = w[:2]
    assert not selector_matches(parse_selector("params/layer1/0"), parent)
    assert selector_matches(parse_selector("params/layer1/0"), parent, include_ancestors=True)
    assert not selector_matches(parse_selector("other/x"), parent, include_ancestors=True)
    # int keys, str keys and indices compare by value; exact entries compare exactly.
    assert selector_matches(("0",), (("key", 0),))
    assert selector_matches((0,), (("key", "0"),))
    assert selector_matches(("mu",), (("attr", "mu"),))
    assert selector_matches((("idx", 0),), (("idx", 0),))
    assert not selector_matches((("idx", 0),), (("key", 0),))


# --------------------------------------------------------------------------- property test


_DTYPES = [np.bool_, np.int8, np.uint32, np.int64, np.float16, np.float32, np.complex64]
_KEYS = st.text(min_size=0, max_size=6)

_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(_DTYPES).flatmap(
        lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
    ),
    st.sampled_from(_DTYPES).flatmap(lambda dt: hnp.from_dtype(np.dtype(dt)).map(dt)),
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.dictionaries(_KEYS, children, max_size=4),
        st.dictionaries(st.integers(-5, 5), children, max_size=3),
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.builds(Moments, children, children),
        st.builds(TrainState, children, children),
        st.builds(Pair, children, children),
    )


_trees = st.recursive(_leaves, _containers, max_leaves=16)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees)
def test_property_round_trip_and_target_paths(state: Any) -> None:
    assert_same(_store_and_build(state), _plain(state))
    leaves, nodes = flatten(state)
    paths, _, _ = target_leaf_paths(state)
    assert paths == [leaf.path for leaf in leaves]
    all_paths = [leaf.path for leaf in leaves] + [node.path for node in nodes]
    assert len(set(all_paths)) == len(all_paths)
    for path in all_paths:
        assert decode_path(json.loads(json.dumps(encode_path(path)))) == path
        assert selector_matches(parse_selector(path), path)
