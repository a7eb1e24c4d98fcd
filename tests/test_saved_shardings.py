"""Saved shardings: the manifest records each jax.Array's NamedSharding, and it comes back.

A worker process with 8 CPU devices (``tests/_shardings_worker.py``) saves
arrays sharded over a (2, 4) mesh with several partition specs (tuples of
axes, ``None``, replicated, a 0-d array, a reversed mesh with auto axes)
to local disk and S3 (moto), then restores them through
``metadata(path).abstract_tree()``: bit-exact, with shardings equal to the
saved ones; onto a mesh the caller gives; and, refused clearly, onto a mesh
without the saved axes. A flax nnx model's sharded state goes the same
way. A 4-device process reading the 8-device checkpoint gets an error
naming the leaf, the saved mesh and the devices it has, and restores with
a mesh it passes. In this process (one device): manifests without the
field (older writers) load unchanged, every damaged field is
``CorruptCheckpointError``, unknown sharding kinds are ignored.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import pytest
from _shardings_worker import SPECS, expected

import partialstore
from partialstore._commit.entries import LeafEntry
from partialstore._pytree.abstract import SavedNode
from partialstore._pytree.tree import flatten, target_leaf_paths
from partialstore.errors import CorruptCheckpointError, InvalidInputError
from partialstore.testing.servers import MotoS3Server

WORKER = Path(__file__).with_name("_shardings_worker.py")
SHARDED = [*SPECS, "rev"]  # every leaf saved with a NamedSharding (opt's too)


def _run_worker(tmp_path: Path, devices: int, job: dict[str, Any]) -> dict[str, Any]:
    job_file, report = tmp_path / f"job{devices}.json", tmp_path / f"report{devices}.json"
    job_file.write_text(json.dumps(job))
    env = dict(os.environ)  # carries the moto server's credentials
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    done = subprocess.run(
        [sys.executable, str(WORKER), str(job_file), str(report)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result: dict[str, Any] = json.loads(report.read_text())
    assert "crash" not in result, result.get("crash")
    return result


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, moto_server: MotoS3Server) -> dict[str, Any]:
    """The 8-device worker's report, and where it saved."""
    root = tmp_path_factory.mktemp("shardings")
    bucket = f"ps-{uuid.uuid4().hex[:20]}"
    moto_server.create_bucket(bucket)
    targets = {
        "local": [str(root / "ckpt"), {}],
        "s3": [f"s3://{bucket}/ckpt", moto_server.storage_options()],
    }
    job = {"mode": "save", "targets": targets, "nnx": [str(root / "nnx"), {}]}
    return {"report": _run_worker(root, 8, job), "targets": targets, "root": root}


def test_manifest_records_each_named_sharding(saved: dict[str, Any]) -> None:
    recorded = saved["report"]["local"]["metadata"]
    # Built by jax.make_mesh: its device order is make_mesh's, so no ids are needed.
    mesh = {
        "axis_names": ["data", "model"],
        "axis_types": ["explicit", "explicit"],
        "shape": [2, 4],
    }
    assert recorded["['w']"] == {"kind": "named", "mesh": mesh, "spec": ["data", "model"]}
    assert recorded["['cols']"]["spec"] == [None, ["data", "model"]]
    assert recorded["['rows']"]["spec"] == [["model", "data"]]
    assert recorded["['rep']"]["spec"] == [] and recorded["['scalar']"]["spec"] == []
    assert recorded["['half']"]["spec"] == ["model"]
    assert recorded["['opt']['mu']['w']"]["spec"] == ["data", "model"]
    # Built by hand over the devices reversed: the order is recorded.
    reverse = {"axis_names": ["a", "b"], "axis_types": ["auto", "auto"]}
    reverse |= {"device_ids": list(range(7, -1, -1)), "shape": [4, 2]}
    assert recorded["['rev']"] == {"kind": "named", "mesh": reverse, "spec": ["a", "b"]}
    # One device, numpy and inline leaves record no sharding.
    for name in ("single", "host", "step", "note", "nothing"):
        assert recorded[f"['{name}']"] is None, name
    # The manifest repeats the log record's entry byte for byte, field included.
    path = Path(saved["targets"]["local"][0])
    manifest = json.loads((path / "partialstore.json").read_text())
    record = json.loads((path / "log" / "00000001.json").read_text())
    entry = next(e for e in manifest["leaves"] if e["path"] == [["key", "w"]])
    assert entry == next(e for e in record["leaves"] if e["path"] == [["key", "w"]])
    assert entry["sharding"] == recorded["['w']"]


