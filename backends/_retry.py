"""Bounded retries for the object-store backends: one loop, one deadline per backend call.

Every S3 and GCS backend call runs through :func:`run_bounded`. The clients
below it are configured not to retry on their own (botocore makes one
attempt, s3fs's and gcsfs's retry loops are bypassed, TensorStore's requests
for the log retry once), so a failure is retried in exactly one place:

- transient failures (HTTP 5xx, 429 / SlowDown, connection resets,
  timeouts) are retried with exponential backoff and full jitter: before
  retry ``n`` the call sleeps ``uniform(0, min(max_delay, base_delay * 2**n))``;
- at most :attr:`RetryPolicy.retries` retries, and never past
  :attr:`RetryPolicy.deadline` seconds after the call started: an attempt
  still running at the deadline is cancelled;
- an endpoint that cannot be reached at all (DNS failure, connection
  refused, connect timeout) and has never answered this process fails at
  once with a message naming the endpoint: retrying a typo does not help.
  Once it has answered, the same errors count as transient (a restart);
- permanent failures (no credentials, access denied, no such bucket,
  preconditions) are raised at once.

When the retries or the deadline run out, a read-only call raises
:class:`~partialstore.errors.TransientBackendError`. A mutating call
(create, write, delete) raises
:class:`~partialstore.errors.OutcomeUnknownError` when one of its attempts
may have been applied (a timeout or reset after the request went out, HTTP
500/502/504), and :class:`TransientBackendError` when none was (every
attempt refused: 503, 429, connection refused). Likewise a create or
conditional write that meets "already exists" / "version changed" after
such an attempt raises :class:`OutcomeUnknownError`, since the object may
be its own earlier attempt.

Example:
    >>> from partialstore._runtime.aio import run
    >>> call = Call("read", "s3://b/k", False, "http://127.0.0.1:9000",
    ...             reached=lambda: True, mark_reached=lambda: None, hint="")
    >>> async def attempt(state: Attempt) -> bytes:
    ...     if state.number == 0:
    ...         raise ConnectionResetError("reset")  # transient: retried
    ...     return b"data"
    >>> policy = RetryPolicy(deadline=5.0, retries=2, base_delay=0.01)
    >>> run(run_bounded(policy, call, attempt, classify=lambda err: Kind.REJECTED))
    b'data'
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from partialstore import observe
from partialstore.errors import (
    AlreadyExistsError,
    BackendError,
    ConflictError,
    OutcomeUnknownError,
    PartialStoreError,
    TransientBackendError,
)

__all__ = [
    "Attempt",
    "Call",
    "Kind",
    "RetryPolicy",
    "causes",
    "http_kind",
    "note_failure",
    "run_bounded",
    "transport_kind",
]

T = TypeVar("T")

#: Default ``deadline`` (seconds) of one backend call.
DEFAULT_DEADLINE = 90.0
#: Default ``retries`` of one backend call.
DEFAULT_RETRIES = 10
_BASE_DELAY = 0.25
_MAX_DELAY = 16.0


class Kind(enum.Enum):
    """What a failed attempt tells the retry loop."""

    PERMANENT = "permanent"  # raise now
    UNREACHABLE = "unreachable"  # nothing was sent: DNS, refused, connect timeout
    REJECTED = "rejected"  # answered and not applied: 503, 429, SlowDown
    AMBIGUOUS = "ambiguous"  # may have been applied: timeouts, resets, 500/502/504


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long and how often one backend call may retry.

    Attributes:
      deadline: seconds after which a call gives up (its running attempt is
        cancelled).
      retries: retries after the first attempt.
      base_delay, max_delay: the backoff's first ceiling and its cap, seconds.

    Example:
        >>> RetryPolicy(deadline=10.0, retries=3).worst_case_backoff()
        1.75
    """

    deadline: float = DEFAULT_DEADLINE
    retries: int = DEFAULT_RETRIES
    base_delay: float = _BASE_DELAY
    max_delay: float = _MAX_DELAY

    def ceiling(self, retry: int) -> float:
        """The longest sleep before retry number ``retry`` (0-based)."""
        return min(self.max_delay, self.base_delay * 2.0 ** min(retry, 60))

    def delay(self, retry: int) -> float:
        """A full-jitter sleep before retry number ``retry``."""
        return random.uniform(0.0, self.ceiling(retry))

    def worst_case_backoff(self) -> float:
        """The most a call can sleep between attempts, all retries taken."""
        return sum(self.ceiling(n) for n in range(self.retries))

    def tensorstore_retries(self) -> dict[str, Any]:
        """TensorStore ``*_request_retries`` resource whose backoff fits in the deadline.

        TensorStore sleeps ``min(max_delay, initial * 2**n + U(0, min(1 s,
        initial)))`` before retry ``n``; the retry count is lowered (to its
        minimum of 1) until the sum of the longest sleeps fits in ``deadline``.

        Example:
            >>> import tensorstore as ts
            >>> retries = RetryPolicy(deadline=10.0, retries=3).tensorstore_retries()
            >>> retries["max_retries"]
            3
            >>> context = ts.Context({"s3_request_retries": retries})
        """
        initial = min(self.base_delay, self.deadline / 4)
        jitter = min(1.0, initial)

        def worst(count: int) -> float:
            return sum(min(self.max_delay, initial * 2.0**n + jitter) for n in range(count))

        count = max(1, self.retries)
        while count > 1 and worst(count) > self.deadline:
            count -= 1
        return {
            "max_retries": count,
            "initial_delay": f"{initial:.3f}s",
            "max_delay": f"{max(self.max_delay, initial):.3f}s",
        }


