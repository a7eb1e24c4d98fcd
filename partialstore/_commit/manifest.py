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
from partialstore._commit.location import LOG_DIR
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

__all__ = ["FORMAT", "VERSION", "build_manifest", "merge_metadata", "merge_state"]

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


def build_manifest(
    entries: Sequence[LogEntry], seal: LogEntry, log_prefix: str, base: Manifest | None = None
) -> bytes:
    """Merge the save records before ``seal`` into manifest bytes.

    ``base`` is the merge of the session's earlier records (a compaction
    object's state, :mod:`partialstore._commit.compaction`); ``entries`` are
    then only the records after it. The bytes are the same as merging every
    record from the start: the merge only ever appends an entry, replaces one
    in place or removes one, so the order of nodes among nodes and of leaves
    among leaves, which is all a manifest keeps, goes on from the base as it
    would have from the records that made it.

    ``log_prefix`` is only used to name records in error messages.

    Raises:
      CorruptCheckpointError: ``entries`` holds a record that is not a save.
    """
    with paused_gc():
        tree, custom_metadata, saves = _fold(entries, log_prefix, base)
        sealed = _expect(seal, SealRecord, log_prefix)
        return Manifest(
            finalized=sealed.created,
            finalize_id=sealed.finalize_id,
            finalized_by=sealed.writer,
            seal=record_key(LOG_DIR, seal.number, sealed.version),
            custom_metadata=custom_metadata,
            saves=saves,
            nodes=[e for e in tree.entries.values() if isinstance(e, NodeEntry)],
            leaves=[e for e in tree.entries.values() if isinstance(e, LeafEntry)],
        ).encode()


def merge_state(
    entries: Sequence[LogEntry], log_prefix: str, base: Manifest | None = None
) -> Manifest:
    """The merge of ``base`` and the save records ``entries``, unsealed (seal fields ``None``).

    What a compaction object stores: :func:`build_manifest` given it as
    ``base`` goes on from it.

    Raises:
      CorruptCheckpointError: ``entries`` holds a record that is not a save.
    """
    with paused_gc():
        tree, custom_metadata, saves = _fold(entries, log_prefix, base)
        return Manifest(
            finalized=None,
            finalize_id=None,
            finalized_by=None,
            seal=None,
            custom_metadata=custom_metadata,
            saves=saves,
            nodes=[e for e in tree.entries.values() if isinstance(e, NodeEntry)],
            leaves=[e for e in tree.entries.values() if isinstance(e, LeafEntry)],
        )


def _expect(entry: LogEntry, kind: type[_Record], log_prefix: str) -> _Record:
    """``entry``'s record, which must be a ``kind`` (the caller split the log by kind)."""
    if not isinstance(entry.record, kind):
        where = record_key(log_prefix, entry.number, entry.record.version)
        raise CorruptCheckpointError(
            f"Log record {where} is a {entry.record.kind}, not a {kind.kind}."
        )
    return entry.record


def _start(base: Manifest | None) -> tuple[_Tree, Any, list[SaveSummary]]:
    tree = _Tree()
    if base is None:
        return tree, None, []
    # Nodes, then leaves: only the order within each kind matters (see build_manifest).
    for node in base.nodes:
        tree.put(node)
    for leaf in base.leaves:
        tree.put(leaf)
    return tree, base.custom_metadata, list(base.saves)


def _fold(
    entries: Sequence[LogEntry], log_prefix: str, base: Manifest | None
) -> tuple[_Tree, Any, list[SaveSummary]]:
    tree, custom_metadata, saves = _start(base)
    seen = {save.save_id for save in saves}
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
        log = record_key(LOG_DIR, entry.number, record.version)
        saves.append(SaveSummary(log, record.save_id, record.created, len(record.leaves)))
    return tree, custom_metadata, saves
