"""Named crash points for crash-safety tests.

Set ``PARTIALSTORE_CRASH_AT=<point>`` in a child process's environment and
the process kills itself with SIGKILL when it reaches that point, exactly as
an out-of-memory kill or a preempted VM would. ``<point>:<n>`` kills at the
n-th time the point is reached (1-based). Unset, a crash point costs one
dictionary lookup.

A test runs a child as ``PARTIALSTORE_CRASH_AT=save.before_log_append python train.py``.

Example:
    >>> "save.before_log_append" in CRASH_POINTS
    True
    >>> crash_point("save.before_log_append")  # unset here: nothing happens
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_POINTS", "crash_point"]

#: Every point the library offers, in the order a save and a finalize reach them.
CRASH_POINTS = (
    "save.after_data",
    "save.before_log_append",
    "save.after_log_append",
    "finalize.before_seal",
    "finalize.after_seal",
    "finalize.after_manifest_write",
    "finalize.after_publish",
)

_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if ``PARTIALSTORE_CRASH_AT`` names ``name``."""
    wanted = os.environ.get("PARTIALSTORE_CRASH_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
