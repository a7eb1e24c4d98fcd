"""Shared fixtures: real local S3/GCS servers and fresh roots on every backend.

- ``moto_server`` / ``gcs_server`` (session): one server per test session on
  a free port of 127.0.0.1 (fixed ports break parallel runs). A server that
  cannot start raises, so the tests that need it error; nothing is skipped.
  Starting one also exports its ``env()`` into ``os.environ`` for the session
  (credentials, ``TENSORSTORE_GCS_HTTP_URL``, ...), so TensorStore in this
  process and every child process reach the emulator; the previous values are
  restored at the end.
- ``s3_url`` / ``gcs_url`` (function): a fresh bucket per test, returned as
  ``(url, storage_options)`` with the root ``<bucket>/root``; the bucket is
  dropped afterwards.
- ``any_backend_url``: parametrized over every backend (ids ``local``,
  ``memory``, ``s3``, ``gcs``, ``fsspec``), ``(url, storage_options)`` for a
  fresh unique root. Servers start only when an S3/GCS case runs.

Example::

    def test_roundtrip(any_backend_url):
        url, options = any_backend_url
        backend = registry.open_backend(url, options)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from partialstore.testing.servers import FakeGcsServer, MotoS3Server

BackendUrl = tuple[str, dict[str, Any]]
BACKEND_KINDS = ("local", "memory", "s3", "gcs", "fsspec")


def _bucket_name() -> str:
    # Valid for S3 and GCS: lowercase, 3-63 characters, starts with a letter.
    return f"ps-{uuid.uuid4().hex[:20]}"


def _export_env(values: dict[str, str]) -> dict[str, str | None]:
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    return previous


def _restore_env(previous: dict[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoS3Server]:
    """A moto S3 server for the whole session (raises if it cannot start)."""
    server = MotoS3Server().start()
    previous = _export_env(server.env())
    try:
        yield server
    finally:
        _restore_env(previous)
        server.stop()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGcsServer]:
    """A fake-gcs-server for the whole session (raises if it cannot start)."""
    server = FakeGcsServer().start()
    previous = _export_env(server.env())
    try:
        yield server
    finally:
        _restore_env(previous)
        server.stop()


@pytest.fixture
def s3_url(moto_server: MotoS3Server) -> Iterator[BackendUrl]:
    """``("s3://<fresh bucket>/root", storage_options)`` on the session's moto server."""
    bucket = _bucket_name()
    moto_server.create_bucket(bucket)
    yield f"s3://{bucket}/root", moto_server.storage_options()
    # Dropping every bucket is one cheap request and frees moto's memory.
    moto_server.reset()


@pytest.fixture
def gcs_url(gcs_server: FakeGcsServer) -> Iterator[BackendUrl]:
    """``("gs://<fresh bucket>/root", storage_options)`` on the session's fake-gcs-server."""
    bucket = _bucket_name()
    gcs_server.create_bucket(bucket)
    yield f"gs://{bucket}/root", gcs_server.storage_options()
    gcs_server.delete_bucket(bucket)


@pytest.fixture(params=BACKEND_KINDS, ids=list(BACKEND_KINDS))
def any_backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> BackendUrl:
    """``(url, storage_options)`` of a fresh unique root on each backend in turn."""
    kind = request.param
    if kind == "local":
        return str(tmp_path / "root"), {}
    if kind == "memory":
        return f"memory://{uuid.uuid4().hex}", {}
    if kind == "s3":
        return request.getfixturevalue("s3_url")
    if kind == "gcs":
        return request.getfixturevalue("gcs_url")
    # The generic fsspec backend over fsspec's local filesystem.
    return "local://" + str(tmp_path / "fsroot"), {}


# -- fault injection (partialstore.testing.faultproxy / faulty_backend) ----------------
# Imported here, not at the top, so this block stays one appended section.
import dataclasses  # noqa: E402

from partialstore.testing.faultproxy import FaultProxy  # noqa: E402
from partialstore.testing.faulty_backend import FaultyBackend, install_faulty  # noqa: E402


@dataclasses.dataclass
class ProxiedUrl:
    """A fresh bucket root reached through a :class:`FaultProxy` (rules and log cleared)."""

    url: str
    options: dict[str, Any]
    proxy: FaultProxy
    server: MotoS3Server | FakeGcsServer


@pytest.fixture(scope="session")
def s3_proxy(moto_server: MotoS3Server) -> Iterator[FaultProxy]:
    """One proxy in front of the session's moto server (clients stay pooled across tests)."""
    with FaultProxy(moto_server.endpoint_url) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def gcs_proxy(gcs_server: FakeGcsServer) -> Iterator[FaultProxy]:
    """One proxy in front of the session's fake-gcs-server."""
    with FaultProxy(gcs_server.endpoint_url) as proxy:
        yield proxy


def _proxied(url: str, proxy: FaultProxy, server: Any) -> Iterator[ProxiedUrl]:
    proxy.clear()
    proxy.reset_log()
    try:
        yield ProxiedUrl(url, proxy.storage_options(server), proxy, server)
    finally:
        proxy.clear()  # releases anything a test left blackholed
        proxy.reset_log()


@pytest.fixture
def proxied_s3_url(s3_url: BackendUrl, s3_proxy: FaultProxy, moto_server: MotoS3Server) -> Any:
    """A fresh S3 root whose every request (s3fs and TensorStore) goes through ``s3_proxy``."""
    yield from _proxied(s3_url[0], s3_proxy, moto_server)


@pytest.fixture
def proxied_gcs_url(gcs_url: BackendUrl, gcs_proxy: FaultProxy, gcs_server: FakeGcsServer) -> Any:
    """A fresh GCS root through ``gcs_proxy``; TensorStore too (``TENSORSTORE_GCS_HTTP_URL``
    points at the proxy for this test, see ``FaultProxy.patched_env``)."""
    with gcs_proxy.patched_env(gcs_server):
        yield from _proxied(gcs_url[0], gcs_proxy, gcs_server)


@pytest.fixture(params=["s3", "gcs"])
def proxied_url(request: pytest.FixtureRequest) -> ProxiedUrl:
    """``proxied_s3_url`` and ``proxied_gcs_url`` in turn."""
    return request.getfixturevalue(f"proxied_{request.param}_url")


@pytest.fixture(params=["memory", "local", "fsspec"])
def faulty_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, FaultyBackend]:
    """``install_faulty`` over a fresh memory, local or fsspec root: ``(url, faulty_backend)``."""
    inner = {
        "memory": f"memory://{uuid.uuid4().hex}",
        "local": str(tmp_path / "root"),
        "fsspec": "local://" + str(tmp_path / "fsroot"),
    }[request.param]
    return install_faulty(inner)
