"""Multi-process saves: coordination between the processes of a JAX job.

In a multi-process JAX job (``jax.distributed.initialize`` called) every
process calls ``save`` with the same global tree, in the same order. Each
process snapshots and writes only the shards it owns (``replica_id == 0``,
so a replicated shard is written once; :mod:`partialstore._pytree.shards`)
into the same zarr3 arrays, whose chunks tile every shard exactly
(:mod:`partialstore._arrays.sharded`), so no two processes ever write one
chunk; this module only coordinates.
The primary process (index 0) also writes the small and process-local
leaves, collects every process's outcome, appends the one log record and
tells the others how it went; finalize, discard and gc run on the primary
alone (:func:`run_on_primary`).

Coordination uses the key-value store of JAX's distributed coordination
service: the primary publishes, the others wait for a key in short slices
(in a thread, so partialstore's event loop keeps running). The others'
reports reach the primary through one counter
(:mod:`partialstore._runtime.kvgather`), so the primary's requests per
operation do not grow with the number of processes. Failures travel
as messages carrying their type, message and process, so a process whose
write fails makes every process raise that error instead of leaving the
others waiting at a barrier; a process that dies is noticed by its
heartbeat stopping (:class:`ProcessLostError`). Each operation's keys are
deleted by the last non-primary process to read its outcome (the primary
reads nothing after setting it). With one process (or without
``jax.distributed``) nothing here talks to anyone.

In a multi-process job a collective step reads
``await broadcast(f"{next_op(name)}/save_id", new_id() if is_primary() else None)``;
it needs ``jax.distributed``, so only the single-process path runs here.

Example:
    >>> from partialstore._runtime.aio import run
    >>> is_multiprocess()
    False
    >>> async def collect() -> list[str]:
    ...     return ["data/3f2a"]
    >>> run(run_on_primary(None, collect, "gc"))  # op None: the action just runs
    ['data/3f2a']
"""

from __future__ import annotations

import asyncio
import atexit
import builtins
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from partialstore import errors
from partialstore._runtime import kvgather

__all__ = [
    "OUTCOME",
    "broadcast",
    "decode_outcome",
    "encode_outcome",
    "gather_to_primary",
    "is_multiprocess",
    "is_primary",
    "next_op",
    "process_count",
    "process_index",
    "run_on_primary",
]

#: How long a process waits for another that is alive (seconds);
#: ``PARTIALSTORE_MULTIHOST_TIMEOUT_S`` overrides it. A save of a large
#: sharded tree may take minutes on every process.
DEFAULT_TIMEOUT_S = 1800.0
#: After how many seconds without a heartbeat a process is taken for dead;
#: ``PARTIALSTORE_MULTIHOST_LIVENESS_S`` overrides it (every process beats
#: six times in that span, at most every 2 s). Other processes then fail
#: within about this time plus one beat, instead of waiting for JAX's own
#: heartbeat timeout to abort the job.
DEFAULT_LIVENESS_S = 15.0

T = TypeVar("T")


def _global_state() -> Any:
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover - jax is a dependency
        return None
    return distributed.global_state


def _client() -> Any:
    state = _global_state()
    if state is None or state.client is None or (state.num_processes or 1) <= 1:
        return None
    return state.client


def is_multiprocess() -> bool:
    """Whether ``jax.distributed`` is initialized with more than one process."""
    return _client() is not None


def process_count() -> int:
    """Number of processes in the job (1 without ``jax.distributed``)."""
    return int(_global_state().num_processes) if is_multiprocess() else 1


def process_index() -> int:
    """This process's index (0 without ``jax.distributed``)."""
    return int(_global_state().process_id) if is_multiprocess() else 0


def is_primary() -> bool:
    """Whether this process writes metadata and log records (index 0)."""
    return process_index() == 0


def _timeout_s(name: str = "TIMEOUT", default: float = DEFAULT_TIMEOUT_S) -> float:
    return float(os.environ.get(f"PARTIALSTORE_MULTIHOST_{name}_S", default))


def _liveness_s() -> float:
    return _timeout_s("LIVENESS", DEFAULT_LIVENESS_S)


# ----------------------------------------------------------------- liveness
# JAX notices a dead process only after its own heartbeat timeout (100 s by
# default, set at jax.distributed.initialize), then aborts every process. So
# each process taking part also publishes a counter under a key of its own,
# and one waiting for another checks, between short waits, that it moves.