def causes(err: BaseException) -> Iterator[BaseException]:
    """``err``, then what caused it: ``__cause__``/``__context__`` and botocore's ``error``.

    Example:
        >>> import socket
        >>> try:
        ...     try:
        ...         raise socket.gaierror("no such host")
        ...     except OSError as inner:
        ...         raise ConnectionError("connect failed") from inner
        ... except ConnectionError as err:
        ...     found = any(isinstance(c, socket.gaierror) for c in causes(err))
        >>> found
        True
    """
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        current = todo.pop(0)
        if id(current) in seen or len(seen) > 20:
            continue
        seen.add(id(current))
        yield current
        inner = (getattr(current, "kwargs", None) or {}).get("error")
        os_error = getattr(current, "os_error", None)  # aiohttp's connector errors
        for nxt in (inner, os_error, current.__cause__, current.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


_CURL_CODE = re.compile(r"curl_code='(\d+)'")
_TS_HTTP = re.compile(r"http_response_code='(\d+)'")


def transport_kind(err: BaseException) -> Kind | None:
    """Classify a transport-level failure anywhere in ``err``'s causes, or None.

    Covers aiohttp, botocore, requests, sockets and TensorStore's curl
    errors; HTTP answers are left to the service (they carry codes).

    Example:
        >>> transport_kind(ConnectionRefusedError())
        <Kind.UNREACHABLE: 'unreachable'>
    """
    import aiohttp
    import botocore.exceptions as boto

    for cause in causes(err):
        if isinstance(cause, aiohttp.ClientSSLError):
            return Kind.PERMANENT  # a certificate problem does not heal on retry
        if isinstance(cause, aiohttp.ClientConnectorError | socket.gaierror):
            return Kind.UNREACHABLE
        # aiohttp >= 3.10 tells connect timeouts apart from read timeouts.
        connect_timeout = getattr(aiohttp, "ConnectionTimeoutError", boto.ConnectTimeoutError)
        if isinstance(cause, boto.ConnectTimeoutError | connect_timeout):
            return Kind.UNREACHABLE
        if isinstance(cause, ConnectionRefusedError):
            return Kind.UNREACHABLE
        text = str(cause)
        curl = _CURL_CODE.search(text)
        if curl:
            # 6: host not resolved, 7: could not connect; the rest (timeouts,
            # resets, 28, 52, 55, 56) may have reached the server.
            return Kind.UNREACHABLE if curl.group(1) in ("6", "7") else Kind.AMBIGUOUS
        status = _TS_HTTP.search(text)
        if status:
            return http_kind(int(status.group(1)))
    for cause in causes(err):
        if isinstance(
            cause,
            TimeoutError
            | ConnectionError
            | aiohttp.ClientError
            | boto.HTTPClientError
            | boto.ConnectionError,
        ):
            return Kind.AMBIGUOUS
    return None


def http_kind(status: int | None) -> Kind | None:
    """What an HTTP status says about a request, or None if it is not a retry matter.

    Example:
        >>> http_kind(503), http_kind(500), http_kind(404)
        (<Kind.REJECTED: 'rejected'>, <Kind.AMBIGUOUS: 'ambiguous'>, None)
    """
    if status in (429, 503):
        return Kind.REJECTED  # the server declined the request without applying it
    if status is not None and (status >= 500 or status == 408):
        return Kind.AMBIGUOUS
    return None


@dataclasses.dataclass
class Attempt:
    """What one backend call learned across its attempts (handed to every attempt).

    Attributes:
      number: 0 for the first attempt.
      maybe_applied: an earlier attempt of this mutating call may have landed.
      skip_fast: TensorStore's request path failed once in this call; use the
        service's own client from now on.
    """

    number: int = 0
    maybe_applied: bool = False
    skip_fast: bool = False


@dataclasses.dataclass
class Call:
    """One backend call for :func:`run_bounded`.

    Attributes:
      action: a verb phrase for messages ("read", "create").
      where: the object or prefix, as a URL.
      mutating: whether the call changes the store (create, write, delete).
      endpoint: the service's endpoint, for messages.
      reached: returns whether the endpoint has answered in this process.
      mark_reached: records that it answered.
      hint: what to check when the endpoint cannot be reached.
    """

    action: str
    where: str
    mutating: bool
    endpoint: str
    reached: Callable[[], bool]
    mark_reached: Callable[[], None]
    hint: str


def _status_of(err: BaseException) -> int | None:
    """An HTTP status carried anywhere in ``err``'s causes (gcsfs, aiohttp, botocore)."""
    for cause in causes(err):
        response = getattr(cause, "response", None)
        if isinstance(response, dict):  # botocore's ClientError
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        else:
            status = getattr(cause, "code", None) or getattr(cause, "status", None)
        if isinstance(status, int) and 100 <= status < 600:
            return status
    return None


def _detail(err: BaseException) -> str:
    root = err.__cause__ if isinstance(err, PartialStoreError) and err.__cause__ else err
    text = f"{type(root).__name__}: {str(root).strip().replace(chr(10), ' ')[:300]}"
    status = _status_of(root)
    return f"HTTP {status} ({text})" if status else text


def _why_unreachable(err: BaseException) -> str:
    import aiohttp
    import botocore.exceptions as boto

    found = list(causes(err))
    dns_error = getattr(aiohttp, "ClientConnectorDNSError", socket.gaierror)  # aiohttp >= 3.10
    if any(isinstance(c, socket.gaierror | dns_error) or "curl_code='6'" in str(c) for c in found):
        return "its host name does not resolve (DNS)"
    if any(isinstance(c, ConnectionRefusedError) or "curl_code='7'" in str(c) for c in found):
        return "the connection was refused"
    if any(isinstance(c, TimeoutError | boto.ConnectTimeoutError) for c in found):
        return "connecting timed out"
    return "the connection failed"


def _unreachable(call: Call, err: BaseException) -> BackendError:
    why = _why_unreachable(err)
    return BackendError(
        f"Cannot {call.action} {call.where}: the endpoint {call.endpoint} cannot be reached: "
        f"{why} ({_detail(err)}). Check {call.hint}."
    )


def _exhausted(
    call: Call,
    state: Attempt,
    started: float,
    err: BaseException,
    policy: RetryPolicy,
    *,
    cut_off: bool = False,
) -> BackendError:
    elapsed = time.monotonic() - started
    last = "no answer before the deadline" if cut_off else f"last error: {_detail(err)}"
    summary = (
        f"{call.action.capitalize()} {call.where} at {call.endpoint} gave up after "
        f"{state.number + 1} attempt(s) in {elapsed:.1f} s (storage options "
        f"deadline={policy.deadline:g} s, retries={policy.retries}); {last}."
    )
    if call.mutating and state.maybe_applied:
        return OutcomeUnknownError(
            f"{summary} The change may or may not have been applied: look at the store or "
            "repeat the operation once it answers again."
        )
    done = " Nothing was changed." if call.mutating else ""
    return TransientBackendError(
        f"{summary}{done} The service is failing or overloaded; retry later, or raise "
        "storage_options 'deadline' / 'retries'."
    )


def note_failure(state: Attempt, kind: Kind, mutating: bool) -> None:
    """Record in ``state`` that a request of a mutating call failed as ``kind``.

    Example:
        >>> state = Attempt()
        >>> note_failure(state, Kind.AMBIGUOUS, mutating=True)
        >>> state.maybe_applied
        True
    """
    if mutating and kind is Kind.AMBIGUOUS:
        state.maybe_applied = True


def _settle(call: Call, state: Attempt, err: Exception, kind: Kind) -> None:
    """Raise what a failed attempt ends in, or return when it may be retried."""
    if kind is Kind.PERMANENT:
        if state.maybe_applied and isinstance(err, AlreadyExistsError | ConflictError):
            raise OutcomeUnknownError(
                f"{call.action.capitalize()} {call.where}: an earlier attempt failed in a way "
                f"that may have applied it, and the store now reports {type(err).__name__} "
                f"({err}). The object may be this call's own write: look at the store before "
                "repeating."
            ) from err
        raise err
    if kind is Kind.UNREACHABLE and not call.reached():
        raise _unreachable(call, err) from err
    if kind is not Kind.UNREACHABLE:
        call.mark_reached()  # it answered, or accepted the connection
    note_failure(state, kind, call.mutating)


async def run_bounded(
    policy: RetryPolicy,
    call: Call,
    attempt: Callable[[Attempt], Awaitable[T]],
    *,
    classify: Callable[[BaseException], Kind],
) -> T:
    """``await attempt(state)`` until it succeeds, fails for good, or the policy runs out.

    ``classify`` says what a failure means (:class:`Kind`); ``attempt``
    raises partialstore's own errors for answers such as "not found".

    See the module docstring for an example.
    """
    state = Attempt()
    started = time.monotonic()
    stop_at = started + policy.deadline
    while True:
        limit = asyncio.timeout(max(0.0, stop_at - time.monotonic()))
        observe.count_request()
        try:
            async with limit:
                result = await attempt(state)
        except Exception as err:
            failure = err
            if limit.expired():
                # Cancelled in flight: a mutating request may have gone out.
                state.maybe_applied = state.maybe_applied or call.mutating
                raise _exhausted(call, state, started, err, policy, cut_off=True) from err
            _settle(call, state, err, classify(err))
        else:
            call.mark_reached()
            return result
        pause = policy.delay(state.number)
        if state.number >= policy.retries or time.monotonic() + pause >= stop_at:
            raise _exhausted(call, state, started, failure, policy) from failure
        await asyncio.sleep(pause)
        observe.count_retry()
        state.number += 1
