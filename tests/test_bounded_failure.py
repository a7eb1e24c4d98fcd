"""Failing stores fail fast, once, with a clear message: S3 and GCS against real local servers.

Each test points a backend (or ``partialstore.save``) at a real server on
127.0.0.1 that misbehaves in one way (a refused port, a host name under
``.invalid`` that never resolves, a store without the bucket, a client
without credentials, a store answering 503 to everything, a store that
accepts connections and never answers) and checks the error's type, that
its message names the endpoint and bucket, and that it arrived within the
bound the backends promise (generous margins: these are correctness bounds,
not performance figures). The 503 and silent servers are minimal threaded
HTTP fixtures in this module; partialstore.testing's fault proxy can replace
them once it lands.
"""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore import registry
from partialstore._runtime.aio import run
from partialstore.backends._retry import RetryPolicy
from partialstore.errors import (
    AlreadyExistsError,
    BackendError,
    InvalidInputError,
    NotFoundError,
    OutcomeUnknownError,
    TransientBackendError,
)
from partialstore.testing.misconfig import no_google_credentials_env, refused_endpoint
from partialstore.testing.servers import FakeGcsServer, MotoS3Server

# The promised bounds: an unreachable endpoint, missing credentials or a
# missing bucket fail within FAST_BOUND; a store failing with 503 within
# its deadline (plus the time to notice).
FAST_BOUND = 10.0
SERVICES = ("s3", "gcs")