@pytest.mark.parametrize("store", ["local", "s3"])
def test_abstract_tree_restores_the_saved_layout(saved: dict[str, Any], store: str) -> None:
    report = saved["report"][store]
    types = report["target_types"]
    assert types["['host']"] == "ndarray" and types["['step']"] == "int"
    assert types["['opt'].count"] == "ShapeDtypeStruct"  # NamedTuple fields: attr paths
    restored = report["restored"]
    for name, fact in restored.items():
        assert fact["present"], name
        assert fact.get("bytes_equal", fact.get("value_equal")), name
    for name in [*(f"['{n}']" for n in SHARDED), "['opt'].count", "['opt'].mu['w']"]:
        fact = restored[name]
        assert fact["type"] == "ArrayImpl" and fact["same_sharding"], (name, fact)
    # Saved on one device (3): restored as a jax.Array on the default device.
    assert restored["['single']"]["type"] == "ArrayImpl"
    assert "SingleDeviceSharding(device=CpuDevice(id=0)" in restored["['single']"]["sharding"]
    assert restored["['host']"]["type"] == "ndarray"
    assert restored["['nothing']"] == {"type": "NoneType", "present": True, "value_equal": True}


def test_restore_onto_a_mesh_the_caller_gives(saved: dict[str, Any]) -> None:
    report = saved["report"]["local"]
    assert report["onto_mesh"] == dict.fromkeys(SHARDED, True)
    for name, fact in report["onto_mesh_bytes"].items():
        assert fact.get("bytes_equal", fact.get("value_equal")), name
    missing = report["missing_axes"]
    assert missing["type"] == "InvalidInputError"
    for part in ("'cols'", "['data', 'model']", "without ['model']", "own target"):
        assert part in missing["message"], part
    indivisible = report["indivisible"]
    assert indivisible["type"] == "InvalidInputError"
    assert "'rev'" in indivisible["message"] and "(6)" in indivisible["message"]


def test_fewer_devices_get_a_clear_error_and_restore_with_a_mesh(
    saved: dict[str, Any],
) -> None:
    path, options = saved["targets"]["s3"]
    job = {"mode": "read", "path": path, "options": options}
    report = _run_worker(saved["root"], 4, job)["read"]
    assert report["devices"] == 4
    error = report["error"]
    assert error["type"] == "InvalidInputError"
    for part in ("'cols'", "{'data': 2, 'model': 4} (8 devices)", "4 cpu device(s)", "mesh="):
        assert part in error["message"], part
    assert report["onto_mesh"] == dict.fromkeys(SHARDED, True)
    assert all(report["bytes_equal"].values()), report["bytes_equal"]


def test_nnx_state_restored_through_its_saved_shardings(saved: dict[str, Any]) -> None:
    report = saved["report"]["nnx"]
    assert report["same_paths"] and report["same_output"]
    assert len(report["leaves"]) == 6  # dense kernel and bias; norm scale, bias, mean, var
    for name, fact in report["leaves"].items():
        assert fact["bytes_equal"] and fact["same_sharding"], (name, fact)
        assert "Mesh('data': 2, 'model': 4" in fact["sharding"], name
    # abstract_tree(mesh=...) onto a (4, 2) mesh: the saved specs there, same bytes.
    assert report["onto_other_mesh"] == dict.fromkeys(report["leaves"], True)


def _strip(body: dict[str, Any]) -> None:
    for entry in body["leaves"]:
        entry.pop("sharding", None)


