"""Exclusive creates whose outcome is known, even when a response was lost.

On a real network the answer to a conditional create can be lost after the
object landed: the HTTP client then retries and the retry reports "exists",
or the call fails with a timeout or a 5xx. Every object partialstore
creates exclusively (log records, the manifest) carries a fresh id, so its
bytes are unique: reading the key back and comparing bytes tells "mine"
from "another writer's" (Icechunk and Delta Lake resolve lost commits the
same way).

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from partialstore import registry
    >>> from partialstore._runtime.aio import run
    >>> backend = registry.open_backend(f"{tmp.name}/root")
    >>> run(create_once(backend, "ck/log/00000003.json", b'{"id": "a"}'))
    (<Created.MINE: 'mine'>, True)
    >>> run(create_once(backend, "ck/log/00000003.json", b'{"id": "b"}'))  # another writer's
    (<Created.OTHER: 'other'>, False)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import asyncio
import enum
import random

from partialstore.backend import Backend
from partialstore.errors import (
    AlreadyExistsError,
    NotFoundError,
    OutcomeUnknownError,
    TransientBackendError,
)

__all__ = ["Created", "create_once", "create_or_read"]

#: How many times a create is tried again after a failure that may or may not
#: have landed. The backend already retried each request under its deadline,
#: so this only covers a failure between a landed write and its read-back.
ATTEMPTS = 3


class Created(enum.Enum):
    """The outcome of :func:`create_once`.

    - ``MINE``: the key holds exactly our bytes (created now, or by an
      earlier attempt whose answer was lost).
    - ``OTHER``: the key holds another writer's bytes.
    - ``VANISHED``: the key was reported to exist, but was deleted before we
      could read it (a concurrent ``discard``).
    """

    MINE = "mine"
    OTHER = "other"
    VANISHED = "vanished"


async def _read_back(backend: Backend, key: str) -> bytes | None:
    """What the key holds now; ``None`` when it is absent."""
    try:
        return await backend.read(key)
    except NotFoundError:
        return None


async def create_once(backend: Backend, key: str, data: bytes) -> tuple[Created, bool]:
    """Create ``key`` with ``data`` exclusively; return the outcome and whether it was clean.

    ``clean`` is ``False`` when the first answer was not conclusive (a lost
    or failed response was resolved by reading the key back): the caller may
    then have to check what else changed meanwhile.

    See the module docstring for an example.

    Raises:
      OutcomeUnknownError: the store kept failing, so whether ``data`` landed
        cannot be known now.
    """
    outcome, clean, _ = await create_or_read(backend, key, data)
    return outcome, clean


async def create_or_read(
    backend: Backend, key: str, data: bytes
) -> tuple[Created, bool, bytes | None]:
    """:func:`create_once`, also returning the bytes found when the outcome is ``OTHER``.

    The read-back that tells "mine" from "another writer's" already holds
    the other writer's object, so a caller that needs it (the log's next
    append learns the kind of the record that beat it) reads nothing more.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> from partialstore import registry
        >>> from partialstore._runtime.aio import run
        >>> backend = registry.open_backend(f"{tmp.name}/root")
        >>> run(create_or_read(backend, "k", b"a"))
        (<Created.MINE: 'mine'>, True, None)
        >>> run(create_or_read(backend, "k", b"b"))
        (<Created.OTHER: 'other'>, False, b'a')
        >>> tmp.cleanup()

    Raises:
      OutcomeUnknownError: as :func:`create_once`.
    """
    last_error: Exception | None = None
    settled = True  # whether every failed attempt was found not to have landed
    for attempt in range(ATTEMPTS):
        if attempt:
            await asyncio.sleep(random.uniform(0, 0.05 * 2**attempt))
        try:
            await backend.create(key, data)
            return Created.MINE, attempt == 0, None
        except AlreadyExistsError:
            reported_exists = True
        except (TransientBackendError, OutcomeUnknownError) as error:
            reported_exists, last_error = False, error
        try:
            seen = await _read_back(backend, key)
        except (TransientBackendError, OutcomeUnknownError) as error:
            last_error, settled = error, False
            continue
        if seen is not None:
            return (Created.MINE, False, None) if seen == data else (Created.OTHER, False, seen)
        if reported_exists:
            return Created.VANISHED, False, None
        # Absent after a failed create: it never landed, so creating again is safe.
    if settled and last_error is not None:
        raise last_error  # the store failed every try, and none of them landed
    raise OutcomeUnknownError(
        f"Creating {key} on {backend!r} failed {ATTEMPTS} times and reading it back did not "
        f"settle whether it landed (last error: {last_error}). Check that the store is "
        "reachable, then repeat the call: it recognises its own earlier writes."
    ) from last_error
