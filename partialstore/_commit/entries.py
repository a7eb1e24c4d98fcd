"""Node and leaf entries: the tree a save record or a manifest stores.

A save record and the manifest both hold ``nodes`` (containers) and
``leaves``; each is one typed entry here, with its JSON form (``encode``)
and the checks of that form (``decode``), used by
:mod:`partialstore._commit.records` for both objects. A problem raises
:class:`~partialstore._commit.record_checks.Damage`, which the record decoder
turns into :class:`~partialstore.errors.CorruptCheckpointError` naming the key.

Example:
    >>> body = {"nodes": [{"kind": "dict", "path": [], "type": None}],
    ...         "leaves": [{"kind": "int", "path": [["key", "step"]], "value": 3}]}
    >>> nodes, leaves = decode_entries(body, None)
    >>> leaves[0].value, leaves[0].encode() == body["leaves"][0]
    (3, True)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from partialstore._arrays import descriptors
from partialstore._commit.record_checks import (
    Damage,
    check_layout,
    fail,
    json_list,
    kind_of,
    path_of,
)
from partialstore._pytree.keypaths import KeyPath, encode_path, format_path, short_repr
from partialstore._pytree.leaves import ARRAY_KINDS, INLINE_KINDS, decode_value, encode_inline
from partialstore._pytree.shardings import SavedSharding
from partialstore._pytree.tree import NODE_KINDS
from partialstore.errors import CorruptCheckpointError

__all__ = ["NODE_KINDS", "LeafEntry", "NodeEntry", "decode_entries"]


# ``stored``: the JSON object an entry was decoded from, if it was (not
# compared, not shown). An entry encodes as exactly that object, so a manifest
# merged from records repeats their entries byte for byte (unknown fields of
# newer writers included) without building 10^4 entries' JSON again.


@dataclasses.dataclass(frozen=True, slots=True)
class NodeEntry:
    """A container entry: ``kind`` from :data:`NODE_KINDS`, ``type_name`` its Python type."""

    path: KeyPath
    kind: str
    type_name: str | None
    stored: dict[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def encode(self) -> dict[str, Any]:
        """The JSON form (keys sorted, as on disk).

        Example:
            >>> NodeEntry((("key", "a"),), "dict", None).encode()
            {'kind': 'dict', 'path': [['key', 'a']], 'type': None}
        """
        if self.stored is not None:
            return self.stored
        return {"kind": self.kind, "path": encode_path(self.path), "type": self.type_name}

    @classmethod
    def decode(cls, entry: Any, number: int) -> NodeEntry:
        """Check node entry ``number`` of a record or manifest; raises :class:`Damage`."""
        path = path_of(entry, "node", number)
        kind = kind_of(entry)
        type_name = entry.get("type")
        if kind is None or kind not in NODE_KINDS:
            why = f"unknown container kind {short_repr(entry.get('kind'), 40)}"
        elif type_name is not None and not isinstance(type_name, str):
            why = f"'type' must be a string or null, got {short_repr(type_name, 60)}"
        else:
            return cls(path, kind, type_name, entry)
        raise fail(f"node {format_path(path)!r}", why)


@dataclasses.dataclass(frozen=True, slots=True)
class LeafEntry:
    """A leaf entry: ``data`` for array kinds, the Python ``value`` for inline ones.

    ``sharding`` is the saved ``NamedSharding`` of a ``"jax_array"`` leaf,
    if it had one (information only: the array is stored whole).
    """

    path: KeyPath
    kind: str
    data: descriptors.Leaf | None = None
    value: Any = None
    stored: dict[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)
    sharding: SavedSharding | None = None

    def encode(self) -> dict[str, Any]:
        """The JSON form (keys sorted, as on disk).

        Example:
            >>> LeafEntry((("key", "lr"),), "float", None, float("inf")).encode()
            {'kind': 'float', 'path': [['key', 'lr']], 'value': {'float': 'inf'}}
        """
        if self.stored is not None:
            return self.stored
        if self.data is not None:
            entry = {"data": self.data.encode(), "kind": self.kind, "path": encode_path(self.path)}
            if self.sharding is not None:
                entry["sharding"] = self.sharding.encode()
            return entry
        value = encode_inline(self.kind, self.value)
        if isinstance(value, dict):  # {"bits", "float"} of a NaN: sorted, as on disk
            value = dict(sorted(value.items()))
        return {"kind": self.kind, "path": encode_path(self.path), "value": value}

    @classmethod
    def decode(cls, entry: Any, number: int, save_dir: str | None) -> LeafEntry:
        """Check leaf entry ``number``; its array must lie in ``save_dir`` (if given)."""
        path = path_of(entry, "leaf", number)
        try:
            return cls._decode_body(entry, path, save_dir)
        except (CorruptCheckpointError, Damage) as error:
            # The readable path is only built for a message: formatting every
            # path of a large manifest would cost more than checking it.
            raise fail(f"leaf {format_path(path)!r}", str(error)) from None

    @classmethod
    def _decode_body(cls, entry: dict[str, Any], path: KeyPath, save_dir: str | None) -> LeafEntry:
        kind = kind_of(entry)
        if kind is not None and kind in INLINE_KINDS:
            if "data" in entry or entry.get("sharding") is not None:  # "data" means an array
                raise Damage(f"a {kind!r} leaf has an array descriptor or a sharding")
            return cls(path, kind, None, decode_value(kind, entry.get("value")), entry)
        if kind is None or kind not in ARRAY_KINDS:
            raise Damage(f"unknown leaf kind {short_repr(entry.get('kind'), 40)}")
        data = descriptors.parse(entry.get("data"))
        if kind == "np_scalar" and data.shape != ():
            raise Damage(f"a numpy scalar must have shape (), not {data.shape}")
        if save_dir is not None and not data.path.startswith(save_dir):
            raise Damage(f"array path {data.path!r} is not in its save's {save_dir!r}")
        sharding = None
        if entry.get("sharding") is not None:  # absent or null: no saved layout
            if kind != "jax_array":  # only a jax.Array has a layout to restore
                raise Damage(f"a {kind!r} leaf has a sharding")
            sharding = SavedSharding.decode(entry["sharding"], len(data.shape))
        return cls(path, kind, data, None, entry, sharding)


def decode_entries(
    body: dict[str, Any], save_dir: str | None
) -> tuple[list[NodeEntry], list[LeafEntry]]:
    """Check ``body``'s ``nodes`` and ``leaves`` and their layout (example: module docstring).

    ``save_dir`` (``data/<save_id>/``), when given, must hold every array.
    """
    nodes = [NodeEntry.decode(entry, i) for i, entry in enumerate(json_list(body, "nodes"))]
    leaves = [
        LeafEntry.decode(entry, i, save_dir) for i, entry in enumerate(json_list(body, "leaves"))
    ]
    check_layout((("node", (n.path for n in nodes)), ("leaf", (leaf.path for leaf in leaves))))
    return nodes, leaves