def test_manifest_without_shardings_loads(saved: dict[str, Any], tmp_path: Path) -> None:
    """An older writer's checkpoint: no field; everything loads, layout on the default device."""
    path = tmp_path / "old"
    shutil.copytree(saved["targets"]["local"][0], path)
    manifest = path / "partialstore.json"
    body = json.loads(manifest.read_text())
    assert any("sharding" in e for e in body["leaves"])
    _strip(body)
    manifest.write_text(json.dumps(body))
    info = partialstore.metadata(str(path))
    assert info.tree["w"].sharding is None
    values = expected()
    plain = partialstore.load(str(path))
    assert plain["w"].tobytes() == values["w"].tobytes()
    restored = partialstore.load(str(path), target=info.abstract_tree())
    for name in SHARDED:
        assert isinstance(restored[name], jax.Array), name
        assert restored[name].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
        assert np.asarray(restored[name]).tobytes() == values[name].tobytes(), name
    # This process has one device: the checkpoint with its shardings says so.
    original = partialstore.metadata(saved["targets"]["local"][0])
    with pytest.raises(InvalidInputError, match=r"8 devices.*1 cpu device"):
        original.abstract_tree()


class State(NamedTuple):
    count: Any
    empty: tuple[()]


@pytest.fixture
def one_device(tmp_path: Path) -> Iterator[tuple[str, jax.sharding.NamedSharding]]:
    """A checkpoint of a NamedSharding on a 1-device mesh, saved in this process."""
    mesh = jax.make_mesh((1,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    state = {
        "w": jax.device_put(np.arange(12, dtype=np.float32).reshape(3, 4), sharding),
        "np": np.ones(3, np.float16),
        "scalar": np.int8(3),
        "state": State(jax.device_put(np.int32(5), sharding.update(spec=())), ()),
        "empty": {"d": {}, "l": [], "t": ()},
    }
    path = str(tmp_path / "one")
    partialstore.save(path, state)
    partialstore.finalize(path)
    yield path, sharding


def test_one_device_mesh_round_trip(one_device: tuple[str, Any]) -> None:
    path, sharding = one_device
    target = partialstore.metadata(path).abstract_tree()
    node = target["state"]  # a NamedTuple: rebuilt as a SavedNode with its field paths
    assert isinstance(node, SavedNode) and node.type_name.endswith("test_saved_shardings.State")
    assert node.empty == () and node.count.shape == ()
    assert target["np"].strides == (0,) and not target["np"].flags.writeable
    restored = partialstore.load(path, target=target)
    assert restored["w"].sharding == sharding
    assert (
        np.asarray(restored["w"]).tobytes()
        == np.arange(12, dtype=np.float32).reshape(3, 4).tobytes()
    )
    assert restored["state"].count.sharding == sharding.update(spec=())
    assert type(restored["np"]) is np.ndarray and restored["np"].dtype == np.float16
    assert type(restored["scalar"]) is np.int8 and restored["scalar"] == 3
    assert restored["empty"] == {"d": {}, "l": [], "t": ()}


def _edit_entry(name: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Any], None]:
    def edit(body: dict[str, Any]) -> None:
        change(next(e for e in body["leaves"] if e["path"][-1][1] == name))

    return edit


def _sharding_edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Any], None]:
    return _edit_entry("w", lambda entry: change(entry["sharding"]))


DAMAGE = {
    "not an object": _edit_entry("w", lambda e: e.__setitem__("sharding", [1])),
    "kind not a string": _sharding_edit(lambda s: s.__setitem__("kind", 3)),
    "mesh missing": _sharding_edit(lambda s: s.pop("mesh")),
    "mesh size 0": _sharding_edit(lambda s: s["mesh"].__setitem__("shape", [0])),
    "mesh size bool": _sharding_edit(lambda s: s["mesh"].__setitem__("shape", [True])),
    "names and sizes differ": _sharding_edit(lambda s: s["mesh"]["axis_names"].append("x")),
    "axis name repeated": _sharding_edit(
        lambda s: s["mesh"].update(shape=[1, 1], axis_names=["data", "data"])
    ),
    "unknown axis type": _sharding_edit(lambda s: s["mesh"].__setitem__("axis_types", ["odd"])),
    "device ids short": _sharding_edit(lambda s: s["mesh"].__setitem__("device_ids", [])),
    "device id negative": _sharding_edit(lambda s: s["mesh"].__setitem__("device_ids", [-1])),
    "spec names unknown axis": _sharding_edit(lambda s: s.__setitem__("spec", ["model"])),
    "spec longer than rank": _sharding_edit(lambda s: s.__setitem__("spec", [None] * 3)),
    "spec uses an axis twice": _sharding_edit(lambda s: s.__setitem__("spec", ["data", ["data"]])),
    "spec entry a number": _sharding_edit(lambda s: s.__setitem__("spec", [1])),
    "on a numpy leaf": lambda body: _edit_entry(
        "np", lambda e: e.__setitem__("sharding", _w_sharding(body))
    )(body),
    "on an inline leaf": lambda body: body["leaves"].append(
        {"kind": "int", "path": [["key", "n"]], "value": 1, "sharding": _w_sharding(body)}
    ),
}


