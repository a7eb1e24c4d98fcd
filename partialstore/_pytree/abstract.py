"""Rebuild a stored tree so that it flattens to the stored key paths again.

``load(path, target=...)`` finds each target leaf by its key path, so a
tree built from a checkpoint to serve as a target (the abstract tree of
:meth:`partialstore.CheckpointMetadata.abstract_tree`) must flatten to the
very paths :func:`partialstore._pytree.tree.flatten` stored. Plain
containers do that for dict keys (a ``dict``) and dense indices (a ``list``
or ``tuple``). Fields of NamedTuples, dataclasses and other registered nodes
(``GetAttrKey``, ``FlattenedIndexKey``) need their own classes, which are
never imported: such a container becomes a :class:`SavedNode`, a pytree
node that flattens to exactly the stored entries and names the saved type.

Example:
    >>> from typing import NamedTuple
    >>> from partialstore._pytree.tree import flatten
    >>> class Adam(NamedTuple):
    ...     count: int
    >>> leaves, nodes = flatten({"opt": Adam(3), "step": [1, 2]})
    >>> rebuilt = build_abstract({n.path: n for n in nodes}, {l.path: l.value for l in leaves})
    >>> rebuilt
    {'opt': SavedNode('partialstore._pytree.abstract.Adam', count=3), 'step': [1, 2]}
    >>> [jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(rebuilt)[0]]
    ["['opt'].count", "['step'][0]", "['step'][1]"]
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import jax.tree_util as jtu

from partialstore._pytree.keypaths import KeyPath, PathEntry, format_path
from partialstore._pytree.tree import Node
from partialstore.errors import CorruptCheckpointError

__all__ = ["SavedNode", "build_abstract"]


def _jax_key(entry: PathEntry) -> Any:
    kind, key = entry
    if kind == "key":
        return jtu.DictKey(key)
    if kind == "idx":
        return jtu.SequenceKey(int(key))
    if kind == "attr":
        return jtu.GetAttrKey(str(key))
    return jtu.FlattenedIndexKey(int(key))


@jtu.register_pytree_with_keys_class
class SavedNode:
    """A container of a saved type that is not rebuilt (NamedTuple, dataclass, flax node).

    It flattens to the saved key entries, so ``load(path, target=...)``
    finds its leaves. Fields are read as attributes (``node.value``) and
    keys and indices with ``node[key]``.

    Example:
        >>> node = SavedNode("optax.EmptyState", (("attr", "count"),), (3,))
        >>> node.count, node
        (3, SavedNode('optax.EmptyState', count=3))
    """

    __slots__ = ("_children", "_entries", "type_name")

    def __init__(
        self, type_name: str | None, entries: tuple[PathEntry, ...], children: tuple[Any, ...]
    ) -> None:
        self.type_name = type_name
        self._entries = entries
        self._children = children

    def __getattr__(self, name: str) -> Any:
        return self._child(("attr", name), AttributeError)

    def __getitem__(self, key: Any) -> Any:
        for kind in ("key", "idx", "flat"):
            if (kind, key) in self._entries:
                return self._child((kind, key), KeyError)
        raise KeyError(key)

    def _child(self, entry: PathEntry, error: type[Exception]) -> Any:
        try:
            return self._children[self._entries.index(entry)]
        except ValueError:
            raise error(entry[1]) from None

    def __repr__(self) -> str:
        parts = [repr(self.type_name)]
        for (kind, key), child in zip(self._entries, self._children, strict=True):
            label = key if kind == "attr" else f"[{key!r}]"
            parts.append(f"{label}={child!r}")
        return f"SavedNode({', '.join(parts)})"

    def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], Any]:
        """Children with their saved key entries (jax's pytree protocol)."""
        keyed = [(_jax_key(e), c) for e, c in zip(self._entries, self._children, strict=True)]
        return keyed, (self.type_name, self._entries)

    @classmethod
    def tree_unflatten(cls, aux: Any, children: Any) -> SavedNode:
        """Rebuild from :meth:`tree_flatten_with_keys`' parts (jax's pytree protocol)."""
        type_name, entries = aux
        return cls(type_name, entries, tuple(children))


def _rank(entry: PathEntry) -> tuple[int, int, Any]:
    kind, key = entry
    if kind in ("idx", "flat"):
        return (0, 0, key)
    return (1, 0, key) if isinstance(key, int) else (1, 1, key)


def _container(node: Node | None, entries: list[PathEntry], children: list[Any]) -> Any:
    kinds = {kind for kind, _ in entries}
    kind = node.kind if node is not None else None
    key_types = {type(key) for _, key in entries}
    # An empty custom node stays a SavedNode: a {} or [] would lose its type.
    keeps_type = bool(entries) or kind != "custom"
    if kinds <= {"key"} and len(key_types) <= 1 and kind in (None, "dict", "custom") and keeps_type:
        return {key: child for (_, key), child in zip(entries, children, strict=True)}
    dense = [key for _, key in entries] == list(range(len(entries)))
    if kinds <= {"idx"} and dense and kind in (None, "list", "tuple", "custom") and keeps_type:
        return tuple(children) if kind == "tuple" else list(children)
    return SavedNode(node.type_name if node is not None else None, tuple(entries), tuple(children))


def build_abstract(nodes: Mapping[KeyPath, Node], values: Mapping[KeyPath, Any]) -> Any:
    """The tree of ``values`` (one per stored leaf path) inside the stored containers.

    Dicts, lists and tuples come back as such; every other container (and
    one whose entries a plain container cannot reproduce) as a
    :class:`SavedNode`. Flattening the result with ``jax.tree_util`` gives
    exactly the stored key paths (``None`` values count as leaves, as in
    :func:`partialstore._pytree.tree.flatten`). Example: module docstring.
    """
    if () in values:
        return values[()]
    children: dict[KeyPath, set[PathEntry]] = collections.defaultdict(set)
    for path in (*values, *nodes):
        while path and path[-1] not in children[path[:-1]]:
            children[path[:-1]].add(path[-1])
            path = path[:-1]
    built: dict[KeyPath, Any] = dict(values)
    for path in sorted(set(children) | set(nodes), key=len, reverse=True):
        if path in values:  # decode_manifest refuses this; a hand-built call may not
            raise CorruptCheckpointError(f"{format_path(path)!r} is both a leaf and a container.")
        entries = sorted(children.get(path, ()), key=_rank)
        built[path] = _container(nodes.get(path), entries, [built[(*path, e)] for e in entries])
    return built.get((), {})
