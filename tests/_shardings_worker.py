"""A JAX process with several CPU devices that saves and restores sharded trees.

Run by tests/test_saved_shardings.py as
``python _shardings_worker.py <job.json> <report.json>`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``. ``job.json`` has a
``mode``:

- ``"save"`` (8 devices): saves :func:`sharded_state` (leaves on a (2, 4)
  ``("data", "model")`` mesh with several partition specs, one on a
  reversed (4, 2) ``("a", "b")`` mesh, plus numpy, single-device and inline
  leaves) in two partial saves to each ``targets`` entry ``[path,
  storage_options]``, finalizes, restores through
  ``metadata(path).abstract_tree()`` (also onto a caller's mesh, and onto
  a mesh without the saved axes) and, with ``nnx``, saves and restores a
  flax nnx model's sharded state;
- ``"read"`` (4 devices): reads a checkpoint written by ``"save"``.

It reports what it observed (shardings, bytes, errors) as JSON; the test
asserts on the report.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import partialstore

#: Each sharded leaf's spec on the ("data", "model") mesh.
SPECS: dict[str, Any] = {
    "w": P("data", "model"),
    "cols": P(None, ("data", "model")),
    "rows": P(("model", "data")),
    "rep": P(),
    "half": P("model"),
    "scalar": P(),
}


class Adam(NamedTuple):
    """An optimizer state of the optax kind: a NamedTuple node."""

    count: Any
    mu: Any


def expected() -> dict[str, Any]:
    """The values of every leaf as numpy (the same in every process)."""
    rng = np.random.default_rng(11)
    return {
        "w": rng.standard_normal((8, 16)).astype(np.float32),
        "cols": rng.standard_normal((4, 16)).astype(ml_dtypes.bfloat16),
        "rows": rng.integers(-100, 100, (16, 3)).astype(np.int32),
        "rep": rng.standard_normal((3, 5)).astype(np.float32),
        "half": rng.standard_normal((8, 4)).astype(np.float16),
        "scalar": np.array(2.5, np.float32),
        "rev": rng.standard_normal((8, 6)).astype(np.float32),
        "single": np.arange(6, dtype=np.int32),
        "host": np.arange(10, dtype=np.int16),
        "count": np.array(3, np.int32),
    }


def meshes() -> tuple[Mesh, Mesh]:
    """The (2, 4) mesh (explicit axes) and a (4, 2) mesh over the devices reversed (auto)."""
    main = jax.make_mesh((2, 4), ("data", "model"))
    reverse = Mesh(np.array(jax.devices()[::-1]).reshape(4, 2), ("a", "b"))
    return main, reverse


def sharded_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """The two partial saves: ``(first, second)``."""
    values = expected()
    main, reverse = meshes()
    first: dict[str, Any] = {
        name: jax.device_put(values[name], NamedSharding(main, spec))
        for name, spec in SPECS.items()
    }
    first["single"] = jax.device_put(values["single"], jax.devices()[3])
    first.update(host=values["host"], step=7, note="sharded", nothing=None)
    second = {
        "rev": jax.device_put(values["rev"], NamedSharding(reverse, P("a", "b"))),
        "opt": Adam(
            jax.device_put(values["count"], NamedSharding(main, P())),
            {"w": jax.device_put(values["w"], NamedSharding(main, SPECS["w"]))},
        ),
    }
    return first, second


def _flat(tree: Any) -> dict[str, Any]:
    pairs, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return {jax.tree_util.keystr(path): leaf for path, leaf in pairs}


def _compare(restored: Any, original: Any) -> dict[str, Any]:
    """Per leaf: type, sharding (and whether it equals ``original``'s), bytes equal."""
    out: dict[str, Any] = {}
    got, want = _flat(restored), _flat(original)
    for name, value in want.items():
        have = got.get(name)
        fact: dict[str, Any] = {"type": type(have).__name__, "present": name in got}
        if isinstance(value, jax.Array | np.ndarray):
            host = np.asarray(have)
            fact["bytes_equal"] = host.dtype == value.dtype and host.tobytes() == (
                np.asarray(value).tobytes()
            )
            fact["sharding"] = repr(getattr(have, "sharding", None))
            fact["same_sharding"] = getattr(have, "sharding", None) == getattr(
                value, "sharding", None
            )
        else:
            fact["value_equal"] = have == value and type(have) is type(value)
        out[name] = fact
    return out


def _error(call: Any) -> dict[str, Any] | None:
    try:
        call()
    except Exception as error:
        return {"type": type(error).__name__, "message": str(error)}
    return None


def _on_mesh(restored: Any, mesh: Mesh, specs: dict[str, Any]) -> dict[str, bool]:
    """Whether each named leaf lies on ``mesh`` with its saved spec."""
    flat = _flat(restored)
    return {
        name: flat[f"['{name}']"].sharding == NamedSharding(mesh, spec)
        for name, spec in specs.items()
    }


def save_and_restore(path: str, options: dict[str, Any]) -> dict[str, Any]:
    first, second = sharded_state()
    partialstore.save(path, first, storage_options=options)
    partialstore.save_async(path, second, storage_options=options).result()
    partialstore.finalize(path, storage_options=options)
    info = partialstore.metadata(path, storage_options=options)
    leaves = _flat(info.tree)
    target = info.abstract_tree()
    restored = partialstore.load(path, target=target, storage_options=options)
    spread = jax.make_mesh((2, 2, 2, 1), ("data", "model", "a", "b"))
    onto = partialstore.load(path, target=info.abstract_tree(mesh=spread), storage_options=options)
    specs = {**SPECS, "rev": P("a", "b")}
    return {
        "metadata": {
            name: None if leaf.sharding is None else leaf.sharding.encode()
            for name, leaf in leaves.items()
        },
        "target_types": {name: type(leaf).__name__ for name, leaf in _flat(target).items()},
        "restored": _compare(restored, {**first, **second}),
        "onto_mesh": _on_mesh(onto, spread, specs),
        "onto_mesh_bytes": _compare(onto, {**first, **second}),
        "missing_axes": _error(lambda: info.abstract_tree(mesh=jax.make_mesh((8,), ("data",)))),
        "indivisible": _error(
            lambda: info.abstract_tree(
                mesh=jax.make_mesh((1, 1, 1, 8), ("data", "model", "a", "b"))
            )
        ),
    }


def nnx_roundtrip(path: str, options: dict[str, Any]) -> dict[str, Any]:
    """A flax nnx model's sharded state, restored through its saved shardings."""
    from flax import nnx

    mesh, _ = meshes()

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.dense = nnx.Linear(8, 16, rngs=rngs)
            self.norm = nnx.BatchNorm(16, rngs=rngs)

    def place(x: jax.Array) -> jax.Array:
        spec = P("data", "model") if x.ndim == 2 else P("model")
        return jax.device_put(x, NamedSharding(mesh, spec))

    model = Model(nnx.Rngs(0))
    nnx.update(model, jax.tree.map(place, nnx.state(model)))
    partialstore.save(path, nnx.state(model), storage_options=options)
    partialstore.finalize(path, storage_options=options)
    info = partialstore.metadata(path, storage_options=options)
    restored = partialstore.load(path, target=info.abstract_tree(), storage_options=options)
    other = jax.make_mesh((4, 2), ("data", "model"))
    onto = partialstore.load(path, target=info.abstract_tree(mesh=other), storage_options=options)
    fresh = Model(nnx.Rngs(1))
    state = nnx.state(fresh)
    same_paths = list(_flat(restored)) == list(_flat(state))
    nnx.update(
        fresh,
        jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(state), jax.tree_util.tree_leaves(restored)
        ),
    )
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    model.eval()
    fresh.eval()
    same_output = (
        np.asarray(model.norm(model.dense(x))).tobytes()
        == np.asarray(fresh.norm(fresh.dense(x))).tobytes()
    )
    return {
        "same_paths": same_paths,
        "same_output": same_output,
        "leaves": _compare(nnx.state(fresh), nnx.state(model)),
        "onto_other_mesh": _respecced(onto, nnx.state(model), other),
    }


