"""The Orbax drop-in (``partialstore.orbax``), issue 11 items 2 and 3.

- Orbax's partial-saving guide ("A Simple Addition Workflow", the v1
  ``partial_saving`` notebook) runs unchanged except the import, on local disk,
  S3 (moto) and GCS (fake-gcs-server), and gives what real Orbax gives;
- the signatures are Orbax's (read from the installed orbax-checkpoint);
- Orbax's own ``test_finalize`` (both spellings of the path), ported;
- one test per difference the README lists under "Switching from Orbax".
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import pytest
from etils import epath

import partialstore
from partialstore import orbax as ps_ocp
from partialstore.errors import InvalidInputError

BackendUrl = tuple[str, dict[str, Any]]


def _guide_workflow(ocp: Any, path: Any, exists: Callable[[Any], bool] | None) -> Any:
    """The guide's cells, in order; ``exists`` checks the staging asserts (local layout)."""
    initial_state = {
        "params": {
            "layer0": np.arange(8),
        },
        "step": 10000,
    }

    ocp.partial.save(path, initial_state)
    if exists is not None:
        assert not exists(path)
        assert exists(path.parent / (path.name + ".partial_save"))

    new_state = {
        "params": {
            "layer1": np.ones(4),
        },
    }

    ocp.partial.save(path, new_state)
    if exists is not None:
        assert not exists(path)
        assert exists(path.parent / (path.name + ".partial_save"))

    load_error = None
    try:
        ocp.load(path)
    except Exception as e:
        load_error = e
    assert load_error is not None  # the guide prints "LOAD ERROR"

    ocp.partial.finalize(path)
    if exists is not None:
        assert not exists(path.parent / (path.name + ".partial_save"))
        assert exists(path)

    restored_state = ocp.load(path)

    expected_state = {
        "params": {
            "layer0": np.array([0, 1, 2, 3, 4, 5, 6, 7]),
            "layer1": np.array([1.0, 1.0, 1.0, 1.0]),
        },
        "step": 10000,
    }

    def is_equal(x: Any, y: Any) -> None:
        if isinstance(x, np.ndarray):
            assert np.allclose(x, y)
        else:
            assert x == y

    jax.tree.map(is_equal, restored_state, expected_state)
    return restored_state


def _exists(path: Any) -> bool:
    return epath.Path(path).exists()


def test_guide_workflow_on_local_disk_with_one_import_changed(tmp_path: Path) -> None:
    restored = _guide_workflow(ps_ocp, epath.Path(tmp_path / "partial_save" / "ckpt"), _exists)
    assert isinstance(restored["params"]["layer0"], np.ndarray)
    assert restored["params"]["layer0"].dtype == np.arange(8).dtype


def test_guide_workflow_gives_what_real_orbax_gives(tmp_path: Path) -> None:
    from orbax.checkpoint import v1 as orbax_ocp

    ours = _guide_workflow(ps_ocp, epath.Path(tmp_path / "ours" / "ckpt"), _exists)
    theirs = _guide_workflow(orbax_ocp, epath.Path(tmp_path / "orbax" / "ckpt"), _exists)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture
def configured_s3(s3_url: BackendUrl) -> Iterator[str]:
    """The S3 root, with its options given once (the drop-in takes no storage_options)."""
    url, options = s3_url
    partialstore.configure_storage(url, options)
    yield url
    partialstore.configure_storage(url, None)


def test_guide_workflow_on_s3_with_options_configured_once(configured_s3: str) -> None:
    # The guide's staging-directory asserts are about the local layout: on S3
    # there is no <path>.partial_save (README, "Switching from Orbax").
    _guide_workflow(ps_ocp, epath.Path(f"{configured_s3}/partial_save/ckpt"), None)
    # The older names of the guide (ocp.partial.save_pytree, ocp.load_pytree) too.
    path = f"{configured_s3}/older_names/ckpt"
    ps_ocp.partial.save_pytree(path, {"a": np.arange(3)})
    ps_ocp.partial.save_pytree_async(path, {"b": 1}).result()
    ps_ocp.partial.finalize(path)
    restored = ps_ocp.load_pytree(path)
    np.testing.assert_array_equal(restored["a"], np.arange(3))
    assert restored["b"] == 1


