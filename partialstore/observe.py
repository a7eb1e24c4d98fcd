"""Request counters that backends feed and partialstore reads per operation.

A backend calls :func:`count_request` for each request it sends to its
store (each attempt, retries included) and :func:`count_retry` before each
retry. The counts go to the operation running in the current asyncio task
(a save, finalize, ...), which reports them in its
:class:`partialstore.OperationStats`; outside an operation they go nowhere,
at the cost of one context-variable lookup. A third-party backend that never
calls these still works: its operations report zero requests.

Example:
    >>> with counting() as counts:
    ...     count_request()
    ...     count_retry()
    ...     count_request()
    >>> (counts.requests, counts.retries)
    (2, 1)
    >>> count_request()  # no operation is counting: ignored
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

__all__ = ["RequestCounts", "count_request", "count_resend", "count_retry", "counting"]


@dataclasses.dataclass
class RequestCounts:
    """Requests sent and retries made on behalf of one operation."""

    requests: int = 0
    retries: int = 0


# Each operation's tasks inherit the context they were created in, so every
# request a save's tasks send (on any number of tasks) lands in its counts.
_current: contextvars.ContextVar[RequestCounts | None] = contextvars.ContextVar(
    "partialstore_request_counts", default=None
)


def count_request() -> None:
    """Count one request sent to the store (call it once per attempt)."""
    counts = _current.get()
    if counts is not None:
        counts.requests += 1


def count_retry() -> None:
    """Count one retry (an attempt after a failed one)."""
    counts = _current.get()
    if counts is not None:
        counts.retries += 1


def count_resend() -> None:
    """Count a request sent again after a failure: one more request, one retry."""
    count_retry()
    count_request()


@contextlib.contextmanager
def counting(counts: RequestCounts | None = None) -> Iterator[RequestCounts]:
    """Count the requests of the code run inside (and the tasks it starts) into ``counts``.

    Several blocks may feed one ``counts`` (a save's write and commit steps
    run as separate tasks). See the module docstring for an example.
    """
    counts = RequestCounts() if counts is None else counts
    token = _current.set(counts)
    try:
        yield counts
    finally:
        _current.reset(token)
