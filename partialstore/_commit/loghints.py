"""What this process last saw of each log: the number and kind of its last record.

A writer that appended to a log before remembers the number and kind of the
last record it created or read there (a *hint*). Its next append lists only
the log's tail from that record on, instead of the whole log: records are
immutable, so the kind is still right, and the listing shows whether the
record still exists and what came after it (see
:func:`partialstore._commit.txlog.append`). A hint is only a starting point:
whatever it says is checked against the store before anything is created,
with one exception: a save that was already in flight when this process
created the hinted record may append right after it (see
:func:`created_since`).

Example:
    >>> from partialstore import registry
    >>> backend = registry.open_backend("memory://loghints-doc")
    >>> remember(backend, "ck/log", 7, "save", version=2)
    >>> recall(backend, "ck/log")[:3]
    (7, 'save', 2)
    >>> recall(backend, "other/log") is None
    True
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import NamedTuple

from partialstore.backend import Backend

__all__ = ["Hint", "created_since", "forget", "recall", "remember"]

#: How many logs a process keeps hints for (least recently used dropped first).
HINT_LIMIT = 4096


class Hint(NamedTuple):
    """The last record this process created or read in a log."""

    number: int
    kind: str
    version: int  # the record's format version
    created: float | None  # when this process created it (time.monotonic()), or None if read


_hints: OrderedDict[tuple[str, str], Hint] = OrderedDict()
_lock = threading.Lock()


def remember(
    backend: Backend,
    log_prefix: str,
    number: int,
    kind: str,
    *,
    version: int,
    created: bool = False,
) -> None:
    """Note that record ``number`` of ``log_prefix`` was just read or ``created``, and its kind."""
    key = (backend.url, log_prefix)
    with _lock:
        _hints[key] = Hint(number, kind, version, time.monotonic() if created else None)
        _hints.move_to_end(key)
        while len(_hints) > HINT_LIMIT:
            _hints.popitem(last=False)


def recall(backend: Backend, log_prefix: str) -> Hint | None:
    """The last record noted for ``log_prefix``, if any."""
    with _lock:
        return _hints.get((backend.url, log_prefix))


def created_since(backend: Backend, log_prefix: str, since: float) -> Hint | None:
    """The hint, if this process created its record, as a save, after ``since``.

    ``since`` is when a save was called (``time.monotonic()``). Everything
    that happened to the log after that record landed is then concurrent
    with the save, so the save may be ordered before it: its create may go
    straight to the next number, as if no time had passed (a rival's record
    there is met by the create itself, see ``txlog.append``).

    Example:
        >>> from partialstore import registry
        >>> backend = registry.open_backend("memory://loghints-since-doc")
        >>> called = time.monotonic()
        >>> remember(backend, "ck/log", 3, "save", version=2, created=True)
        >>> created_since(backend, "ck/log", called).number  # the save was in flight: no look
        3
        >>> created_since(backend, "ck/log", time.monotonic()) is None  # a later save looks
        True
    """
    with _lock:
        hint = _hints.get((backend.url, log_prefix))
    if hint is None or hint.kind != "save" or hint.created is None or hint.created <= since:
        return None
    return hint


def forget(backend: Backend, log_prefix: str) -> None:
    """Drop the hint of ``log_prefix`` (it pointed at a record that is gone)."""
    with _lock:
        _hints.pop((backend.url, log_prefix), None)
