"""What is published at a checkpoint path, and whether this writer published it.

A finalize seals the log with a fresh ``finalize_id`` and copies it into the
manifest, with the writer's identity. A later answer about that checkpoint
(a retried create that says "exists", a rename whose answer was lost, a
finalize run again after a timeout) reads the manifest and compares: the
checkpoint this writer sealed is success, anyone else's is
:class:`~partialstore.errors.CheckpointFinalizedError`.

The writer is a finalize call of this process that raised (so calling it
again recognises its checkpoint, while a finalize after one that returned
raises as Orbax's does), or, when ``PARTIALSTORE_WRITER_ID`` is set, every
process with the same value: a job that sets it to its own job id recognises
a finalize it ran before it was killed and restarted.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import partialstore
    >>> from partialstore._commit.location import resolve
    >>> from partialstore._runtime.aio import run
    >>> location = resolve(f"{tmp.name}/ckpt")
    >>> run(read_published(location)) is None
    True
    >>> partialstore.save(f"{tmp.name}/ckpt", {"step": 1})
    >>> partialstore.finalize(f"{tmp.name}/ckpt")
    >>> manifest = run(read_published(location))
    >>> is_ours(location, manifest)  # finalize returned, so a save must not reuse it
    False
    >>> raise already_finalized(location, manifest)
    Traceback (most recent call last):
    partialstore.errors.CheckpointFinalizedError: A finalized checkpoint already exists at ...
    >>> tmp.cleanup()
"""

from __future__ import annotations

import datetime
import os
import socket
import threading

from partialstore._commit import records
from partialstore._commit.location import Location
from partialstore._commit.records import Manifest, SealRecord, Writer
from partialstore.errors import CheckpointFinalizedError, NotFoundError

__all__ = [
    "WRITER_ID_ENV",
    "already_finalized",
    "drop_stray_staging",
    "forget_finalizes",
    "is_ours",
    "read_published",
    "remember_finalize",
    "sealer_gone",
    "writer",
]

WRITER_ID_ENV = "PARTIALSTORE_WRITER_ID"
#: After this many seconds a seal whose finalize did not publish is taken as abandoned.
SEAL_GRACE_S = 60.0

_own_finalize_ids: dict[tuple[int, str], set[str]] = {}
_own_lock = threading.Lock()


def writer() -> Writer:
    """Who is writing: host, process id and the optional ``PARTIALSTORE_WRITER_ID``."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "writer_id": os.environ.get(WRITER_ID_ENV) or None,
    }


def _key(location: Location) -> tuple[int, str]:
    # One backend object serves every call of this process on a location
    # (location.resolve caches it); writers with their own backend objects,
    # like the actors of the concurrency tests, are separate writers.
    return (id(location.backend), location.final_prefix)


def remember_finalize(location: Location, finalize_id: str) -> None:
    """Record that this process is sealing ``location`` with ``finalize_id``.

    Done before the seal is appended, so a finalize that raised (a lost
    answer, a timeout) and is called again recognises its own checkpoint.
    """
    with _own_lock:
        _own_finalize_ids.setdefault(_key(location), set()).add(finalize_id)


def forget_finalizes(location: Location) -> None:
    """Forget this process's finalizes of ``location`` once one returned.

    The checkpoint is then published and reported, so a later finalize is a
    new one (and raises, as Orbax's does), whichever earlier call sealed it.
    """
    with _own_lock:
        _own_finalize_ids.pop(_key(location), None)


def _sealer(sealed: Manifest | SealRecord) -> Writer | None:
    """Who sealed: a manifest's ``finalized_by``, a seal record's ``writer``."""
    return sealed.finalized_by if isinstance(sealed, Manifest) else sealed.writer


def is_ours(location: Location, sealed: Manifest | SealRecord) -> bool:
    """Whether this writer sealed ``sealed``: a published manifest, or a seal record."""
    with _own_lock:
        if sealed.finalize_id in _own_finalize_ids.get(_key(location), ()):
            return True
    mine = os.environ.get(WRITER_ID_ENV)
    by = _sealer(sealed)
    return bool(mine) and by is not None and by.get("writer_id") == mine


def sealer_gone(seal: SealRecord) -> bool:
    """Whether the finalize that wrote ``seal`` is known to have stopped.

    A finalizer that finds another's seal completes its publication; it
    takes the checkpoint as its own (a finalize re-run after a kill) only
    when that sealer cannot still be running: a process of this host that
    no longer exists, or a seal older than :data:`SEAL_GRACE_S` (a live
    finalize publishes within seconds of sealing).
    """
    by = seal.writer
    if by is not None and by.get("host") == socket.gethostname():
        pid = by.get("pid")
        if isinstance(pid, int) and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False  # alive, another user's
            return False
    try:
        created = datetime.datetime.fromisoformat(str(seal.created))
    except ValueError:
        return True  # a seal that says nothing of its writer: nothing says it is alive
    age = datetime.datetime.now(datetime.UTC) - created
    return age.total_seconds() > SEAL_GRACE_S


async def read_published(location: Location) -> Manifest | None:
    """The decoded manifest published at ``location``, or ``None`` if not finalized."""
    try:
        body = await location.backend.read(location.manifest_key)
    except NotFoundError:
        return None
    return records.decode_manifest(location.manifest_key, body)


def already_finalized(
    location: Location, sealed: Manifest | SealRecord | None, *, completed: bool = False
) -> CheckpointFinalizedError:
    """The error for a checkpoint published by another writer (``sealed``: its manifest or seal)."""
    by = None if sealed is None else _sealer(sealed)
    who = ""
    if by is not None:
        who = f" by host {by.get('host')!r}, process {by.get('pid')}"
    when = None
    if sealed is not None:
        when = sealed.finalized if isinstance(sealed, Manifest) else sealed.created
    detail = f" (finalized{who}{f' at {when}' if when else ''})"
    if completed:
        detail += (
            "; this call only completed the publication of that finalize's seal. Set "
            f"{WRITER_ID_ENV} to your job's id so a restarted job recognises its own finalize"
        )
    return CheckpointFinalizedError(
        f"A finalized checkpoint already exists at {location.path}{detail}. To overwrite it, "
        "delete it first, or save to a new path."
    )


async def drop_stray_staging(location: Location) -> None:
    """Delete a staging prefix recreated after the session was renamed away.

    Only called once the checkpoint is published by rename: no session can
    live at a finalized path, so anything under the staging prefix then is
    debris of a writer that lost a race (a record created after the rename).
    """
    await location.backend.delete_prefix(location.staging_prefix)
