"""Listing the tail of a prefix: only the keys after a given key.

The log's records are named so that they sort by number; a reader or writer
that already knows the log up to record k lists only the keys after it
(S3 ``StartAfter``, GCS ``startOffset``), so what it pays does not grow with
the length of the log. :meth:`Backend.list` takes ``start_after`` as part of
the contract; a backend written against the older contract (a ``list``
without that keyword) still works here: its full listing is filtered.

Example:
    >>> from partialstore import registry
    >>> from partialstore._runtime.aio import run
    >>> backend = registry.open_backend("memory://listing-doc")
    >>> for name in ("1", "2", "3"):
    ...     run(backend.write(f"log/{name}", b""))
    >>> run(list_after(backend, "log", "log/1"))
    ['log/2', 'log/3']
"""

from __future__ import annotations

import inspect

from partialstore.backend import Backend

__all__ = ["list_after"]

_TAKES_START_AFTER: dict[type, bool] = {}


def _takes_start_after(backend: Backend) -> bool:
    """Whether ``backend.list`` accepts ``start_after`` (cached per class)."""
    kind = type(backend)
    known = _TAKES_START_AFTER.get(kind)
    if known is None:
        try:
            parameters = inspect.signature(backend.list).parameters
        except (TypeError, ValueError):  # no introspectable signature: assume the old one
            parameters = {}  # type: ignore[assignment]
        known = "start_after" in parameters
        _TAKES_START_AFTER[kind] = known
    return known


async def list_after(backend: Backend, prefix: str, start_after: str | None) -> list[str]:
    """Keys under ``prefix`` that sort after ``start_after`` (every key when ``None``)."""
    if start_after is None:
        return await backend.list(prefix)
    if _takes_start_after(backend):
        return await backend.list(prefix, start_after=start_after)
    return [key for key in await backend.list(prefix) if key > start_after]
