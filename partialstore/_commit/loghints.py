"""What this process last saw of each log: the number and kind of its last record.

A writer that appended to a log before remembers the number and kind of the
last record it created or read there (a *hint*). Its next append lists only
the log's tail from that record on, instead of the whole log: records are
immutable, so the kind is still right, and the listing shows whether the
record still exists and what came after it (see
:func:`partialstore._commit.txlog.append`). A hint is only a starting point:
whatever it says is checked against the store before anything is created.

Example:
    >>> from partialstore import registry
    >>> backend = registry.open_backend("memory://loghints-doc")
    >>> remember(backend, "ck/log", 7, "save")
    >>> recall(backend, "ck/log")
    (7, 'save')
    >>> recall(backend, "other/log") is None
    True
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from partialstore.backend import Backend

__all__ = ["forget", "recall", "remember"]

#: How many logs a process keeps hints for (least recently used dropped first).
HINT_LIMIT = 4096

_hints: OrderedDict[tuple[str, str], tuple[int, str]] = OrderedDict()
_lock = threading.Lock()


def remember(backend: Backend, log_prefix: str, number: int, kind: str) -> None:
    """Note that record ``number`` of ``log_prefix`` was just read or created, and its kind."""
    key = (backend.url, log_prefix)
    with _lock:
        _hints[key] = (number, kind)
        _hints.move_to_end(key)
        while len(_hints) > HINT_LIMIT:
            _hints.popitem(last=False)


def recall(backend: Backend, log_prefix: str) -> tuple[int, str] | None:
    """The last ``(number, kind)`` noted for ``log_prefix``, if any."""
    with _lock:
        return _hints.get((backend.url, log_prefix))


def forget(backend: Backend, log_prefix: str) -> None:
    """Drop the hint of ``log_prefix`` (it pointed at a record that is gone)."""
    with _lock:
        _hints.pop((backend.url, log_prefix), None)