def _w_sharding(body: dict[str, Any]) -> Any:
    return copy.deepcopy(next(e for e in body["leaves"] if e["path"] == [["key", "w"]])["sharding"])


def _rewrite(path: str, edit: Callable[[Any], None]) -> None:
    manifest = Path(path) / "partialstore.json"
    body = json.loads(manifest.read_text())
    edit(body)
    manifest.write_text(json.dumps(body))


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_sharding_is_corrupt(one_device: tuple[str, Any], case: str) -> None:
    path, _ = one_device
    _rewrite(path, DAMAGE[case])
    for read in (partialstore.metadata, partialstore.load):
        with pytest.raises(CorruptCheckpointError, match=r"partialstore\.json is damaged: leaf"):
            read(path)


def test_unknown_sharding_kind_or_null_is_ignored(one_device: tuple[str, Any]) -> None:
    path, _ = one_device
    _rewrite(path, _sharding_edit(lambda s: s.__setitem__("kind", "positional")))
    assert partialstore.metadata(path).tree["w"].sharding is None
    _rewrite(path, _edit_entry("w", lambda e: e.__setitem__("sharding", None)))
    info = partialstore.metadata(path)
    assert info.tree["w"].sharding is None and info.tree["state"]["count"].sharding is not None
    assert (
        partialstore.load(path)["w"].tobytes()
        == np.arange(12, dtype=np.float32).reshape(3, 4).tobytes()
    )


def test_leaf_entry_round_trips_its_sharding(one_device: tuple[str, Any]) -> None:
    path, sharding = one_device
    body = json.loads((Path(path) / "partialstore.json").read_text())
    stored = next(e for e in body["leaves"] if e["path"] == [["key", "w"]])
    entry = LeafEntry.decode(stored, 0, None)
    assert entry.sharding is not None and entry.encode() is stored
    fresh = LeafEntry(entry.path, entry.kind, entry.data, sharding=entry.sharding)
    assert fresh.encode() == stored  # built, not stored: the same JSON
    assert entry.sharding.to_jax("w", (3, 4)) == sharding


class Pair:
    """A pytree node registered without keys: its children have flat indices."""

    def __init__(self, left: Any, right: Any) -> None:
        self.left, self.right = left, right


jax.tree_util.register_pytree_node(
    Pair, lambda p: ((p.left, p.right), None), lambda _, children: Pair(*children)
)


def test_abstract_tree_flattens_to_the_stored_key_paths(tmp_path: Path) -> None:
    """Every container kind: ``load`` finds each leaf of the abstract tree by its path."""
    state = {
        "pair": Pair(np.arange(3, dtype=np.int16), 2.5),
        "ordered": collections.OrderedDict(b=1, a="x"),
        "by_int": {3: np.float32(1), 0: None},
        "nested": [(), {"deep": [np.ones(2, np.float32)]}],
        "state": State(np.int32(4), ()),
    }
    path = str(tmp_path / "kinds")
    partialstore.save(path, state)
    partialstore.finalize(path)
    target = partialstore.metadata(path).abstract_tree()
    stored, _ = flatten(state)
    paths, _, _ = target_leaf_paths(target)
    # The same paths (an OrderedDict's insertion order becomes sorted keys).
    assert sorted(paths, key=repr) == sorted((leaf.path for leaf in stored), key=repr)
    assert len(paths) == len(stored) == 8
    assert isinstance(target["pair"], SavedNode) and target["pair"][1] == 2.5
    restored = partialstore.load(path, target=target)
    assert restored["pair"][0].tobytes() == np.arange(3, dtype=np.int16).tobytes()
    assert restored["ordered"] == {"a": "x", "b": 1} and restored["by_int"][0] is None
    assert type(restored["by_int"][3]) is np.float32 and restored["nested"][0] == ()
    assert restored["state"].count == 4 and restored["state"].empty == ()
