"""Fault rules shared by the fault proxy and the faulty backend.

A :class:`Fault` says which HTTP requests a :class:`~partialstore.testing.faultproxy.FaultProxy`
acts on (method, regexes on the unquoted path, query and object key, a header
predicate; ``skip`` lets N matches through, ``times`` (``None``: always) is how
often it fires) and what it does (an :class:`Action` from :func:`latency`,
:func:`drop_response`, :func:`error_after`, :func:`error`, :func:`reset` or
:func:`blackhole`). Adding one to a proxy or a faulty backend returns a
:class:`Rule`, whose counters and ``wait`` / ``release`` handles a test uses.
:class:`RuleHost` holds the rules and the log for both. :func:`fault_like`
turns :class:`RequestRecord` ``i`` of a fault-free run into a fault on the same
request of a repeat.

Import these from :mod:`partialstore.testing.faultproxy`, which re-exports them.

A test adds faults to a running proxy, e.g.
``rule = proxy.add(Fault(error(503), method="PUT", times=2))`` (SlowDown
twice, then through), and checks ``rule.fired`` afterwards.

Example:
    >>> fault = Fault(error(503), method="PUT", times=2)
    >>> fault.name(), fault.action.status, fault.action.terminal
    ('error', 503, True)
"""

from __future__ import annotations

import dataclasses
import email.message
import re
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

__all__ = [
    "Action",
    "Fault",
    "RequestRecord",
    "Rule",
    "RuleHost",
    "blackhole",
    "drop_response",
    "error",
    "error_after",
    "fault_like",
    "has_header",
    "latency",
    "reset",
]


@dataclasses.dataclass(frozen=True)
class Action:
    """What a fault does; build one with :func:`latency`, :func:`error`, ..."""

    kind: str
    seconds: float = 0.0
    status: int = 0
    code: str | None = None
    retry_after: float | None = None

    @property
    def terminal(self) -> bool:
        """Whether the request's fate is decided (latency lets later rules act)."""
        return self.kind != "latency"


def latency(seconds: float) -> Action:
    """Wait ``seconds`` before forwarding; later rules still act on the request.

    Example:
        >>> latency(0.2)  # e.g. proxy.add(Fault(latency(0.2), method="GET", times=None))
        Action(kind='latency', seconds=0.2, status=0, code=None, retry_after=None)
        >>> latency(0.2).terminal
        False
    """
    return Action("latency", seconds=seconds)


def drop_response() -> Action:
    """Forward, let the server apply the request, then close the connection unanswered.

    A test adds it as
    ``proxy.add(Fault(drop_response(), method="PUT", headers=has_header("If-None-Match")))``.
    """
    return Action("drop_response")


def error_after(status: int = 503) -> Action:
    """Forward and let the server apply the request, then answer ``status`` instead.

    A test adds it as ``proxy.add(Fault(error_after(500), method="POST"))``.
    """
    return Action("error_after", status=status)


def error(status: int = 503, *, code: str | None = None, retry_after: float | None = 1) -> Action:
    """Answer ``status`` without forwarding; ``code`` overrides the S3 error code.

    ``Retry-After`` is sent on 429 and 503 (``retry_after=None``: never).

    Example:
        >>> error(503)
        Action(kind='error', seconds=0.0, status=503, code=None, retry_after=1)
    """
    return Action("error", status=status, code=code, retry_after=retry_after)


def reset() -> Action:
    """Reset the TCP connection (``SO_LINGER`` 0) before forwarding anything.

    A test adds it as ``proxy.add(Fault(reset(), method="GET", key=r"zarr\\.json$"))``.
    """
    return Action("reset")


def blackhole() -> Action:
    """Read the request and never answer; once released, close the connection unanswered.

    :class:`Rule` shows waiting for a held request and releasing it.
    """
    return Action("blackhole")


def has_header(name: str) -> Callable[[email.message.Message], bool]:
    """A ``headers`` predicate: the request carries header ``name``.

    Example:
        >>> conditional = has_header("If-None-Match")
        >>> conditional({"If-None-Match": "*"}), conditional({})
        (True, False)
    """
    return lambda headers: headers.get(name) is not None


