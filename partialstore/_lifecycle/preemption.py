"""Knowing that the job is about to be preempted, so it can save and finalize first.

In a multi-process JAX job every process must agree on the step at which to
save: JAX's preemption sync point does that
(``jax.experimental.multihost_utils.reached_preemption_sync_point``, as in
Orbax's ``CheckpointManager.reached_preemption``). A single process has
nobody to agree with: a SIGTERM handler records the signal, and every
later step reports it. A manager installs it on its first
``reached_preemption`` call (only a job that asks about preemption stops
dying of SIGTERM), from the main thread; it calls a previous Python handler
too, and the previous handler is restored when the last such manager closes.

Example:
    >>> install()
    >>> received()
    False
    >>> uninstall()
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from partialstore._runtime import multihost

__all__ = ["install", "reached", "received", "uninstall"]

_log = logging.getLogger("partialstore")
_lock = threading.Lock()
_users = 0
_previous: Any = None
_installed = False
_received = threading.Event()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _received.set()
    if callable(_previous):
        _previous(signum, frame)


def install() -> None:
    """Start recording SIGTERM (only possible from the main thread; elsewhere a no-op)."""
    global _users, _previous, _installed
    with _lock:
        _users += 1
        if _installed or threading.current_thread() is not threading.main_thread():
            return
        _previous = signal.signal(signal.SIGTERM, _on_sigterm)
        _installed = True


def uninstall() -> None:
    """Release one :func:`install`; the last one restores the previous SIGTERM handler."""
    global _users, _installed
    with _lock:
        _users = max(0, _users - 1)
        if _users or not _installed:
            return
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _previous if _previous is not None else signal.SIG_DFL)
            _installed = False


def received() -> bool:
    """Whether this process received SIGTERM since a manager started recording it."""
    return _received.is_set()


def reached(step: int) -> bool:
    """Whether the job should save ``step`` now because it is being preempted."""
    if multihost.is_multiprocess():
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:
            # JAX raises when its preemption service is off (Orbax treats it the same way).
            return False
    if received():
        _log.info("SIGTERM received: step %d is the step to save before preemption.", step)
        return True
    return False
