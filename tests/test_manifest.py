"""Merge rules of the manifest, on hand-written log records (no store involved)."""

from __future__ import annotations

import itertools
import json

import pytest

from partialstore._commit.manifest import build_manifest, merge_metadata
from partialstore._commit.records import check_record, decode_manifest
from partialstore._commit.txlog import LogEntry
from partialstore.errors import CorruptCheckpointError


def key(*names: str) -> list[list[str]]:
    return [["key", n] for n in names]


_ids = itertools.count()


def record(leaves: dict[tuple[str, ...], int], nodes: dict[tuple[str, ...], str], **extra):
    return {
        "kind": "save",
        "save_id": extra.pop("save_id", f"save-{next(_ids)}"),
        "nodes": [{"path": key(*p), "kind": k, "type": None} for p, k in nodes.items()],
        "leaves": [{"path": key(*p), "kind": "int", "value": v} for p, v in leaves.items()],
        **extra,
    }


def log_entries(*records) -> tuple[list[LogEntry], LogEntry]:
    """The records as checked log entries, and a seal after them."""
    entries = [LogEntry(i + 1, check_record("test", r)) for i, r in enumerate(records)]
    seal = {"kind": "finalize", "created": "t"}
    return entries, LogEntry(len(records) + 1, check_record("seal", seal))


def merged(*records) -> dict:
    data = build_manifest(*log_entries(*records), "ckpt/log")
    assert decode_manifest("test", data).encode() == data  # a valid manifest, typed losslessly
    return json.loads(data)


def leaf_values(manifest: dict) -> dict[tuple[str, ...], int]:
    return {tuple(k for _, k in leaf["path"]): leaf["value"] for leaf in manifest["leaves"]}


def node_kinds(manifest: dict) -> dict[tuple[str, ...], str]:
    return {tuple(k for _, k in node["path"]): node["kind"] for node in manifest["nodes"]}


def test_additions_merge_disjoint_keys():
    m = merged(
        record({("a",): 1}, {(): "dict"}),
        record({("b", "x"): 2}, {(): "dict", ("b",): "dict"}),
    )
    assert leaf_values(m) == {("a",): 1, ("b", "x"): 2}


def test_later_leaf_replaces_leaf():
    m = merged(record({("a",): 1}, {(): "dict"}), record({("a",): 2}, {(): "dict"}))
    assert leaf_values(m) == {("a",): 2}


def test_later_leaf_replaces_whole_subtree():
    m = merged(
        record({("a", "x"): 1, ("a", "y"): 2, ("b",): 3}, {(): "dict", ("a",): "dict"}),
        record({("a",): 9}, {(): "dict"}),
    )
    assert leaf_values(m) == {("a",): 9, ("b",): 3}
    assert ("a",) not in node_kinds(m)


def test_later_subtree_replaces_leaf():
    m = merged(
        record({("a",): 1}, {(): "dict"}),
        record({("a", "x"): 2}, {(): "dict", ("a",): "dict"}),
    )
    assert leaf_values(m) == {("a", "x"): 2}
    assert node_kinds(m)[("a",)] == "dict"


def test_same_kind_subtrees_merge_key_by_key():
    m = merged(
        record({("a", "x"): 1}, {(): "dict", ("a",): "dict"}),
        record({("a", "y"): 2}, {(): "dict", ("a",): "dict"}),
    )
    assert leaf_values(m) == {("a", "x"): 1, ("a", "y"): 2}


def test_container_of_other_kind_replaces_subtree():
    m = merged(
        record({("a", "x"): 1}, {(): "dict", ("a",): "dict"}),
        record({("a", "0"): 2}, {(): "dict", ("a",): "list"}),
    )
    assert leaf_values(m) == {("a", "0"): 2}
    assert node_kinds(m)[("a",)] == "list"


def test_empty_container_replaced_by_leaf_and_back():
    m = merged(
        record({}, {(): "dict", ("a",): "dict"}),
        record({("a",): 5}, {(): "dict"}),
        record({}, {(): "dict", ("a",): "dict"}),
    )
    assert leaf_values(m) == {}
    assert node_kinds(m)[("a",)] == "dict"


def test_order_is_log_order_over_many_saves():
    records = [record({("k",): i}, {(): "dict"}, save_id=f"s{i}") for i in range(50)]
    m = merged(*records)
    assert leaf_values(m) == {("k",): 49}
    assert [s["save_id"] for s in m["saves"]] == [f"s{i}" for i in range(50)]


def test_custom_metadata_merges_nested_later_wins():
    m = merged(
        record({}, {(): "dict"}, custom_metadata={"a": 1, "n": {"x": 1, "y": 1}}),
        record({}, {(): "dict"}, custom_metadata=None),
        record({}, {(): "dict"}, custom_metadata={"b": 2, "n": {"y": 2}}),
    )
    assert m["custom_metadata"] == {"a": 1, "b": 2, "n": {"x": 1, "y": 2}}


def test_merge_metadata_replaces_non_dicts():
    assert merge_metadata({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}
    assert merge_metadata(None, {"a": 1}) == {"a": 1}
    assert merge_metadata({"a": {"b": 1}}, {"a": 5}) == {"a": 5}


def test_manifest_bytes_are_deterministic():
    records = [record({("a",): 1, ("b",): 2}, {(): "dict"}), record({("c",): 3}, {(): "dict"})]
    entries, seal = log_entries(*records)
    assert build_manifest(entries, seal, "l") == build_manifest(list(entries), seal, "l")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        json.dumps({"format": "other", "version": 1}).encode(),
        json.dumps({"format": "partialstore", "version": 99}).encode(),
        json.dumps({"format": "partialstore", "version": 1, "nodes": []}).encode(),
    ],
)
def test_decode_manifest_rejects_malformed(body):
    with pytest.raises(CorruptCheckpointError):
        decode_manifest("ckpt/partialstore.json", body)


def test_duplicate_records_of_one_save_count_once():
    first = record({("a",): 1}, {(): "dict"}, save_id="s1")
    second = record({("a",): 2}, {(): "dict"}, save_id="s2")
    m = merged(first, second, dict(first))  # s1 appended twice (a retried create)
    assert [s["save_id"] for s in m["saves"]] == ["s1", "s2"]
    assert leaf_values(m) == {("a",): 2}
