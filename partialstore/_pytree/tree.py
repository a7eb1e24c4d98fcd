"""The PyTree layer: state -> leaf and node records -> tree again.

:func:`flatten` walks a user's PyTree (dicts, lists, tuples, NamedTuples and
every node registered with ``jax.tree_util``, e.g. flax structs or registered
dataclasses), validates every leaf, snapshots arrays to host memory, and
returns :class:`Leaf` and :class:`Node` records with stable key paths (see
:mod:`partialstore._pytree.keypaths`). Unlike ``jax.tree_util`` it keeps ``None``
leaves and empty containers, so they survive a save.

:func:`build_tree` rebuilds a tree from stored records without a target;
:func:`target_leaf_paths` flattens a load target so each of its leaves can be
looked up by the same key path :func:`flatten` gave at save time.

Which leaves are supported, and how inline values are stored in JSON, is
decided in :mod:`partialstore._pytree.leaves`; this module re-exports what the layers
above need from it and from :mod:`partialstore._pytree.keypaths`, so they import one
module.

Example:
    >>> leaves, nodes = flatten({"params": {"w": np.ones(3)}, "step": 1})
    >>> [format_path(leaf.path) for leaf in leaves]
    ['params/w', 'step']
    >>> tree = build_tree({n.path: n for n in nodes},
    ...                   {leaf.path: leaf.array if leaf.array is not None else leaf.value
    ...                    for leaf in leaves})
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import jax.tree_util as jtu
import numpy as np

from partialstore._pytree.keypaths import (
    MAX_DEPTH,
    KeyPath,
    PathEntry,
    decode_path,
    encode_path,
    entry_from_jax_key,
    format_path,
    is_ancestor,
    parse_selector,
    path_keys,
    selector_matches,
)
from partialstore._pytree.leaves import (
    ARRAY_KINDS,
    INLINE_KINDS,
    LEAF_KINDS,
    check_dtype,
    classify_leaf,
    decode_value,
    encode_inline,
    fallback_leaf_kind,
    is_sharded_across_processes,
    snapshot,
    start_host_copy,
    type_name,
    value_from_array,
)
from partialstore._pytree.shards import ShardedArray, snapshot_shards
from partialstore.errors import CorruptCheckpointError, InvalidInputError

if TYPE_CHECKING:
    from jax.sharding import Sharding

__all__ = [
    "ARRAY_KINDS",
    "INLINE_KINDS",
    "LEAF_KINDS",
    "MAX_DEPTH",
    "NODE_KINDS",
    "KeyPath",
    "Leaf",
    "Node",
    "PathEntry",
    "build_tree",
    "check_dtype",
    "decode_path",
    "decode_value",
    "encode_inline",
    "encode_path",
    "encode_value",
    "flatten",
    "format_path",
    "is_ancestor",
    "parse_selector",
    "path_keys",
    "selector_matches",
    "target_leaf_paths",
    "value_from_array",
]

NODE_KINDS = frozenset({"dict", "list", "tuple", "namedtuple", "custom"})


@dataclasses.dataclass(frozen=True, eq=False)
class Leaf:
    """One leaf of a flattened state.

    ``array`` holds the host snapshot for the array kinds (a 0-d array for
    ``"np_scalar"``) and ``value`` the Python value for the inline kinds.
    A ``jax.Array`` sharded across the processes of a multi-process job has
    no ``array``; ``shards`` holds the shards this process writes instead.
    Compared by identity, since arrays have no single truth value.
    """

    path: KeyPath
    kind: str
    array: np.ndarray | None
    value: int | float | bool | str | None
    sharding: Sharding | None = None
    shards: ShardedArray | None = None

    @property
    def data(self) -> np.ndarray | ShardedArray | None:
        """What is written for an array leaf: ``array``, or this process's ``shards``."""
        return self.array if self.array is not None else self.shards

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape of the (global) array, or ``None`` for inline kinds."""
        data = self.data
        return None if data is None else tuple(data.shape)

    @property
    def dtype(self) -> np.dtype | None:
        """Dtype of the array, or ``None`` for inline kinds."""
        data = self.data
        return None if data is None else data.dtype


@dataclasses.dataclass(frozen=True)
class Node:
    """One container of a flattened state, recorded even when empty.

    ``kind`` is ``"dict"``, ``"list"``, ``"tuple"``, ``"namedtuple"`` or
    ``"custom"`` (any other registered pytree node, OrderedDict included);
    ``type_name`` is ``module.QualName`` for information only.
    """

    path: KeyPath
    kind: str
    type_name: str | None


class _TreeSize(Protocol):
    """What is read of a ``jax.tree_util.PyTreeDef`` (jaxlib ships it without type stubs)."""

    @property
    def num_nodes(self) -> int: ...

    @property
    def num_leaves(self) -> int: ...


def _children(obj: Any, path: KeyPath) -> list[tuple[PathEntry, Any]] | None:
    """Flatten ``obj`` by one level with jax's key paths; ``None`` if it is no node.

    ``tree_flatten_with_path`` with an ``is_leaf`` that stops below the root is
    used rather than ``flatten_one_level_with_keys``, whose NamedTuple keys
    are wrong in jaxlib 0.10 (every field is named after the first).
    """
    if isinstance(obj, dict) and type(obj) is dict:
        bad = [k for k in obj if isinstance(k, bool) or not isinstance(k, str | int)]
        kinds = {isinstance(k, str) for k in obj}
        if bad or len(kinds) > 1:
            culprit = bad[0] if bad else next(k for k in obj if isinstance(k, int))
            raise InvalidInputError(
                f"The dict at {format_path(path)!r} has key {culprit!r} of type "
                f"{type(culprit).__qualname__}; dict keys must be all str or all int "
                "(jax cannot order mixed keys)."
            )
    below_root = False

    def stop_below_root(_: Any) -> bool:
        # jax asks about the root first and then about each child: stopping at
        # every call after the first flattens exactly one level, even when a
        # child is the root itself (a cycle, reported by the caller).
        nonlocal below_root
        stopped, below_root = below_root, True
        return stopped

    treedef: _TreeSize
    try:
        keyed, treedef = jtu.tree_flatten_with_path(obj, is_leaf=stop_below_root)
    except Exception as exc:  # jax raises plain TypeError/ValueError from user flatten code
        raise InvalidInputError(
            f"Cannot flatten the pytree node at {format_path(path)!r} ({type_name(obj)}): {exc}"
        ) from exc
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        return None
    children: list[tuple[PathEntry, Any]] = []
    seen: set[PathEntry] = set()
    for key_path, child in keyed:
        entry = entry_from_jax_key(key_path[0], path)
        if entry in seen:
            raise InvalidInputError(
                f"The pytree node at {format_path(path)!r} ({type_name(obj)}) yields the key "
                f"{format_path((entry,))!r} twice."
            )
        seen.add(entry)
        children.append((entry, child))
    return children


def _node_kind(obj: Any) -> str:
    cls = type(obj)
    if cls is dict:
        return "dict"
    if cls is list:
        return "list"
    if cls is tuple:
        return "tuple"
    if isinstance(obj, tuple) and hasattr(cls, "_fields"):
        return "namedtuple"
    return "custom"


_EXIT = object()


def _walk(state: Any) -> tuple[list[tuple[KeyPath, str, Any]], list[Node]]:
    """Validate ``state`` and list its leaves (path, kind, object) and nodes in preorder."""
    leaves: list[tuple[KeyPath, str, Any]] = []
    nodes: list[Node] = []
    # Explicit stack: deep trees must not hit Python's recursion limit, and the
    # ids of the containers on the current branch catch reference cycles.
    stack: list[tuple[Any, Any]] = [(state, ())]
    active: set[int] = set()
    while stack:
        obj, path = stack.pop()
        if obj is _EXIT:
            active.discard(path)  # for an exit marker the second slot is the id
            continue
        if len(path) > MAX_DEPTH:
            raise InvalidInputError(
                f"The tree is more than {MAX_DEPTH} levels deep below {format_path(path[:8])!r} "
                f"(a key path of {len(path)} entries); partialstore stores trees of at most "
                f"{MAX_DEPTH} levels. Flatten the deep part (e.g. a list of leaves instead of "
                "nested containers) before saving."
            )
        kind = classify_leaf(obj, path)
        children = None if kind is not None else _children(obj, path)
        if children is None:
            if kind is None:
                kind = fallback_leaf_kind(obj, path)
            leaves.append((path, kind, obj))
            continue
        if id(obj) in active:
            raise InvalidInputError(
                f"The tree contains a reference cycle: the container at {format_path(path)!r} "
                "is one of its own ancestors."
            )
        active.add(id(obj))
        nodes.append(Node(path=path, kind=_node_kind(obj), type_name=type_name(obj)))
        stack.append((_EXIT, id(obj)))
        stack.extend((child, (*path, entry)) for entry, child in reversed(children))
    return leaves, nodes


def flatten(state: Any, *, copy_arrays: bool = True) -> tuple[list[Leaf], list[Node]]:
    """Validate and snapshot a PyTree into leaf and node records.

    Leaves come in ``jax.tree_util`` order (dict keys sorted, ``None`` kept as
    a leaf of kind ``"none"``), nodes in preorder, root first; every
    container is recorded, empty ones included. The whole tree is validated
    before any array is copied, so a bad leaf costs no device transfer.
    Snapshots: ``jax.Array`` leaves are copied to host (device-to-host
    transfers are started for all arrays before waiting on any); NumPy arrays
    are copied unless ``copy_arrays=False`` (then the caller must not mutate
    them until the save is done; host-resident jax arrays are then viewed,
    not copied); numpy scalars become fresh 0-d arrays. A ``jax.Array``
    sharded across processes keeps only the shards this process writes
    (``Leaf.shards``).

    Example:
        >>> leaves, nodes = flatten({"w": np.zeros(2), "opt": (), "step": 3})
        >>> [(format_path(l.path), l.kind) for l in leaves]
        [('step', 'int'), ('w', 'array')]
        >>> [(format_path(n.path), n.kind) for n in nodes]
        [('<root>', 'dict'), ('opt', 'tuple')]

    Raises:
      UnsupportedLeafError: a leaf type or dtype cannot be saved; the message
        names its key path.
      InvalidInputError: a dict key that is not str/int, mixed str and int
        keys in one dict, a custom node with unsupported keys, a cycle, or a
        tree deeper than :data:`MAX_DEPTH` levels.
    """
    pending, nodes = _walk(state)
    # Start every device-to-host copy before blocking on the first one.
    for _, kind, obj in pending:
        if kind == "jax_array":
            start_host_copy(obj)
    leaves: list[Leaf] = []
    for path, kind, obj in pending:
        if kind == "jax_array" and is_sharded_across_processes(obj):
            shards = snapshot_shards(obj, copy_arrays)
            leaves.append(Leaf(path, kind, None, None, obj.sharding, shards))
            continue
        array, value = snapshot(kind, obj, copy_arrays)
        sharding = obj.sharding if kind == "jax_array" else None
        leaves.append(Leaf(path, kind, array, value, sharding))
    return leaves, nodes


def encode_value(leaf: Leaf) -> Any:
    """Return the JSON form of an inline leaf's value (see :func:`decode_value`).

    See :func:`partialstore._pytree.leaves.encode_inline` for the encoding.

    Example:
        >>> leaf = flatten(float("inf"))[0][0]
        >>> encode_value(leaf)
        {'float': 'inf'}

    Raises:
      InvalidInputError: the leaf is of an array kind.
    """
    return encode_inline(leaf.kind, leaf.value)


def _entry_rank(entry: PathEntry) -> tuple[int, int, Any]:
    kind, key = entry
    if kind in ("idx", "flat"):
        return (0, 0, key)
    # One dict never mixes int and str keys, but merged saves may: ints sort
    # first, then strs, each by value, so the order never depends on input order.
    return (1, 0, key) if isinstance(key, int) else (1, 1, key)


def _assemble(
    path: KeyPath,
    node: Node | None,
    entries: list[PathEntry],
    built: Mapping[KeyPath, Any],
) -> Any:
    """Build one container from its already built children."""
    kind = node.kind if node is not None else None
    if kind is None:
        kind = "list" if entries and all(e[0] in ("idx", "flat") for e in entries) else "dict"
    if not entries:
        return () if kind == "tuple" else [] if kind == "list" else {}
    # Sorted at every level, so the result never depends on the order in
    # which the caller lists paths (e.g. after merging many saves).
    entries = sorted(entries, key=_entry_rank)
    sequence_like = all(e[0] in ("idx", "flat") for e in entries)
    # A sequence with holes (e.g. a selected part of a list) comes back as a
    # dict keyed by index below, rather than invent the missing elements.
    dense = [e[1] for e in entries] == list(range(len(entries)))
    if sequence_like and dense and kind in ("list", "tuple", "custom"):
        items = [built[(*path, e)] for e in entries]
        return tuple(items) if kind == "tuple" else items
    out: dict[Any, Any] = {}
    for entry in entries:
        if entry[1] in out:
            raise CorruptCheckpointError(
                f"The container at {format_path(path)!r} has two children with key "
                f"{entry[1]!r} of different kinds; the stored tree is inconsistent."
            )
        out[entry[1]] = built[(*path, entry)]
    return out


def build_tree(nodes: Mapping[KeyPath, Node], values: Mapping[KeyPath, Any]) -> Any:
    """Rebuild a tree from stored node records and loaded leaf values, without a target.

    - ``"dict"`` nodes become dicts (int keys stay ints); ``"list"`` -> list,
      ``"tuple"`` -> tuple.
    - ``"namedtuple"`` nodes become dicts keyed by field name, and
      ``"custom"`` nodes dicts keyed by their str/int keys or field names, or
      lists when all children have flat/sequence indices: the original classes
      are never imported.
    - Dict keys are in sorted order (as ``jax.tree_util`` orders dicts; field
      names too, so NamedTuple field order is not kept), whatever the order of
      ``nodes`` and ``values``.
    - Empty containers come back empty; a ``None`` value is a ``None`` leaf.
    - A container whose node record is missing is a dict if its children have
      key or field entries, else a list. A list or tuple missing some indices
      (as when only part of it was selected) comes back as a dict keyed by
      index.
    - Nothing at all gives ``{}``.

    Example:
        >>> leaves, nodes = flatten({"a": [1, {}], "b": None})
        >>> build_tree({n.path: n for n in nodes}, {l.path: l.value for l in leaves})
        {'a': [1, {}], 'b': None}

    Raises:
      CorruptCheckpointError: a path is both a leaf and a container, or two
        children of one container collide.
    """
    for path in nodes:
        if path in values:
            raise CorruptCheckpointError(
                f"{format_path(path)!r} is stored both as a leaf and as a container."
            )
    children: dict[KeyPath, set[PathEntry]] = collections.defaultdict(set)
    for path in (*values, *nodes):
        # Climb only until a parent is already linked, so deep trees cost
        # O(paths x depth) rather than a set insert per prefix of every path.
        while path and path[-1] not in children[path[:-1]]:
            children[path[:-1]].add(path[-1])
            path = path[:-1]
    if not nodes and not values:
        return {}
    if () in values:
        if children.get(()):
            raise CorruptCheckpointError("The root is stored both as a leaf and as a container.")
        return values[()]
    for path in values:
        if children.get(path):
            raise CorruptCheckpointError(
                f"{format_path(path)!r} is stored both as a leaf and as a container."
            )
    containers = set(children) | set(nodes)
    built: dict[KeyPath, Any] = dict(values)
    # Deepest first, so every child exists before its parent is assembled.
    for path in sorted(containers, key=len, reverse=True):
        built[path] = _assemble(path, nodes.get(path), list(children.get(path, ())), built)
    return built[()]


def target_leaf_paths(target: Any) -> tuple[list[KeyPath], list[Any], Any]:
    """Flatten a load target into key paths, its leaves and its treedef.

    ``None`` counts as a leaf (as in :func:`flatten`); empty containers have
    no leaves but live on in the treedef. The paths equal those
    :func:`flatten` gives for a state of the same structure, so the caller
    can look each one up and then call
    ``jax.tree_util.tree_unflatten(treedef, values)``. Leaves are returned as
    they are (``jax.ShapeDtypeStruct``, arrays, scalars, ``None``, ...).

    Example:
        >>> import jax
        >>> paths, leaves, treedef = target_leaf_paths(
        ...     {"w": jax.ShapeDtypeStruct((2,), np.float32), "step": None})
        >>> paths
        [(('key', 'step'),), (('key', 'w'),)]
        >>> jax.tree_util.tree_unflatten(treedef, [1, np.zeros(2, np.float32)])
        {'step': 1, 'w': array([0., 0.], dtype=float32)}

    Raises:
      InvalidInputError: the target has unsupported or mixed dict keys, or a
        custom node jax cannot flatten.
    """
    try:
        keyed, treedef = jtu.tree_flatten_with_path(target, is_leaf=lambda x: x is None)
    except Exception as exc:  # mixed dict keys or user flatten code failing
        raise InvalidInputError(f"Cannot flatten the load target: {exc}") from exc
    paths: list[KeyPath] = []
    leaves: list[Any] = []
    for jax_path, leaf in keyed:
        path: KeyPath = ()
        for key in jax_path:
            path = (*path, entry_from_jax_key(key, path))
        paths.append(path)
        leaves.append(leaf)
    return paths, leaves, treedef
