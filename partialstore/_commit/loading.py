"""Reading finalized checkpoints: the whole tree, selected subtrees, or a target layout.

Only the manifest says what a checkpoint holds, so ``metadata`` is one read
and ``load(select=...)`` reads only the bytes of the selected leaves. The
manifest is checked once, as it is decoded (:mod:`partialstore._commit.records`):
everything here works on checked, typed entries, in time linear in the
manifest's size.

:func:`load_tree` has an example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from partialstore._arrays import arrays
from partialstore._arrays.descriptors import Leaf
from partialstore._arrays.dtypes import dtype_name
from partialstore._commit import records, txlog
from partialstore._commit.layouts import SavedSharding, abstract_target
from partialstore._commit.location import Location
from partialstore._commit.records import LeafEntry, Manifest
from partialstore._pytree import tree
from partialstore.errors import (
    InvalidInputError,
    NotFinalizedError,
    NotFoundError,
)

__all__ = ["CheckpointMetadata", "LeafMetadata", "load_tree", "read_manifest", "read_metadata"]


@dataclasses.dataclass(frozen=True)
class LeafMetadata:
    """What a stored leaf is, without its bytes.

    Attributes:
      kind: "array", "jax_array", "np_scalar", "int", "float", "bool", "str" or "none".
      shape: array shape (``()`` for scalars).
      dtype: numpy dtype name for array kinds, else ``None``.
      sharding: the ``NamedSharding`` a ``jax_array`` leaf was saved with (mesh
        shape, axis names, partition spec), or ``None`` (one device, a numpy
        leaf, or a checkpoint written before shardings were recorded).
    """

    kind: str
    shape: tuple[int, ...]
    dtype: str | None
    sharding: SavedSharding | None = None

    def __repr__(self) -> str:
        text = f"LeafMetadata(kind={self.kind!r}, shape={self.shape!r}, dtype={self.dtype!r}"
        if self.sharding is not None:  # most leaves have none: keep their repr short
            text += f", sharding={self.sharding!r}"
        return text + ")"


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    """The result of :func:`partialstore.metadata`.

    Attributes:
      tree: the checkpoint's structure with a :class:`LeafMetadata` at every leaf.
      custom_metadata: the merged ``custom_metadata`` of every save.
      saves: one dict per save the checkpoint was built from, in log order
        (``save_id``, ``log``, ``created``, ``num_leaves``).
      finalized: when the checkpoint was sealed (ISO 8601, UTC).
    """

    tree: Any
    custom_metadata: Any
    saves: list[dict[str, Any]]
    finalized: str | None
    # The checked entries, for abstract_tree (not compared, not shown).
    _nodes: Mapping[tree.KeyPath, tree.Node] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )
    _leaves: Sequence[LeafEntry] = dataclasses.field(default=(), compare=False, repr=False)

    def abstract_tree(self, mesh: Any = None) -> Any:
        """A load target that restores every leaf as it was saved: the saved layout.

        ``partialstore.load(path, target=info.abstract_tree())`` gives back
        ``jax.Array`` leaves with their saved ``NamedSharding`` (same mesh
        shape, axis names and types, partition spec), numpy leaves as numpy
        and inline leaves as saved. In the tree:

        - a ``jax_array`` leaf is a ``jax.ShapeDtypeStruct`` whose sharding
          is the saved one on a mesh of this job's devices (the saved device
          ids when all exist, else the first ``jax.devices()``), or on
          ``mesh`` when given (it must have the axes the spec names; its
          own shape and axis types are used). One saved without a
          ``NamedSharding`` is placed on the default device, or replicated
          over ``mesh`` when given;
        - a numpy array or numpy scalar leaf is a read-only zero-strided
          numpy array of its shape and dtype (no memory), so it loads as numpy;
        - an inline leaf (int, float, bool, str, None) is its value;
        - dicts, lists and tuples are rebuilt; NamedTuples, dataclasses and
          other registered nodes become :class:`~partialstore._pytree.abstract.SavedNode`
          (they flatten to the stored key paths, which ``load`` matches).

        Example:
            >>> import jax, tempfile
            >>> import partialstore
            >>> tmp = tempfile.TemporaryDirectory()
            >>> mesh = jax.make_mesh((1,), ("data",))
            >>> sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
            >>> w = jax.device_put(np.arange(4.0), sharding)
            >>> partialstore.save(f"{tmp.name}/ckpt", {"w": w, "step": 7})
            >>> partialstore.finalize(f"{tmp.name}/ckpt")
            >>> target = partialstore.metadata(f"{tmp.name}/ckpt").abstract_tree()
            >>> target["w"].sharding == sharding, target["step"]
            (True, 7)
            >>> restored = partialstore.load(f"{tmp.name}/ckpt", target=target)
            >>> restored["w"].sharding == sharding
            True
            >>> tmp.cleanup()

        Raises:
          InvalidInputError: a leaf's saved mesh needs more devices than this
            job has, or ``mesh`` lacks an axis its spec names or does not
            divide its shape; the message names the leaf, what was saved and
            what is available, and how to restore anyway.
        """
        return abstract_target(self._nodes, self._leaves, mesh)

    def with_stored_containers(self, restored: Any) -> Any:
        """``restored`` (e.g. a load of :meth:`abstract_tree`) in the containers a plain load gives.

        The abstract tree keeps NamedTuples and other custom nodes as
        :class:`partialstore.SavedNode`; this rebuilds them as
        ``partialstore.load(path)`` does, so only the leaves differ.

        Example:
            >>> import tempfile
            >>> tmp = tempfile.TemporaryDirectory()
            >>> import partialstore
            >>> partialstore.save(f"{tmp.name}/ckpt", {"opt": (np.zeros(2), 3)})
            >>> partialstore.finalize(f"{tmp.name}/ckpt")
            >>> info = partialstore.metadata(f"{tmp.name}/ckpt")
            >>> restored = partialstore.load(f"{tmp.name}/ckpt", info.abstract_tree())
            >>> info.with_stored_containers(restored)
            {'opt': (array([0., 0.]), 3)}
            >>> tmp.cleanup()
        """
        paths, leaves, _ = tree.target_leaf_paths(restored)
        return tree.build_tree(self._nodes, dict(zip(paths, leaves, strict=True)))


async def read_manifest(location: Location) -> Manifest:
    """Read and check the manifest of the finalized checkpoint at ``location``.

    Every check (:func:`partialstore._commit.records.decode_manifest`) runs here,
    once, so ``load``, ``metadata`` and ``gc`` refuse the same damage.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> from partialstore._commit.location import resolve
        >>> from partialstore._runtime.aio import run
        >>> partialstore.save(f"{tmp.name}/ckpt", {"params": {"w": np.ones(3, np.float32)}})
        >>> partialstore.finalize(f"{tmp.name}/ckpt")
        >>> location = resolve(f"{tmp.name}/ckpt")
        >>> manifest = run(read_manifest(location))
        >>> len(manifest.save_dirs())  # what gc keeps
        1
        >>> tmp.cleanup()

    Raises:
      NotFinalizedError: a session is open there but not finalized.
      NotFoundError: no finalized checkpoint and no session.
      CorruptCheckpointError: the manifest is malformed (the message names its key).
    """
    backend = location.backend
    try:
        body = await backend.read(location.manifest_key)
    except NotFoundError as error:
        if await txlog.has_session(location.backend, location.log_prefix):
            raise NotFinalizedError(
                f"No finalized checkpoint at {location.path}. A partial save session exists "
                "there: call partialstore.finalize first."
            ) from error
        raise NotFoundError(f"No finalized checkpoint at {location.path}.") from error
    return records.decode_manifest(location.manifest_key, body)


def _nodes(manifest: Manifest) -> dict[tree.KeyPath, tree.Node]:
    return {
        n.path: tree.Node(path=n.path, kind=n.kind, type_name=n.type_name) for n in manifest.nodes
    }


def _leaf_metadata(leaf: LeafEntry) -> LeafMetadata:
    if leaf.data is None:
        return LeafMetadata(leaf.kind, (), None)
    return LeafMetadata(leaf.kind, leaf.data.shape, dtype_name(leaf.data.dtype), leaf.sharding)


def read_metadata(location: Location, manifest: Manifest) -> CheckpointMetadata:
    """Build :class:`CheckpointMetadata` from a checked manifest (no array bytes read).

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> from partialstore._commit.location import resolve
        >>> from partialstore._runtime.aio import run
        >>> partialstore.save(f"{tmp.name}/ckpt", {"params": {"w": np.ones(3, np.float32)}})
        >>> partialstore.finalize(f"{tmp.name}/ckpt")
        >>> location = resolve(f"{tmp.name}/ckpt")
        >>> info = read_metadata(location, run(read_manifest(location)))
        >>> info.tree["params"]["w"].shape
        (3,)
        >>> tmp.cleanup()
    """
    values = {leaf.path: _leaf_metadata(leaf) for leaf in manifest.leaves}
    nodes = _nodes(manifest)
    return CheckpointMetadata(
        tree=tree.build_tree(nodes, values),
        custom_metadata=manifest.custom_metadata,
        saves=[save.encode() for save in manifest.saves],
        finalized=manifest.finalized,
        _nodes=nodes,
        _leaves=tuple(manifest.leaves),
    )


def _python_value(leaf: LeafEntry, array: np.ndarray | None) -> Any:
    if array is None:
        return leaf.value
    return array[()] if leaf.kind == "np_scalar" else array


def _selectors(select: Sequence[Any] | str) -> list[Any]:
    if isinstance(select, str):
        return [tree.parse_selector(select)]
    if not isinstance(select, Sequence) or not select:
        raise InvalidInputError(
            "select must be a non-empty list of key paths ('a/b' strings or tuples of keys), "
            f"got {select!r}."
        )
    return [tree.parse_selector(s) for s in select]


def _select(
    leaves: list[LeafEntry],
    nodes: dict[tree.KeyPath, tree.Node],
    select: Sequence[Any] | str,
) -> tuple[list[LeafEntry], dict[tree.KeyPath, tree.Node]]:
    """Keep the selected leaves, and the containers in and around the selected subtrees."""
    selectors = _selectors(select)
    chosen = [
        leaf for leaf in leaves if any(tree.selector_matches(s, leaf.path) for s in selectors)
    ]
    kept_nodes = {
        path: node
        for path, node in nodes.items()
        if any(tree.selector_matches(s, path, include_ancestors=True) for s in selectors)
    }
    for selector in selectors:
        found = any(tree.selector_matches(selector, leaf.path) for leaf in chosen) or any(
            tree.selector_matches(selector, p) for p in kept_nodes
        )
        if not found:
            raise NotFoundError(f"select names {selector!r}, which the checkpoint does not hold.")
    return chosen, kept_nodes


async def load_tree(
    location: Location, manifest: Manifest, *, select: Sequence[Any] | str | None
) -> Any:
    """Load the whole tree (or the ``select``-ed subtrees) as numpy arrays and Python values.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> from partialstore._commit.location import resolve
        >>> from partialstore._runtime.aio import run
        >>> partialstore.save(f"{tmp.name}/ckpt", {"params": {"w": np.ones(3, np.float32)}})
        >>> partialstore.finalize(f"{tmp.name}/ckpt")
        >>> location = resolve(f"{tmp.name}/ckpt")
        >>> run(load_tree(location, run(read_manifest(location)), select=["params"]))
        {'params': {'w': array([1., 1., 1.], dtype=float32)}}
        >>> tmp.cleanup()
    """
    leaves = list(manifest.leaves)
    nodes = _nodes(manifest)
    if select is not None:
        leaves, nodes = _select(leaves, nodes, select)
    with_data = [(leaf, leaf.data) for leaf in leaves if leaf.data is not None]
    loaded = await arrays.read_arrays(
        location.backend, location.final_prefix, [(data, None) for _, data in with_data]
    )
    by_path = {leaf.path: a for (leaf, _), a in zip(with_data, loaded, strict=True)}
    values = {leaf.path: _python_value(leaf, by_path.get(leaf.path)) for leaf in leaves}
    return tree.build_tree(nodes, values)


async def load_into_target(location: Location, manifest: Manifest, target: Any) -> Any:
    """Load the leaves ``target`` names, shaped and placed as its leaves say.

    A ``jax.ShapeDtypeStruct`` or ``jax.Array`` leaf comes back as a ``jax.Array``
    placed as :func:`partialstore._commit.targets.sharding_for` says, each
    device's shard read by itself; numpy leaves as numpy; others as stored.

    Example:
        >>> import jax
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> from partialstore._commit.location import resolve
        >>> from partialstore._runtime.aio import run
        >>> partialstore.save(f"{tmp.name}/ckpt", {"params": {"w": np.ones(3, np.float32)}})
        >>> partialstore.finalize(f"{tmp.name}/ckpt")
        >>> location = resolve(f"{tmp.name}/ckpt")
        >>> sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        >>> target = {"params": {"w": jax.ShapeDtypeStruct((3,), np.float32, sharding=sharding)}}
        >>> run(load_into_target(location, run(read_manifest(location)), target))
        {'params': {'w': Array([1., 1., 1.], dtype=float32)}}
        >>> tmp.cleanup()
    """
    import jax  # deferred: loading without a target should not pay for jax

    from partialstore._commit import targets

    stored = {leaf.path: leaf for leaf in manifest.leaves}
    paths, target_leaves, treedef = tree.target_leaf_paths(target)
    requests: list[tuple[Leaf, tuple[slice, ...] | None]] = []
    plans: list[tuple[Any, ...]] = []
    for path, wanted in zip(paths, target_leaves, strict=True):
        entry = stored.get(path)
        if entry is None:
            raise NotFoundError(
                f"Target leaf {tree.format_path(path)} is not in the checkpoint at {location.path}."
            )
        if entry.data is None:
            plans.append(("value", entry.value))
            continue
        shape = entry.data.shape
        if hasattr(wanted, "shape") and tuple(wanted.shape) != shape:
            raise InvalidInputError(
                f"Target leaf {tree.format_path(path)} has shape {tuple(wanted.shape)}, but the "
                f"checkpoint holds shape {shape}."
            )
        dtype = getattr(wanted, "dtype", None)
        sharding = targets.sharding_for(wanted, tree.format_path(path))
        if sharding is not None:
            index_map = sharding.addressable_devices_indices_map(shape)
            first = len(requests)
            unique = list(dict.fromkeys(_index_key(i, shape) for i in index_map.values()))
            requests += [(entry.data, _read_index(key, shape)) for key in unique]
            plans.append(("sharded", shape, sharding, dtype, first, unique))
        else:
            requests.append((entry.data, None))
            plans.append(("whole", entry.kind, dtype, len(requests) - 1))
    loaded = await arrays.read_arrays(location.backend, location.final_prefix, requests)
    values = [_realize(plan, loaded) for plan in plans]
    return jax.tree_util.tree_unflatten(treedef, values)


def _index_key(
    index: tuple[slice, ...] | None, shape: tuple[int, ...]
) -> tuple[tuple[int, int], ...]:
    if index is None:  # jax types shard indexes as optional; None means the whole array
        return tuple((0, n) for n in shape)
    return tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape, strict=True))


def _read_index(
    key: tuple[tuple[int, int], ...], shape: tuple[int, ...]
) -> tuple[slice, ...] | None:
    if all(start == 0 and stop == n for (start, stop), n in zip(key, shape, strict=True)):
        return None  # the whole array: lets the reader skip slicing
    return tuple(slice(start, stop) for start, stop in key)


def _realize(plan: tuple[Any, ...], loaded: list[np.ndarray]) -> Any:
    import jax

    if plan[0] == "value":
        return plan[1]
    if plan[0] == "whole":
        _, kind, dtype, position = plan
        array = loaded[position]
        if dtype is not None:
            array = array.astype(dtype, copy=False)
        return array[()] if kind == "np_scalar" else array
    _, shape, sharding, dtype, first, unique = plan
    shards: dict[tuple[tuple[int, int], ...], np.ndarray] = {
        key: loaded[first + i] for i, key in enumerate(unique)
    }

    def shard(index: tuple[slice, ...] | None) -> np.ndarray:
        block = shards[_index_key(index, shape)]
        if dtype is not None:
            block = block.astype(dtype, copy=False)
        return block

    return jax.make_array_from_callback(shape, sharding, shard)
