"""Requests to JAX's coordination key-value store behind :mod:`partialstore._runtime.multihost`.

Each function here runs in a thread (the client's calls block) and takes
the client as its first argument: ``jax._src.distributed.global_state.client``.

Gathering one value from every process to the primary costs the primary
the same requests whatever the number of processes. Most values are the
plain success message, and a process with that to report only counts
itself in, with one increment of ``{key}.count``; a process with anything
else first sets ``{key}/{index}`` and adds :data:`SENT` to its increment.
The increment that completes the count (its low part reaches the number of
reporting processes) tells its process to set ``{key}.all`` to the total.
The primary waits for that one key, and reads the directory ``{key}/``
only when the total says some process sent a value. Every report is set
before its count, so a full count means every report is there.

Example:
    >>> counted = 2 * SENT + 7  # 7 processes counted in, 2 of them sent a value
    >>> counted % SENT, counted // SENT
    (7, 2)
"""

from __future__ import annotations

from typing import Any

from partialstore import errors

__all__ = ["SENT", "get_or_none", "report", "wait_for_reports"]

#: Added to a count by a report that carries a value; far above any number
#: of processes, so a count's low part counts processes, its high part values.
SENT = 1 << 24


def get_or_none(client: Any, key: str, wait_ms: int, waiter: int, sources: str) -> str | None:
    """``key``'s value once set, or None once ``wait_ms`` passed without it.

    ``waiter`` (this process's index) and ``sources`` (who should set the key)
    only name them in the error raised if the coordination service is gone.
    """
    try:
        return str(client.blocking_key_value_get(key, wait_ms))
    except Exception as error:  # jaxlib's JaxRuntimeError, told apart by its status
        if "DEADLINE_EXCEEDED" in str(error):
            return None
        raise errors.ProcessLostError(
            f"Process {waiter} lost the JAX coordination service (run by process 0) while "
            f"waiting for {key!r} from {sources}: {error}. Check process 0's logs and "
            "restart the job."
        ) from error


def report(client: Any, key: str, index: int, reporting: int, value: str, plain: str) -> None:
    """Process ``index``'s report of ``value``, one of ``reporting`` processes reporting.

    A ``value`` equal to ``plain`` goes as a count alone.
    """
    sent = value != plain
    if sent:
        client.key_value_set(f"{key}/{index}", value)
    total = int(client.key_value_increment(f"{key}.count", 1 + (SENT if sent else 0)))
    if total % SENT == reporting:
        client.key_value_set(f"{key}.all", str(total))


def wait_for_reports(
    client: Any, key: str, reporting: int, wait_ms: int, waiter: int
) -> dict[int, str] | None:
    """The values sent to ``key`` (by process index) once all have reported, else None.

    Waits up to ``wait_ms`` for ``{key}.all``; without it, looks at the count
    itself, in case the process that completed it stopped before setting
    ``{key}.all``. Processes that reported the plain value are not in the result.
    """
    total = get_or_none(client, f"{key}.all", wait_ms, waiter, "the other processes")
    if total is None:
        try:
            total = str(client.key_value_try_get(f"{key}.count"))
        except Exception:  # NOT_FOUND: nobody has counted in yet
            return None
        if int(total) % SENT < reporting:
            return None
    if int(total) < SENT:
        return {}
    values = client.key_value_dir_get(f"{key}/")
    return {int(name.rsplit("/", 1)[1]): value for name, value in values}
