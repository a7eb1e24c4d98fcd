"""An HTTP proxy on 127.0.0.1 that loses, fails, delays or hangs chosen requests.

:class:`FaultProxy` forwards requests to the moto S3 server or fake-gcs-server
(:mod:`partialstore.testing.servers`) unless a :class:`Fault` matches: by
method, regexes on the unquoted path, query and object key, and a header
predicate; ``skip`` lets N matches through, ``times`` (``None``: always) is
how often it fires. Actions: :func:`latency`, :func:`drop_response` (the
server applies it, the client gets no answer), :func:`error_after`,
:func:`error` (S3 XML / GCS JSON body, ``Retry-After``), :func:`reset` and
:func:`blackhole` (held until :meth:`Rule.release`, ``clear`` or ``stop``).
``rtt`` and ``bandwidth`` add a network profile for benchmarks. Requests are
logged in arrival order; :func:`fault_like` turns record ``i`` of a
fault-free run into a fault on the same request of a repeat.

Wiring: ``proxy.storage_options(server)`` puts the proxy in ``endpoint_url``.
On S3 s3fs and TensorStore both follow it (the backend copies it into its
kvstore spec). On GCS gcsfs follows it, but TensorStore's ``gcs`` driver only
reads ``TENSORSTORE_GCS_HTTP_URL``, each time a driver is opened (an open
driver, cached per TensorStore context and spec, keeps its URL), and the
backend gives TensorStore a spec only when that variable equals its
endpoint. So within ``with proxy.patched_env(server):`` GCS array bytes go
through TensorStore and the proxy; outside it, through gcsfs and the proxy.

Example::

    with FaultProxy(moto_server.endpoint_url) as proxy:
        backend = registry.open_backend("s3://b/root", proxy.storage_options(moto_server))
        rule = proxy.add(Fault(drop_response(), method="PUT", key=r"log/00000001\\.json$"))
        with contextlib.suppress(FileExistsError):  # the retry finds its own object
            run(backend.create("log/00000001.json", b"{}"))
        assert rule.fired == 1 and run(backend.exists("log/00000001.json"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.message
import http.client
import json
import os
import re
import select
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from partialstore.errors import InvalidInputError

__all__ = [
    "Action",
    "Fault",
    "FaultProxy",
    "RequestRecord",
    "Rule",
    "blackhole",
    "drop_response",
    "error",
    "error_after",
    "fault_like",
    "has_header",
    "latency",
    "reset",
]

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding"}
    | {"upgrade", "expect", "content-length"}
)
_LOGGED_HEADERS = ("range", "if-none-match", "if-match", "content-type", "user-agent")
_GCS_PREFIXES = ("/storage/v1/", "/upload/storage/", "/download/storage/", "/batch/storage/")
_S3_CODES = {500: "InternalError", 503: "SlowDown", 429: "SlowDown", 502: "BadGateway"}
_GCS_REASONS = {429: "rateLimitExceeded", 503: "backendError", 500: "backendError"}
_BLOCK = 1 << 16
_UPSTREAM_TIMEOUT_S = 300.0
_JOIN_TIMEOUT_S = 5.0


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

    Example::

        proxy.add(Fault(latency(0.2), method="GET", times=None))
    """
    return Action("latency", seconds=seconds)


def drop_response() -> Action:
    """Forward, let the server apply the request, then close the connection unanswered.

    Example::

        proxy.add(Fault(drop_response(), method="PUT", headers=has_header("If-None-Match")))
    """
    return Action("drop_response")


def error_after(status: int = 503) -> Action:
    """Forward and let the server apply the request, then answer ``status`` instead.

    Example::

        proxy.add(Fault(error_after(500), method="POST"))
    """
    return Action("error_after", status=status)


def error(status: int = 503, *, code: str | None = None, retry_after: float | None = 1) -> Action:
    """Answer ``status`` without forwarding; ``code`` overrides the S3 error code.

    ``Retry-After`` is sent on 429 and 503 (``retry_after=None``: never).

    Example::

        Fault(error(503), method="PUT", times=2)  # SlowDown twice, then through
    """
    return Action("error", status=status, code=code, retry_after=retry_after)


