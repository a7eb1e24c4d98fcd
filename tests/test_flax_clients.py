"""Real clients: flax nnx and flax linen training loops with optax on 8 CPU devices.

Each client trains a small model on a ``(4, 2)`` ``("data", "model")`` mesh,
saves its params, optimizer state and step in pieces (``save``,
``save_async``, ``save``) to S3 (moto) and to GCS (fake-gcs-server) with
storage options given once (``configure_storage``), finalizes, and restores
onto another mesh, ``(2, 4)``, through the nnx recipe: the abstract state
built with ``nnx.eval_shape`` (``jax.eval_shape`` for linen) under
``jax.set_mesh(new_mesh)``, whose shardings are over an ``AbstractMesh``, then
``partialstore.load(path, abstract)`` under the same ``jax.set_mesh``. The
restored state must be bit-exact, placed on the new mesh with the target's
partition specs, and train on: one more step on the restored state gives
the loss and params of one more step on the original.

Then each checkpoint is restored again through its saved shardings, with no
model code: ``load(path, metadata(path).abstract_tree())`` puts every array
saved with a ``NamedSharding`` back on a mesh of the saved shape, ``(4, 2)``,
with the saved partition spec, and ``abstract_tree(mesh=new_mesh)`` puts it
on the ``(2, 4)`` mesh with the saved specs; both bit-exact, every leaf
matched to the trained state by its key path (``jax.tree_util.keystr``).
The Orbax drop-in's ``load(path)``, without an abstract state, restores the
saved layout too, in ``partialstore.load``'s plain containers.

8 CPU devices need ``XLA_FLAGS`` before JAX starts, so the clients run in a
child process: this file, run as a script (``python test_flax_clients.py
<job.json>``), once for both clients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEVICES = 8
OLD_MESH = (4, 2)
NEW_MESH = (2, 4)
AXES = ("data", "model")


# -- the parent: pytest ------------------------------------------------------------------


def _run_client(tmp_path: Path, stores: dict[str, tuple[str, dict[str, Any]]]) -> Any:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({name: [url, opts] for name, (url, opts) in stores.items()}))
    env = dict(os.environ)  # carries the emulators' environment (conftest)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    done = subprocess.run(
        [sys.executable, __file__, str(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (
        f"the flax clients failed:\n{done.stdout[-3000:]}{done.stderr[-6000:]}"
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_report(report: dict[str, Any]) -> None:
    for store in ("s3", "gcs"):
        result = report[store]
        assert result["devices"] == DEVICES
        assert result["leaves"] >= 10  # params, both adam moments, counts
        assert result["bit_exact"] == result["leaves"]
        assert result["placed"] == result["arrays"], result["misplaced"]
        # The params (4 arrays) and both adam moments of them: sharded targets.
        assert result["on_new_mesh"] >= 12, result
        assert result["saves"] == 3
        _check_saved_layouts(result["saved_layout"])
        # Another mesh may sum in another order: equal up to float32 rounding.
        assert abs(result["loss_after"] - result["loss_after_original"]) <= 1e-5 * max(
            1.0, abs(result["loss_after_original"])
        )


def _check_saved_layouts(layouts: dict[str, dict[str, Any]]) -> None:
    """The restores through the saved shardings: every leaf exact, every sharded one placed."""
    assert sorted(layouts) == ["drop_in", "new_mesh", "saved_mesh"]
    for result in layouts.values():
        # Params, both adam moments, the adam count, the step: all found, all exact.
        assert result["leaves"] >= 14, result
        assert result["found"] == result["leaves"] == result["restored"], result
        assert result["bit_exact"] == result["leaves"], result
        # The 4 params and both adam moments of them at least were saved on the mesh...
        assert result["sharded"] >= 12, result
        # ...and the kernels (and their moments) split over the "model" axis.
        assert result["split"] >= 6, result
        assert result["placed"] == result["sharded"], result["misplaced"]


def test_nnx_and_linen_training_loops_save_in_pieces_and_restore_on_another_mesh(
    tmp_path: Path, s3_url: Any, gcs_url: Any
) -> None:
    # One child runs both clients: JAX and flax start once (this file's time budget).
    reports = _run_client(tmp_path, {"s3": s3_url, "gcs": gcs_url})
    assert sorted(reports) == ["linen", "nnx"]
    for report in reports.values():
        _check_report(report)


# -- the child: both clients, 8 devices --------------------------------------------------


def _batch(step: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(step)
    return rng.normal(size=(16, 16)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)


def _snapshot(tree: Any) -> Any:
    """Host copies of ``tree``'s leaves (training goes on and changes the state)."""
    import jax
    import numpy as np

    return jax.tree.map(lambda leaf: np.array(leaf, copy=True), tree)


