"""Finalize (seal, merge, publish), discard and gc of a partial-save session.

Finalize never moves an array byte. It appends a seal to the log (after
which no save can commit), merges the records before the seal into the
manifest, and publishes:

- with atomic rename: write ``<staging>/partialstore.json``, then rename the
  staging prefix to the final one (no-replace);
- without: ``create`` ``<path>/partialstore.json`` (exclusive).

Either way exactly one finalizer publishes; the others get
:class:`CheckpointFinalizedError`. A finalizer that finds the log already
sealed (another finalizer, or one that crashed) completes the same,
deterministic manifest, so finalize is idempotent after a crash.

Example::

    await finalize(location)
"""

from __future__ import annotations

import datetime
import uuid

from partialstore import txlog
from partialstore.errors import (
    AlreadyExistsError,
    CheckpointFinalizedError,
    NotFoundError,
)
from partialstore.faults import crash_point
from partialstore.location import DATA_DIR, Location
from partialstore.manifest import build_manifest, decode_manifest

__all__ = ["discard", "drop_stray_staging", "finalize", "gc"]


def _already_finalized(location: Location) -> CheckpointFinalizedError:
    return CheckpointFinalizedError(
        f"A finalized checkpoint already exists at {location.path}. To overwrite it, delete "
        "it first."
    )


async def _no_session(location: Location) -> Exception:
    if await location.backend.exists(location.manifest_key):
        return _already_finalized(location)
    return NotFoundError(
        f"No partial save session at {location.path}: call partialstore.save before finalize."
    )


async def _seal(location: Location) -> tuple[list[txlog.LogEntry], txlog.LogEntry]:
    """Make sure the log is sealed; return the save records before the seal, and the seal."""
    backend = location.backend
    entries = await txlog.read_all(backend, location.log_prefix)
    if not entries:
        raise await _no_session(location)
    if not txlog.is_seal(entries[-1].record):
        crash_point("finalize.before_seal")
        created = datetime.datetime.now(datetime.UTC).isoformat()
        seal = txlog.encode_record(
            {"kind": "finalize", "finalize_id": uuid.uuid4().hex, "created": created}
        )
        try:
            number, numbers = await txlog.append(
                backend, location.log_prefix, seal, what="finalize", known=entries
            )
        except CheckpointFinalizedError:
            # Another finalizer sealed first: complete the manifest its seal fixes.
            entries = await txlog.read_all(backend, location.log_prefix)
        else:
            crash_point("finalize.after_seal")
            known = {entry.number for entry in entries}
            entries += await txlog.read_entries(
                backend, location.log_prefix, [n for n in numbers if n not in known]
            )
            entries.append(txlog.LogEntry(number, txlog.decode_record("seal", seal)))
    seal_index = next((i for i, e in enumerate(entries) if txlog.is_seal(e.record)), None)
    if seal_index is None:  # the sealed session was renamed away between our reads
        raise await _no_session(location)
    return entries[:seal_index], entries[seal_index]


async def finalize(location: Location) -> None:
    """Seal the session at ``location``, write its manifest and publish it.

    Raises:
      CheckpointFinalizedError: a finalized checkpoint exists, or a concurrent
        finalizer published first.
      NotFoundError: there is no session to finalize.
    """
    backend = location.backend
    if location.uses_rename and await backend.exists(location.manifest_key):
        raise _already_finalized(location)
    try:
        await _seal_merge_publish(location)
    except (NotFoundError, AlreadyExistsError) as error:
        # With rename, a concurrent finalizer may move the session away at any
        # step (reads, seal, manifest write, rename) and the loser then sees
        # missing or existing keys. Report that as what it is.
        if await backend.exists(location.manifest_key):
            if location.uses_rename:
                await drop_stray_staging(location)
            raise _already_finalized(location) from error
        raise
    crash_point("finalize.after_publish")


async def _seal_merge_publish(location: Location) -> None:
    backend = location.backend
    saves, seal = await _seal(location)
    body = build_manifest(saves, seal, location.log_prefix)
    if location.uses_rename:
        await backend.write(location.staging_manifest_key, body)
        crash_point("finalize.after_manifest_write")
        await backend.rename(location.staging_prefix, location.final_prefix)
    else:
        await backend.create(location.manifest_key, body)


async def drop_stray_staging(location: Location) -> None:
    """Delete a staging prefix recreated after the session was renamed away.

    Only called once the checkpoint is published: no session can live at a
    finalized path, so anything under the staging prefix then is debris of a
    writer that lost a race (a seal or save record created after the rename).
    """
    await location.backend.delete_prefix(location.staging_prefix)


async def discard(location: Location) -> None:
    """Delete an unfinalized session and all its data.

    Raises:
      CheckpointFinalizedError: the checkpoint is finalized (discard never deletes one).
      NotFoundError: there is no session.
    """
    backend = location.backend
    if await backend.exists(location.manifest_key):
        raise CheckpointFinalizedError(
            f"{location.path} is a finalized checkpoint; discard only abandons unfinalized "
            "sessions. Delete the checkpoint with your store's tools if you mean to."
        )
    if not await backend.list_children(location.staging_prefix):
        raise NotFoundError(f"No partial save session at {location.path} to discard.")
    await backend.delete_prefix(location.staging_prefix)


async def gc(location: Location) -> list[str]:
    """Delete data of a finalized checkpoint that its manifest does not use.

    Saves that crashed, lost the race against the seal, or were entirely
    replaced by later saves leave such directories. Only finalized
    checkpoints are collected: in an open session an unreferenced directory
    may belong to a save still in flight.

    Returns the deleted directories (relative to the checkpoint).
    """
    backend = location.backend
    try:
        body = await backend.read(location.manifest_key)
    except NotFoundError as error:
        raise NotFoundError(
            f"gc needs a finalized checkpoint, and {location.path} has none."
        ) from error
    manifest = decode_manifest(location.manifest_key, body)
    used = {leaf["data"]["path"].split("/")[1] for leaf in manifest["leaves"] if "data" in leaf}
    data_prefix = f"{location.final_prefix}/{DATA_DIR}"
    unused = [d for d in await backend.list_children(data_prefix) if d not in used]
    for save_dir in unused:
        await backend.delete_prefix(f"{data_prefix}/{save_dir}")
    return [f"{DATA_DIR}/{d}" for d in unused]
