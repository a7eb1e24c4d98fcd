"""Decoding of stored log records and manifests: every check, in one place.

Log records and manifests are data read from a store, so they may be damaged
or tampered with. Each is checked once, where its bytes are decoded, and
every reader (finalize's merge, ``load``, ``metadata``, ``gc``) goes through
the same checks; anything malformed raises
:class:`~partialstore.errors.CorruptCheckpointError` naming the object's key
(and the leaf or node inside it), never another exception.

What is checked, before anything uses it:

- the bytes are UTF-8 JSON (nesting bounded by the JSON parser, no NaN or
  Infinity constants, ints within Python's digit limit) of the right format
  and version;
- every field a reader uses has the right type; unknown extra fields (at the
  top level and in entries) are ignored, so newer writers can add some;
- key paths are well-formed and at most :data:`~partialstore._pytree.keypaths.MAX_DEPTH`
  entries long; no two entries share a path; no leaf lies under a leaf;
- kinds are from the known sets; inline values decode; array descriptors
  pass :func:`partialstore._arrays.descriptors.parse` (paths inside the checkpoint,
  dtypes from the table, bounded shapes, sizes and offsets), and lie in the
  data directory of their own save.

The checks cost time linear in the object's size. The typed entries here
(:class:`NodeEntry`, :class:`LeafEntry`, :class:`Manifest`) are what loaders
use; the merge still works on the checked record dicts.

Example:
    >>> import numpy as np
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import partialstore
    >>> partialstore.save(f"{tmp.name}/ckpt", {"w": np.ones(3), "step": 1})
    >>> data = open(f"{tmp.name}/ckpt.partial_save/log/00000001.json", "rb").read()
    >>> record = decode_record("ckpt.partial_save/log/00000001.json", data)
    >>> partialstore.finalize(f"{tmp.name}/ckpt")
    >>> data = open(f"{tmp.name}/ckpt/partialstore.json", "rb").read()
    >>> manifest = decode_manifest("ckpt/partialstore.json", data)
    >>> manifest.leaves[0].path, manifest.save_dirs() == {record["save_id"]}
    ((('key', 'step'),), True)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any, NamedTuple, NoReturn

from partialstore._arrays import descriptors
from partialstore._commit.formats import (
    LOG_FORMAT,
    LOG_VERSION,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    paused_gc,
)
from partialstore._pytree.keypaths import KeyPath, decode_path, format_path, short_repr
from partialstore._pytree.leaves import ARRAY_KINDS, INLINE_KINDS, decode_value
from partialstore._pytree.tree import NODE_KINDS
from partialstore.errors import CorruptCheckpointError

__all__ = [
    "NODE_KINDS",
    "RECORD_KINDS",
    "LeafEntry",
    "Manifest",
    "NodeEntry",
    "check_record",
    "decode_manifest",
    "decode_record",
    "parse_versioned",
]

#: Kinds a log record may have: "save" records carry entries, "finalize" is
#: the seal, "discard" the marker that ends a session. A new kind must be
#: added here (with its checks in _check_body) before anything writes it,
#: since readers refuse kinds they do not know.
RECORD_KINDS = frozenset({"save", "finalize", "discard"})


class NodeEntry(NamedTuple):
    """A checked container entry: ``kind`` from :data:`NODE_KINDS`."""

    path: KeyPath
    kind: str
    type_name: str | None


class LeafEntry(NamedTuple):
    """A checked leaf entry: ``data`` for array kinds, the decoded ``value`` for inline ones."""

    path: KeyPath
    kind: str
    data: descriptors.Leaf | None
    value: Any


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A checked manifest; ``body`` is the decoded JSON object itself."""

    key: str
    body: dict[str, Any]
    nodes: list[NodeEntry]
    leaves: list[LeafEntry]
    saves: list[dict[str, Any]]
    custom_metadata: Any
    finalized: str | None

    def save_dirs(self) -> set[str]:
        """Names of the save directories (``data/<name>``) that the leaves use.

        See the module docstring for an example.
        """
        return {leaf.data.path.split("/")[1] for leaf in self.leaves if leaf.data is not None}


class _Damage(Exception):
    """A problem found inside an object; re-raised with the object's key."""


def _fail(where: str, why: str) -> _Damage:
    return _Damage(f"{where}: {why}" if where else why)


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"the non-JSON constant {name} is not allowed")


