"""The public API's semantics, on every backend (fixture ``any_backend_url``)."""

from __future__ import annotations

import json
import typing

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import partialstore
from partialstore import errors
from partialstore._commit.location import resolve
from partialstore._runtime.aio import run


class Adam(typing.NamedTuple):
    mu: np.ndarray
    nu: np.ndarray
    count: int


@pytest.fixture
def ckpt(any_backend_url):
    """(checkpoint path, storage_options) on a fresh root of each backend."""
    root, options = any_backend_url
    return f"{root}/ckpt", options


def bits(x) -> bytes:
    return np.asarray(x).tobytes()


def assert_same_array(expected, actual) -> None:
    expected = np.asarray(expected)
    assert isinstance(actual, np.ndarray | np.generic)
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert bits(actual) == bits(expected)


def test_round_trip_of_mixed_tree(ckpt):
    path, opts = ckpt
    rng = np.random.default_rng(1)
    big = rng.standard_normal((300, 257), dtype=np.float32)
    state = {
        "params": {
            "w": jnp.asarray(big),
            "b16": rng.standard_normal(64).astype(ml_dtypes.bfloat16),
            "i8": np.arange(-5, 5, dtype=np.int8),
        },
        "opt": Adam(mu=np.ones(3), nu=np.zeros(3), count=7),
        "scalars": (1, 2.5, True, "name", None, np.float32(0.5)),
        "empty": {"d": {}, "l": [], "t": ()},
        "zero_d": np.array(3.0),
        "zero_size": np.zeros((0, 4), np.float32),
    }
    partialstore.save(path, state, storage_options=opts)
    partialstore.finalize(path, storage_options=opts)
    loaded = partialstore.load(path, storage_options=opts)

    assert_same_array(big, loaded["params"]["w"])
    assert_same_array(state["params"]["b16"], loaded["params"]["b16"])
    assert_same_array(state["params"]["i8"], loaded["params"]["i8"])
    # NamedTuples come back as dicts keyed by field without a target.
    assert set(loaded["opt"]) == {"mu", "nu", "count"}
    assert loaded["opt"]["count"] == 7 and type(loaded["opt"]["count"]) is int
    assert loaded["scalars"][:5] == (1, 2.5, True, "name", None)
    assert [type(v) for v in loaded["scalars"][:3]] == [int, float, bool]
    assert loaded["scalars"][5] == np.float32(0.5) and loaded["scalars"][5].dtype == np.float32
    assert loaded["empty"] == {"d": {}, "l": [], "t": ()}
    assert_same_array(state["zero_d"], loaded["zero_d"])
    assert_same_array(state["zero_size"], loaded["zero_size"])


def test_nothing_visible_until_finalize(ckpt):
    path, opts = ckpt
    partialstore.save(path, {"a": np.ones(4)}, storage_options=opts)
    # NotFinalizedError is a FileNotFoundError: `except FileNotFoundError` still works.
    with pytest.raises(partialstore.errors.NotFinalizedError, match="finalize"):
        partialstore.load(path, storage_options=opts)
    with pytest.raises(partialstore.errors.NotFinalizedError):
        partialstore.metadata(path, storage_options=opts)


def test_finalize_without_session_raises_not_found(ckpt):
    path, opts = ckpt
    with pytest.raises(FileNotFoundError, match="No partial save session"):
        partialstore.finalize(path, storage_options=opts)


def test_finalized_checkpoint_refuses_saves_and_finalize(ckpt):
    path, opts = ckpt
    partialstore.save(path, {"a": 1}, storage_options=opts)
    partialstore.finalize(path, storage_options=opts)
    with pytest.raises(FileExistsError):
        partialstore.save(path, {"b": 2}, storage_options=opts)
    with pytest.raises(FileExistsError):
        partialstore.save_async(path, {"b": 2}, storage_options=opts)
    # A blocking save checks while it writes: the refused save's bytes are removed.
    with pytest.raises(FileExistsError):
        partialstore.save(path, {"big": np.ones(300_000, np.float32)}, storage_options=opts)
    assert partialstore.gc(path, storage_options=opts) == []
    location = resolve(path, opts)
    if location.uses_rename:
        assert run(location.backend.list_children(location.staging_prefix)) == []
    with pytest.raises(FileExistsError):
        partialstore.finalize(path, storage_options=opts)
    with pytest.raises(FileExistsError):
        partialstore.discard(path, storage_options=opts)
    assert partialstore.load(path, storage_options=opts) == {"a": 1}


def test_additions_and_replacements_follow_save_order(ckpt):
    path, opts = ckpt
    partialstore.save(
        path, {"layer": {"w": np.ones(2), "b": np.zeros(2)}, "step": 1}, storage_options=opts
    )
    partialstore.save(path, {"step": 2, "extra": "x"}, storage_options=opts)  # leaf -> leaf
    partialstore.save(
        path, {"layer": np.full(3, 7.0)}, storage_options=opts
    )  # leaf replaces subtree
    partialstore.save(path, {"extra": {"nested": 5}}, storage_options=opts)  # subtree replaces leaf
    partialstore.save(path, {"more": {"a": 1}}, storage_options=opts)
    partialstore.save(path, {"more": {"b": 2}}, storage_options=opts)  # same-kind subtrees merge
    partialstore.finalize(path, storage_options=opts)
    loaded = partialstore.load(path, storage_options=opts)
    assert loaded["step"] == 2
    assert_same_array(np.full(3, 7.0), loaded["layer"])
    assert loaded["extra"] == {"nested": 5}
    assert loaded["more"] == {"a": 1, "b": 2}