def reset() -> Action:
    """Reset the TCP connection (``SO_LINGER`` 0) before forwarding anything.

    Example::

        proxy.add(Fault(reset(), method="GET", key=r"zarr\\.json$"))
    """
    return Action("reset")


def blackhole() -> Action:
    """Read the request and never answer; once released, close the connection unanswered.

    Example::

        rule = proxy.add(Fault(blackhole(), method="GET"))
        ...
        rule.release()
    """
    return Action("blackhole")


def has_header(name: str) -> Callable[[email.message.Message], bool]:
    """A ``headers`` predicate: the request carries header ``name``.

    Example::

        Fault(drop_response(), method="PUT", headers=has_header("If-None-Match"))
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

    Example::

        rule = proxy.add(Fault(blackhole(), method="GET"))
        assert rule.wait(1, timeout=10)   # a request is now hanging
        rule.release()
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


class _RuleHost:
    """Rules and a log of records, in arrival order (the proxy's and the backend's)."""

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


def _s3_target(path: str, query: dict[str, list[str]]) -> tuple[str | None, str | None]:
    parts = path.lstrip("/").split("/", 1)
    if not parts[0]:
        return None, None
    key = parts[1] if len(parts) > 1 and parts[1] else None
    return parts[0], key or query.get("prefix", [None])[0]


def _gcs_target(path: str, query: dict[str, list[str]], body: bytes, ctype: str) -> Any:
    match = re.search(r"/b/([^/]+)(?:/o(?:/(.+))?)?$", path)
    if match is None:
        return None, None
    key = match.group(2) or query.get("name", [None])[0] or query.get("prefix", [None])[0]
    if key is None and "multipart" in ctype:  # the first part is the object's JSON metadata
        start = body.find(b"{")
        with contextlib.suppress(ValueError, AttributeError):
            key = json.JSONDecoder().raw_decode(body[start:].decode())[0].get("name")
    return match.group(1), key


def _client_of(agent: str) -> str:
    lowered = agent.lower()
    for name in ("tensorstore", "botocore", "gcsfs", "curl"):
        if name in lowered:
            return "tensorstore" if name == "curl" else name
    return agent.split("/")[0] or "unknown"


def _error_body(flavor: str, action: Action, request: RequestRecord) -> bytes:
    if request.method == "HEAD":
        return b""
    status = action.status
    if flavor == "gcs":
        reason = _GCS_REASONS.get(status, "backendError")
        message = f"Injected by FaultProxy: HTTP {status}."
        errors = [{"domain": "global", "reason": reason, "message": message}]
        return json.dumps(
            {"error": {"code": status, "message": message, "errors": errors}}
        ).encode()
    code = action.code or _S3_CODES.get(status, "ServiceUnavailable")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>'
        f"{code}</Code><Message>Injected by FaultProxy: HTTP {status}.</Message>"
        f"<Resource>{request.path}</Resource><RequestId>faultproxy-{request.index}</RequestId>"
        "</Error>"
    ).encode()


class _Pacer:
    """One shared link of ``bandwidth`` bytes/s: transfers queue for their time slots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_free = 0.0

    def pace(self, nbytes: int, bandwidth: float | None, stop: threading.Event) -> None:
        if not bandwidth or nbytes <= 0:
            return
        with self._lock:
            start = max(time.monotonic(), self._next_free)
            self._next_free = start + nbytes / bandwidth
            done_at = self._next_free
        stop.wait(max(0.0, done_at - time.monotonic()))