_HEARTBEAT_DIR = "partialstore/heartbeat/"
_heartbeat_lock = threading.Lock()
_heartbeat_client: Any = None
_seen: dict[int, tuple[str, float]] = {}  # process: (last beat seen, when first seen)
_beats: list[threading.Thread] = []  # every heartbeat thread started, for the exit
_exiting = threading.Event()
#: How long the exit waits for a heartbeat request in flight (one to a lost
#: coordination service may hang until its own RPC timeout).
_EXIT_JOIN_S = 10.0


def _heartbeat_interval_s() -> float:
    return max(0.05, min(2.0, _liveness_s() / 6))


def _ensure_heartbeat() -> None:
    """Start this process's heartbeat for the current JAX client (once per client)."""
    global _heartbeat_client
    client = _client()
    with _heartbeat_lock:
        if client is None or _heartbeat_client is client:
            return
        key = f"{_HEARTBEAT_DIR}{process_index()}"
        client.key_value_set(key, "0", allow_overwrite=True)  # visible before any wait
        _heartbeat_client = client
        _seen.clear()
        thread = threading.Thread(
            target=_beat, args=(client, key), name="partialstore-beat", daemon=True
        )
        thread.start()
        _beats.append(thread)
        if len(_beats) == 1:
            atexit.register(_stop_beating)


def _beat(client: Any, key: str) -> None:
    beat = 0
    # Until jax.distributed.shutdown() (or a new job), or the interpreter's exit.
    while not _exiting.wait(_heartbeat_interval_s()) and _client() is client:
        beat += 1
        try:
            client.key_value_set(key, str(beat), allow_overwrite=True)
        except Exception:  # a lost beat only makes the others' view older
            continue


def _stop_beating() -> None:
    """At exit, let each heartbeat thread finish its request and stop.

    A daemon thread still inside a jaxlib call when the interpreter
    finalizes is ended in the middle of C++ code, which aborts the process
    (SIGABRT) after its work is done. Exit handlers run before that.
    """
    _exiting.set()
    for thread in _beats:
        thread.join(timeout=_EXIT_JOIN_S)


def _read_beats(client: Any, sources: list[int]) -> dict[int, str]:
    if len(sources) == 1:
        try:
            return {sources[0]: client.key_value_try_get(f"{_HEARTBEAT_DIR}{sources[0]}")}
        except Exception:  # NOT_FOUND: that process has not taken part in anything yet
            return {}
    beats = client.key_value_dir_get(_HEARTBEAT_DIR)
    return {int(key.rsplit("/", 1)[1]): value for key, value in beats}


async def _raise_if_silent(sources: list[int], key: str) -> None:
    """Raise :class:`ProcessLostError` if one of ``sources`` stopped beating.

    A process that never beat (it has not called partialstore yet) is not
    judged: it may be busy elsewhere, and the overall timeout still applies.
    """
    beats = await asyncio.to_thread(_read_beats, _client(), sources)
    now = time.monotonic()
    for source in sources:
        value = beats.get(source)
        if value is None:
            continue
        last = _seen.get(source)
        if last is None or last[0] != value:
            _seen[source] = (value, now)
            continue
        if now - last[1] > _liveness_s():
            raise errors.ProcessLostError(
                f"Process {source} of the JAX job (coordination task {source}) has sent no "
                f"heartbeat for {now - last[1]:.0f} s while process {process_index()} waited "
                f"for {key!r}: it has most likely died or hung, so this operation cannot "
                f"complete. Check process {source}'s logs and restart the job; what was "
                "committed before stays (PARTIALSTORE_MULTIHOST_LIVENESS_S sets the limit)."
            )


def _timed_out(key: str, sources: list[int]) -> TimeoutError:
    named = ", ".join(str(s) for s in sources)
    who = f"process {named}" if len(sources) == 1 else f"processes {named}"
    return TimeoutError(
        f"Process {process_index()} waited {_timeout_s():.0f} s in vain for {key!r} from "
        f"{who} of the JAX job. Did every process call the same partialstore "
        "functions on the same path, in the same order? (PARTIALSTORE_MULTIHOST_TIMEOUT_S "
        "sets the limit.)"
    )


def _wait_ms(deadline: float) -> int:
    remaining = deadline - time.monotonic()
    return max(1, int(min(_heartbeat_interval_s(), remaining) * 1000))


