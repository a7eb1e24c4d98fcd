"""The fault-injection kit works: every proxy fault on moto and fake-gcs-server through
the real backends, every FaultyBackend action on memory and local disk, and the public
API unchanged through a fault-free proxy and through ``install_faulty``.

Retry timings are the clients' own (TensorStore and gcsfs wait about 1-2 s before a
retry after a 5xx), so each test injects as few server errors as it can.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import socket
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ProxiedUrl

import partialstore
from partialstore import registry
from partialstore._runtime.aio import run, submit
from partialstore.backend import Backend
from partialstore.errors import (
    AlreadyExistsError,
    BackendError,
    NotFoundError,
    OutcomeUnknownError,
    TransientBackendError,
)
from partialstore.testing.faultproxy import (
    Fault,
    FaultProxy,
    blackhole,
    drop_response,
    error,
    error_after,
    fault_like,
    has_header,
    latency,
    reset,
)
from partialstore.testing.faulty_backend import (
    BackendFault,
    FaultyBackend,
    after,
    after_as_retry,
    before,
    call,
    hang,
    install_faulty,
)
from partialstore.testing.faulty_backend import latency as call_latency

UPLOAD = ("PUT", "POST")  # S3 uploads are PUTs, GCS uploads POSTs


def _open(store: ProxiedUrl) -> Backend:
    return registry.open_backend(store.url, store.options)


# -- FaultProxy on S3 and GCS ---------------------------------------------------------


def test_drop_response_on_create_leaves_the_object(proxied_url: ProxiedUrl) -> None:
    backend = _open(proxied_url)
    rule = proxied_url.proxy.add(Fault(drop_response(), method=UPLOAD, key=r"log/00000001\.json$"))
    # The server applies the create; the client never hears back, retries, and its
    # retry finds the object its own first attempt made: the backend cannot tell
    # that from another writer's identical create, so it says the outcome is unknown
    # (the core then reads the object back and recognises its own bytes).
    with pytest.raises(OutcomeUnknownError):
        run(backend.create("log/00000001.json", b"first"))
    assert rule.fired == 1
    assert run(backend.read("log/00000001.json")) == b"first"
    attempts = proxied_url.proxy.requests(key=r"log/00000001\.json$")
    assert attempts[0].outcome == "dropped" and attempts[0].upstream_status == 200
    assert attempts[0].status is None and attempts[0].faults == ["drop_response"]
    assert attempts[1].status == 412  # the retry's precondition failed: it exists


def test_server_errors_are_retried_until_success(proxied_url: ProxiedUrl) -> None:
    backend = _open(proxied_url)
    times = 2 if proxied_url.server.__class__.__name__ == "MotoS3Server" else 1
    rule = proxied_url.proxy.add(Fault(error(503), method=UPLOAD, key=r"data/x$", times=times))
    run(backend.write("data/x", b"payload"))
    assert rule.fired == times
    assert run(backend.read("data/x")) == b"payload"
    attempts = proxied_url.proxy.requests(UPLOAD, key=r"data/x$")
    assert [a.status for a in attempts] == [503] * times + [200]
    assert all(a.upstream_status is None for a in attempts[:times])  # never forwarded


def test_error_bodies_are_parsed_by_the_clients(proxied_url: ProxiedUrl) -> None:
    backend = _open(proxied_url)
    run(backend.write("k", b"abc"))
    proxied_url.proxy.add(Fault(error(403, code="AccessDenied"), method="GET", key=r"/k$"))
    # A ranged read goes through s3fs / gcsfs; 403 is not retried, so the error the
    # backend reports comes from the body the proxy wrote.
    with pytest.raises(BackendError, match="access denied") as raised:
        run(backend.read("k", start=0, end=2))
    assert "Injected by FaultProxy" in str(raised.value)


def test_error_after_applies_then_fails(proxied_url: ProxiedUrl) -> None:
    backend = _open(proxied_url)
    proxied_url.proxy.add(Fault(error_after(503), method=UPLOAD, key=r"log/00000002\.json$"))
    # S3's backend sees TensorStore resend and says the outcome is unknown; GCS's
    # takes a 503 for "not applied" and reports the retry's 412. Either way the
    # core reads the object back and finds its own bytes (tests/test_fault_matrix.py).
    with pytest.raises((OutcomeUnknownError, AlreadyExistsError)):
        run(backend.create("log/00000002.json", b"mine"))
    assert run(backend.read("log/00000002.json")) == b"mine"
    first = proxied_url.proxy.requests(key=r"log/00000002\.json$")[0]
    assert (first.status, first.upstream_status, first.outcome) == (503, 200, "error")


def test_blackhole_hangs_until_released(proxied_url: ProxiedUrl) -> None:
    backend = _open(proxied_url)
    run(backend.write("held", b"bytes"))
    rule = proxied_url.proxy.add(Fault(blackhole(), method="GET", key=r"/held$"))
    future = submit(backend.read("held", start=1, end=4))
    assert rule.wait(1, timeout=10)
    with pytest.raises(concurrent.futures.TimeoutError):
        future.result(timeout=0.5)
    rule.release()  # the connection closes unanswered; the client retries
    assert future.result(timeout=30) == b"yte"
    gets = proxied_url.proxy.requests("GET", key=r"/held$")
    assert [g.outcome for g in gets] == ["blackholed", "forwarded"]


def test_reset_before_forwarding_is_retried(proxied_url: ProxiedUrl) -> None:
    backend = _open(proxied_url)
    run(backend.write("r", b"1"))
    rule = proxied_url.proxy.add(Fault(reset(), key=r"/r$", method=("HEAD", "GET")))
    assert run(backend.exists("r"))
    assert rule.fired == 1
    outcomes = [r.outcome for r in proxied_url.proxy.requests(key=r"/r$")]
    assert outcomes[-2:] == ["reset", "forwarded"]


def test_latency_delays_the_request(proxied_url: ProxiedUrl) -> None:
    backend = _open(proxied_url)
    run(backend.write("slow", b"1"))
    proxied_url.proxy.add(Fault(latency(0.4), method="GET", key=r"/slow$"))
    started = time.monotonic()
    assert run(backend.read("slow", start=0, end=1)) == b"1"
    assert time.monotonic() - started >= 0.4
    record = proxied_url.proxy.requests("GET", key=r"/slow$")[0]
    assert record.faults == ["latency"] and record.status == 206
    assert proxied_url.proxy.wait_idle()
    assert record.duration is not None and record.duration >= 0.4


def test_skip_times_and_header_predicates(proxied_s3_url: ProxiedUrl) -> None:
    backend = _open(proxied_s3_url)
    # TensorStore sends the exclusive create with If-None-Match; a plain write has none.
    rule = proxied_s3_url.proxy.add(
        Fault(error(500), method="PUT", headers=has_header("If-None-Match"), skip=1)
    )
    run(backend.write("plain", b"1"))  # no If-None-Match: not a match
    run(backend.create("c1", b"1"))  # the first match is skipped
    assert (rule.seen, rule.fired) == (1, 0)
    run(backend.create("c2", b"1"))  # fails once, and TensorStore's retry succeeds
    assert (rule.seen, rule.fired) == (2, 1)
    run(backend.create("c3", b"1"))  # times=1: spent
    assert (rule.seen, rule.fired) == (2, 1)
    assert [r.status for r in proxied_s3_url.proxy.requests("PUT", key=r"/c2$")] == [500, 200]
    assert run(backend.list()) == ["c1", "c2", "c3", "plain"]


def test_log_enumerates_requests_and_fault_like_hits_the_same_one(
    proxied_s3_url: ProxiedUrl,
) -> None:
    proxy = proxied_s3_url.proxy

    def session(root: str) -> None:
        backend = registry.open_backend(f"{proxied_s3_url.url}/{root}", proxied_s3_url.options)
        run(backend.write(f"data/{uuid.uuid4().hex}/pack.bin", b"x" * 100))
        assert run(backend.list("log")) == []
        run(backend.create("log/00000001.json", b"{}"))
        assert run(backend.read("log/00000001.json")) == b"{}"

    session("a")
    seen = proxy.requests()
    assert [r.index for r in seen] == list(range(len(seen)))
    creates = [i for i, r in enumerate(seen) if "if-none-match" in r.headers]
    assert len(creates) == 1 and seen[creates[0]].key == "root/a/log/00000001.json"
    proxy.reset_log()
    rule = proxy.add(fault_like(seen, creates[0], error(500), substitute={"/a/": "/b/"}))
    session("b")  # TensorStore retries the 500; the session runs on unchanged
    assert rule.fired == 1
    hit = next(r for r in proxy.requests() if r.faults)
    assert (hit.method, hit.key, hit.status) == ("PUT", "root/b/log/00000001.json", 500)


def test_network_profile_adds_rtt_and_caps_bandwidth(moto_server: Any, s3_url: Any) -> None:
    url, _ = s3_url
    with FaultProxy(moto_server.endpoint_url, rtt=0.1, bandwidth=256 * 1024) as proxy:
        backend = registry.open_backend(url, proxy.storage_options(moto_server))
        run(backend.write("blob", bytes(128 * 1024)))
        proxy.reset_log()
        started = time.monotonic()
        assert len(run(backend.read("blob", start=0, end=128 * 1024))) == 128 * 1024
        # 128 KiB at 256 KiB/s is 0.5 s on the wire, plus one 0.1 s round trip.
        assert time.monotonic() - started >= 0.6
        assert proxy.wait_idle()
        assert all(r.duration is not None and r.duration >= 0.1 for r in proxy.requests())
        run(backend.close())


# moto answers anonymous reads of a private object with 403; it does not check signatures.
_MOTO_AUTH = {
    "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/s3/aws4_request, "
    "SignedHeaders=host, Signature=00",
    "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
}


def test_raw_http_chunked_body_expect_continue_head_304_and_204(
    moto_server: Any, s3_url: Any
) -> None:
    bucket = urllib.parse.urlsplit(s3_url[0]).netloc
    with FaultProxy(moto_server.endpoint_url) as proxy:
        conn = http.client.HTTPConnection(*urllib.parse.urlsplit(proxy.endpoint_url)[1].split(":"))
        body = b"0123456789" * 1000
        conn.putrequest("PUT", f"/{bucket}/raw")
        for name, value in _MOTO_AUTH.items():
            conn.putheader(name, value)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        for start in range(0, len(body), 4096):
            piece = body[start : start + 4096]
            conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        conn.send(b"0\r\n\r\n")
        put = conn.getresponse()
        assert (put.status, put.read()) == (200, b"")
        # The same keep-alive connection serves the next requests.
        conn.request("HEAD", f"/{bucket}/raw", headers=_MOTO_AUTH)
        head = conn.getresponse()
        assert head.status == 200 and head.getheader("Content-Length") == str(len(body))
        assert head.read() == b""
        conn.request("GET", f"/{bucket}/raw", headers={"Range": "bytes=10-19", **_MOTO_AUTH})
        ranged = conn.getresponse()
        assert (ranged.status, ranged.read()) == (206, body[10:20])
        etag = head.getheader("ETag")
        conn.request("GET", f"/{bucket}/raw", headers={"If-None-Match": etag, **_MOTO_AUTH})
        unchanged = conn.getresponse()
        assert (unchanged.status, unchanged.read()) == (304, b"")
        conn.request("DELETE", f"/{bucket}/raw", headers=_MOTO_AUTH)
        deleted = conn.getresponse()
        assert (deleted.status, deleted.read()) == (204, b"")
        conn.close()
        assert [r.method for r in proxy.requests()] == ["PUT", "HEAD", "GET", "GET", "DELETE"]
        assert proxy.requests()[0].body_size == len(body)


def test_stop_ends_blackholed_and_idle_connections(moto_server: Any) -> None:
    proxy = FaultProxy(moto_server.endpoint_url).start()
    host, port = urllib.parse.urlsplit(proxy.endpoint_url)[1].split(":")
    idle = socket.create_connection((host, int(port)))
    rule = proxy.add(Fault(blackhole(), path="^/held$"))
    held = socket.create_connection((host, int(port)))
    held.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
    assert rule.wait(1, timeout=10)  # both connections are accepted (in order) by now
    held.settimeout(30)
    answer: list[bytes] = []
    reader = threading.Thread(target=lambda: answer.append(held.recv(100)))
    reader.start()
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 10
    reader.join(30)
    assert answer == [b""]  # closed without an answer
    idle.settimeout(30)
    assert idle.recv(100) == b""
    idle.close()
    held.close()


# -- FaultyBackend on memory and local disk -----------------------------------------


@pytest.fixture(params=["memory", "local"])
def faulty(request: pytest.FixtureRequest, tmp_path: Path) -> FaultyBackend:
    """A wrapped store with rename (the actions below use it): memory or local disk."""
    inner = f"memory://{uuid.uuid4().hex}" if request.param == "memory" else str(tmp_path / "r")
    return install_faulty(inner)[1]


def test_before_fails_without_applying(faulty: FaultyBackend) -> None:
    rule = faulty.add(BackendFault(before(), method="create", key=r"^log/"))
    with pytest.raises(TransientBackendError, match="before it was applied"):
        run(faulty.create("log/00000001.json", b"{}"))
    assert rule.fired == 1 and not run(faulty.exists("log/00000001.json"))
    run(faulty.create("log/00000001.json", b"{}"))  # times=1: the next one goes through
    assert run(faulty.read("log/00000001.json")) == b"{}"


def test_after_applies_then_fails(faulty: FaultyBackend) -> None:
    faulty.add(BackendFault(after(), method="write"))
    with pytest.raises(TransientBackendError, match="response lost"):
        run(faulty.write("k", b"v"))
    assert run(faulty.read("k")) == b"v"
    record = faulty.calls("write")[0]
    assert (record.outcome, record.error, record.faults) == (
        "error",
        "TransientBackendError",
        ["after"],
    )


def test_after_as_retry_answers_like_a_client_retry(faulty: FaultyBackend) -> None:
    faulty.add(BackendFault(after_as_retry(), method=("create", "rename", "delete"), times=None))
    with pytest.raises(AlreadyExistsError):
        run(faulty.create("a/x", b"1"))
    assert run(faulty.read("a/x")) == b"1"
    with pytest.raises(NotFoundError):
        run(faulty.rename("a", "b"))
    assert run(faulty.list("b")) == ["b/x"] and run(faulty.list("a")) == []
    run(faulty.delete("b/x"))
    assert not run(faulty.exists("b/x"))


def test_latency_hang_and_hooks(faulty: FaultyBackend) -> None:
    faulty.add(BackendFault(call_latency(0.3), method="exists"))
    started = time.monotonic()
    assert not run(faulty.exists("nothing"))
    assert time.monotonic() - started >= 0.3

    rule = faulty.add(BackendFault(hang(), method="write", key=r"^held$"))
    future = submit(faulty.write("held", b"1"))
    assert rule.wait(1, timeout=10)
    with pytest.raises(concurrent.futures.TimeoutError):
        future.result(timeout=0.3)
    assert not run(faulty.exists("held"))
    rule.release()
    future.result(timeout=10)
    assert run(faulty.read("held")) == b"1"

    seen: list[tuple[str, bool]] = []

    def look(when: str) -> Any:
        # Plain hooks run in a worker thread, so they may use the synchronous API.
        return lambda record: seen.append((when, run(faulty.inner.exists(record.key))))

    faulty.add(BackendFault(call(look("before")), method="create", key="^hooked$"))
    faulty.add(BackendFault(call(look("after"), when="after"), method="create", key="^hooked$"))
    run(faulty.create("hooked", b"1"))
    assert seen == [("before", False), ("after", True)]


def test_hang_is_cancellable(faulty: FaultyBackend) -> None:
    faulty.add(BackendFault(hang(), method="create"))

    async def cancel_it() -> None:
        task = asyncio.ensure_future(faulty.create("never", b"1"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_it())
    assert not run(faulty.exists("never"))
    assert faulty.calls("create")[0].error == "CancelledError"


def test_skip_and_times_count_matches(faulty: FaultyBackend) -> None:
    run(faulty.write("k", b"v"))
    rule = faulty.add(BackendFault(before(), method="read", skip=1, times=2))
    outcomes = []
    for _ in range(4):
        try:
            outcomes.append(run(faulty.read("k")))
        except TransientBackendError:
            outcomes.append("failed")
    assert outcomes == [b"v", "failed", "failed", b"v"]
    assert (rule.seen, rule.fired) == (3, 2)


# -- the public API through the kit ------------------------------------------------


def _roundtrip(path: str, options: dict[str, Any] | None = None) -> None:
    # "w" is over 1 MiB, so it becomes a zarr3 array written by TensorStore (smaller
    # leaves are packed into one object the backend writes itself).
    tree = {"w": np.arange(300_000, dtype=np.float32).reshape(300, 1000), "step": 7}
    partialstore.save(path, tree, storage_options=options)
    partialstore.save(path, {"b": np.ones(3, np.int8)}, storage_options=options)
    partialstore.finalize(path, storage_options=options)
    loaded = partialstore.load(path, storage_options=options)
    np.testing.assert_array_equal(loaded["w"], tree["w"])
    np.testing.assert_array_equal(loaded["b"], np.ones(3, np.int8))
    assert loaded["step"] == 7


def test_public_api_through_a_fault_free_proxy(proxied_url: ProxiedUrl) -> None:
    _roundtrip(f"{proxied_url.url}/ck", proxied_url.options)
    clients = {r.client for r in proxied_url.proxy.requests()}
    # Array bytes too: TensorStore's requests pass the proxy on S3 and (with the
    # fixture's TENSORSTORE_GCS_HTTP_URL) on GCS.
    assert "tensorstore" in clients
    assert all(r.outcome == "forwarded" for r in proxied_url.proxy.requests())


def test_public_api_through_install_faulty(faulty_url: tuple[str, FaultyBackend]) -> None:
    url, faulty = faulty_url
    _roundtrip(f"{url}/ck")
    creates = [c.key for c in faulty.calls("create")]
    assert any(key.startswith("ck") and "/log/" in key for key in creates)
    # Deeper paths share the rules and the log.
    # Memory and local disk stage a session in "ck2.partial_save" (they rename).
    # Every try fails (the core tries a create again once it finds it did not land).
    rule = faulty.add(
        BackendFault(before(), method="create", key=r"^sub/ck2[^/]*/log/", times=None)
    )
    with pytest.raises(TransientBackendError):
        partialstore.save(f"{url}/sub/ck2", {"a": 1})
    with pytest.raises(FileNotFoundError):
        partialstore.load(f"{url}/sub/ck2")
    rule.remove()
    partialstore.save(f"{url}/sub/ck2", {"a": 1})
    partialstore.finalize(f"{url}/sub/ck2")
    assert partialstore.load(f"{url}/sub/ck2") == {"a": 1}
