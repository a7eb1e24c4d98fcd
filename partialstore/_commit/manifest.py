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

from collections.abc import Sequence
from typing import Any, TypeVar

from partialstore._commit.formats import MANIFEST_FORMAT, MANIFEST_VERSION, paused_gc
from partialstore._commit.records import (
    LeafEntry,
    Manifest,
    NodeEntry,
    SaveRecord,
    SaveSummary,
    SealRecord,
)
from partialstore._commit.txlog import LogEntry, record_key
from partialstore._pytree.keypaths import KeyPath
from partialstore.errors import CorruptCheckpointError

__all__ = ["FORMAT", "VERSION", "build_manifest", "merge_metadata"]

FORMAT = MANIFEST_FORMAT
VERSION = MANIFEST_VERSION

_Record = TypeVar("_Record", SaveRecord, SealRecord)


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


class _Tree:
    """Key paths -> entries, with a child index so subtree removal is linear overall."""

    def __init__(self) -> None:
        self.entries: dict[KeyPath, NodeEntry | LeafEntry] = {}
        self.children: dict[KeyPath, set[KeyPath]] = {}

    def remove_subtree(self, path: KeyPath) -> None:
        stack = [path]
        while stack:
            current = stack.pop()
            if self.entries.pop(current, None) is not None and current:
                self.children.get(current[:-1], set()).discard(current)
            stack.extend(self.children.pop(current, ()))

    def put(self, entry: NodeEntry | LeafEntry) -> None:
        self.entries[entry.path] = entry
        if entry.path:
            self.children.setdefault(entry.path[:-1], set()).add(entry.path)

    def apply_node(self, node: NodeEntry) -> None:
        existing = self.entries.get(node.path)
        if isinstance(existing, NodeEntry) and existing.kind == node.kind:
            self.entries[node.path] = node  # same container kind: merge children
            return
        self.remove_subtree(node.path)
        self.put(node)

    def apply_leaf(self, leaf: LeafEntry) -> None:
        self.remove_subtree(leaf.path)
        self.put(leaf)


def build_manifest(entries: Sequence[LogEntry], seal: LogEntry, log_prefix: str) -> bytes:
    """Merge the save records before ``seal`` into manifest bytes.

    ``log_prefix`` is only used to name records in error messages.

    Raises:
      CorruptCheckpointError: ``entries`` holds a record that is not a save.
    """
    with paused_gc():
        return _merge(entries, seal, log_prefix).encode()


def _expect(entry: LogEntry, kind: type[_Record], log_prefix: str) -> _Record:
    """``entry``'s record, which must be a ``kind`` (the caller split the log by kind)."""
    if not isinstance(entry.record, kind):
        where = record_key(log_prefix, entry.number)
        raise CorruptCheckpointError(
            f"Log record {where} is a {entry.record.kind}, not a {kind.kind}."
        )
    return entry.record


def _merge(entries: Sequence[LogEntry], seal: LogEntry, log_prefix: str) -> Manifest:
    tree = _Tree()
    custom_metadata: Any = None
    saves: list[SaveSummary] = []
    seen: set[str] = set()
    for entry in entries:
        record = _expect(entry, SaveRecord, log_prefix)
        # A create whose response was lost is retried by the HTTP client and
        # reports "exists" though it landed; the save then appends again.
        # Both records carry the same save id: count it once.
        if record.save_id in seen:
            continue
        seen.add(record.save_id)
        # Parents first, so a container record never lands under a stale leaf.
        for node in sorted(record.nodes, key=lambda n: len(n.path)):
            tree.apply_node(node)
        for leaf in record.leaves:
            tree.apply_leaf(leaf)
        if record.custom_metadata is not None:
            custom_metadata = merge_metadata(custom_metadata, record.custom_metadata)
        log = f"log/{entry.number:08d}.json"
        saves.append(SaveSummary(log, record.save_id, record.created, len(record.leaves)))
    sealed = _expect(seal, SealRecord, log_prefix)
    return Manifest(
        finalized=sealed.created,
        finalize_id=sealed.finalize_id,
        finalized_by=sealed.writer,
        seal=f"log/{seal.number:08d}.json",
        custom_metadata=custom_metadata,
        saves=saves,
        nodes=[e for e in tree.entries.values() if isinstance(e, NodeEntry)],
        leaves=[e for e in tree.entries.values() if isinstance(e, LeafEntry)],
    )
