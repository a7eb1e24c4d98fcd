"""Partial save: snapshot a tree, write its arrays, then commit one log record.

The order is what makes a save crash safe: all array bytes go to a fresh
``data/<save-id>/`` directory first, and only then is the log record created
(the commit point). A save killed before that leaves unreferenced bytes and
no trace in the log; one killed after it is complete.

:func:`write_save_data` shows the two steps of a save.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import uuid
from collections.abc import Awaitable, Mapping
from typing import Any

from partialstore._arrays import arrays, descriptors
from partialstore._commit import compaction, txlog
from partialstore._commit.location import Location
from partialstore._commit.published import drop_stray_staging, read_published, writer
from partialstore._commit.records import LeafEntry, NodeEntry, SaveRecord
from partialstore._pytree import tree
from partialstore._pytree.keypaths import MAX_DEPTH
from partialstore._pytree.shardings import SavedSharding
from partialstore._runtime import multihost
from partialstore._runtime.faults import crash_point
from partialstore.errors import (
    BackendError,
    CheckpointFinalizedError,
    CorruptCheckpointError,
    InvalidInputError,
    NotFoundError,
    OutcomeUnknownError,
    SessionDiscardedError,
    UnsupportedOperationError,
)

__all__ = [
    "Descriptors",
    "Snapshot",
    "check_writable",
    "commit_save",
    "new_save_id",
    "snapshot",
    "write_save_data",
]


#: What a save's array writes return: each array leaf's descriptor, by ``id(leaf)``.
Descriptors = dict[int, descriptors.Leaf]


class Snapshot:
    """A tree flattened and copied to host memory, ready to be written."""

    __slots__ = ("called", "custom_metadata", "leaves", "nodes")

    def __init__(
        self, leaves: list[tree.Leaf], nodes: list[tree.Node], custom_metadata: Any
    ) -> None:
        self.leaves = leaves
        self.nodes = nodes
        self.custom_metadata = custom_metadata
        # When the save was called: what the log went through after that is
        # concurrent with it (see loghints.created_since).
        self.called = time.monotonic()


def _check_custom_metadata(custom_metadata: Any) -> Any:
    if custom_metadata is None:
        return None
    if not isinstance(custom_metadata, Mapping):
        raise InvalidInputError(
            f"custom_metadata must be a dict of JSON values, got {type(custom_metadata).__name__}."
        )
    try:
        # Round trip now so a bad value fails before any byte is written.
        checked = json.loads(json.dumps(dict(custom_metadata), allow_nan=False))
    except (TypeError, ValueError, RecursionError) as error:
        raise InvalidInputError(f"custom_metadata is not JSON-serializable: {error}.") from error
    if _json_depth(checked) > MAX_DEPTH:
        # The record must stay readable: readers bound the nesting they parse.
        raise InvalidInputError(f"custom_metadata nests more than {MAX_DEPTH} levels deep.")
    return checked


def _json_depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, dict | list):
            deepest = max(deepest, depth)
            children = current.values() if isinstance(current, dict) else current
            stack.extend((child, depth + 1) for child in children)
    return deepest


def snapshot(state: Any, custom_metadata: Any, *, copy: bool) -> Snapshot:
    """Flatten and validate ``state``; copy its arrays when ``copy`` is set.

    Raises:
      UnsupportedLeafError: a leaf (or an array's dtype or rank) cannot be saved; names its
        key path.
      InvalidInputError: ``custom_metadata`` is not a JSON dict.
    """
    metadata = _check_custom_metadata(custom_metadata)
    # flatten checks every leaf against the dtype and rank rules, once.
    leaves, nodes = tree.flatten(state, copy_arrays=copy)
    return Snapshot(leaves, nodes, metadata)


def check_writable(location: Location) -> None:
    """Refuse stores on which concurrent writers could lose saves, unless opted out.

    Raises:
      UnsupportedOperationError: the backend has no atomic create and the user did
        not promise a single writer.
    """
    backend = location.backend
    if backend.capabilities.atomic_create or backend.single_writer:
        return
    raise UnsupportedOperationError(
        f"{backend!r} cannot create objects atomically, so concurrent writers to "
        f"{location.path} could overwrite each other's log records and lose saves. If exactly "
        "one process ever writes to this path, pass storage_options={'single_writer': True}."
    )


async def raise_if_finalized(location: Location) -> None:
    """Raise :class:`CheckpointFinalizedError` if the checkpoint is already published."""
    if await location.backend.exists(location.manifest_key):
        raise CheckpointFinalizedError(
            f"A finalized checkpoint already exists at {location.path}; partial saves cannot "
            "change it. Delete it first or save to a new path."
        )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _leaf_entry(leaf: tree.Leaf, descriptor: descriptors.Leaf | None) -> LeafEntry:
    if descriptor is not None:
        # A NamedSharding is recorded so that the saved layout can be restored
        # (CheckpointMetadata.abstract_tree); other shardings record none.
        sharding = SavedSharding.from_jax(leaf.sharding) if leaf.sharding is not None else None
        return LeafEntry(leaf.path, leaf.kind, descriptor, sharding=sharding)
    return LeafEntry(leaf.path, leaf.kind, None, leaf.value)


def new_save_id() -> str:
    """A fresh save id: names the save's ``data/<save-id>/`` directory and its record."""
    return uuid.uuid4().hex


async def write_save_data(
    location: Location, snap: Snapshot, save_id: str, *, check: bool = False
) -> Descriptors:
    """Write a single-process save's arrays ahead of its commit (see :func:`commit_save`).

    With ``check``, :func:`raise_if_finalized` runs alongside the writes
    (one request less in series); the writes are let finish first, so no
    write lands after the cleanup of a refused save.

    Example:
        >>> import numpy as np
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> import asyncio
        >>> from partialstore._commit.location import resolve
        >>> from partialstore._runtime.aio import run
        >>> location = resolve(f"{tmp.name}/ckpt")
        >>> snap = snapshot({"params": {"w": np.ones(3)}}, {"step": 10}, copy=True)
        >>> async def save() -> int:
        ...     save_id = new_save_id()
        ...     written = asyncio.ensure_future(write_save_data(location, snap, save_id))
        ...     # ... earlier saves commit meanwhile ...
        ...     return await commit_save(location, snap, save_id=save_id, written=written)
        >>> run(save())  # the number of its log record
        1
        >>> tmp.cleanup()
    """
    if not check:
        return await _write_data(location, snap, save_id)
    written, checked = await asyncio.gather(
        _write_data(location, snap, save_id), raise_if_finalized(location), return_exceptions=True
    )
    if isinstance(checked, BaseException):
        raise checked
    if isinstance(written, BaseException):
        raise written
    return written


async def commit_save(
    location: Location,
    snap: Snapshot,
    *,
    op: str | None = None,
    save_id: str | None = None,
    written: Awaitable[Descriptors] | None = None,
) -> int:
    """Write ``snap``'s arrays under a fresh save directory, then append its log record.

    Returns the log number of the committed record. ``op`` is set in a
    multi-process JAX job (:func:`partialstore._runtime.multihost.next_op`): every
    process writes its shards into the save directory the primary names,
    the primary appends the record once all have written, and every process
    returns the same number or raises. Otherwise the arrays may have been
    written ahead: ``written`` is the awaitable of :func:`write_save_data`
    for ``save_id``, and its failure is this save's failure.

    Raises:
      CheckpointFinalizedError: the session was finalized before this save committed;
        it is not part of the checkpoint and its data is removed.
    """
    if (written is None) != (save_id is None) or (written is not None and op is not None):
        raise InvalidInputError("commit_save takes save_id and written together, without op.")
    if op is None:
        return await _commit(location, snap, save_id or new_save_id(), None, written)
    primary = multihost.is_primary()
    save_id = await multihost.broadcast(f"{op}/save_id", new_save_id() if primary else None)
    if not primary:
        return await _commit_secondary(location, snap, save_id, op)
    try:
        number = await _commit(location, snap, save_id, op, None)
    except Exception as error:
        await multihost.broadcast(f"{op}/outcome", multihost.encode_outcome(error))
        raise
    await multihost.broadcast(f"{op}/outcome", multihost.encode_outcome(None, str(number)))
    return number


async def _commit_secondary(location: Location, snap: Snapshot, save_id: str, op: str) -> int:
    """A non-primary process's part: write its shards, report, wait for the primary."""
    own: Exception | None = None
    try:
        await _write_data(location, snap, save_id, primary=False)
    except Exception as error:
        own = error
    await multihost.gather_to_primary(f"{op}/wrote", multihost.encode_outcome(own))
    outcome = await multihost.broadcast(f"{op}/outcome", None)
    if own is not None:
        raise own
    return int(multihost.decode_outcome(outcome, "The save"))


async def _commit(
    location: Location,
    snap: Snapshot,
    save_id: str,
    op: str | None,
    written: Awaitable[Descriptors] | None,
) -> int:
    try:
        number = await _write_and_append(location, snap, save_id, op, written)
    except CheckpointFinalizedError as refused:
        raise await _with_cleanup(refused, _drop_data_unless_committed(location, save_id)) from None
    except Exception as error:
        # With rename, a finalize may move the session away while this save
        # writes; TensorStore or the backend then fail on vanished directories.
        # If the record made it in before the seal, the save is in the checkpoint.
        committed = await _published_with(location, save_id)
        if committed is not None:
            return committed
        if location.uses_rename and await read_published(location) is not None:
            refusal = _finalized_in_flight(location)
            raise await _with_cleanup(refusal, _drop_renamed_loser(location, save_id)) from error
        if isinstance(error, SessionDiscardedError):  # its data may be half deleted
            raise await _with_cleanup(error, _drop_own_data(location, save_id)) from None
        raise
    crash_point("save.after_log_append")
    if location.uses_rename:
        try:
            stray = await _record_went_astray(location, save_id)
        except BackendError as error:
            raise OutcomeUnknownError(
                f"The save's log record landed, but whether {location.path} was finalized "
                f"without it could not be checked: {error}. Look with partialstore.metadata."
            ) from error
        if stray:
            refusal = _finalized_in_flight(location)
            raise await _with_cleanup(refusal, _drop_renamed_loser(location, save_id))
    return number


async def _with_cleanup(refusal: Exception, cleanup: Awaitable[None]) -> Exception:
    """Run a refused save's cleanup; its failure must not replace the refusal.

    The refusal is the answer the caller needs; what the cleanup could not
    delete is unreferenced data that ``gc`` removes.
    """
    try:
        await cleanup
    except BackendError as failed:
        refusal.add_note(f"Removing this save's data failed too ({failed}); gc removes it.")
    return refusal


async def _record_went_astray(location: Location, save_id: str) -> bool:
    """Whether a finalize renamed the session away before this save's record landed.

    If the record went in before the seal the save is in the checkpoint;
    otherwise it went into a fresh, orphaned staging prefix that nothing can
    ever finalize (the path is published).
    """
    if await read_published(location) is None:
        return False
    return await _published_with(location, save_id) is None


async def _published_with(location: Location, save_id: str) -> int | None:
    """The log number of ``save_id`` in the published manifest, if it is part of it."""
    if not location.uses_rename:
        return None  # the log itself answers on stores without rename
    manifest = await read_published(location)
    for save in manifest.saves if manifest is not None else ():
        if save.save_id == save_id:
            return txlog.number_of_key(save.log)
    return None


async def _drop_own_data(location: Location, save_id: str) -> None:
    await location.backend.delete_prefix(_data_prefix(location, save_id))


async def _drop_renamed_loser(location: Location, save_id: str) -> None:
    """Remove what a save that missed a rename-published checkpoint left behind.

    Its data was written before the rename, so it moved into the checkpoint
    (unreferenced: the save's id is not in the manifest), and its record, if
    any, went into a fresh staging prefix that nothing can finalize.
    """
    await drop_stray_staging(location)
    await location.backend.delete_prefix(f"{location.final_prefix}/{location.data_dir(save_id)}")


def _data_prefix(location: Location, save_id: str) -> str:
    return f"{location.staging_prefix}/{location.data_dir(save_id)}"


async def _drop_data_unless_committed(location: Location, save_id: str) -> None:
    """Delete a save's data after it lost to the seal, unless its record made it in.

    The log is sealed, hence final, and this only runs on the failure path,
    so it looks rather than trusts: a record is never left without its data.
    """
    backend = location.backend
    if location.uses_rename and await read_published(location) is not None:
        # Published by rename, and this save is not in it (it met the seal).
        await _drop_renamed_loser(location, save_id)
        return
    try:
        entries = await txlog.read_log(backend, location.log_prefix)
    except (NotFoundError, CorruptCheckpointError):
        if not location.uses_rename or await read_published(location) is None:
            raise
        # Renamed away by the finalize meanwhile (a stray record may have
        # started a fresh staging log that looks cut at its head).
        await _drop_renamed_loser(location, save_id)
        return
    if not any(
        isinstance(entry.record, SaveRecord) and entry.record.save_id == save_id
        for entry in entries
    ):
        await _drop_own_data(location, save_id)
        if location.uses_rename and await read_published(location) is not None:
            # The sealer renamed the session while we looked: our data moved too.
            await _drop_renamed_loser(location, save_id)


def _finalized_in_flight(location: Location) -> CheckpointFinalizedError:
    return CheckpointFinalizedError(
        f"{location.path} was finalized while this save was in flight; the save is not "
        "part of the checkpoint. Save to a new path."
    )


async def _write_data(
    location: Location, snap: Snapshot, save_id: str, *, primary: bool = True
) -> Descriptors:
    """Write the arrays this process owns; return descriptors by ``id(leaf)`` (primary only)."""
    with_arrays = [(leaf, leaf.data) for leaf in snap.leaves if leaf.data is not None]
    written = await arrays.write_arrays(
        location.backend,
        location.staging_prefix,
        location.data_dir(save_id),
        [data for _, data in with_arrays],
        primary=primary,
    )
    if not primary:
        return {}
    return {id(leaf): d for (leaf, _), d in zip(with_arrays, written, strict=True)}


async def _write_and_append(
    location: Location,
    snap: Snapshot,
    save_id: str,
    op: str | None,
    written: Awaitable[Descriptors] | None,
) -> int:
    backend = location.backend
    if written is None:
        written = _write_data(location, snap, save_id)
    # Where the record goes is looked up while the data uploads: only the
    # create must wait for the data, so one round trip is left after it.
    looking = asyncio.ensure_future(
        txlog.look_ahead(backend, location.log_prefix, called=snap.called)
    )
    try:
        by_leaf = await written
        if op is not None:
            # Every process must have written its shards before the record exists.
            statuses = await multihost.gather_to_primary(
                f"{op}/wrote", multihost.encode_outcome(None)
            )
            for status in statuses or []:
                multihost.decode_outcome(status, "Writing the save's shards")
    except BaseException:
        looking.cancel()  # the save failed: nothing needs the look's answer
        await asyncio.gather(looking, return_exceptions=True)
        raise
    # A failed look only costs the append its own look, after the data.
    start = (await asyncio.gather(looking, return_exceptions=True))[0]
    crash_point("save.after_data")
    record = SaveRecord(
        save_id=save_id,
        created=_now(),
        writer=writer(),
        custom_metadata=snap.custom_metadata,
        nodes=[NodeEntry(n.path, n.kind, n.type_name) for n in snap.nodes],
        leaves=[_leaf_entry(leaf, by_leaf.get(id(leaf))) for leaf in snap.leaves],
    )
    crash_point("save.before_log_append")
    appended = await txlog.append(
        backend,
        location.log_prefix,
        record,
        start=start if isinstance(start, txlog.AppendStart) else None,
    )
    number = appended.number
    compaction.schedule(location, number)  # in the background, after this save returns
    return number
