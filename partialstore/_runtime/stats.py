"""What each operation cost: time per phase, bytes, leaves, requests, retries.

Every save, finalize, discard, gc and load records an :class:`OperationStats`,
logs it as one INFO line on ``logging.getLogger("partialstore")`` and hands
it to the listeners registered with :func:`add_stats_listener`, so a
training loop can send the figures to its metrics system. A save's figures
are also on its :class:`~partialstore.AsyncResponse` (``response.stats``).

Requests and retries are what the backend reports through
:mod:`partialstore.observe` (every built-in backend does); TensorStore's own
chunk requests on S3 and GCS are not among them, the arrays' bytes are.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> import numpy as np
    >>> import partialstore
    >>> seen = []
    >>> remove = partialstore.add_stats_listener(seen.append)
    >>> partialstore.save(f"{tmp.name}/ckpt", {"w": np.ones(1024, np.float32)})
    >>> partialstore.finalize(f"{tmp.name}/ckpt")
    >>> [(s.operation, s.nbytes, s.leaves) for s in seen]
    [('save', 4096, 1), ('finalize', 0, 0)]
    >>> seen[0].requests > 0 and set(seen[0].phases) == {"snapshot", "write", "commit"}
    True
    >>> remove()
    >>> tmp.cleanup()
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from partialstore.observe import RequestCounts, counting

__all__ = ["OperationStats", "Recorder", "add_stats_listener"]

logger = logging.getLogger("partialstore")

StatsListener = Callable[["OperationStats"], None]
_listeners: list[StatsListener] = []
_listeners_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class OperationStats:
    """The figures of one operation on one checkpoint path.

    Attributes:
      operation: ``"save"``, ``"finalize"``, ``"discard"``, ``"gc"`` or ``"load"``.
      path: the checkpoint path as given.
      seconds: from the call to the end of the operation (a save's includes
        its wait behind earlier saves to the path).
      nbytes: array bytes written (save) or read (load).
      leaves: leaves saved or loaded.
      requests: requests sent to the store, retries included.
      retries: requests that repeated a failed one.
      phases: seconds per phase, in order (save: snapshot, write, commit).
    """

    operation: str
    path: str
    seconds: float
    nbytes: int
    leaves: int
    requests: int
    retries: int
    phases: Mapping[str, float]

    def summary(self) -> str:
        """One line for a log or a console.

        Example:
            >>> OperationStats("save", "/ck", 0.5, 2**20, 3, 7, 1, {"write": 0.4}).summary()
            'save /ck: 1.0 MiB in 3 leaves, 7 requests (1 retries), 0.500 s (write 0.400)'
        """
        phases = ", ".join(f"{name} {seconds:.3f}" for name, seconds in self.phases.items())
        return (
            f"{self.operation} {self.path}: {self.nbytes / 2**20:.1f} MiB in {self.leaves} "
            f"leaves, {self.requests} requests ({self.retries} retries), {self.seconds:.3f} s"
            + (f" ({phases})" if phases else "")
        )


def add_stats_listener(listener: StatsListener) -> Callable[[], None]:
    """Call ``listener(stats)`` after each operation; return a function that removes it.

    A listener runs on partialstore's I/O thread (or the caller's, for
    finalize, discard, gc and load) and must not block; an exception it
    raises is logged, never raised into the operation. See the module
    docstring for an example.
    """
    with _listeners_lock:
        _listeners.append(listener)

    def remove() -> None:
        with _listeners_lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return remove


class Recorder:
    """Collects one operation's figures across the tasks that run it.

    Example:
        >>> recorder = Recorder("load", "/ck")
        >>> with recorder.phase("read"):
        ...     recorder.add(nbytes=8, leaves=1)
        >>> recorder.finish().nbytes
        8
    """

    def __init__(self, operation: str, path: str) -> None:
        self.operation = operation
        self.path = path
        self.counts = RequestCounts()
        self.nbytes = 0
        self.leaves = 0
        self.phases: dict[str, float] = {}
        self._started = time.perf_counter()
        self.stats: OperationStats | None = None

    def elapsed(self) -> float:
        """Seconds since the operation was called."""
        return time.perf_counter() - self._started

    def add(self, *, nbytes: int = 0, leaves: int = 0) -> None:
        """Add array bytes and leaves moved by the operation."""
        self.nbytes += nbytes
        self.leaves += leaves

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` and count the requests sent inside it."""
        started = time.perf_counter()
        with counting(self.counts):
            try:
                yield
            finally:
                self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - started

    def finish(self) -> OperationStats:
        """Freeze the figures, log them and tell the listeners (once)."""
        if self.stats is not None:
            return self.stats
        self.stats = OperationStats(
            operation=self.operation,
            path=self.path,
            seconds=time.perf_counter() - self._started,
            nbytes=self.nbytes,
            leaves=self.leaves,
            requests=self.counts.requests,
            retries=self.counts.retries,
            phases=dict(self.phases),
        )
        logger.info("%s", self.stats.summary())
        with _listeners_lock:
            listeners = list(_listeners)
        for listener in listeners:
            try:
                listener(self.stats)
            except Exception:  # a metrics hook must never fail a checkpoint
                logger.exception("partialstore stats listener %r failed", listener)
        return self.stats