class _Always503(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _refuse(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.requests += 1  # type: ignore[attr-defined]
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _refuse

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def always_503() -> Iterator[http.server.ThreadingHTTPServer]:
    """An HTTP server on 127.0.0.1 answering 503 to every request (counted)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    server.requests = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class _LoseFirstWrite(http.server.BaseHTTPRequestHandler):
    """Relays to ``server.upstream``; the first PUT/POST is applied but its answer is lost."""

    protocol_version = "HTTP/1.1"
    _HOP = ("connection", "keep-alive", "transfer-encoding", "content-length")

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=10)  # type: ignore[attr-defined]
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self._HOP[:3]}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        if self.command in ("PUT", "POST") and not self.server.lost:  # type: ignore[attr-defined]
            self.server.lost = True  # type: ignore[attr-defined]
            self.close_connection = True  # applied upstream; the client never hears back
            return
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in self._HOP or (
                self.command == "HEAD" and name.lower() == "content-length"
            ):
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def lossy_proxy() -> Iterator[Any]:
    """Start, on demand, a relay to an upstream URL that loses its first write's answer."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(upstream: str) -> str:
        host, port = upstream.removeprefix("http://").split(":")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LoseFirstWrite)
        server.upstream = (host, int(port))  # type: ignore[attr-defined]
        server.lost = False  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return _url(server)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()
    for connection in held:
        connection.close()


def _url(server: http.server.ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _target(service: str, endpoint: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    """A fresh ``(url, storage_options)`` for ``service`` at ``endpoint``."""
    bucket = f"ps-{uuid.uuid4().hex[:12]}"
    if service == "s3":
        return f"s3://{bucket}/ckpt", {
            "endpoint_url": endpoint,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
            **extra,
        }
    return f"gs://{bucket}/ckpt", {"endpoint_url": endpoint, "token": "anon", **extra}


def _timed_save(url: str, options: dict[str, Any], error: type[Exception]) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(error) as raised:
        partialstore.save(url, {"w": np.arange(8.0), "step": 3}, storage_options=options)
    return str(raised.value), time.monotonic() - start


@pytest.mark.parametrize("service", SERVICES)
def test_refused_endpoint_fails_fast_through_save(service: str) -> None:
    endpoint = refused_endpoint()
    url, options = _target(service, endpoint)
    message, elapsed = _timed_save(url, options, BackendError)
    assert elapsed < FAST_BOUND
    assert endpoint in message and url.split("/")[2] in message
    assert "refused" in message and "endpoint_url" in message


@pytest.mark.parametrize("service", SERVICES)
def test_unresolvable_host_fails_fast_through_save(service: str) -> None:
    # RFC 6761: names under .invalid never resolve, so nothing leaves the machine.
    url, options = _target(service, "http://partialstore-test.invalid:9000")
    message, elapsed = _timed_save(url, options, BackendError)
    assert elapsed < FAST_BOUND
    assert "does not resolve" in message and "partialstore-test.invalid:9000" in message
    assert url.split("/")[2] in message


def test_missing_bucket_fails_fast_through_save_on_s3(moto_server: MotoS3Server) -> None:
    url, options = "s3://no-such-bucket-anywhere/ckpt", moto_server.storage_options()
    message, elapsed = _timed_save(url, options, NotFoundError)
    assert elapsed < FAST_BOUND
    assert "'no-such-bucket-anywhere' does not exist" in message
    assert moto_server.endpoint_url in message


def test_missing_bucket_fails_fast_through_save_on_gcs(gcs_server: FakeGcsServer) -> None:
    url, options = "gs://no-such-bucket-anywhere/ckpt", gcs_server.storage_options()
    message, elapsed = _timed_save(url, options, NotFoundError)
    assert elapsed < FAST_BOUND
    assert "'no-such-bucket-anywhere' does not exist" in message
    assert gcs_server.endpoint_url in message


def test_missing_credentials_fail_fast_through_save(
    moto_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd
) -> None:
    # moto accepts any keys, so the client itself must find none: no keys in
    # the options or the environment, empty shared files, no instance metadata.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("credentials", "config"):
        (tmp_path / name).write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = f"ps-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(bucket)
    # Options no other test uses: no filesystem that already found keys is shared.
    options = {"endpoint_url": moto_server.endpoint_url, "deadline": 41.0}
    message, elapsed = _timed_save(f"s3://{bucket}/ckpt", options, BackendError)
    assert elapsed < FAST_BOUND
    assert "no AWS credentials found" in message
    assert moto_server.endpoint_url in message and bucket in message
    assert "Failed to open file" not in capfd.readouterr().err  # one message, no C++ lines


def test_missing_google_credentials_fail_fast_through_save(
    gcs_server: FakeGcsServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Asked for default credentials where there are none: no key file, an
    # empty gcloud folder, and no metadata server (refused on 127.0.0.1).
    for name, value in no_google_credentials_env(tmp_path / "gcloud").items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    bucket = f"ps-{uuid.uuid4().hex[:12]}"
    gcs_server.create_bucket(bucket)
    options = {**gcs_server.storage_options(), "token": "google_default", "deadline": 43.0}
    message, elapsed = _timed_save(f"gs://{bucket}/ckpt", options, BackendError)
    assert elapsed < FAST_BOUND
    assert "no Google credentials found" in message
    assert gcs_server.endpoint_url in message and bucket in message


@pytest.mark.parametrize("service", SERVICES)
def test_503_store_fails_within_a_lowered_deadline_through_save(
    service: str, always_503: http.server.ThreadingHTTPServer
) -> None:
    url, options = _target(service, _url(always_503), deadline=2.0)
    message, elapsed = _timed_save(url, options, TransientBackendError)
    assert elapsed < 2.0 + FAST_BOUND
    assert _url(always_503) in message and url.split("/")[2] in message
    assert "deadline=2 s" in message and "503" in message


@pytest.mark.parametrize(("service", "requests"), [("s3", 2 + 4), ("gcs", 4)])
def test_retries_are_one_layer(
    service: str, requests: int, always_503: http.server.ThreadingHTTPServer
) -> None:
    # retries=3: four attempts. S3 sends the first through TensorStore (one
    # quick retry of its own) and s3fs; botocore, s3fs and gcsfs add none.
    url, options = _target(service, _url(always_503), retries=3)
    backend = registry.open_backend(url, options)
    with pytest.raises(TransientBackendError, match="gave up after 4 attempt"):
        run(backend.read("log/00000001.json"))
    assert always_503.requests == requests  # type: ignore[attr-defined]
    # A create refused with 503 was never applied: it says so.
    with pytest.raises(TransientBackendError, match="Nothing was changed"):
        run(backend.create("log/00000001.json", b"{}"))
    run(backend.close())


@pytest.mark.parametrize("service", SERVICES)
def test_deadline_cuts_off_a_silent_store(service: str, silent_endpoint: str) -> None:
    url, options = _target(service, silent_endpoint, deadline=1.0)
    backend = registry.open_backend(url, options)
    start = time.monotonic()
    with pytest.raises(TransientBackendError, match="no answer before the deadline"):
        run(backend.read("log/00000001.json"))
    # A write cut off in flight may have landed: the caller must find out.
    with pytest.raises(OutcomeUnknownError, match="may or may not have been applied"):
        run(backend.create("log/00000001.json", b"{}"))
    assert time.monotonic() - start < 2 * 1.0 + FAST_BOUND
    run(backend.close())


@pytest.mark.parametrize("service", SERVICES)
def test_create_whose_answer_was_lost_is_outcome_unknown(
    service: str, lossy_proxy: Any, request: pytest.FixtureRequest
) -> None:
    # The create lands, its answer is lost, the retry meets "already exists":
    # that is this create's own object, so "exists" would be a lie.
    server = request.getfixturevalue("moto_server" if service == "s3" else "gcs_server")
    url, options = _target(service, lossy_proxy(server.endpoint_url))
    server.create_bucket(url.split("/")[2])
    backend = registry.open_backend(url, options)
    with pytest.raises(OutcomeUnknownError, match="may"):
        run(backend.create("log/00000001.json", b'{"id": "mine"}'))
    assert run(backend.read("log/00000001.json")) == b'{"id": "mine"}'  # it had landed
    # A plain race still reads as one: someone else's object is "already exists".
    with pytest.raises(AlreadyExistsError):
        run(backend.create("log/00000001.json", b'{"id": "theirs"}'))
    run(backend.close())


def test_default_schedule_fails_a_503_store_within_120_s() -> None:
    # Measured end to end the default takes tens of seconds; the arithmetic
    # is what guarantees the bound: the call stops at its deadline, and every
    # sleep the schedule may take (and TensorStore's for arrays) fits in it.
    policy = RetryPolicy()
    assert policy.deadline <= 100.0
    assert policy.worst_case_backoff() < policy.deadline
    ts_retries = policy.tensorstore_retries()
    initial = float(ts_retries["initial_delay"].rstrip("s"))
    cap = float(ts_retries["max_delay"].rstrip("s"))
    ts_worst = sum(
        min(cap, initial * 2**n + min(1.0, initial)) for n in range(ts_retries["max_retries"])
    )
    assert ts_worst < policy.deadline
    # Each sleep is drawn from [0, ceiling]: full jitter.
    assert all(0.0 <= policy.delay(n) <= policy.ceiling(n) for n in range(policy.retries))


def test_save_to_moto_with_environment_credentials_prints_nothing(
    s3_url: tuple[str, dict[str, Any]], capfd
) -> None:
    url, options = s3_url
    # Keys only in the environment (the session's moto fixture exports them).
    options = {
        "endpoint_url": options["endpoint_url"],
        "client_kwargs": {"region_name": "us-east-1"},
    }
    capfd.readouterr()
    partialstore.save(f"{url}/ck", {"w": np.arange(1000.0), "b": 1}, storage_options=options)
    partialstore.finalize(f"{url}/ck", storage_options=options)
    loaded = partialstore.load(f"{url}/ck", storage_options=options)
    assert loaded["b"] == 1 and np.array_equal(loaded["w"], np.arange(1000.0))
    err = capfd.readouterr().err
    assert not re.search(r"^[EWF]\d{4} ", err, re.MULTILINE), err  # absl's C++ log lines
    assert ".aws" not in err


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("s3://b/x", {"endpont_url": "http://h"}, "did you mean 'endpoint_url'"),
        ("s3://b/x", {"endpoint": "http://h"}, "did you mean 'endpoint_url'"),
        ("s3://b/x", {"client_kwargs": {"region": "x"}}, "did you mean 'region_name'"),
        ("s3://b/x", {"config_kwargs": {"retries": {"max_attempts": 9}}}, "'retries' and"),
        ("s3://b/x", {"anon": "yes"}, "must be bool"),
        ("gs://b/x", {"endpont_url": "http://h"}, "did you mean 'endpoint_url'"),
        ("gs://b/x", {"projet": "p"}, "did you mean 'project'"),
        ("gs://b/x", {"deadline": "10"}, "must be int or float"),
        ("gs://b/x", {"retries": -1}, "int >= 0"),
        ("s3://b/x", {"deadline": 0}, "positive number of seconds"),
        ("memory://x", {"single_writr": True}, "did you mean 'single_writer'"),
        ("local:///tmp/x", {"auto_mkdri": True}, "did you mean 'auto_mkdir'"),
        ("local:///tmp/x", {"single_writer": "yes"}, "must be bool"),
    ],
)
def test_bad_storage_options_are_refused_at_once(url: str, options: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=f"(?i){re.escape(message)}"):
        registry.open_backend(url, options)


def test_unknown_option_refused_on_local_disk(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"(?i)did you mean 'single_writer'"):
        registry.open_backend(str(tmp_path), {"single_writter": True})


def test_valid_service_options_still_pass(tmp_path: Path) -> None:
    s3 = registry.open_backend(
        "s3://b/x",
        {
            "anon": True,
            "client_kwargs": {"region_name": "eu-west-1", "verify": False},
            "config_kwargs": {"connect_timeout": 3, "max_pool_connections": 20},
            "requester_pays": False,
            "deadline": 5,
            "retries": 0,
            "single_writer": True,
        },
    )
    gcs = registry.open_backend(
        "gs://b/x", {"token": "anon", "project": "p", "requests_timeout": 9.5, "deadline": 1.5}
    )
    fsspec_local = registry.open_backend(f"local://{tmp_path}", {"auto_mkdir": True})
    assert s3.single_writer and s3.tensorstore_context()["s3_request_retries"]["max_retries"] == 1
    assert gcs.tensorstore_context()["gcs_request_retries"]["max_retries"] >= 1
    assert fsspec_local.fs.auto_mkdir is True
    for backend in (s3, gcs, fsspec_local):
        run(backend.close())