def parse_versioned(what: str, data: bytes, *, fmt: str, version: int) -> dict[str, Any]:
    """Parse a JSON object of format ``fmt`` and version ``version``; ``what`` names it.

    Example:
        >>> parse_versioned("Manifest x", b'{"format": "partialstore", "version": 1}',
        ...                 fmt="partialstore", version=1)
        {'format': 'partialstore', 'version': 1}
        >>> parse_versioned("Manifest x", b'{"format": "other"}', fmt="partialstore", version=1)
        Traceback (most recent call last):
        partialstore.errors.CorruptCheckpointError: Manifest x is not a partialstore object. ...

    Raises:
      CorruptCheckpointError: not UTF-8 JSON (or nested too deep, or holding
        NaN/Infinity or an int past Python's digit limit), another format, or
        another version.
    """
    try:
        with paused_gc():
            body = json.loads(data, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        why = "it is nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise CorruptCheckpointError(
            f"{what} is not valid JSON ({why}). The checkpoint is damaged."
        ) from None
    if not isinstance(body, dict) or body.get("format") != fmt:
        raise CorruptCheckpointError(f"{what} is not a {fmt} object. The checkpoint is damaged.")
    if body.get("version") != version:
        raise CorruptCheckpointError(
            f"{what} has format version {short_repr(body.get('version'), 40)}; this "
            f"partialstore reads version {version}. Upgrade partialstore to read it."
        )
    return body


def _optional_str(body: dict[str, Any], field: str, where: str) -> str | None:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise _fail(where, f"{field!r} must be a string or null, got {short_repr(value, 60)}")
    return value


def _list(body: dict[str, Any], field: str, where: str = "") -> list[Any]:
    value = body.get(field)
    if not isinstance(value, list):
        raise _fail(where, f"{field!r} must be a list, got {short_repr(value, 60)}")
    return value


def _save_id(value: Any, where: str) -> str:
    # It names the directory data/<save_id>: one clean key segment.
    if not isinstance(value, str) or value in ("", ".", "..") or any(c in value for c in "/\\\x00"):
        raise _fail(where, f"save id {short_repr(value, 60)} is not a plain directory name")
    return value


def _kind(body: dict[str, Any]) -> Any:
    """``body["kind"]``, or None when it is not a str (a list or dict is unhashable)."""
    kind = body.get("kind")
    return kind if isinstance(kind, str) else None


def _path(entry: Any, role: str, number: int) -> KeyPath:
    if not isinstance(entry, dict):
        raise _fail(f"{role} {number}", f"it is not a JSON object but {short_repr(entry, 60)}")
    try:
        return decode_path(entry.get("path"))
    except CorruptCheckpointError as error:
        raise _fail(f"{role} {number}", str(error)) from None


def _node(entry: Any, number: int) -> NodeEntry:
    path = _path(entry, "node", number)
    kind = _kind(entry)
    type_name = entry.get("type")
    if kind not in NODE_KINDS:
        why = f"unknown container kind {short_repr(entry.get('kind'), 40)}"
    elif type_name is not None and not isinstance(type_name, str):
        why = f"'type' must be a string or null, got {short_repr(type_name, 60)}"
    else:
        return NodeEntry(path, kind, type_name)
    raise _fail(f"node {format_path(path)!r}", why)


def _leaf(entry: Any, number: int, save_dir: str | None) -> LeafEntry:
    path = _path(entry, "leaf", number)
    try:
        return _leaf_body(entry, path, save_dir)
    except (CorruptCheckpointError, _Damage) as error:
        # The readable path is only built for a message: formatting every
        # path of a large manifest would cost more than checking it.
        raise _fail(f"leaf {format_path(path)!r}", str(error)) from None


def _leaf_body(entry: dict[str, Any], path: KeyPath, save_dir: str | None) -> LeafEntry:
    kind = _kind(entry)
    if kind in INLINE_KINDS:
        if "data" in entry:  # readers (gc among them) take "data" to mean an array
            raise _Damage(f"a {kind!r} leaf has an array descriptor")
        return LeafEntry(path, kind, None, decode_value(kind, entry.get("value")))
    if kind not in ARRAY_KINDS:
        raise _Damage(f"unknown leaf kind {short_repr(entry.get('kind'), 40)}")
    data = descriptors.parse(entry.get("data"))
    if kind == "np_scalar" and data.shape != ():
        raise _Damage(f"a numpy scalar must have shape (), not {data.shape}")
    if save_dir is not None and not data.path.startswith(save_dir):
        raise _Damage(f"array path {data.path!r} is not in its save's {save_dir!r}")
    return LeafEntry(path, kind, data, None)


def _check_layout(nodes: Iterable[NodeEntry], leaves: Iterable[LeafEntry]) -> None:
    """No path twice, and nothing under a leaf; linear in the total path length.

    A trie of ``[role, children]`` slots is walked one entry per step, so a
    deep path costs its length, not the square of it.
    """
    root: list[Any] = [None, None]
    for role, entries in (("node", nodes), ("leaf", leaves)):
        for entry in entries:
            slot = root
            for step in entry.path:
                if slot[0] == "leaf":
                    raise _fail(f"{role} {format_path(entry.path)!r}", "it lies under a leaf")
                children = slot[1]
                if children is None:
                    children = slot[1] = {}
                child = children.get(step)
                if child is None:
                    child = children[step] = [None, None]
                slot = child
            if slot[0] is not None:
                why = f"the path is stored twice (also as a {slot[0]})"
                raise _fail(f"{role} {format_path(entry.path)!r}", why)
            if role == "leaf" and slot[1]:
                raise _fail(f"{role} {format_path(entry.path)!r}", "entries lie under this leaf")
            slot[0] = role