async def _await_keys(keys: dict[int, str]) -> dict[int, str]:
    """Each source process's value under its key, in order; fail fast if a source dies."""
    _ensure_heartbeat()
    client = _client()
    deadline = time.monotonic() + _timeout_s()
    values: dict[int, str] = {}
    for source, key in keys.items():
        while source not in values:
            if time.monotonic() >= deadline:
                raise _timed_out(key, [source])
            wait_ms = _wait_ms(deadline)
            got = await asyncio.to_thread(
                kvgather.get_or_none, client, key, wait_ms, process_index(), f"process {source}"
            )
            if got is None:
                await _raise_if_silent([s for s in keys if s not in values], key)
            else:
                values[source] = got
    return values


# ----------------------------------------------------------------- messages

OUTCOME = "outcome"  # an operation's last message: its keys can go once all have it
_SUCCESS = json.dumps({"ok": ""})  # encode_outcome(None): gathered as a count alone

_counters: dict[str, int] = {}
_counters_lock = threading.Lock()


def next_op(name: str) -> str:
    """A key prefix unique to the next collective operation on the checkpoint ``name``.

    ``name`` is the checkpoint's job-wide name
    (:func:`~partialstore._commit.location.job_wide_name`), the same in every
    process whatever the spelling of its path. Every process calls
    save/finalize/discard/gc on a checkpoint in the same order, so the
    per-checkpoint counter gives the same prefix everywhere.

    Example:
        >>> first = next_op("gs://bucket/doctest/step_10")
        >>> second = next_op("gs://bucket/doctest/step_10")
        >>> first.startswith("partialstore/"), int(second[-1]) - int(first[-1])
        (True, 1)
    """
    _ensure_heartbeat()
    digest = hashlib.sha256(name.encode()).hexdigest()[:24]
    with _counters_lock:
        number = _counters.get(digest, 0)
        _counters[digest] = number + 1
    return f"partialstore/{digest}/{number}"


async def _finish(op: str) -> None:
    """Count this process out of ``op``; the last one deletes the operation's keys.

    Only the non-primary processes count: the primary is done with an
    operation once it has set its outcome, so its own count would only add
    a request to its path.
    """
    try:
        done = await asyncio.to_thread(_client().key_value_increment, f"{op}/done", 1)
        if done >= process_count() - 1:
            await asyncio.to_thread(_client().key_value_delete, op)
    except Exception:  # only tidying: a leftover key harms nothing
        pass


async def broadcast(key: str, value: str | None) -> str:
    """Return the primary's ``value`` on every process (others pass ``None``).

    A key ending in ``/outcome`` is the operation's last message: the last
    non-primary process to read it deletes the operation's keys.

    It needs ``jax.distributed``; the module docstring shows the call.
    """
    if is_primary():
        if value is None:
            raise errors.InvalidInputError("The primary process must broadcast a value.")
        _ensure_heartbeat()
        await asyncio.to_thread(_client().key_value_set, key, value)
        result = value
    else:
        result = (await _await_keys({0: key}))[0]
        op, _, last = key.rpartition("/")
        if last == OUTCOME:
            await _finish(op)
    return result


async def gather_to_primary(key: str, value: str) -> list[str] | None:
    """Send ``value`` to the primary; it gets every process's value in order, others None.

    The primary's part takes the same few requests whatever the number of
    processes (:mod:`partialstore._runtime.kvgather` says how); a success
    message (``encode_outcome(None)``) travels as a count alone.

    It needs ``jax.distributed``: a step calls
    ``await gather_to_primary(f"{op}/wrote", encode_outcome(None))``.
    """
    _ensure_heartbeat()
    reporting = process_count() - 1
    if not is_primary():
        await asyncio.to_thread(
            kvgather.report, _client(), key, process_index(), reporting, value, _SUCCESS
        )
        return None
    sent = await _await_reports(key, reporting)
    return [value, *(sent.get(i, _SUCCESS) for i in range(1, reporting + 1))]


async def _await_reports(key: str, reporting: int) -> dict[int, str]:
    """The values sent by the other processes to ``key``; fail fast if one of them dies.

    Waits in short slices; after each slice that ends before every process
    has reported, the other processes' heartbeats are checked (one that has
    reported is waiting for the outcome, and beats).
    """
    client = _client()
    deadline = time.monotonic() + _timeout_s()
    others = list(range(1, reporting + 1))
    while True:
        sent = await asyncio.to_thread(
            kvgather.wait_for_reports, client, key, reporting, _wait_ms(deadline), 0
        )
        if sent is not None:
            return sent
        if time.monotonic() >= deadline:
            raise _timed_out(f"{key}.all", others)
        await _raise_if_silent(others, f"{key}.all")