class _Conn:
    """One client connection and its own upstream connection (both keep-alive)."""

    def __init__(self, sock: socket.socket, upstream: tuple[str, int]) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=_BLOCK)
        self.upstream_addr = upstream
        self.upstream: http.client.HTTPConnection | None = None

    def forward(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> http.client.HTTPResponse:
        conn = self.upstream
        # A pooled connection the server closed while idle reads as EOF: reconnect
        # now rather than risk a request that was sent but never seen.
        if conn is not None and conn.sock is not None and select.select([conn.sock], [], [], 0)[0]:
            self.close_upstream()
        if self.upstream is None:
            self.upstream = http.client.HTTPConnection(
                *self.upstream_addr, timeout=_UPSTREAM_TIMEOUT_S
            )
        conn = self.upstream
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(body)
        return conn.getresponse()

    def close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def interrupt(self) -> None:
        """Wake the serving thread from any blocking read (from another thread)."""
        for sock in (self.sock, self.upstream.sock if self.upstream else None):
            with contextlib.suppress(OSError, AttributeError):
                sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]

    def close(self, rst: bool = False) -> None:
        """Close both sides; ``rst`` resets the client connection instead of a clean FIN."""
        self.close_upstream()
        with contextlib.suppress(OSError):
            if rst:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.rfile.close()
        self.sock.close()  # idempotent


def _read_request(rfile: Any, sock: socket.socket) -> tuple[str, str, str, Any, bytes] | None:
    """One request (method, target, version, headers, body), or None at end of stream."""
    line = rfile.readline(65537)
    while line in (b"\r\n", b"\n"):
        line = rfile.readline(65537)
    if not line:
        return None
    method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers = http.client.parse_headers(rfile)
    if (headers.get("Expect") or "").lower() == "100-continue":
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        chunks = []
        while size := int(rfile.readline(1024).split(b";")[0].strip() or b"0", 16):
            chunks.append(rfile.read(size))
            rfile.readline(1024)
        while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        body = b"".join(chunks)
    else:
        body = rfile.read(int(headers.get("Content-Length") or 0))
    return method.upper(), target, version, headers, body


