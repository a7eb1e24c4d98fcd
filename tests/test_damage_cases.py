"""Hand-picked damage, one field at a time: manifests, log records, depth, forward compatibility.

Each manifest case edits one field of a real checkpoint's manifest and
states which readers must report it (``CorruptCheckpointError`` naming the
damaged key); the others must return exactly the pristine data. Cases that
only reading array bytes can find (a pack offset past the object's end, a
zarr3 shape that disagrees with ``zarr.json``) are reported by ``load`` alone.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _damage import Pristine, build_pristine, check_reads, outcome, put, same

import partialstore
from partialstore._pytree.keypaths import MAX_DEPTH
from partialstore._runtime import aio
from partialstore.backend import join_key
from partialstore.errors import CorruptCheckpointError, InvalidInputError, NotFoundError

ALL = ["load", "metadata", "gc"]
Edit = Callable[[dict[str, Any]], Any]


@pytest.fixture(scope="module", params=["local", "memory"])
def pristine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    if request.param == "local":
        return build_pristine(str(tmp_path_factory.mktemp("cases") / "root"), {})
    return build_pristine(f"memory://cases-{id(request)}", {})


def leaf(body: dict[str, Any], name: str) -> dict[str, Any]:
    """The leaf entry whose path ends with key ``name``."""
    return next(e for e in body["leaves"] if e["path"] and e["path"][-1][1] == name)


def data(body: dict[str, Any], name: str) -> dict[str, Any]:
    return leaf(body, name)["data"]


def setter(name: str, field: str, value: Any, where: Callable[..., Any] = data) -> Edit:
    return lambda body: where(body, name).__setitem__(field, value)


def add_leaf(path: list[list[Any]], **entry: Any) -> Edit:
    return lambda body: body["leaves"].append({"path": path, "kind": "int", "value": 1, **entry})


def repeat(field: str, index: int) -> Edit:
    return lambda body: body[field].append(copy.deepcopy(body[field][index]))


def save_dir(body: dict[str, Any]) -> str:
    return data(body, "w")["path"].split("/")[1]


MANIFEST_CASES: dict[str, tuple[Edit, list[str]]] = {
    # key paths
    "path not a list": (setter("step", "path", 5, leaf), ALL),
    "path entry of unknown kind": (setter("step", "path", [["bogus", "step"]], leaf), ALL),
    "negative index": (setter("step", "path", [["idx", -1]], leaf), ALL),
    "index past int64": (setter("step", "path", [["idx", 2**64]], leaf), ALL),
    "path deeper than MAX_DEPTH": (
        setter("step", "path", [["idx", 0]] * (MAX_DEPTH + 1), leaf),
        ALL,
    ),
    "duplicate leaf": (repeat("leaves", 0), ALL),
    "duplicate node": (repeat("nodes", 1), ALL),
    "leaf under a leaf": (add_leaf([["key", "step"], ["key", "x"]]), ALL),
    "leaf under a leaf, two levels": (add_leaf([["key", "step"], ["key", "x"], ["idx", 0]]), ALL),
    "node under a leaf": (
        lambda b: b["nodes"].append({"path": [["key", "step"], ["key", "x"]], "kind": "dict"}),
        ALL,
    ),
    "node and leaf at one path": (
        lambda b: b["nodes"].append({"path": [["key", "step"]], "kind": "dict"}),
        ALL,
    ),
    # kinds and values
    "leaf kind pickle": (setter("step", "kind", "pickle", leaf), ALL),
    "leaf kind missing": (lambda b: leaf(b, "step").pop("kind"), ALL),
    "leaf kind a list": (setter("step", "kind", ["int"], leaf), ALL),
    "node kind set": (lambda b: b["nodes"][1].__setitem__("kind", "set"), ALL),
    "node type an int": (lambda b: b["nodes"][1].__setitem__("type", 5), ALL),
    "int value a str": (setter("step", "value", "8", leaf), ALL),
    "float value an int": (setter("lr", "value", 1, leaf), ALL),
    "bool value an int": (setter("flag", "value", 1, leaf), ALL),
    "none value 0": (setter("none", "value", 0, leaf), ALL),
    "big int not hex": (setter("big_int", "value", {"int": "zz"}, leaf), ALL),
    "array leaf without data": (lambda b: leaf(b, "w").pop("data"), ALL),
    "inline leaf with data": (setter("step", "data", 5, leaf), ALL),
    # descriptors: paths
    "escaping path": (setter("big", "path", "data/../../elsewhere/a00000"), ALL),
    "absolute path": (setter("w", "path", "/etc/passwd"), ALL),
    "path of the save dir itself": (
        lambda b: data(b, "big").__setitem__("path", f"data/{save_dir(b)}"),
        ALL,
    ),
    "path to a log record": (setter("w", "path", "log/00000001.json"), ALL),
    "path in no listed save": (setter("big", "path", "data/not-a-save/a00000"), ALL),
    # descriptors: numbers, dtypes
    "shape of strings (issue 8)": (setter("w", "shape", ["a", "b", "c"]), ALL),
    "negative dimension": (setter("w", "shape", [-3, 4]), ALL),
    "bool dimension": (setter("w", "shape", [True, 4]), ALL),
    "rank 33": (setter("big", "shape", [1] * 33), ALL),
    "shape past 2**62 bytes": (setter("big", "shape", [2**31, 2**31]), ALL),
    "zero dimension hiding a huge one": (setter("big", "shape", [0, 2**62]), ALL),
    "chunk 0": (setter("big", "chunks", [0, 512]), ALL),
    "chunk larger than the shape": (setter("big", "chunks", [1024, 512]), ALL),
    "chunks of another rank": (setter("big", "chunks", [512]), ALL),
    "dtype object": (setter("w", "dtype", "object"), ALL),
    "dtype an int": (setter("w", "dtype", 5), ALL),
    "narrower storage dtype": (setter("big", "storage_dtype", "uint8"), ALL),
    "unknown format": (setter("w", "format", "pickle"), ALL),
    "negative offset": (setter("w", "offset", -64), ALL),
    "unaligned offset": (setter("w", "offset", 65), ALL),
    "offset past 2**62": (setter("w", "offset", 2**63), ALL),
    "nbytes not the shape's": (setter("w", "nbytes", 47), ALL),
    "crc past 32 bits": (setter("w", "crc32c", 2**32), ALL),
    "numpy scalar with a shape": (
        lambda b: data(b, "scalar").update(shape=[1], nbytes=4),
        ALL,
    ),
    # saves, top level
    "saves not a list": (lambda b: b.__setitem__("saves", {"a": 1}), ALL),
    "save without id": (lambda b: b["saves"][0].pop("save_id"), ALL),
    "save id escaping": (lambda b: b["saves"][0].__setitem__("save_id", ".."), ALL),
    "save listed twice": (repeat("saves", 0), ALL),
    "negative leaf count": (lambda b: b["saves"][0].__setitem__("num_leaves", -1), ALL),
    "finalized an int": (lambda b: b.__setitem__("finalized", 5), ALL),
    "leaves missing": (lambda b: b.pop("leaves"), ALL),
    "nodes not a list": (lambda b: b.__setitem__("nodes", None), ALL),
    "another format": (lambda b: b.__setitem__("format", "orbax"), ALL),
    "version 2": (lambda b: b.__setitem__("version", 2), ALL),
    "version true": (lambda b: b.__setitem__("version", True), ALL),
    # unknown fields are ignored: newer writers may add some
    "unknown top-level field": (lambda b: b.__setitem__("finalize_id", "abc"), []),
    "unknown entry fields": (
        lambda b: (leaf(b, "w").__setitem__("future", 1), data(b, "big").__setitem__("x", [])),
        [],
    ),
}


# Damage only reading the array bytes can find: load reports it, naming the
# object it read (the edited leaf's pack or array); gc is exact, and metadata,
# which reads no array bytes, describes what the manifest says.
LOAD_ONLY_CASES: dict[str, tuple[Edit, str]] = {
    "pack offset past the object": (setter("w", "offset", 1 << 40), "w"),
    "pack leaf larger than the pack": (
        lambda b: data(b, "w").update(shape=[2**34], dtype="float64", nbytes=2**37),
        "w",
    ),
    "zarr3 shape not zarr.json's": (setter("big", "shape", [512, 1024]), "big"),
    "zarr3 dtype not zarr.json's": (
        lambda b: data(b, "big").update(dtype="int32", storage_dtype="int32"),
        "big",
    ),
}


def _edited(pristine: Pristine, edit: Edit) -> tuple[str, Any, dict[str, Any]]:
    path, location = pristine.materialize("final")
    body = json.loads(pristine.final["partialstore.json"])
    edit(body)
    put(location, location.manifest_key, json.dumps(body).encode())
    return path, location, body


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_field_damage(pristine: Pristine, case: str) -> None:
    edit, reporters = MANIFEST_CASES[case]
    path, location, _ = _edited(pristine, edit)
    assert check_reads(pristine, path, location.manifest_key) == reporters


@pytest.mark.parametrize("case", list(LOAD_ONLY_CASES))
def test_damage_found_by_reading_bytes(pristine: Pristine, case: str) -> None:
    edit, name = LOAD_ONLY_CASES[case]
    path, _, body = _edited(pristine, edit)
    options = pristine.options
    assert (
        outcome(lambda: partialstore.load(path, storage_options=options), data(body, name)["path"])
        is None
    )
    assert partialstore.gc(path, storage_options=options) == []
    described = partialstore.metadata(path, storage_options=options).tree["params"][name]
    assert (list(described.shape), described.dtype) == (
        data(body, name)["shape"],
        data(body, name)["dtype"],
    )


BAD_BYTES = {
    "not JSON": b"{not json",
    "empty": b"",
    "not UTF-8": b'{"format": "\xff\xfe"}',
    "a list": b"[]",
    "nested too deeply": b"[" * 100_000 + b"]" * 100_000,
    "NaN constant": b'{"format": "partialstore", "version": NaN}',
    "int past the digit limit": b'{"format": "partialstore", "version": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("case", list(BAD_BYTES))
def test_manifest_bytes_damage(pristine: Pristine, case: str) -> None:
    path, location = pristine.materialize("final")
    put(location, location.manifest_key, BAD_BYTES[case])
    assert check_reads(pristine, path, location.manifest_key) == ALL


RECORD_CASES: dict[str, Edit] = {
    "kind unknown": lambda r: r.__setitem__("kind", "discard-everything"),
    "kind a dict": lambda r: r.__setitem__("kind", {"save": 1}),
    "save id missing": lambda r: r.pop("save_id"),
    "save id with a slash": lambda r: r.__setitem__("save_id", "a/b"),
    "created an int": lambda r: r.__setitem__("created", 5),
    "leaves not a list": lambda r: r.__setitem__("leaves", {}),
    "duplicate leaf": repeat("leaves", 0),
    "leaf under a leaf": add_leaf([["key", "step"], ["key", "x"]]),
    "array in another save's directory": setter("w", "path", "data/elsewhere/packed-0000.bin"),
    "escaping array path": setter("big", "path", "data/../../x/a00000"),
    "path deeper than MAX_DEPTH": setter("step", "path", [["key", "k"]] * (MAX_DEPTH + 1), leaf),
    "version 4": lambda r: r.__setitem__("version", 4),
    "version true": lambda r: r.__setitem__("version", True),
}


@pytest.mark.parametrize("case", list(RECORD_CASES))
def test_record_damage_is_reported_by_finalize(pristine: Pristine, case: str) -> None:
    path, location = pristine.materialize("session")
    key = join_key(location.staging_prefix, "log/00000001.json")
    record = json.loads(pristine.session["log/00000001.json"])
    RECORD_CASES[case](record)
    put(location, key, json.dumps(record).encode())
    finalize = lambda: partialstore.finalize(path, storage_options=pristine.options)  # noqa: E731
    assert outcome(lambda: finalize() or "published", key) is None
    assert not aio.run(location.backend.exists(location.manifest_key))
    # The damage stays reported, and nothing half-published appears meanwhile.
    assert outcome(lambda: finalize() or "published", key) is None


def test_records_and_seal_with_unknown_fields_finalize_exactly(pristine: Pristine) -> None:
    path, location = pristine.materialize("session")
    for name in ("log/00000001.json", "log/00000002.json"):
        record = json.loads(pristine.session[name])
        record["save_token"] = {"future": [1, 2]}
        leaf(record, "later" if name.endswith("2.json") else "w")["checksum_v2"] = "abc"
        put(location, join_key(location.staging_prefix, name), json.dumps(record).encode())
    seal = {"format": "partialstore.log", "version": 1, "kind": "finalize", "finalize_id": "x"}
    put(location, join_key(location.staging_prefix, "log/00000003.json"), json.dumps(seal).encode())
    partialstore.finalize(path, storage_options=pristine.options)  # completes the sealed log
    assert check_reads(pristine, path, location.manifest_key) == []


# ------------------------------------------------------------------ depth


def _chain(depth: int) -> Any:
    tree: Any = np.arange(3)
    for _ in range(depth):
        tree = {"k": tree}
    return tree


def test_tree_deeper_than_max_depth_is_refused_at_save(tmp_path: Any) -> None:
    path = str(tmp_path / "deep")
    with pytest.raises(InvalidInputError, match=f"more than {MAX_DEPTH} levels"):
        partialstore.save(path, _chain(MAX_DEPTH + 1))
    with pytest.raises(NotFoundError):  # nothing was written
        partialstore.discard(path)


def test_tree_of_max_depth_saves_and_loads(tmp_path: Any) -> None:
    path = str(tmp_path / "deep")
    partialstore.save(path, _chain(MAX_DEPTH))  # the leaf's key path has MAX_DEPTH entries
    partialstore.finalize(path)
    assert same(partialstore.load(path), _chain(MAX_DEPTH))
    # Each record stores its full key path, so a chain's manifest grows with
    # the square of its depth; the bound keeps it well under a megabyte.
    assert (tmp_path / "deep" / "partialstore.json").stat().st_size < 1 << 20


@pytest.mark.parametrize("store", ["local", "memory"])
@pytest.mark.parametrize(
    ("chunks", "message"),
    [((512, 512), r"lacks 'c/[0-9]+/0'"), ((2**21, 512), "holds fewer than")],
    ids=["more chunks", "larger chunks"],
)
def test_array_inflated_in_manifest_and_zarr_json_is_refused_before_allocating(
    tmp_path: Any, store: str, chunks: tuple[int, int], message: str
) -> None:
    # Both objects tampered alike claim a 4 GiB array. TensorStore allocates a
    # read's result before reading (and aborts the process if it cannot), and
    # the chunk list of such an array is long: the read must stop at the first
    # chunk that is missing or shorter than its metadata says, before either.
    parent = str(tmp_path / "root") if store == "local" else f"memory://{uuid.uuid4().hex}"
    pristine = build_pristine(parent, {})
    path, location = pristine.materialize("final")
    body = json.loads(pristine.final["partialstore.json"])
    big = data(body, "big")
    big.update(shape=[2**21, 512], chunks=list(chunks))
    put(location, location.manifest_key, json.dumps(body).encode())
    zarr_key = join_key(location.final_prefix, big["path"], "zarr.json")
    zarr = json.loads(aio.run(location.backend.read(zarr_key)))
    zarr["shape"] = big["shape"]
    zarr["chunk_grid"]["configuration"]["chunk_shape"] = big["chunks"]
    put(location, zarr_key, json.dumps(zarr).encode())
    with pytest.raises(CorruptCheckpointError, match=message) as raised:
        partialstore.load(path, select="params/big")
    assert big["path"] in str(raised.value)