async def run_on_primary(op: str | None, action: Callable[[], Awaitable[T]], where: str) -> T:
    """Run ``action`` on the primary only; every process returns or raises as it did.

    ``op`` is :func:`next_op`'s prefix, or ``None`` outside a multi-process
    job (``action`` then just runs). Results travel as JSON, so ``T`` is a
    type that comes back from ``json.loads`` as it went in (``None``, ``list[str]``).

    See the module docstring for an example.
    """
    if op is None:
        return await action()
    if not is_primary():
        sent: T = json.loads(decode_outcome(await broadcast(f"{op}/{OUTCOME}", None), where))
        return sent
    try:
        result = await action()
    except Exception as error:
        await broadcast(f"{op}/{OUTCOME}", encode_outcome(error))
        raise
    await broadcast(f"{op}/{OUTCOME}", encode_outcome(None, json.dumps(result)))
    return result


# ----------------------------------------------------------------- outcomes

_ERROR_TYPES: dict[str, type[Exception]] = {
    c.__name__: c
    for c in vars(errors).values()
    if isinstance(c, type) and issubclass(c, errors.PartialStoreError)
}
ORIGIN_ATTRIBUTE = "partialstore_origin"  # on an error rebuilt from another process's message


def _sendable_type(cls: type[BaseException]) -> str:
    """The nearest class in ``cls``'s ancestry that every process can rebuild."""
    sendable = (b for b in cls.__mro__ if _ERROR_TYPES.get(b.__name__) is b or _is_builtin(b))
    return next(sendable, errors.PartialStoreError).__name__


def _is_builtin(cls: type) -> bool:
    return cls.__module__ == "builtins" and issubclass(cls, Exception)


def encode_outcome(error: BaseException | None, result: str = "") -> str:
    """A JSON message: ``result``, or the error's origin, type and message.

    A relayed error keeps its origin: it still names the process it happened on.

    Example:
        >>> decode_outcome(encode_outcome(None, "7"), "The save")
        '7'
    """
    if error is None:
        return json.dumps({"ok": result})
    origin = getattr(error, ORIGIN_ATTRIBUTE, None)
    if origin is None:
        origin = {
            "process": process_index(),
            "type": type(error).__name__,
            "sendable": _sendable_type(type(error)),
            "message": str(error),
            "errno": getattr(error, "errno", None),
        }
    return json.dumps({"error": origin})


def decode_outcome(text: str, where: str) -> str:
    """Return the result of an outcome message, or raise the error it carries.

    The error is rebuilt as its partialstore class or its nearest built-in
    class (a ``TimeoutError`` stays a ``TimeoutError``, an ``OSError`` an
    ``OSError``), with a message naming the process it happened on.

    Example:
        >>> decode_outcome(encode_outcome(TimeoutError("deadline")), "The save")
        Traceback (most recent call last):
        TimeoutError: The save failed on process 0 of the JAX job: TimeoutError: deadline
    """
    outcome = json.loads(text)
    if "ok" in outcome:
        return str(outcome["ok"])
    raise _rebuild(outcome["error"], where)


def _rebuild(origin: dict[str, Any], where: str) -> Exception:
    message = (
        f"{where} failed on process {origin['process']} of the JAX job: "
        f"{origin['type']}: {origin['message']}"
    )
    name = str(origin.get("sendable", ""))
    found = _ERROR_TYPES.get(name) or getattr(builtins, name, None)
    cls: type[Exception] = errors.PartialStoreError
    if (
        isinstance(found, type)
        and issubclass(found, Exception)
        and (_is_builtin(found) or found in _ERROR_TYPES.values())
    ):
        cls = found
    error: Exception = errors.PartialStoreError(message)
    for base in cls.__mro__:  # UnicodeDecodeError wants five arguments: UnicodeError then
        with contextlib.suppress(Exception):
            error = base(message)
            break
    if isinstance(error, OSError):
        code: Any = origin.get("errno")  # as the other process sent it: an int or None
        error.errno = code
    setattr(error, ORIGIN_ATTRIBUTE, origin)
    return error
