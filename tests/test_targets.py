"""Load targets as users write them (issue 11, item 1).

``load(path, target)`` positionally (Orbax's ``ocp.load(path, abstract_state)``),
a ``jax.ShapeDtypeStruct`` without a sharding (``jax.eval_shape`` output), and
shardings over an ``AbstractMesh`` (``nnx.eval_shape`` under ``jax.set_mesh``),
resolved against the mesh ``jax.set_mesh`` installed or refused with a
partialstore error that says what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import partialstore
from partialstore.errors import InvalidInputError

W = np.arange(12, dtype=np.float32).reshape(3, 4)


def _saved(tmp_path: Path) -> str:
    path = str(tmp_path / "ckpt")
    partialstore.save(path, {"params": {"w": W}, "step": 7})
    partialstore.finalize(path)
    return path


def test_target_is_positional_and_keyword(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    abstract = {"params": {"w": jax.ShapeDtypeStruct(W.shape, W.dtype)}, "step": 0}
    by_position = partialstore.load(path, abstract)
    by_keyword = partialstore.load(path, target=abstract)
    for loaded in (by_position, by_keyword):
        assert isinstance(loaded["params"]["w"], jax.Array)
        np.testing.assert_array_equal(np.asarray(loaded["params"]["w"]), W)
        assert loaded["step"] == 7


def test_other_parameters_stay_keyword_only(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    with pytest.raises(TypeError):
        partialstore.load(path, None, ["params"])  # type: ignore[misc]
    assert partialstore.load(path, None, select=["params"])["params"]["w"].shape == (3, 4)


def test_shape_dtype_struct_without_sharding_gives_a_jax_array_on_the_default_device(
    tmp_path: Path,
) -> None:
    path = _saved(tmp_path)
    abstract = jax.eval_shape(lambda: {"params": {"w": jnp.zeros((3, 4), jnp.float32)}})
    assert abstract["params"]["w"].sharding is None
    loaded = partialstore.load(path, abstract)
    w = loaded["params"]["w"]
    assert isinstance(w, jax.Array) and not isinstance(w, np.ndarray)
    assert w.devices() == {jax.local_devices()[0]}
    np.testing.assert_array_equal(np.asarray(w), W)


def test_shape_dtype_struct_without_sharding_under_set_mesh_is_replicated_on_it(
    tmp_path: Path,
) -> None:
    path = _saved(tmp_path)
    mesh = jax.make_mesh((1,), ("x",))
    abstract = {"params": {"w": jax.ShapeDtypeStruct(W.shape, W.dtype)}}
    with jax.set_mesh(mesh):
        w = partialstore.load(path, abstract)["params"]["w"]
        jnp_sharding = jnp.zeros(W.shape).sharding  # where jnp puts a new array
    assert w.sharding.is_equivalent_to(jnp_sharding, W.ndim)
    assert w.sharding == NamedSharding(mesh, P())
    np.testing.assert_array_equal(np.asarray(w), W)


def test_numpy_target_leaf_stays_numpy(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    loaded = partialstore.load(path, {"params": {"w": np.zeros((3, 4), np.float32)}})
    assert type(loaded["params"]["w"]) is np.ndarray
    np.testing.assert_array_equal(loaded["params"]["w"], W)


def _abstract_under(mesh: Any) -> Any:
    with jax.set_mesh(mesh):
        return jax.eval_shape(
            lambda: {"params": {"w": jax.device_put(jnp.zeros((3, 4)), P("x", None))}}
        )


def test_abstract_mesh_resolves_against_the_mesh_set_by_set_mesh(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    mesh = jax.make_mesh((1,), ("x",))
    abstract = _abstract_under(mesh)
    assert isinstance(abstract["params"]["w"].sharding.mesh, jax.sharding.AbstractMesh)
    with jax.set_mesh(mesh):
        loaded = partialstore.load(path, abstract)
    w = loaded["params"]["w"]
    assert isinstance(w.sharding, NamedSharding)
    assert w.sharding.mesh == mesh and w.sharding.spec == P("x", None)
    np.testing.assert_array_equal(np.asarray(w), W)


def test_abstract_mesh_without_a_mesh_set_says_what_to_do(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    abstract = _abstract_under(jax.make_mesh((1,), ("x",)))
    with pytest.raises(ValueError, match=r"params/w .*AbstractMesh.*jax\.set_mesh") as raised:
        partialstore.load(path, abstract)
    assert isinstance(raised.value, InvalidInputError)


def test_abstract_mesh_with_other_axes_than_the_set_mesh_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    abstract = _abstract_under(jax.make_mesh((1,), ("x",)))
    with (
        jax.set_mesh(jax.make_mesh((1,), ("y",))),
        pytest.raises(InvalidInputError, match=r"axes \{'x': 1\}.*axes \{'y': 1\}"),
    ):
        partialstore.load(path, abstract)


class _Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
        self.dense = nnx.Linear(4, 8, kernel_init=init, rngs=rngs)


def test_nnx_eval_shape_recipe_restores_under_set_mesh(tmp_path: Path) -> None:
    path = str(tmp_path / "nnx")
    mesh = jax.make_mesh((1,), ("model",))
    with jax.set_mesh(mesh):
        model = _Model(nnx.Rngs(0))
        partialstore.save(path, {"model": nnx.state(model)})
        partialstore.finalize(path)
        abstract_model = nnx.eval_shape(lambda: _Model(nnx.Rngs(1)))
        abstract = {"model": nnx.state(abstract_model)}
        restored = partialstore.load(path, abstract)
        nnx.update(abstract_model, restored["model"])
    kernel = abstract_model.dense.kernel[...]
    assert isinstance(kernel, jax.Array) and kernel.sharding.mesh == mesh
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(model.dense.kernel[...]))
    np.testing.assert_array_equal(
        np.asarray(abstract_model.dense.bias[...]), np.asarray(model.dense.bias[...])
    )