def test_custom_metadata_merges_across_saves(ckpt):
    path, opts = ckpt
    partialstore.save(
        path,
        {"a": 1},
        custom_metadata={"run": "r1", "cfg": {"lr": 1, "bs": 8}},
        storage_options=opts,
    )
    partialstore.save(
        path, {"b": 2}, custom_metadata={"cfg": {"lr": 2}, "step": 9}, storage_options=opts
    )
    partialstore.finalize(path, storage_options=opts)
    info = partialstore.metadata(path, storage_options=opts)
    assert info.custom_metadata == {"run": "r1", "cfg": {"lr": 2, "bs": 8}, "step": 9}
    assert len(info.saves) == 2
    assert [s["num_leaves"] for s in info.saves] == [1, 1]


def test_metadata_describes_leaves_without_reading_array_bytes(ckpt):
    path, opts = ckpt
    partialstore.save(
        path, {"w": np.zeros((4, 5), np.float16), "n": 3, "s": "x"}, storage_options=opts
    )
    partialstore.finalize(path, storage_options=opts)
    location = resolve(path, opts)
    run(location.backend.delete_prefix(f"{location.final_prefix}/data"))
    info = partialstore.metadata(path, storage_options=opts)
    assert info.tree["w"] == partialstore.LeafMetadata("array", (4, 5), "float16")
    assert info.tree["n"].kind == "int"
    assert info.tree["s"].kind == "str"
    assert info.finalized


def test_select_reads_only_selected_leaves(ckpt):
    path, opts = ckpt
    rng = np.random.default_rng(2)
    keep = rng.standard_normal((200, 300), dtype=np.float32)
    partialstore.save(
        path, {"keep": {"w": keep, "i": 4}, "other": np.ones((200, 300))}, storage_options=opts
    )
    partialstore.finalize(path, storage_options=opts)
    location = resolve(path, opts)
    manifest = json.loads(run(location.backend.read(location.manifest_key)))
    other = next(leaf for leaf in manifest["leaves"] if leaf["path"] == [["key", "other"]])
    # Destroy the unselected leaf's bytes: a load that read them would fail.
    other_dir = f"{location.final_prefix}/{other['data']['path']}"
    run(location.backend.delete_prefix(other_dir))
    loaded = partialstore.load(path, select=["keep"], storage_options=opts)
    assert set(loaded) == {"keep"}
    assert_same_array(keep, loaded["keep"]["w"])
    assert loaded["keep"]["i"] == 4
    only_i = partialstore.load(path, select=[("keep", "i")], storage_options=opts)
    assert only_i == {"keep": {"i": 4}}
    with pytest.raises(FileNotFoundError):
        partialstore.load(path, select=["missing"], storage_options=opts)


def test_target_places_jax_arrays_with_sharding(ckpt):
    path, opts = ckpt
    values = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    partialstore.save(path, {"w": values, "step": 3}, storage_options=opts)
    partialstore.finalize(path, storage_options=opts)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"w": jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=sharding), "step": 0}
    loaded = partialstore.load(path, target=target, storage_options=opts)
    assert isinstance(loaded["w"], jax.Array)
    assert loaded["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(loaded["w"]), values)
    assert loaded["step"] == 3
    bad = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sharding), "step": 0}
    with pytest.raises(ValueError, match="shape"):
        partialstore.load(path, target=bad, storage_options=opts)


def test_unsupported_leaf_raises_type_error_before_writing(ckpt):
    path, opts = ckpt
    with pytest.raises(TypeError, match="bad"):
        partialstore.save(path, {"ok": np.ones(3), "bad": {1, 2}}, storage_options=opts)
    with pytest.raises(TypeError, match="strings"):
        partialstore.save(
            path, {"ok": np.ones(3), "strings": np.array(["a"])}, storage_options=opts
        )
    with pytest.raises(FileNotFoundError):  # nothing was written: no session exists
        partialstore.finalize(path, storage_options=opts)


def test_bad_custom_metadata_is_rejected(ckpt):
    path, opts = ckpt
    with pytest.raises(ValueError):
        partialstore.save(
            path, {"a": 1}, custom_metadata=["not", "a", "dict"], storage_options=opts
        )
    with pytest.raises(ValueError):
        partialstore.save(path, {"a": 1}, custom_metadata={"x": object()}, storage_options=opts)


