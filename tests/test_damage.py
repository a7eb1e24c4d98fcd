"""Damage is reported, never silent: mutated manifests, log records and array bytes.

Hypothesis mutates the objects of a real two-save checkpoint (local disk and
memory; one S3 case) and checks, for every mutation: ``load``, ``metadata``
and ``gc`` (and ``finalize``, for a log record damaged before it) raise
:class:`CorruptCheckpointError` whose message names the damaged key, or
succeed with exactly the pristine data; never another exception, never a
hang (each call is bounded by an alarm), never a large allocation (peak RSS
checked).

The mutations are those a reader can tell from intact data: a value
replaced by one of another JSON type, a field deleted, a list entry
repeated, an unknown field added. Edits a reader cannot tell apart from a
real checkpoint (another int for an int leaf, another key in a path,
dropping a whole leaf) are left out: nothing but a signature could catch them.
Hand-picked cases per field are in ``test_damage_cases.py``.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import hypothesis.strategies as st
import pytest
from _damage import (
    Pristine,
    build_pristine,
    check_reads,
    get,
    outcome,
    peak_rss_bytes,
    put,
    same,
)
from hypothesis import HealthCheck, event, given, settings

import partialstore
from partialstore._runtime import aio
from partialstore.backend import join_key

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Replacement values of every JSON type (keyed by Python type name), with
# values that are wrong in most places.
JSON_VALUES = {
    "NoneType": st.none(),
    "bool": st.booleans(),
    "int": st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([-1, 2**62 + 1, 2**64, 10**40]),
    ),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "str": st.one_of(
        st.text(max_size=6),
        st.sampled_from(["../x", "data/../../x", "/abs/x", "data", "pickle", "float128"]),
    ),
    "list": st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    "dict": st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
}


@pytest.fixture(scope="module", params=["local", "memory"])
def pristine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    if request.param == "local":
        return build_pristine(str(tmp_path_factory.mktemp("damage") / "root"), {})
    return build_pristine(f"memory://damage-{id(request)}", {})


@pytest.fixture(scope="module")
def rss_at_start() -> int:
    return peak_rss_bytes()


# ------------------------------------------------------------------ JSON mutation


def _positions(obj: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position (keys and indices from the root) of a value below ``obj``."""
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    found = []
    for key, value in items:
        found.append((*at, key))
        found.extend(_positions(value, (*at, key)))
    return found


def _parent(obj: Any, position: tuple[Any, ...]) -> Any:
    for key in position[:-1]:
        obj = obj[key]
    return obj


def _json_type(value: Any) -> str:
    return type(value).__name__  # bool, int, float, str, list, dict, NoneType


def _undetectable(position: tuple[Any, ...], old: Any, new: Any) -> bool:
    """Replacements that give another valid checkpoint: no reader can tell them."""
    plain_int = isinstance(new, int) and not isinstance(new, bool)
    if len(position) >= 3 and position[-3] == "path" and position[-1] == 1:
        return plain_int or isinstance(new, str)  # another dict key: another valid tree
    # A big int leaf is stored as {"int": "0x..."}; a plain int is just another value.
    return position[-1] == "value" and isinstance(old, dict) and plain_int


def mutate(body: dict[str, Any], data: st.DataObject) -> tuple[dict[str, Any], str]:
    """Apply one detectable-or-harmless mutation to a copy of ``body``; describe it."""
    body = copy.deepcopy(body)
    position = data.draw(st.sampled_from(_positions(body)), label="position")
    parent = _parent(body, position)
    old = parent[position[-1]]
    op = data.draw(st.sampled_from(["replace", "delete", "repeat", "extra"]), label="op")
    container = position[-2] if len(position) >= 2 else None
    if op == "replace":
        others = [values for name, values in JSON_VALUES.items() if name != _json_type(old)]
        new = data.draw(st.one_of(others), label="new value")
        if _undetectable(position, old, new):
            new = [new]  # still of another type, and never valid where a scalar was
        parent[position[-1]] = new
    elif op == "delete" and not (isinstance(parent, list) and container in _WHOLE):
        del parent[position[-1]]
    elif op == "repeat" and isinstance(parent, list) and container != "path":
        parent.insert(position[-1], copy.deepcopy(old))
    elif isinstance(old, dict):
        old["zz_unknown_field"] = {"added": True}
    else:
        parent[position[-1]] = {"unexpected": old}
    return body, f"{op} at {position}"


# Dropping one element of these changes the tree (a leaf, a node, a level of a
# path) into another valid one.
_WHOLE = ("leaves", "nodes", "path")


# ------------------------------------------------------------------ fuzz tests


@FUZZ
@given(data=st.data())
def test_mutated_manifest_is_reported_or_read_exactly(
    pristine: Pristine, rss_at_start: int, data: st.DataObject
) -> None:
    if id(pristine) not in _ready:
        _ready[id(pristine)] = pristine.materialize("final")
    path, location = _ready[id(pristine)]
    original = json.loads(pristine.final["partialstore.json"])
    body, what = mutate(original, data)
    key = location.manifest_key
    put(location, key, json.dumps(body).encode())
    try:
        event(f"reported by {check_reads(pristine, path, key)}")
    finally:
        put(location, key, pristine.final["partialstore.json"])
    assert peak_rss_bytes() - rss_at_start < 2 << 30, f"{what} made a reader allocate GiBs"


