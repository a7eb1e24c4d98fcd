"""The stored records as typed classes: encoding, decoding and every check.

Everything partialstore writes about a checkpoint (log records: saves, the
finalize seal and discard markers; the node and leaf entries inside them;
the manifest) is one frozen dataclass here, with an ``encode()`` that gives
the exact bytes (or JSON) on disk and a decoder that checks everything
before anything uses it. The entries are typed in
:mod:`partialstore._commit.entries` (re-exported here), array descriptors in
:mod:`partialstore._arrays.descriptors`.

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
  top level and in entries) are ignored, so newer writers can add some (an
  entry's pass into the manifest with it, see ``LeafEntry.stored``);
- key paths are well-formed and at most :data:`~partialstore._pytree.keypaths.MAX_DEPTH`
  entries long; no two entries share a path; no leaf lies under a leaf;
- kinds are from the known sets; inline values decode; array descriptors
  pass :func:`partialstore._arrays.descriptors.parse` (paths inside the checkpoint,
  dtypes from the table, bounded shapes, sizes and offsets), and lie in the
  data directory of their own save; a ``jax_array`` leaf's optional saved
  ``sharding`` passes :meth:`partialstore._pytree.shardings.SavedSharding.decode`
  (bounded mesh, known axis names, a spec that fits the array's rank).

The checks cost time linear in the object's size.

Example:
    >>> import numpy as np
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import partialstore
    >>> partialstore.save(f"{tmp.name}/ckpt", {"w": np.ones(3), "step": 1})
    >>> data = open(f"{tmp.name}/ckpt.partial_save/log/00000001.json", "rb").read()
    >>> record = decode_record("ckpt.partial_save/log/00000001.json", data)
    >>> type(record).__name__, record.encode() == data
    ('SaveRecord', True)
    >>> partialstore.finalize(f"{tmp.name}/ckpt")
    >>> data = open(f"{tmp.name}/ckpt/partialstore.json", "rb").read()
    >>> manifest = decode_manifest("ckpt/partialstore.json", data)
    >>> manifest.leaves[0].path, manifest.save_dirs() == {record.save_id}
    ((('key', 'step'),), True)
    >>> manifest.encode() == data
    True
    >>> tmp.cleanup()
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, ClassVar

from partialstore._arrays import descriptors
from partialstore._commit.entries import NODE_KINDS, LeafEntry, NodeEntry, decode_entries
from partialstore._commit.formats import (
    LOG_FORMAT,
    LOG_VERSION,
    LOG_VERSIONS_READ,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    paused_gc,
)
from partialstore._commit.record_checks import (
    Damage,
    fail,
    json_list,
    kind_of,
    optional_object,
    optional_str,
    parse_versioned,
    save_id_of,
)
from partialstore._pytree.keypaths import format_path, short_repr
from partialstore.errors import CorruptCheckpointError

__all__ = [
    "NODE_KINDS",
    "RECORD_KINDS",
    "DiscardRecord",
    "LeafEntry",
    "LogRecord",
    "Manifest",
    "NodeEntry",
    "SaveRecord",
    "SaveSummary",
    "SealRecord",
    "Versioned",
    "check_record",
    "decode_manifest",
    "decode_record",
    "parse_versioned",
]

#: Who wrote a record: ``{"host", "pid", "writer_id"}`` (see
#: :func:`partialstore._commit.published.writer`); a JSON object.
Writer = dict[str, Any]


def _encode_log(version: int, body: dict[str, Any]) -> bytes:
    """A log record's bytes: deterministic (sorted keys, no whitespace)."""
    full = {"format": LOG_FORMAT, "version": version, **body}
    return json.dumps(full, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclasses.dataclass(frozen=True)
class SaveRecord:
    """A committed save: its entries, written under ``data/<save_id>/``."""

    kind: ClassVar[str] = "save"
    save_id: str
    created: str | None
    writer: Writer | None
    custom_metadata: Any
    nodes: Sequence[NodeEntry]
    leaves: Sequence[LeafEntry]
    #: The format version the record was read with, or is written with
    #: (:data:`~partialstore._commit.formats.LOG_VERSION` for a new one).
    version: int = dataclasses.field(default=LOG_VERSION, repr=False, compare=False)

    def encode(self) -> bytes:
        """The record's bytes (see the module docstring for an example)."""
        return _encode_log(
            self.version,
            {
                "created": self.created,
                "custom_metadata": self.custom_metadata,
                "kind": self.kind,
                "leaves": [leaf.encode() for leaf in self.leaves],
                "nodes": [node.encode() for node in self.nodes],
                "save_id": self.save_id,
                "writer": self.writer,
            },
        )


@dataclasses.dataclass(frozen=True)
class SealRecord:
    """The finalize seal: nothing can be appended after it."""

    kind: ClassVar[str] = "finalize"
    finalize_id: str | None
    created: str | None
    writer: Writer | None
    #: The format version the record was read with, or is written with
    #: (:data:`~partialstore._commit.formats.LOG_VERSION` for a new one).
    version: int = dataclasses.field(default=LOG_VERSION, repr=False, compare=False)

    def encode(self) -> bytes:
        """The record's bytes.

        Example:
            >>> SealRecord("f1", None, None).encode()
            b'{"created":null,"finalize_id":"f1","format":"partialstore.log","kind":"finalize",...'
        """
        return _encode_log(
            self.version,
            {
                "created": self.created,
                "finalize_id": self.finalize_id,
                "kind": self.kind,
                "writer": self.writer,
            },
        )


@dataclasses.dataclass(frozen=True)
class DiscardRecord:
    """A discard marker: the session before it is abandoned."""

    kind: ClassVar[str] = "discard"
    discard_id: str | None
    created: str | None
    writer: Writer | None
    #: The format version the record was read with, or is written with
    #: (:data:`~partialstore._commit.formats.LOG_VERSION` for a new one).
    version: int = dataclasses.field(default=LOG_VERSION, repr=False, compare=False)

    def encode(self) -> bytes:
        """The record's bytes (``SealRecord.encode``'s, with a ``discard_id``)."""
        return _encode_log(
            self.version,
            {
                "created": self.created,
                "discard_id": self.discard_id,
                "kind": self.kind,
                "writer": self.writer,
            },
        )


#: Any log record.
LogRecord = SaveRecord | SealRecord | DiscardRecord


class Versioned:
    """A record in each version it is written in, encoded once per version.

    A log's records are written in the log's version, known only at each
    attempt of an append; a save record names every leaf, and a contended
    append makes many attempts.

    Example:
        >>> versions = Versioned(SealRecord("f1", None, None))
        >>> record, data = versions.of(2)
        >>> record.version, versions.of(2)[1] is data
        (2, True)
    """

    __slots__ = ("_encoded", "_record")

    def __init__(self, record: LogRecord) -> None:
        self._record = record
        self._encoded: dict[int, tuple[LogRecord, bytes]] = {}

    def of(self, version: int) -> tuple[LogRecord, bytes]:
        """The record as of ``version``, and its bytes."""
        if version not in self._encoded:
            versioned = dataclasses.replace(self._record, version=version)
            self._encoded[version] = (versioned, versioned.encode())
        return self._encoded[version]


#: Kinds a log record may have: "save" records carry entries, "finalize" is
#: the seal, "discard" the marker that ends a session. A new kind must be
#: added here (with its class and decoder) before anything writes it,
#: since readers refuse kinds they do not know.
RECORD_KINDS = frozenset({SaveRecord.kind, SealRecord.kind, DiscardRecord.kind})


def _decode_body(body: dict[str, Any]) -> LogRecord:
    # decode_record checked it (parse_versioned); a body built by hand is taken as new
    version = body.get("version", LOG_VERSION)
    kind = kind_of(body)
    if kind not in RECORD_KINDS:
        raise fail("", f"unknown record kind {short_repr(body.get('kind'), 40)}")
    created = optional_str(body, "created", "")
    writer = optional_object(body, "writer", "")
    if kind == SealRecord.kind:
        return SealRecord(optional_str(body, "finalize_id", ""), created, writer, version)
    if kind == DiscardRecord.kind:
        return DiscardRecord(optional_str(body, "discard_id", ""), created, writer, version)
    save_id = save_id_of(body.get("save_id"), "")
    nodes, leaves = decode_entries(body, f"{descriptors.DATA_PREFIX}/{save_id}/")
    metadata = body.get("custom_metadata")
    return SaveRecord(save_id, created, writer, metadata, nodes, leaves, version)


def check_record(key: str, body: dict[str, Any]) -> LogRecord:
    """Check an already parsed log record ``body`` read from ``key``; return it typed.

    Example:
        >>> check_record("ckpt/log/00000002.json", {"kind": "finalize", "created": None})
        SealRecord(finalize_id=None, created=None, writer=None)

    Raises:
      CorruptCheckpointError: a field the merge uses is malformed.
    """
    try:
        with paused_gc():
            return _decode_body(body)
    except Damage as damage:
        raise CorruptCheckpointError(
            f"Log record {key} is damaged: {damage}. Finalize cannot merge it; restore the "
            "record or discard the session (partialstore.discard) and save again."
        ) from None


def decode_record(key: str, data: bytes) -> LogRecord:
    """Parse and check the log record ``data`` read from ``key``.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import partialstore
        >>> partialstore.save(f"{tmp.name}/ckpt", {"step": 1})
        >>> data = open(f"{tmp.name}/ckpt.partial_save/log/00000001.json", "rb").read()
        >>> decode_record("ckpt.partial_save/log/00000001.json", data).kind
        'save'
        >>> tmp.cleanup()

    Raises:
      CorruptCheckpointError: not a version 1 or 2 log record, or malformed (the
        message names ``key`` and the entry).
    """
    body = parse_versioned(f"Log record {key}", data, fmt=LOG_FORMAT, version=LOG_VERSIONS_READ)
    return check_record(key, body)


@dataclasses.dataclass(frozen=True, slots=True)
class SaveSummary:
    """One save a manifest was merged from: its record ``log/NNNNNNNN.json`` and leaf count."""

    log: str
    save_id: str
    created: str | None
    num_leaves: int

    def encode(self) -> dict[str, Any]:
        """The JSON form, in the manifest's key order.

        Example:
            >>> SaveSummary("log/00000001.json", "s1", None, 2).encode()
            {'log': 'log/00000001.json', 'save_id': 's1', 'created': None, 'num_leaves': 2}
        """
        return {
            "log": self.log,
            "save_id": self.save_id,
            "created": self.created,
            "num_leaves": self.num_leaves,
        }

    @classmethod
    def decode(cls, save: Any, number: int) -> SaveSummary:
        """Check entry ``number`` of a manifest's ``saves``; raises :class:`Damage`."""
        where = f"save {number}"
        if not isinstance(save, dict):
            raise fail(where, f"it is not a JSON object but {short_repr(save, 60)}")
        save_id = save_id_of(save.get("save_id"), where)
        log = save.get("log")
        if not isinstance(log, str):
            raise fail(where, f"'log' must be a string, got {short_repr(log, 60)}")
        created = optional_str(save, "created", where)
        count = save.get("num_leaves")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise fail(where, f"'num_leaves' must be an int >= 0, got {short_repr(count, 40)}")
        return cls(log, save_id, created, count)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A finalized checkpoint: the merge of its saves, sealed by ``seal``.

    ``key`` is where it was read from (for messages; not stored).
    """

    finalized: str | None
    finalize_id: str | None
    finalized_by: Writer | None
    seal: str | None
    custom_metadata: Any
    saves: Sequence[SaveSummary]
    nodes: Sequence[NodeEntry]
    leaves: Sequence[LeafEntry]
    key: str = dataclasses.field(default="", compare=False)

    def encode(self) -> bytes:
        """The manifest's bytes (see the module docstring for an example).

        Not sorted: every part is in a deterministic order already (entries
        in merge order, their keys sorted), so concurrent finalizers write
        the same bytes, and sorting 10^4 leaf entries again would be most of
        the cost of serializing them.
        """
        body = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "finalized": self.finalized,
            "finalize_id": self.finalize_id,
            "finalized_by": self.finalized_by,
            "seal": self.seal,
            "custom_metadata": self.custom_metadata,
            "saves": [save.encode() for save in self.saves],
            "nodes": [node.encode() for node in self.nodes],
            "leaves": [leaf.encode() for leaf in self.leaves],
        }
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()

    def save_dirs(self) -> set[str]:
        """Names of the save directories (``data/<name>``) that the leaves use.

        See the module docstring for an example.
        """
        return {leaf.data.path.split("/")[1] for leaf in self.leaves if leaf.data is not None}


def _saves(body: dict[str, Any]) -> list[SaveSummary]:
    saves = [SaveSummary.decode(save, i) for i, save in enumerate(json_list(body, "saves"))]
    seen: set[str] = set()
    for number, save in enumerate(saves):
        if save.save_id in seen:  # the merge counts each save once
            raise fail(f"save {number}", f"save id {save.save_id!r} is listed twice")
        seen.add(save.save_id)
    return saves


def _manifest(key: str, body: dict[str, Any]) -> Manifest:
    saves = _saves(body)
    nodes, leaves = decode_entries(body, None)
    known = {save.save_id for save in saves}
    for leaf in leaves:
        if leaf.data is not None and leaf.data.path.split("/")[1] not in known:
            raise fail(
                f"leaf {format_path(leaf.path)!r}",
                f"array path {leaf.data.path!r} is not in the directory of any listed save",
            )
    return Manifest(
        finalized=optional_str(body, "finalized", ""),
        finalize_id=optional_str(body, "finalize_id", ""),
        finalized_by=optional_object(body, "finalized_by", ""),
        seal=optional_str(body, "seal", ""),
        custom_metadata=body.get("custom_metadata"),
        saves=saves,
        nodes=nodes,
        leaves=leaves,
        key=key,
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
    except Damage as damage:
        raise CorruptCheckpointError(
            f"Manifest {key} is damaged: {damage}. Restore the checkpoint from a copy or "
            "save it again."
        ) from None