@dataclasses.dataclass(frozen=True)
class Fault:
    """A rule: which requests (all given matchers must match) and what happens to them."""

    action: Action
    method: str | Collection[str] | None = None
    path: str | None = None
    query: str | None = None
    key: str | None = None
    headers: Callable[[email.message.Message], bool] | None = None
    skip: int = 0
    times: int | None = 1
    label: str | None = None

    def matches(self, request: RequestRecord, headers: email.message.Message) -> bool:
        """Whether ``request`` (with its full ``headers``) is one this fault is about."""
        methods = {self.method} if isinstance(self.method, str) else self.method
        if methods is not None and request.method not in {m.upper() for m in methods}:
            return False
        for pattern, text in ((self.path, request.path), (self.query, request.query)):
            if pattern is not None and re.search(pattern, text) is None:
                return False
        if self.key is not None and (request.key is None or not re.search(self.key, request.key)):
            return False
        return self.headers is None or bool(self.headers(headers))

    def name(self) -> str:
        """The label shown in logs: ``label``, else the action's kind."""
        return self.label or self.action.kind


class Rule:
    """A fault added to a proxy or backend: its counters, and handles to wait or release.

    A proxy's rules (e.g. ``proxy.add(Fault(blackhole(), method="GET"))``)
    work as a :class:`~partialstore.testing.faulty_backend.FaultyBackend`'s do.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> from partialstore import registry
        >>> from partialstore._runtime.aio import submit
        >>> from partialstore.testing.faulty_backend import BackendFault, FaultyBackend, hang
        >>> faulty = FaultyBackend(registry.open_backend(f"{tmp.name}/root"))
        >>> rule = faulty.add(BackendFault(hang(), method="read"))
        >>> future = submit(faulty.read("k"))
        >>> rule.wait(1, timeout=10)  # a call is now hanging
        True
        >>> rule.release()
        >>> future.result(timeout=10)
        Traceback (most recent call last):
        partialstore.errors.NotFoundError: ...
        >>> tmp.cleanup()
    """

    def __init__(self, fault: Any, owner: Any) -> None:
        self.fault = fault
        self.seen = 0  # matches, skipped ones included
        self.fired = 0
        self._owner = owner
        self._changed = threading.Condition()
        self.released = threading.Event()

    def claim(self) -> bool:
        """Count one match; whether the rule fires on it (caller holds the owner's lock)."""
        times = self.fault.times
        if times is not None and self.fired >= times:
            return False
        self.seen += 1
        if self.seen <= self.fault.skip:
            return False
        with self._changed:
            self.fired += 1
            self._changed.notify_all()
        return True

    def wait(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until the rule fired ``count`` times; whether it did within ``timeout``."""
        with self._changed:
            return self._changed.wait_for(lambda: self.fired >= count, timeout)

    def release(self) -> None:
        """Let requests or calls held by a blackhole or hang go."""
        self.released.set()

    def remove(self) -> None:
        """Stop matching (and release anything held)."""
        self._owner.remove(self)

    def __repr__(self) -> str:
        return f"Rule({self.fault.name()}, seen={self.seen}, fired={self.fired})"


class RuleHost:
    """Rules and a log of records, in arrival order: the base of the proxy and the backend.

    A subclass logs each request or call with :meth:`_logged` (which also
    returns the rules that fire on it) and answers queries with :meth:`_records`;
    a record needs a ``faults`` attribute and a fault needs ``matches``,
    ``name()``, ``skip``, ``times`` and ``action.terminal``.

    :class:`~partialstore.testing.faultproxy.FaultProxy` and
    :class:`~partialstore.testing.faulty_backend.FaultyBackend` are rule hosts.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> from partialstore import registry
        >>> from partialstore.testing.faulty_backend import BackendFault, FaultyBackend, before
        >>> host = FaultyBackend(registry.open_backend(f"{tmp.name}/root"))
        >>> rule = host.add(BackendFault(before(), method="write"))
        >>> host.remove(rule)
        >>> tmp.cleanup()
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._log: list[Any] = []
        self._keep_log = True

    def add(self, fault: Any) -> Rule:
        """Add ``fault`` after the existing rules; return its :class:`Rule` handle."""
        rule = Rule(fault, self)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        """Drop ``rule`` and release what it holds."""
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)
        rule.release()

    def clear(self) -> None:
        """Drop every rule, releasing what they hold."""
        with self._lock:
            rules = list(self._rules)
            self._rules.clear()
        for rule in rules:
            rule.release()

    def reset_log(self) -> None:
        """Forget the log (indexes start at 0 again)."""
        with self._lock:
            self._log.clear()

    def forget_before(self, moment: float) -> None:
        """Forget the logged records that started at or before ``moment`` (``time.monotonic()``).

        A long benchmark keeps the log small this way while later requests are
        still being logged; records without a ``started`` time are kept.
        """
        with self._lock:
            self._log = [r for r in self._log if getattr(r, "started", moment + 1) > moment]

    def _logged(self, make: Callable[[int], Any], *context: Any) -> tuple[Any, list[Rule]]:
        """Log ``make(index)``; return it and the rules that fire on it (a terminal one last)."""
        fired = []
        with self._lock:
            record = make(len(self._log))
            if self._keep_log:
                self._log.append(record)
            for rule in self._rules:
                if rule.fault.matches(record, *context) and rule.claim():
                    fired.append(rule)
                    if rule.fault.action.terminal:
                        break
        record.faults = [rule.fault.name() for rule in fired]
        return record, fired

    def _records(self, probe: Any, *context: Any) -> list[Any]:
        with self._lock:
            return [r for r in self._log if probe.matches(r, *context)]


