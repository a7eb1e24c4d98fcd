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

A proxy needs a running S3 or GCS emulator behind it, so there are no
doctests here; ``tests/test_fault_kit.py`` shows each feature. A typical test
opens ``with FaultProxy(moto_server.endpoint_url) as proxy:``, opens a backend
with ``proxy.storage_options(moto_server)``, adds
``proxy.add(Fault(drop_response(), method="PUT", key=r"log/00000001\\.json$"))``
and checks what the store holds afterwards.
"""

from __future__ import annotations

import contextlib
import email.message
import http.client
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Collection, Iterator, Sequence
from types import TracebackType
from typing import Any, Self

from partialstore.errors import InvalidInputError
from partialstore.testing._proxywire import (
    _BLOCK,
    _GCS_PREFIXES,
    _HOP_BY_HOP,
    _JOIN_TIMEOUT_S,
    _LOGGED_HEADERS,
    _client_of,
    _Conn,
    _error_body,
    _gcs_target,
    _Pacer,
    _read_request,
    _s3_target,
)
from partialstore.testing.faultrules import (
    Action,
    Fault,
    RequestRecord,
    Rule,
    RuleHost,
    blackhole,
    drop_response,
    error,
    error_after,
    fault_like,
    has_header,
    latency,
    reset,
)

__all__ = [
    "Action",
    "Fault",
    "FaultProxy",
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

_NO_HEADERS = email.message.Message()


class FaultProxy(RuleHost):
    """A threaded HTTP/1.1 proxy on a free port of 127.0.0.1 in front of ``upstream_url``.

    Args:
      upstream_url: the server, e.g. ``moto_server.endpoint_url``.
      rtt: seconds added to every request (a network round trip).
      bandwidth: bytes/s shared by every transfer through the proxy (``None``: no cap).
      flavor: ``"s3"`` or ``"gcs"`` error bodies; by default GCS for ``/storage/v1/...``
        style paths and S3 otherwise.
      log: keep a :class:`RequestRecord` of every request (off for long benchmarks).

    See the module docstring for how a test uses it.
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

        E.g. the log uploads: ``proxy.requests(("PUT", "POST"), key=r"/log/")``.
        """
        return self._records(Fault(Action("log"), method=method, key=key), _NO_HEADERS)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every logged request is finished (``duration`` set); whether it was.

        A client may see its answer a moment before the proxy's thread logs the end.

        Call it before reading ``duration`` of every request.
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

        Pass them on: ``partialstore.save(url, tree, storage_options=...)``.
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

        A GCS test saves inside ``with proxy.patched_env(gcs_server):``.
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