def _layout(tree: Any) -> list[tuple[Any, Any, Any]]:
    """Each leaf's jax key path, a host copy of it, and its partition spec if it has one.

    Taken when the state is saved, before training changes it and before
    :func:`_snapshot` turns its arrays into numpy (which keeps no sharding).
    """
    import jax
    import numpy as np

    layout = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        named = isinstance(leaf, jax.Array) and isinstance(
            leaf.sharding, jax.sharding.NamedSharding
        )
        spec = leaf.sharding.spec if named else None
        layout.append((path, np.array(leaf, copy=True), spec))
    return layout


def _plain_key(path: Any) -> str:
    """A key path with fields, dict keys and indices alike: ``partialstore.load``'s
    containers (NamedTuples and other nodes become dicts) against the saved state's."""
    parts = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(map(str, parts))


def _restore_saved_layouts(path: str, layout: list[Any], new_mesh: Any) -> dict[str, Any]:
    """Load via ``abstract_tree()``, ``abstract_tree(mesh=new_mesh)`` and the Orbax drop-in."""
    import jax

    import partialstore
    from partialstore import orbax as ocp

    saved = partialstore.metadata(path)
    keystr = jax.tree_util.keystr
    return {
        "saved_mesh": _check_layout(
            partialstore.load(path, saved.abstract_tree()), layout, None, keystr
        ),
        "new_mesh": _check_layout(
            partialstore.load(path, saved.abstract_tree(mesh=new_mesh)), layout, new_mesh, keystr
        ),
        # ocp.load(path), no abstract state: Orbax's saved shardings, plain containers.
        "drop_in": _check_layout(ocp.load(path), layout, None, _plain_key),
    }


