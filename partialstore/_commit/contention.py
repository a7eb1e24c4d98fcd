"""How contended each log is, as this process sees it, and how long an append waits.

Appends race for the log's next number (:func:`partialstore._commit.txlog.append`):
one create wins, the others lose and try again. If every loser tried the
very next number at once, each record would cost a failed create and a read
from every other writer (a thundering herd), and the requests per record
would grow with the number of writers. Instead this process keeps, per log:

- the *round trip* of its creates there (a moving average), and
- the *rivals*: the other writers (host, process, writer id) whose records
  it read there in the last :data:`RIVAL_MEMORY` seconds: the record that
  beat it in a race, or the last record of a tail it listed.

A writer's turn on a contended log (one with rivals) is a *slot* of
:data:`ATTEMPT_ROUND_TRIPS` round trips, and with ``K`` writers (this one and
its rivals) a writer waits a random time up to ``K`` slots (full jitter)
before each attempt: before its first one too, so that the writer that just
won does not take the next number from the writers that lost to it
(capture). A loser's window shrinks with each race it lost in a row, and
after :data:`PRIORITY_AFTER` losses in a row it is :data:`PRIORITY_SLOTS`
slots, however many writers there are: such a writer goes ahead of every
writer that has not lost. A shrinking window alone does not end a run of
losses (each attempt collides with the others' as likely as before; it
only comes sooner), and one writer in a few hundred lost ten races or more.
The window does not fall to zero: the losers of one race learn of it at
the same moment and would collide again at once. A lone writer never waits.

Example:
    >>> from partialstore import registry
    >>> backend = registry.open_backend("memory://contention-doc")
    >>> contended(backend, "ck/log")
    False
    >>> note_round_trip(backend, "ck/log", 0.02)
    >>> note_rival(backend, "ck/log", {"host": "h", "pid": 7, "writer_id": None})
    >>> contended(backend, "ck/log"), writers(backend, "ck/log")
    (True, 2)
    >>> 0.0 <= pause(backend, "ck/log", lost=1) <= MAX_PAUSE
    True
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import OrderedDict
from typing import Any

from partialstore._commit.published import writer
from partialstore.backend import Backend

__all__ = [
    "MAX_PAUSE",
    "MIN_ROUND_TRIP",
    "PRIORITY_AFTER",
    "PRIORITY_SLOTS",
    "RIVAL_MEMORY",
    "contended",
    "note_rival",
    "note_round_trip",
    "pause",
    "pause_window",
    "writers",
]

#: The shortest round trip assumed (a local disk answers in microseconds, but
#: a process still needs this long to notice and retry).
MIN_ROUND_TRIP = 0.001
#: The longest any pause lasts, however crowded the log.
MAX_PAUSE = 2.0
#: How long a writer seen on a log counts as a rival there.
RIVAL_MEMORY = 10.0
#: How many create round trips one writer's turn takes. An attempt on a contended
#: log is two round trips in a log of version 2 (list the tail, create) and three
#: in one of version 1 (a read of the tail's end between them). 1 and 2 were
#: measured in both: 1 gives a few percent more commits per second, and a worst
#: append past 5 times the median (benchmarks/README.md, "K = 16 with seal notices").
ATTEMPT_ROUND_TRIPS = 2
#: After this many races lost in a row a writer's window is :data:`PRIORITY_SLOTS`
#: (see the module docstring). 1, 2 and 3 were measured: 2 kept the worst append
#: closest to the median for the fewest requests (benchmarks/README.md, "K = 16:
#: runs of lost races").
PRIORITY_AFTER = 2
#: The window, in slots, of a writer that lost :data:`PRIORITY_AFTER` races in a
#: row. 0, 0.5 and 1 were measured: 0.5 kept the worst append nearest the median
#: both at 20 ms and on a server short of CPU (benchmarks/README.md, same place).
PRIORITY_SLOTS = 0.5
#: Weight of the newest observation in the round-trip average.
_ALPHA = 0.3
#: How many logs a process keeps state for (least recently used dropped first).
_LIMIT = 4096


@dataclasses.dataclass
class _State:
    round_trip: float = MIN_ROUND_TRIP
    rivals: dict[tuple[Any, ...], float] = dataclasses.field(default_factory=dict)


_states: OrderedDict[tuple[str, str], _State] = OrderedDict()
_lock = threading.Lock()


def _state(backend: Backend, log_prefix: str) -> _State:
    key = (backend.url, log_prefix)
    state = _states.get(key)
    if state is None:
        state = _states[key] = _State()
    _states.move_to_end(key)
    while len(_states) > _LIMIT:
        _states.popitem(last=False)
    return state


def _identity(who: Any) -> tuple[Any, ...] | None:
    if not isinstance(who, dict):
        return None
    return (who.get("host"), who.get("pid"), who.get("writer_id"))


def note_round_trip(backend: Backend, log_prefix: str, seconds: float) -> None:
    """Note how long one create on ``log_prefix`` took (answered either way)."""
    with _lock:
        state = _state(backend, log_prefix)
        state.round_trip += _ALPHA * (max(seconds, MIN_ROUND_TRIP) - state.round_trip)


def note_rival(backend: Backend, log_prefix: str, who: Any) -> None:
    """Note that writer ``who`` (a record's ``writer`` field) appended to ``log_prefix``.

    Records of this process itself, or without a writer, are not rivals.
    """
    identity = _identity(who)
    if identity is None or identity == _identity(writer()):
        return
    with _lock:
        _state(backend, log_prefix).rivals[identity] = time.monotonic()


def writers(backend: Backend, log_prefix: str) -> int:
    """This process and the rivals seen on ``log_prefix`` in the last :data:`RIVAL_MEMORY` s."""
    now = time.monotonic()
    with _lock:
        state = _state(backend, log_prefix)
        state.rivals = {k: t for k, t in state.rivals.items() if now - t < RIVAL_MEMORY}
        return 1 + len(state.rivals)


def contended(backend: Backend, log_prefix: str) -> bool:
    """Whether other writers were seen appending to ``log_prefix`` lately."""
    return writers(backend, log_prefix) > 1


def pause_window(backend: Backend, log_prefix: str, lost: int = 0) -> float:
    """The longest :func:`pause` now: ``writers`` slots, divided by ``lost + 1``, capped.

    Zero on an uncontended log: a lone writer never waits. After
    :data:`PRIORITY_AFTER` races lost in a row, :data:`PRIORITY_SLOTS` slots
    whatever the number of writers.
    """
    count = writers(backend, log_prefix)
    if count == 1:
        return 0.0
    with _lock:
        slot = ATTEMPT_ROUND_TRIPS * _state(backend, log_prefix).round_trip
    slots = PRIORITY_SLOTS if lost >= PRIORITY_AFTER else count / (lost + 1)
    return min(MAX_PAUSE, slot * slots)


def pause(backend: Backend, log_prefix: str, lost: int = 0) -> float:
    """Seconds to wait before an attempt, after ``lost`` lost races in a row (full jitter)."""
    window = pause_window(backend, log_prefix, lost)
    return random.uniform(0.0, window) if window else 0.0