class FaultProxy(_RuleHost):
    """A threaded HTTP/1.1 proxy on a free port of 127.0.0.1 in front of ``upstream_url``.

    Args:
      upstream_url: the server, e.g. ``moto_server.endpoint_url``.
      rtt: seconds added to every request (a network round trip).
      bandwidth: bytes/s shared by every transfer through the proxy (``None``: no cap).
      flavor: ``"s3"`` or ``"gcs"`` error bodies; by default GCS for ``/storage/v1/...``
        style paths and S3 otherwise.
      log: keep a :class:`RequestRecord` of every request (off for long benchmarks).

    Example::

        with FaultProxy(gcs_server.endpoint_url) as proxy:
            proxy.add(Fault(error(503), method="POST", times=2))
            backend = registry.open_backend("gs://b/root", proxy.storage_options(gcs_server))
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        rtt: float = 0.0,
        bandwidth: float | None = None,
        flavor: str | None = None,
        log: bool = True,
    ) -> None:
        super().__init__()
        self._keep_log = log
        parsed = urllib.parse.urlsplit(upstream_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise InvalidInputError(
                f"FaultProxy needs an http://host:port upstream, got {upstream_url!r}."
            )
        self.upstream_url = upstream_url.rstrip("/")
        self._upstream = (parsed.hostname, parsed.port or 80)
        self.rtt = rtt
        self.bandwidth = bandwidth
        self.flavor = flavor
        self.endpoint_url = ""
        self._conns: dict[_Conn, threading.Thread] = {}
        self._stop = threading.Event()
        self._pacer = _Pacer()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> Self:
        """Listen on a free port; ``endpoint_url`` is then ``http://127.0.0.1:PORT``."""
        if self._listener is not None:
            return self
        self._stop.clear()
        listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        listener.settimeout(0.1)  # the accept loop notices stop() within this
        self._listener = listener
        self.endpoint_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self._acceptor = threading.Thread(
            target=self._accept_loop, args=(listener,), name="faultproxy-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close every connection, release blackholes, and join threads (bounded; idempotent)."""
        self._stop.set()
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        if self._acceptor is not None:
            self._acceptor.join(_JOIN_TIMEOUT_S)
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns = list(self._conns.items())
        for conn, _ in conns:
            conn.interrupt()  # the serving thread sees EOF and closes its side
        for _, thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FaultProxy({self.endpoint_url or '<stopped>'} -> {self.upstream_url})"

    # -- log and wiring -----------------------------------------------------------

    def requests(
        self, method: str | Collection[str] | None = None, key: str | None = None
    ) -> list[RequestRecord]:
        """The logged requests in arrival order, optionally only ``method``(s) / key regex ``key``.

        Example::

            uploads = proxy.requests(("PUT", "POST"), key=r"/log/")
        """
        return self._records(Fault(Action("log"), method=method, key=key), _NO_HEADERS)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every logged request is finished (``duration`` set); whether it was.

        A client may see its answer a moment before the proxy's thread logs the end.

        Example::

            assert proxy.wait_idle() and all(r.duration < 5 for r in proxy.requests())
        """
        deadline = time.monotonic() + timeout
        while any(r.duration is None for r in self.requests()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _check_server(self, server: Any) -> None:
        if str(server.endpoint_url).rstrip("/") != self.upstream_url:
            raise InvalidInputError(
                f"{server!r} is not this proxy's upstream ({self.upstream_url}); "
                "build the FaultProxy with server.endpoint_url."
            )

    def storage_options(self, server: Any) -> dict[str, Any]:
        """``server.storage_options()`` with the proxy as ``endpoint_url``.

        Example::

            partialstore.save(url, tree, storage_options=proxy.storage_options(moto_server))
        """
        self._check_server(server)
        return {**server.storage_options(), "endpoint_url": self.endpoint_url}

    def env(self, server: Any) -> dict[str, str]:
        """``server.env()`` with every variable naming the server naming the proxy instead."""
        self._check_server(server)
        return {
            name: self.endpoint_url if value.rstrip("/") == self.upstream_url else value
            for name, value in server.env().items()
        }

    @contextlib.contextmanager
    def patched_env(self, server: Any) -> Iterator[None]:
        """Export :meth:`env` into ``os.environ`` for the block, then restore it.

        Needed for TensorStore's GCS driver, which reads ``TENSORSTORE_GCS_HTTP_URL``
        whenever a driver is opened (see the module docstring).

        Example::

            with proxy.patched_env(gcs_server):
                partialstore.save(url, tree, storage_options=proxy.storage_options(gcs_server))
        """
        values = self.env(server)
        previous = {name: os.environ.get(name) for name in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    # -- serving ------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, self._upstream)
            thread = threading.Thread(
                target=self._serve, args=(conn,), name="faultproxy-conn", daemon=True
            )
            with self._lock:
                self._conns[conn] = thread
            thread.start()

    def _serve(self, conn: _Conn) -> None:
        try:
            while not self._stop.is_set():
                request = _read_request(conn.rfile, conn.sock)
                if request is None or not self._handle(conn, *request):
                    break
        except (OSError, ValueError, http.client.HTTPException):
            pass  # the client went away, or stop() shut the socket
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    def _record(self, method: str, target: str, headers: Any, body: bytes) -> Any:
        split = urllib.parse.urlsplit(target)
        path = urllib.parse.unquote(split.path)
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        flavor = self.flavor or ("gcs" if split.path.startswith(_GCS_PREFIXES) else "s3")
        if flavor == "gcs":
            bucket, key = _gcs_target(path, query, body, headers.get("Content-Type") or "")
        else:
            bucket, key = _s3_target(path, query)
        logged = {name: str(headers[name]) for name in _LOGGED_HEADERS if name in headers}
        client = _client_of(logged.get("user-agent", ""))
        started = time.monotonic()
        return self._logged(
            lambda index: RequestRecord(
                index,
                method,
                path,
                urllib.parse.unquote(split.query),
                flavor,
                bucket,
                key,
                logged,
                len(body),
                client,
                started=started,
            ),
            headers,
        )

    def _handle(
        self, conn: _Conn, method: str, target: str, version: str, headers: Any, body: bytes
    ) -> bool:
        """Serve one request; whether the client connection stays open."""
        record, fired = self._record(method, target, headers, body)
        try:
            for rule in fired:
                if rule.fault.action.kind == "latency":
                    self._stop.wait(rule.fault.action.seconds)
            terminal = fired[-1] if fired and fired[-1].fault.action.terminal else None
            if self.rtt:
                self._stop.wait(self.rtt)
            keep = (headers.get("Connection") or "").lower() != "close" and version != "HTTP/1.0"
            return self._act(conn, record, terminal, (method, target, headers, body)) and keep
        finally:
            record.duration = time.monotonic() - record.started

    def _act(self, conn: _Conn, record: RequestRecord, rule: Rule | None, request: Any) -> bool:
        method, target, headers, body = request
        kind = rule.fault.action.kind if rule is not None else "forward"
        if kind == "reset":
            record.outcome = "reset"
            conn.close(rst=True)
            return False
        if kind == "blackhole":
            assert rule is not None
            record.outcome = "blackholed"
            while not (rule.released.wait(0.05) or self._stop.is_set()):
                pass
            conn.close()
            return False
        if kind == "error":
            assert rule is not None
            return self._send_error(conn, record, rule.fault.action)
        self._pacer.pace(len(body), self.bandwidth, self._stop)
        forwarded = [(k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP]
        if body or "Content-Length" in headers or "Transfer-Encoding" in headers:
            forwarded.append(("Content-Length", str(len(body))))
        try:
            response = conn.forward(method, target, forwarded, body)
        except (OSError, http.client.HTTPException):
            conn.close_upstream()
            return self._send_error(conn, record, error(502, code="BadGateway"), "upstream_error")
        record.upstream_status = response.status
        if kind == "drop_response":
            response.read()
            record.outcome = "dropped"
            conn.close()
            return False
        if kind == "error_after":
            response.read()
            assert rule is not None
            return self._send_error(conn, record, rule.fault.action)
        self._relay(conn, record, method, response)
        return True

    def _send_error(
        self, conn: _Conn, record: RequestRecord, action: Action, outcome: str = "error"
    ) -> bool:
        body = _error_body(record.flavor, action, record)
        ctype = "application/json" if record.flavor == "gcs" else "application/xml"
        head = [("Content-Type", ctype), ("Content-Length", str(len(body)))]
        if action.retry_after is not None and action.status in (429, 503):
            head.append(("Retry-After", f"{action.retry_after:g}"))
        record.status, record.outcome = action.status, outcome
        self._write_head(conn, action.status, head)
        conn.sock.sendall(body)
        return True

    def _write_head(self, conn: _Conn, status: int, headers: Sequence[tuple[str, str]]) -> None:
        reason = http.client.responses.get(status, "Status")
        lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
        conn.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _relay(
        self, conn: _Conn, record: RequestRecord, method: str, response: http.client.HTTPResponse
    ) -> None:
        status = response.status
        record.status, record.outcome = status, "forwarded"
        headers = []
        for name, value in response.getheaders():
            if name.lower() == "location" and value.startswith(self.upstream_url):
                value = self.endpoint_url + value[len(self.upstream_url) :]
            if name.lower() not in _HOP_BY_HOP:
                headers.append((name, value))
        if method == "HEAD" or status in (204, 304) or status < 200:
            length = response.getheader("Content-Length")
            if method == "HEAD" and length is not None:
                headers.append(("Content-Length", length))  # the object's size
            response.read()
            self._write_head(conn, status, headers)
        elif response.chunked or response.length is None:
            data = response.read()
            self._write_head(conn, status, [*headers, ("Content-Length", str(len(data)))])
            self._pacer.pace(len(data), self.bandwidth, self._stop)
            conn.sock.sendall(data)
        else:
            self._write_head(conn, status, [*headers, ("Content-Length", str(response.length))])
            while block := response.read(_BLOCK):
                self._pacer.pace(len(block), self.bandwidth, self._stop)
                conn.sock.sendall(block)


_NO_HEADERS = email.message.Message()
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

    Example::

        proxy.reset_log(); partialstore.save(f"{url}/ck0", tree, storage_options=opts)
        seen = proxy.requests()
        for i in range(len(seen)):
            proxy.add(fault_like(seen, i, drop_response(), substitute={"/ck0/": f"/ck{i + 1}/"}))
            ...  # save to f"{url}/ck{i + 1}", check the promise, proxy.clear()
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
