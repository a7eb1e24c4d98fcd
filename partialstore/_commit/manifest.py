"""The checkpoint manifest: the merge of every save record before the seal.

Merging replays save records in log order over a tree of key paths:

- a leaf replaces whatever was at its path (a leaf, or a whole subtree);
- a container replaces an earlier leaf at its path, and replaces an earlier
  container of another kind (a dict where a list was) with its whole subtree;
- a container of the same kind merges: earlier children it does not mention
  stay, so saves of ``{"a": {"x": 1}}`` then ``{"a": {"y": 2}}`` give both.

``custom_metadata`` merges the same way (nested dicts merged, later values
win). The manifest is a pure function of the log, serialized
deterministically, so concurrent or repeated finalizers write the same bytes.

:func:`build_manifest` takes the log entries before the seal and the seal
entry; :func:`merge_metadata` shows the merge rule on plain dicts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from partialstore._commit.formats import MANIFEST_FORMAT, MANIFEST_VERSION, paused_gc
from partialstore._commit.txlog import LogEntry, record_key
from partialstore.errors import CorruptCheckpointError

__all__ = ["FORMAT", "VERSION", "build_manifest", "merge_metadata"]

FORMAT = MANIFEST_FORMAT
VERSION = MANIFEST_VERSION

PathKey = tuple[tuple[str, Any], ...]


def merge_metadata(base: Any, update: Any) -> Any:
    """Deep-merge ``update`` into ``base`` (dicts recursively; anything else replaced).

    Example:
        >>> merge_metadata({"a": {"x": 1}}, {"a": {"y": 2}})
        {'a': {'x': 1, 'y': 2}}
    """
    if isinstance(base, dict) and isinstance(update, dict):
        merged = dict(base)
        for key, value in update.items():
            merged[key] = merge_metadata(merged.get(key), value) if key in merged else value
        return merged
    return update


def _path_key(encoded: Any, where: str) -> PathKey:
    if not isinstance(encoded, list):
        raise CorruptCheckpointError(f"{where}: a key path must be a list, got {encoded!r}.")
    try:
        # Entries stay (kind, key) pairs as stored; load checks them fully
        # (tree.decode_path), merging only needs them hashable and comparable.
        return tuple(map(tuple, encoded))
    except TypeError as error:
        raise CorruptCheckpointError(f"{where}: malformed key path {encoded!r}.") from error


class _Tree:
    """Key paths -> entries, with a child index so subtree removal is linear overall."""

    def __init__(self) -> None:
        self.entries: dict[PathKey, tuple[str, dict[str, Any]]] = {}
        self.children: dict[PathKey, set[PathKey]] = {}

    def remove_subtree(self, path: PathKey) -> None:
        stack = [path]
        while stack:
            current = stack.pop()
            if self.entries.pop(current, None) is not None and current:
                self.children.get(current[:-1], set()).discard(current)
            stack.extend(self.children.pop(current, ()))

    def put(self, path: PathKey, role: str, entry: dict[str, Any]) -> None:
        self.entries[path] = (role, entry)
        if path:
            self.children.setdefault(path[:-1], set()).add(path)

    def apply_node(self, path: PathKey, node: dict[str, Any]) -> None:
        existing = self.entries.get(path)
        if existing is not None and existing[0] == "node" and existing[1]["kind"] == node["kind"]:
            self.entries[path] = ("node", node)  # same container kind: merge children
            return
        self.remove_subtree(path)
        self.put(path, "node", node)

    def apply_leaf(self, path: PathKey, leaf: dict[str, Any]) -> None:
        self.remove_subtree(path)
        self.put(path, "leaf", leaf)


def build_manifest(entries: Sequence[LogEntry], seal: LogEntry, log_prefix: str) -> bytes:
    """Merge the save records before ``seal`` into manifest bytes.

    ``log_prefix`` is only used to name records in error messages.
    """
    with paused_gc():
        return _build_manifest(entries, seal, log_prefix)


def _build_manifest(entries: Sequence[LogEntry], seal: LogEntry, log_prefix: str) -> bytes:
    tree = _Tree()
    custom_metadata: Any = None
    saves = []
    seen: set[str] = set()
    for entry in entries:
        record = entry.record
        # A create whose response was lost is retried by the HTTP client and
        # reports "exists" though it landed; the save then appends again.
        # Both records carry the same save id: count it once.
        if record["save_id"] in seen:
            continue
        seen.add(record["save_id"])
        where = record_key(log_prefix, entry.number)
        # Parents first, so a container record never lands under a stale leaf.
        for node in sorted(record.get("nodes", []), key=lambda n: len(n["path"])):
            tree.apply_node(_path_key(node["path"], where), node)
        for leaf in record.get("leaves", []):
            tree.apply_leaf(_path_key(leaf["path"], where), leaf)
        if record.get("custom_metadata") is not None:
            custom_metadata = merge_metadata(custom_metadata, record["custom_metadata"])
        saves.append(
            {
                "log": f"log/{entry.number:08d}.json",
                "save_id": record["save_id"],
                "created": record.get("created"),
                "num_leaves": len(record.get("leaves", [])),
            }
        )
    body = {
        "format": FORMAT,
        "version": VERSION,
        "finalized": seal.record.get("created"),
        "finalize_id": seal.record.get("finalize_id"),
        "finalized_by": seal.record.get("writer"),
        "seal": f"log/{seal.number:08d}.json",
        "custom_metadata": custom_metadata,
        "saves": saves,
        "nodes": [entry for role, entry in tree.entries.values() if role == "node"],
        "leaves": [entry for role, entry in tree.entries.values() if role == "leaf"],
    }
    # No sort_keys: every input is already in a deterministic order (records are
    # written with sorted keys), and sorting 10^4 leaf entries again is most of
    # the cost of serializing them.
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