def test_save_async_snapshots_state_and_runs_in_order(ckpt):
    path, opts = ckpt
    array = np.zeros(1000, np.float64)
    responses = []
    for step in range(5):
        array[:] = step
        responses.append(
            partialstore.save_async(path, {"x": array, "step": step}, storage_options=opts)
        )
    array[:] = -1  # mutate after the last save_async returned
    partialstore.finalize(path, storage_options=opts)  # waits for pending saves
    assert all(r.done() for r in responses)
    loaded = partialstore.load(path, storage_options=opts)
    assert loaded["step"] == 4
    assert_same_array(np.full(1000, 4.0), loaded["x"])
    assert len(partialstore.metadata(path, storage_options=opts).saves) == 5


def test_discard_abandons_session(ckpt):
    path, opts = ckpt
    partialstore.save(path, {"a": np.ones(10)}, storage_options=opts)
    partialstore.discard(path, storage_options=opts)
    with pytest.raises(FileNotFoundError):
        partialstore.finalize(path, storage_options=opts)
    with pytest.raises(FileNotFoundError):
        partialstore.discard(path, storage_options=opts)
    partialstore.save(path, {"b": 2}, storage_options=opts)
    partialstore.finalize(path, storage_options=opts)
    assert partialstore.load(path, storage_options=opts) == {"b": 2}


def _relative_keys(location, prefix):
    keys = run(location.backend.list(prefix))
    return {k[len(prefix) + 1 :] for k in keys}


def test_finalize_moves_no_array_bytes(ckpt):
    path, opts = ckpt
    partialstore.save(path, {"w": np.ones((512, 512), np.float32)}, storage_options=opts)
    partialstore.save(path, {"v": np.arange(100)}, storage_options=opts)
    location = resolve(path, opts)
    before = _relative_keys(location, location.staging_prefix)
    data_before = {
        k: run(location.backend.read(f"{location.staging_prefix}/{k}"))
        for k in before
        if k.startswith("data/")
    }
    partialstore.finalize(path, storage_options=opts)
    after = _relative_keys(location, location.final_prefix)
    # Finalize adds exactly the seal notice, the seal and the manifest; array
    # objects are untouched.
    assert after - before == {"log/seal-notice.json", "log/00000003.json", "partialstore.json"}
    assert before <= after
    for key, data in data_before.items():
        assert run(location.backend.read(f"{location.final_prefix}/{key}")) == data


def test_gc_removes_unreferenced_data(ckpt):
    path, opts = ckpt
    partialstore.save(path, {"w": np.ones(100)}, storage_options=opts)
    partialstore.save(path, {"w": np.zeros(100)}, storage_options=opts)  # replaces all of save 1
    partialstore.finalize(path, storage_options=opts)
    removed = partialstore.gc(path, storage_options=opts)
    assert len(removed) == 1 and removed[0].startswith("data/")
    assert_same_array(np.zeros(100), partialstore.load(path, storage_options=opts)["w"])
    assert partialstore.gc(path, storage_options=opts) == []


def test_manifest_pointing_outside_root_is_refused(ckpt):
    path, opts = ckpt
    partialstore.save(path, {"w": np.ones(100_000, np.float32)}, storage_options=opts)
    partialstore.finalize(path, storage_options=opts)
    location = resolve(path, opts)
    manifest = json.loads(run(location.backend.read(location.manifest_key)))
    manifest["leaves"][0]["data"]["path"] = "../../elsewhere/a00000"
    run(location.backend.write(location.manifest_key, json.dumps(manifest).encode()))
    with pytest.raises(errors.CorruptCheckpointError):
        partialstore.load(path, storage_options=opts)


def test_user_keys_never_become_storage_paths(ckpt):
    path, opts = ckpt
    evil = {"../../escape": np.ones(10), "/abs": np.ones(10), "a/b": 1, "ü ñ": np.ones(3)}
    partialstore.save(path, evil, storage_options=opts)
    partialstore.finalize(path, storage_options=opts)
    location = resolve(path, opts)
    keys = _relative_keys(location, location.final_prefix)
    assert all(k.startswith(("data/", "log/")) or k == "partialstore.json" for k in keys)
    assert not any("escape" in k or "abs" in k for k in keys)
    loaded = partialstore.load(path, storage_options=opts)
    assert set(loaded) == set(evil)


@pytest.mark.parametrize("bad", ["", "s3://", 3, None])
def test_bad_paths_are_rejected(bad):
    with pytest.raises((ValueError, TypeError)):
        partialstore.save(bad, {"a": 1})


def test_not_finalized_hint_costs_one_listing_and_one_read(tmp_path):
    # The hint reads only the log's last record, however long the session is.
    from partialstore import observe
    from partialstore._commit import txlog
    from partialstore._commit.location import resolve
    from partialstore._runtime.aio import run

    path = str(tmp_path / "ck")
    for number in range(20):
        partialstore.save(path, {f"k{number}": number})
    location = resolve(path)
    with observe.counting() as counts:
        assert run(txlog.has_session(location.backend, location.log_prefix)) is True
    assert counts.requests == 2
    partialstore.discard(path)  # the last record is now the discard marker: no session
    assert run(txlog.has_session(location.backend, location.log_prefix)) is False
    with pytest.raises(FileNotFoundError) as raised:
        partialstore.load(path)
    assert type(raised.value) is partialstore.errors.NotFoundError