def test_guide_workflow_on_gcs_with_options_configured_once(gcs_url: BackendUrl) -> None:
    url, options = gcs_url
    partialstore.configure_storage(url, options)
    try:
        _guide_workflow(ps_ocp, epath.Path(f"{url}/partial_save/ckpt"), None)
    finally:
        partialstore.configure_storage(url, None)


def _signature(function: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_signatures_are_orbaxs() -> None:
    from orbax.checkpoint import v1 as orbax_ocp

    for name in ("save", "save_async", "finalize"):
        ours = _signature(getattr(ps_ocp.partial, name))
        assert ours == _signature(getattr(orbax_ocp.partial, name)), name
        assert _signature(getattr(ps_ocp, name)) == ours
    assert _signature(ps_ocp.load) == _signature(orbax_ocp.load)


@pytest.mark.parametrize("finalize_partial_path", [True, False])
def test_orbax_test_finalize_ported(tmp_path: Path, finalize_partial_path: bool) -> None:
    """Orbax's ``PartialSavingTestBase.test_finalize``: both spellings, three cases."""
    final_path = tmp_path / "ckpt"
    partial_path = tmp_path / "ckpt.partial_save"
    path_to_finalize = partial_path if finalize_partial_path else final_path

    ps_ocp.partial.save(final_path, {"a": np.arange(4)})  # conforming
    assert partial_path.exists() and not final_path.exists()
    ps_ocp.partial.finalize(path_to_finalize)
    assert not partial_path.exists() and final_path.exists()
    np.testing.assert_array_equal(ps_ocp.load(final_path)["a"], np.arange(4))

    other_final = tmp_path / "other"
    other_to_finalize = tmp_path / ("other.partial_save" if finalize_partial_path else "other")
    with pytest.raises(FileNotFoundError):  # partial_missing
        ps_ocp.partial.finalize(other_to_finalize)
    assert not other_final.exists()

    # final_exists: Orbax stages a directory by hand; here the save is refused too.
    with pytest.raises(FileExistsError):
        ps_ocp.partial.save(path_to_finalize, {"b": 1})
    with pytest.raises(FileExistsError):
        ps_ocp.partial.finalize(path_to_finalize)
    assert final_path.exists()


# -- one test per difference in the README ("Switching from Orbax") --------------------


def test_difference_later_saves_replace_earlier_keys(tmp_path: Path) -> None:
    from orbax.checkpoint import v1 as orbax_ocp

    orbax_ocp.partial.save(tmp_path / "orbax", {"step": 1})
    with pytest.raises(Exception, match="does not support REPLACEMENT"):
        orbax_ocp.partial.save(tmp_path / "orbax", {"step": 2})
    path = str(tmp_path / "ckpt")
    ps_ocp.partial.save(path, {"params": {"w": np.zeros(3)}, "step": 1})
    ps_ocp.partial.save(path, {"params": {"w": np.ones(3)}, "step": 2})
    ps_ocp.partial.finalize(path)
    restored = ps_ocp.load(path)
    np.testing.assert_array_equal(restored["params"]["w"], np.ones(3))
    assert restored["step"] == 2


def test_difference_an_empty_first_save_is_accepted(tmp_path: Path) -> None:
    from orbax.checkpoint import v1 as orbax_ocp

    with pytest.raises(ValueError, match="empty"):
        orbax_ocp.partial.save(tmp_path / "orbax", {})
    path = str(tmp_path / "ckpt")
    ps_ocp.partial.save(path, {})
    assert (tmp_path / "ckpt.partial_save").is_dir()  # the session has begun
    ps_ocp.partial.save(path, {"step": 1})
    ps_ocp.partial.finalize(path)
    assert ps_ocp.load(path) == {"step": 1}


def test_difference_layout_on_local_disk(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    ps_ocp.partial.save(path, {"w": np.arange(3)})
    assert {p.name for p in (tmp_path / "ckpt.partial_save").iterdir()} == {"log", "data"}
    ps_ocp.partial.finalize(path)
    assert {p.name for p in path.iterdir()} == {"log", "data", "partialstore.json"}


def test_difference_layout_on_s3_has_no_partial_save(configured_s3: str) -> None:
    path = f"{configured_s3}/ckpt"
    backend = partialstore.open_backend(configured_s3)
    from partialstore._runtime.aio import run

    ps_ocp.partial.save(path, {"w": np.arange(3)})
    keys = run(backend.list(""))
    assert keys and all(k.startswith("ckpt/") for k in keys)  # staged at <path> itself
    assert not any(".partial_save" in k for k in keys)
    assert "ckpt/partialstore.json" not in keys
    ps_ocp.partial.finalize(path)
    assert "ckpt/partialstore.json" in run(backend.list(""))


def test_difference_neither_library_reads_the_others_checkpoints(tmp_path: Path) -> None:
    from orbax.checkpoint import v1 as orbax_ocp

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ps_ocp.partial.save(ours, {"w": np.arange(3)})
    ps_ocp.partial.finalize(ours)
    orbax_ocp.partial.save(theirs, {"w": np.arange(3)})
    orbax_ocp.partial.finalize(theirs)
    assert "state" in os.listdir(theirs) and "partialstore.json" in os.listdir(ours)
    with pytest.raises(Exception):  # noqa: B017 - whatever Orbax raises: it cannot read ours
        orbax_ocp.load(ours)
    with pytest.raises(FileNotFoundError, match="No finalized checkpoint"):
        ps_ocp.load(theirs)


def test_difference_partial_save_spelling(tmp_path: Path) -> None:
    spelled = str(tmp_path / "ckpt.partial_save")
    ps_ocp.partial.save(spelled, {"a": 1})  # the drop-in: the same session as <path>
    ps_ocp.partial.save_async(str(tmp_path / "ckpt"), {"b": 2}).result()
    assert not (tmp_path / "ckpt.partial_save.partial_save").exists()
    ps_ocp.partial.finalize(spelled)
    assert ps_ocp.load(tmp_path / "ckpt") == {"a": 1, "b": 2}
    # The core names a checkpoint one way, and says which.
    with pytest.raises(InvalidInputError, match=r"names a partial-save session.*'.*ckpt2'"):
        partialstore.finalize(str(tmp_path / "ckpt2.partial_save"))
    with pytest.raises(InvalidInputError, match="names a partial-save session"):
        ps_ocp.load(spelled)  # load names a finalized checkpoint, never a session


def test_difference_checkpointable_name(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    ps_ocp.partial.save(path, {"a": 1})
    ps_ocp.partial.finalize(path)
    for name in ("AUTO", "state", "pytree", None):
        assert ps_ocp.load(path, checkpointable_name=name) == {"a": 1}
    with pytest.raises(FileNotFoundError, match="one PyTree"):
        ps_ocp.load(path, checkpointable_name="dataset")


def test_difference_an_abstract_state_may_name_some_keys_only(tmp_path: Path) -> None:
    from orbax.checkpoint import v1 as orbax_ocp

    abstract = {"x": jax.ShapeDtypeStruct((3,), np.int64)}
    for ocp, path in ((orbax_ocp, tmp_path / "orbax"), (ps_ocp, tmp_path / "ours")):
        ocp.partial.save(path, {"x": np.arange(3), "y": np.ones(2)})
        ocp.partial.finalize(path)
    with pytest.raises(ValueError, match="partial"):  # Orbax: only with partial_load
        orbax_ocp.load(tmp_path / "orbax", abstract)
    restored = ps_ocp.load(tmp_path / "ours", abstract)
    assert list(restored) == ["x"]
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(3))


def test_difference_only_partial_saving_and_load_are_provided() -> None:
    assert sorted(ps_ocp.__all__) == [
        "AUTO_CHECKPOINTABLE_KEY",
        "PARTIAL_SAVE_SUFFIX",
        "STATE_CHECKPOINTABLE_KEY",
        "finalize",
        "load",
        "load_pytree",
        "partial",
        "save",
        "save_async",
    ]
    assert not hasattr(ps_ocp, "Context") and not hasattr(ps_ocp, "save_pytree")


def test_load_with_abstract_state_gives_jax_arrays(tmp_path: Path) -> None:
    path = os.fspath(tmp_path / "ckpt")
    state = {"a": jax.numpy.arange(8.0), "b": jax.numpy.zeros(4)}
    ps_ocp.partial.save(path, state)
    ps_ocp.partial.finalize(path)
    abstract_state = jax.eval_shape(lambda: state)
    restored = ps_ocp.load(path, abstract_state)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(restored))
    np.testing.assert_array_equal(np.asarray(restored["a"]), np.arange(8.0))


# -- load without an abstract state: the saved shardings, as Orbax restores them ---------


class _Adam(NamedTuple):
    count: Any
    mu: Any


def _sharded_state() -> tuple[dict[str, Any], jax.sharding.NamedSharding]:
    """jax.Arrays with a NamedSharding on a 1-device mesh (recorded), and other leaf kinds."""
    mesh = jax.make_mesh((1,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    w = jax.device_put(np.arange(6, dtype=np.float32).reshape(2, 3), sharding)
    state = {
        "params": {"w": w},
        "opt": (_Adam(jax.numpy.int32(4), {"w": jax.device_put(w * 2, sharding)}), ()),
        "host": np.arange(3, dtype=np.int16),
        "step": 5,
    }
    return state, sharding


def test_load_without_abstract_state_restores_the_saved_shardings(tmp_path: Path) -> None:
    from orbax.checkpoint import v1 as orbax_ocp

    state, sharding = _sharded_state()
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for ocp, path in ((ps_ocp, ours), (orbax_ocp, theirs)):
        ocp.partial.save(path, state)
        ocp.partial.finalize(path)
    restored, orbax_restored = ps_ocp.load(ours), orbax_ocp.load(theirs)
    for got in (restored, orbax_restored):  # Orbax does it too
        assert isinstance(got["params"]["w"], jax.Array)
        assert got["params"]["w"].sharding == sharding
    mu, count = restored["opt"][0]["mu"]["w"], restored["opt"][0]["count"]
    assert isinstance(mu, jax.Array) and mu.sharding == sharding
    # Saved from one device (no sharding recorded): a jax.Array on the default device.
    assert isinstance(count, jax.Array) and count.dtype == np.int32 and int(count) == 4
    assert count.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert type(restored["host"]) is np.ndarray and restored["step"] == 5
    # The containers are those partialstore.load gives (the NamedTuple as a dict).
    plain = partialstore.load(ours)
    assert jax.tree.structure(restored) == jax.tree.structure(plain)
    assert restored["opt"][0].keys() == {"count", "mu"} and restored["opt"][1] == ()
    assert type(restored["opt"]) is tuple and type(orbax_restored["opt"]) is list  # README
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(plain), strict=True):
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
        assert np.asarray(got).dtype == np.asarray(want).dtype


def test_difference_no_saved_sharding_loads_numpy(tmp_path: Path) -> None:
    from orbax.checkpoint import v1 as orbax_ocp

    state = {"a": jax.numpy.arange(4.0)}  # one device: no NamedSharding to record
    for ocp, path in ((ps_ocp, tmp_path / "ours"), (orbax_ocp, tmp_path / "theirs")):
        ocp.partial.save(path, state)
        ocp.partial.finalize(path)
    assert isinstance(orbax_ocp.load(tmp_path / "theirs")["a"], jax.Array)
    assert partialstore.metadata(tmp_path / "ours").tree["a"].sharding is None
    restored = ps_ocp.load(tmp_path / "ours")["a"]
    assert type(restored) is np.ndarray
    np.testing.assert_array_equal(restored, np.arange(4.0, dtype=np.float32))


def test_difference_a_saved_mesh_larger_than_the_job_loads_numpy(tmp_path: Path) -> None:
    state, _ = _sharded_state()
    path = tmp_path / "ckpt"
    ps_ocp.partial.save(path, state)
    ps_ocp.partial.finalize(path)
    # As if saved on 8 devices: this job has 1 (the field is layout only, never bytes).
    manifest = path / "partialstore.json"
    body = json.loads(manifest.read_text())
    recorded = [e["sharding"] for e in body["leaves"] if e.get("sharding")]
    assert len(recorded) == 2  # w and mu
    for sharding in recorded:
        sharding["mesh"]["shape"] = [8]
    manifest.write_text(json.dumps(body))
    with pytest.raises(InvalidInputError, match=r"8 devices.*1 cpu device"):
        partialstore.metadata(path).abstract_tree()
    restored = ps_ocp.load(path)
    assert type(restored["params"]["w"]) is np.ndarray
    assert type(restored["opt"][0]["count"]) is np.ndarray
    np.testing.assert_array_equal(
        restored["opt"][0]["mu"]["w"], 2 * np.arange(6, dtype=np.float32).reshape(2, 3)
    )