# One finalized copy per pristine checkpoint, reused by every manifest mutation
# (a mutation that gc accepted deleted nothing: check_reads asserts it).
_ready: dict[int, Any] = {}


@settings(FUZZ, max_examples=60)
@given(data=st.data(), number=st.sampled_from([1, 2]))
def test_mutated_log_record_is_reported_by_finalize_or_merged_exactly(
    pristine: Pristine, rss_at_start: int, data: st.DataObject, number: int
) -> None:
    path, location = pristine.materialize("session")
    name = f"log/{number:08d}.json"
    body, what = mutate(json.loads(pristine.session[name]), data)
    key = join_key(location.staging_prefix, name)
    put(location, key, json.dumps(body).encode())
    finalized = outcome(
        lambda: partialstore.finalize(path, storage_options=pristine.options) or "published", key
    )
    event(f"finalize {'published' if finalized else 'reported'}")
    if finalized is None:
        assert not aio.run(location.backend.exists(location.manifest_key)), what
        return  # reported, and nothing was published
    # Accepted: the merge used only intact fields, so the checkpoint is exact.
    assert check_reads(pristine, path, location.manifest_key) == [], what
    assert peak_rss_bytes() - rss_at_start < 2 << 30, f"{what} made finalize allocate GiBs"


# ------------------------------------------------------------------ flipped bytes


def _flip_test(pristine: Pristine, suffix: str, position: int) -> list[str]:
    """Flip one bit of the object whose relative key ends with ``suffix``; read it back."""
    path, location = pristine.materialize("final")
    (name,) = [key for key in pristine.final if key.endswith(suffix)]
    key = join_key(location.final_prefix, name)
    data = bytearray(get(location, key))
    data[position % len(data)] ^= 1 << (position % 8)
    put(location, key, bytes(data))
    # The message names the object: the array for a chunk or zarr.json, else the key.
    named = key.rsplit("/c/", 1)[0].removesuffix("/zarr.json")
    return check_reads(pristine, path, named)


@settings(FUZZ, max_examples=25)
@given(position=st.integers(min_value=0, max_value=(1 << 20) + 3))
def test_flipped_chunk_byte_is_reported(pristine: Pristine, position: int) -> None:
    # Every byte of a chunk is covered by its crc32c (the last 4 bytes are the crc).
    assert _flip_test(pristine, "/c/0/0", position) == ["load"]


@settings(FUZZ, max_examples=25)
@given(position=st.integers(min_value=0, max_value=4096))
def test_flipped_zarr_json_byte_is_reported_or_harmless(pristine: Pristine, position: int) -> None:
    # Some bytes are harmless (e.g. inside the informational attributes).
    assert set(_flip_test(pristine, "/zarr.json", position)) <= {"load"}


@settings(FUZZ, max_examples=25)
@given(position=st.integers(min_value=0, max_value=256))
def test_flipped_pack_byte_is_reported_or_harmless(pristine: Pristine, position: int) -> None:
    # The first save's pack holds three leaves and zero padding between them.
    suffix = "packed-0000.bin"
    names = [key for key in pristine.final if key.endswith(suffix)]
    first = max(names, key=lambda key: len(pristine.final[key]))
    reported = _flip_test(pristine, first.split("/", 1)[1], position)
    size = len(pristine.final[first])
    in_a_leaf = any(
        start <= position % size < end for start, end in ((0, 6), (64, 112), (128, 132))
    )
    assert reported == (["load"] if in_a_leaf else [])


# ------------------------------------------------------------------ one S3 case


def test_damage_on_s3_is_reported(s3_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_url
    pristine = build_pristine(url, options)
    path, location = pristine.materialize("final")
    key = location.manifest_key
    manifest = json.loads(pristine.final["partialstore.json"])
    escaping = copy.deepcopy(manifest)
    zarr_leaf = next(leaf for leaf in escaping["leaves"] if leaf.get("data", {}).get("chunks"))
    zarr_leaf["data"]["path"] = "data/../../elsewhere/a00000"
    put(location, key, json.dumps(escaping).encode())
    assert check_reads(pristine, path, key) == ["load", "metadata", "gc"]
    beyond = copy.deepcopy(manifest)
    packed = next(leaf for leaf in beyond["leaves"] if leaf.get("data", {}).get("offset"))
    packed["data"]["offset"] = 1 << 40  # far past the end of the pack object
    put(location, key, json.dumps(beyond).encode())
    assert check_reads(pristine, path, packed["data"]["path"]) == ["load"]
    put(location, key, pristine.final["partialstore.json"])
    chunk = next(k for k in pristine.final if k.endswith("/c/0/0"))
    flipped = bytearray(pristine.final[chunk])
    flipped[1000] ^= 0x10
    put(location, join_key(location.final_prefix, chunk), bytes(flipped))
    loaded = outcome(lambda: partialstore.load(path, storage_options=options), chunk[:-6])
    assert loaded is None
    assert same(partialstore.load(path, select="step", storage_options=options), {"step": 8})