def _check_layout(
    restored: Any, layout: list[Any], mesh: Any, name: Callable[[Any], str]
) -> dict[str, Any]:
    """Exact leaves; sharded ones on ``mesh`` (else a mesh like the saved) with the saved spec.

    Leaves are matched by ``name`` of their key paths.
    """
    import jax
    import numpy as np

    got = {name(p): v for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
    exact = found = sharded = split = placed = 0
    misplaced = []
    for path, want, spec in layout:
        key = name(path)
        if key not in got:
            continue
        found += 1
        leaf, a = got[key], np.asarray(got[key])
        exact += int(
            a.dtype == want.dtype and a.shape == want.shape and a.tobytes() == want.tobytes()
        )
        if spec is None:
            continue
        sharded += 1
        split += int(any(entry is not None for entry in spec))
        ok = isinstance(leaf, jax.Array) and isinstance(leaf.sharding, jax.sharding.NamedSharding)
        if ok and mesh is not None:
            ok = leaf.sharding.mesh == mesh
        elif ok:  # a mesh of this job's devices like the saved one
            ok = (
                leaf.sharding.mesh.devices.shape == OLD_MESH
                and leaf.sharding.mesh.axis_names == AXES
            )
        ok = ok and leaf.sharding.spec == spec
        placed += int(ok)
        if not ok:
            misplaced.append(f"{key}: {getattr(leaf, 'sharding', type(leaf))} (saved spec {spec})")
    return {
        "leaves": len(layout),
        "restored": len(got),
        "found": found,
        "bit_exact": exact,
        "sharded": sharded,
        "split": split,
        "placed": placed,
        "misplaced": misplaced,
    }


def _compare(restored: Any, copies: Any, abstract: Any, new_mesh: Any) -> dict[str, Any]:
    """Count bit-exact leaves, arrays placed as ``abstract`` asks, and those on ``new_mesh``."""
    import jax
    import numpy as np

    leaves_r, tree_r = jax.tree.flatten(restored)
    leaves_o, tree_o = jax.tree.flatten(copies)
    assert tree_r == tree_o, (tree_r, tree_o)
    wanted = jax.tree.leaves(abstract)
    exact = placed = on_mesh = arrays = 0
    misplaced = []
    for got, want, target in zip(leaves_r, leaves_o, wanted, strict=True):
        a = np.asarray(got)
        exact += int(
            a.dtype == want.dtype and a.shape == want.shape and a.tobytes() == want.tobytes()
        )
        if not (isinstance(got, jax.Array) and got.ndim):
            continue
        arrays += 1
        sharding = target.sharding
        if sharding is None:  # none asked: where jnp puts it, replicated over the mesh
            replicated = jax.sharding.NamedSharding(new_mesh, jax.sharding.PartitionSpec())
            ok = got.sharding.is_equivalent_to(replicated, got.ndim)
        else:  # the AbstractMesh's spec, on the concrete mesh of jax.set_mesh
            ok = got.sharding.mesh == new_mesh and got.sharding.spec == sharding.spec
            on_mesh += int(ok)
        placed += int(ok)
        if not ok:
            misplaced.append(f"{got.shape} {got.sharding} (target {sharding})")
    return {
        "leaves": len(leaves_r),
        "bit_exact": exact,
        "arrays": arrays,
        "placed": placed,
        "on_new_mesh": on_mesh,
        "misplaced": misplaced,
    }


def _meshes() -> tuple[Any, Any]:
    """The training mesh and the one to restore onto (automatic sharding propagation)."""
    import jax

    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh(OLD_MESH, AXES, axis_types=auto), jax.make_mesh(
        NEW_MESH, AXES, axis_types=auto
    )


def _nnx_client(path: str) -> dict[str, Any]:
    import jax
    import optax
    from flax import nnx

    import partialstore

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            shard = nnx.with_partitioning
            init = nnx.initializers.lecun_normal()
            self.up = nnx.Linear(16, 32, kernel_init=shard(init, (None, "model")), rngs=rngs)
            self.down = nnx.Linear(32, 8, kernel_init=shard(init, ("model", None)), rngs=rngs)

        def __call__(self, x: Any) -> Any:
            return self.down(nnx.relu(self.up(x)))

    @nnx.jit
    def train_step(model: Model, optimizer: nnx.Optimizer, x: Any, y: Any) -> Any:
        loss, grads = nnx.value_and_grad(lambda m: ((m(x) - y) ** 2).mean())(model)
        optimizer.update(model, grads)
        return loss

    def build(seed: int) -> tuple[Model, nnx.Optimizer]:
        model = Model(nnx.Rngs(seed))
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    old_mesh, new_mesh = _meshes()
    with jax.set_mesh(old_mesh):
        model, optimizer = build(0)
        for step in range(3):
            train_step(model, optimizer, *_batch(step))
        partialstore.save(path, {"params": nnx.state(model, nnx.Param)})
        partialstore.save_async(path, {"optimizer": nnx.state(optimizer)}).result()
        partialstore.save(path, {"step": 3})
        partialstore.finalize(path)
        trained = {"params": nnx.state(model, nnx.Param), "optimizer": nnx.state(optimizer)}
        layout = _layout({**trained, "step": 3})
        original = _snapshot(trained)
        loss_original = float(train_step(model, optimizer, *_batch(3)))
    with jax.set_mesh(new_mesh):
        abstract_model, abstract_optimizer = nnx.eval_shape(lambda: build(1))
        abstract = {
            "params": nnx.state(abstract_model, nnx.Param),
            "optimizer": nnx.state(abstract_optimizer),
            "step": 0,
        }
        restored = partialstore.load(path, abstract)
        nnx.update(abstract_model, restored["params"])
        nnx.update(abstract_optimizer, restored["optimizer"])
        assert restored["step"] == 3
        names = ("params", "optimizer")
        report = _compare(
            {k: restored[k] for k in names}, original, {k: abstract[k] for k in names}, new_mesh
        )
        loss_after = float(train_step(abstract_model, abstract_optimizer, *_batch(3)))
    report.update(loss_after=loss_after, loss_after_original=loss_original)
    report["saved_layout"] = _restore_saved_layouts(path, layout, new_mesh)
    return report


def _linen_client(path: str) -> dict[str, Any]:
    import flax.linen as nn
    import jax
    import optax
    from flax.training import train_state
    from jax.sharding import PartitionSpec as P

    import partialstore

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.Dense(8, name="down")(nn.relu(nn.Dense(32, name="up")(x)))

    specs = {
        "up": {"kernel": P(None, "model"), "bias": P("model")},
        "down": {"kernel": P("model", None), "bias": P()},
    }
    model = MLP()

    def create(seed: int) -> train_state.TrainState:
        params = model.init(jax.random.key(seed), _batch(0)[0])["params"]
        params = jax.tree.map(jax.device_put, params, specs)  # on the mesh jax.set_mesh set
        return train_state.TrainState.create(
            apply_fn=model.apply, params=params, tx=optax.adam(1e-2)
        )

    def with_specs(tree: Any) -> Any:
        mesh = jax.sharding.get_abstract_mesh()
        return jax.tree.map(
            lambda leaf, spec: leaf.update(sharding=jax.sharding.NamedSharding(mesh, spec)),
            tree,
            specs,
        )

    @jax.jit
    def train_step(state: train_state.TrainState, x: Any, y: Any) -> Any:
        def loss_fn(params: Any) -> Any:
            return ((state.apply_fn({"params": params}, x) - y) ** 2).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    old_mesh, new_mesh = _meshes()
    with jax.set_mesh(old_mesh):
        state = create(0)
        for step in range(3):
            state, _ = train_step(state, *_batch(step))
        partialstore.save(path, {"params": state.params})
        partialstore.save_async(path, {"opt_state": state.opt_state}).result()
        partialstore.save(path, {"step": state.step})
        partialstore.finalize(path)
        trained = {"params": state.params, "opt_state": state.opt_state}
        layout = _layout({**trained, "step": state.step})
        original = _snapshot(trained)
        _, loss_original = train_step(state, *_batch(3))
    with jax.set_mesh(new_mesh):
        # Linen's abstract state carries no shardings under an Auto mesh: attach
        # the partition specs over the AbstractMesh, as nnx.eval_shape does.
        abstract_state = jax.eval_shape(lambda: create(1))
        adam, *rest = abstract_state.opt_state
        adam = adam._replace(mu=with_specs(adam.mu), nu=with_specs(adam.nu))
        abstract = {
            "params": with_specs(abstract_state.params),
            "opt_state": (adam, *rest),
            "step": abstract_state.step,
        }
        restored = partialstore.load(path, abstract)
        assert int(restored["step"]) == 3
        names = ("params", "opt_state")
        report = _compare(
            {k: restored[k] for k in names}, original, {k: abstract[k] for k in names}, new_mesh
        )
        resumed = create(1).replace(
            params=restored["params"], opt_state=restored["opt_state"], step=restored["step"]
        )
        _, loss_after = train_step(resumed, *_batch(3))
    report.update(loss_after=float(loss_after), loss_after_original=float(loss_original))
    report["saved_layout"] = _restore_saved_layouts(path, layout, new_mesh)
    return report


def _child(job_file: str) -> None:
    import jax

    import partialstore

    stores = json.loads(Path(job_file).read_text())
    reports: dict[str, Any] = {"nnx": {}, "linen": {}}
    for name, (url, options) in stores.items():
        partialstore.configure_storage(url, options)  # once: every call below has only the path
        for client, run in (("nnx", _nnx_client), ("linen", _linen_client)):
            path = f"{url}/{client}/step_3"
            report = run(path)
            report["saves"] = len(partialstore.metadata(path).saves)
            report["devices"] = jax.device_count()
            reports[client][name] = report
    print(json.dumps(reports))


if __name__ == "__main__":
    _child(sys.argv[1])
