"""How contended each log is, as this process sees it, and how long a loser of a race waits.

Appends race for the log's next number (:func:`partialstore._commit.txlog.append`):
one create wins, the others lose and try again. If every loser tried the
very next number at once, each record would cost a failed create and a read
from every other writer (a thundering herd), and the requests per record
would grow with the number of writers. Instead this process keeps, per log:

- the *round trip* of its creates there (a moving average), and
- the *others per commit*: how many records other writers appended between
  two of this process's records (a moving average; 0 for a lone writer).

A loser waits a random time up to ``round trip x (1 + others per commit)``
(full jitter over a window as wide as the queue of writers ahead of it),
then lists the log's tail to go on after its end. So K writers spread their
attempts over about K round trips and the next number is usually tried by
one of them, which keeps the requests per record flat in K (the rate of
records is one per round trip or two whatever K). A lone writer never
waits: it never loses.

Example:
    >>> from partialstore import registry
    >>> backend = registry.open_backend("memory://contention-doc")
    >>> others_per_commit(backend, "ck/log")
    0.0
    >>> note_commit(backend, "ck/log", 10, round_trip=0.02)
    >>> note_commit(backend, "ck/log", 14, round_trip=0.02)  # 3 records by others between
    >>> others_per_commit(backend, "ck/log") > 0
    True
    >>> 0.0 <= pause(backend, "ck/log") <= MAX_PAUSE
    True
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections import OrderedDict

from partialstore.backend import Backend

__all__ = [
    "MAX_PAUSE",
    "MIN_ROUND_TRIP",
    "contended",
    "note_commit",
    "note_round_trip",
    "others_per_commit",
    "pause",
    "pause_window",
]

#: The shortest round trip assumed (a local disk answers in microseconds, but
#: a process still needs this long to notice and retry).
MIN_ROUND_TRIP = 0.001
#: The longest a loser waits before trying again, however crowded the log.
MAX_PAUSE = 2.0
#: Weight of the newest observation in the moving averages.
_ALPHA = 0.3
#: How many logs a process keeps state for (least recently used dropped first).
_LIMIT = 4096


@dataclasses.dataclass
class _State:
    round_trip: float = MIN_ROUND_TRIP
    others: float = 0.0  # records by others between two of ours (moving average)
    last_mine: int | None = None


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


def note_round_trip(backend: Backend, log_prefix: str, seconds: float) -> None:
    """Note how long one create on ``log_prefix`` took (answered either way)."""
    with _lock:
        state = _state(backend, log_prefix)
        seconds = max(seconds, MIN_ROUND_TRIP)
        state.round_trip += _ALPHA * (seconds - state.round_trip)


def note_commit(
    backend: Backend, log_prefix: str, number: int, round_trip: float | None = None
) -> None:
    """Note that this process created record ``number``; update the others-per-commit average."""
    with _lock:
        state = _state(backend, log_prefix)
        if round_trip is not None:
            state.round_trip += _ALPHA * (max(round_trip, MIN_ROUND_TRIP) - state.round_trip)
        if state.last_mine is not None and number > state.last_mine:
            between = number - state.last_mine - 1
            state.others += _ALPHA * (between - state.others)
        state.last_mine = number


def others_per_commit(backend: Backend, log_prefix: str) -> float:
    """About how many records other writers append to ``log_prefix`` between two of ours."""
    with _lock:
        return _state(backend, log_prefix).others


def contended(backend: Backend, log_prefix: str) -> bool:
    """Whether other writers were seen appending to ``log_prefix`` lately."""
    return others_per_commit(backend, log_prefix) >= 0.5


def pause_window(backend: Backend, log_prefix: str) -> float:
    """The longest :func:`pause` on ``log_prefix`` now: round trip x (1 + others), capped."""
    with _lock:
        state = _state(backend, log_prefix)
        window = state.round_trip * (1.0 + max(state.others, 1.0))
    return min(MAX_PAUSE, window)


def pause(backend: Backend, log_prefix: str) -> float:
    """Seconds a loser of a race on ``log_prefix`` waits before trying again (full jitter)."""
    return random.uniform(0.0, pause_window(backend, log_prefix))