@dataclasses.dataclass
class RequestRecord:
    """One request the proxy saw; ``status`` etc. are filled in when it ends.

    ``key`` is the object key (S3 path-style ``/bucket/key``; GCS ``/b/B/o/NAME``,
    the ``name`` query parameter or a multipart upload's metadata) or the
    ``prefix`` of a listing; ``status`` is what the client got (``None``: no
    answer), ``upstream_status`` what the server said (``None``: not forwarded).
    """

    index: int
    method: str
    path: str
    query: str
    flavor: str
    bucket: str | None
    key: str | None
    headers: dict[str, str]
    body_size: int
    client: str
    faults: list[str] = dataclasses.field(default_factory=list)
    status: int | None = None
    upstream_status: int | None = None
    outcome: str = "pending"
    started: float = 0.0
    duration: float | None = None


_RANDOM_ID = re.compile(r"[0-9a-f]{32}")
_CONDITIONS = ("If-None-Match", "If-Match", "Range")


def _conditions(headers: Mapping[str, str] | email.message.Message) -> list[bool]:
    return [headers.get(name, headers.get(name.lower())) is not None for name in _CONDITIONS]


def fault_like(
    records: Sequence[RequestRecord],
    index: int,
    action: Action,
    *,
    substitute: Mapping[str, str] | None = None,
) -> Fault:
    """A fault on the request that plays ``records[index]``'s part when the run is repeated.

    It matches the method, the path and key with 32-hex-digit ids (save ids,
    TensorStore's tokens) generalised and each ``substitute`` pair replaced (old
    text -> text of the repeat, e.g. the checkpoint name), and whether
    ``If-None-Match``, ``If-Match`` and ``Range`` are present; it skips as many
    earlier matches as ``records`` had. Concurrent requests (array chunks) may
    trade places between runs.

    It needs the requests a proxy logged, so it has no doctest: a test saves
    to ``ck0``, then for each logged request ``i`` adds
    ``fault_like(seen, i, drop_response(), substitute={"/ck0/": f"/ck{i + 1}/"})``
    and repeats the save to ``ck{i + 1}`` (``tests/test_fault_matrix.py``).
    """
    target, flags = records[index], _conditions(records[index].headers)

    def pattern(text: str | None, replace: Mapping[str, str]) -> str | None:
        if text is None:
            return None
        for old, new in replace.items():
            text = text.replace(old, new)
        return "^" + _RANDOM_ID.sub("[0-9a-f]{32}", re.escape(text)) + "$"

    def build(replace: Mapping[str, str]) -> Fault:
        return Fault(
            action,
            method=target.method,
            path=pattern(target.path, replace),
            key=pattern(target.key, replace),
            headers=lambda headers: _conditions(headers) == flags,
            label=f"like #{index} {target.method} {target.key or target.path}",
        )

    earlier = build({})
    skip = sum(earlier.matches(r, _as_message(r.headers)) for r in records[:index])
    return dataclasses.replace(build(substitute or {}), skip=skip)


def _as_message(headers: Mapping[str, str]) -> email.message.Message:
    message = email.message.Message()
    for name, value in headers.items():
        message[name] = value
    return message