def _respecced(restored: Any, original: Any, mesh: Mesh) -> dict[str, bool]:
    """Per leaf: same bytes, and the original's spec on ``mesh``."""
    got = _flat(restored)
    return {
        name: got[name].sharding == NamedSharding(mesh, value.sharding.spec)
        and np.asarray(got[name]).tobytes() == np.asarray(value).tobytes()
        for name, value in _flat(original).items()
    }


def read(path: str, options: dict[str, Any]) -> dict[str, Any]:
    """A process with fewer devices than the saved mesh reads the checkpoint."""
    info = partialstore.metadata(path, storage_options=options)
    mesh = jax.make_mesh((2, 2, 1, 1), ("data", "model", "a", "b"))
    restored = partialstore.load(
        path, target=info.abstract_tree(mesh=mesh), storage_options=options
    )
    values = expected()
    flat = _flat(restored)
    return {
        "devices": len(jax.devices()),
        "error": _error(info.abstract_tree),
        "onto_mesh": _on_mesh(restored, mesh, {**SPECS, "rev": P("a", "b")}),
        "bytes_equal": {
            name: np.asarray(flat[f"['{name}']"]).tobytes() == values[name].tobytes()
            for name in (*SPECS, "rev", "single", "host")
        },
    }


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    report: dict[str, Any] = {}
    try:
        if job["mode"] == "save":
            for name, (path, options) in job["targets"].items():
                report[name] = save_and_restore(path, options)
            if "nnx" in job:
                report["nnx"] = nnx_roundtrip(*job["nnx"])
        else:
            report["read"] = read(job["path"], job["options"])
    except Exception:
        report["crash"] = traceback.format_exc()
    Path(sys.argv[2]).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