def _entries(body: dict[str, Any], save_dir: str | None) -> tuple[list[NodeEntry], list[LeafEntry]]:
    nodes = [_node(entry, i) for i, entry in enumerate(_list(body, "nodes"))]
    leaves = [_leaf(entry, i, save_dir) for i, entry in enumerate(_list(body, "leaves"))]
    _check_layout(nodes, leaves)
    return nodes, leaves


def _check_body(body: dict[str, Any]) -> None:
    kind = _kind(body)
    if kind not in RECORD_KINDS:
        raise _fail("", f"unknown record kind {short_repr(body.get('kind'), 40)}")
    _optional_str(body, "created", "")
    if kind == "save":
        save_id = _save_id(body.get("save_id"), "")
        _entries(body, f"{descriptors.DATA_PREFIX}/{save_id}/")


def check_record(key: str, body: dict[str, Any]) -> dict[str, Any]:
    """Check an already parsed log record ``body`` read from ``key``; return it.

    Example:
        >>> check_record("ckpt/log/00000002.json", {"kind": "finalize", "created": None})
        {'kind': 'finalize', 'created': None}

    Raises:
      CorruptCheckpointError: a field the merge uses is malformed.
    """
    try:
        with paused_gc():
            _check_body(body)
    except _Damage as damage:
        raise CorruptCheckpointError(
            f"Log record {key} is damaged: {damage}. Finalize cannot merge it; restore the "
            "record or discard the session (partialstore.discard) and save again."
        ) from None
    return body


def decode_record(key: str, data: bytes) -> dict[str, Any]:
    """Parse and check the log record ``data`` read from ``key``.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> partialstore.save(f"{tmp.name}/ckpt", {"step": 1})
        >>> data = open(f"{tmp.name}/ckpt.partial_save/log/00000001.json", "rb").read()
        >>> decode_record("ckpt.partial_save/log/00000001.json", data)["kind"]
        'save'
        >>> tmp.cleanup()

    Raises:
      CorruptCheckpointError: not a version-1 log record, or malformed (the
        message names ``key`` and the entry).
    """
    body = parse_versioned(f"Log record {key}", data, fmt=LOG_FORMAT, version=LOG_VERSION)
    return check_record(key, body)


def _saves(body: dict[str, Any]) -> list[dict[str, Any]]:
    saves = _list(body, "saves")
    seen: set[str] = set()
    for number, save in enumerate(saves):
        where = f"save {number}"
        if not isinstance(save, dict):
            raise _fail(where, f"it is not a JSON object but {short_repr(save, 60)}")
        save_id = _save_id(save.get("save_id"), where)
        if save_id in seen:  # the merge counts each save once
            raise _fail(where, f"save id {save_id!r} is listed twice")
        seen.add(save_id)
        if not isinstance(save.get("log"), str):
            raise _fail(where, f"'log' must be a string, got {short_repr(save.get('log'), 60)}")
        _optional_str(save, "created", where)
        count = save.get("num_leaves")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise _fail(where, f"'num_leaves' must be an int >= 0, got {short_repr(count, 40)}")
    return saves


def _manifest(key: str, body: dict[str, Any]) -> Manifest:
    saves = _saves(body)
    nodes, leaves = _entries(body, None)
    known = {save["save_id"] for save in saves}
    for leaf in leaves:
        if leaf.data is not None and leaf.data.path.split("/")[1] not in known:
            raise _fail(
                f"leaf {format_path(leaf.path)!r}",
                f"array path {leaf.data.path!r} is not in the directory of any listed save",
            )
    return Manifest(
        key=key,
        body=body,
        nodes=nodes,
        leaves=leaves,
        saves=saves,
        custom_metadata=body.get("custom_metadata"),
        finalized=_optional_str(body, "finalized", ""),
    )


def decode_manifest(key: str, data: bytes) -> Manifest:
    """Parse and check the manifest ``data`` read from ``key``.

    Example:
        >>> import numpy as np
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> partialstore.save(f"{tmp.name}/ckpt", {"w": np.ones(3), "step": 1})
        >>> partialstore.finalize(f"{tmp.name}/ckpt")
        >>> data = open(f"{tmp.name}/ckpt/partialstore.json", "rb").read()
        >>> manifest = decode_manifest("ckpt/partialstore.json", data)
        >>> [format_path(leaf.path) for leaf in manifest.leaves]
        ['step', 'w']
        >>> tmp.cleanup()

    Raises:
      CorruptCheckpointError: not a version-1 manifest, or malformed (the
        message names ``key`` and the entry).
    """
    body = parse_versioned(f"Manifest {key}", data, fmt=MANIFEST_FORMAT, version=MANIFEST_VERSION)
    try:
        with paused_gc():
            return _manifest(key, body)
    except _Damage as damage:
        raise CorruptCheckpointError(
            f"Manifest {key} is damaged: {damage}. Restore the checkpoint from a copy or "
            "save it again."
        ) from None
