"""The wire side of :class:`~partialstore.testing.faultproxy.FaultProxy`.

Connections (:class:`_Conn`), request parsing, the shared bandwidth
:class:`_Pacer`, where a request points (bucket, key, client) and injected
error bodies in S3 XML or GCS JSON. Private to the proxy.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import select
import socket
import struct
import threading
import time
from typing import Any

from partialstore.testing.faultrules import Action, RequestRecord

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
            if sock is None:
                continue  # no upstream connection (yet, or any more)
            with contextlib.suppress(OSError, AttributeError):
                sock.shutdown(socket.SHUT_RDWR)

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
