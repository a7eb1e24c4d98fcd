"""The local server helpers start real servers, reset them, and fail loudly."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from partialstore import registry
from partialstore._runtime.aio import run
from partialstore.testing import servers
from partialstore.testing.servers import FakeGcsServer, MotoS3Server, ServerStartError


def _gcs_buckets(server: FakeGcsServer) -> list[str]:
    with urllib.request.urlopen(f"{server.endpoint_url}/storage/v1/b") as resp:
        return [b["name"] for b in json.load(resp).get("items", [])]


def test_fake_gcs_server_reset_and_env(gcs_server: FakeGcsServer) -> None:
    assert gcs_server.endpoint_url.startswith("http://127.0.0.1:")
    gcs_server.create_bucket("reset-me")
    backend = registry.open_backend("gs://reset-me/x", gcs_server.storage_options())
    run(backend.write("k", b"v"))
    assert "reset-me" in _gcs_buckets(gcs_server)
    gcs_server.reset()
    assert _gcs_buckets(gcs_server) == []
    env = gcs_server.env()
    assert (
        env["STORAGE_EMULATOR_HOST"] == env["TENSORSTORE_GCS_HTTP_URL"] == gcs_server.endpoint_url
    )
    assert env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"


def test_moto_server_in_a_child_process() -> None:
    with MotoS3Server(in_process=False) as server:
        assert server.endpoint_url.startswith("http://127.0.0.1:")
        server.create_bucket("child")
        backend = registry.open_backend("s3://child/x", server.storage_options())
        run(backend.create("k", b"v"))
        assert run(backend.list()) == ["k"]
        run(backend.close())
        server.reset()
        with pytest.raises(FileNotFoundError):
            run(registry.open_backend("s3://child/x", server.storage_options()).read("k"))
        assert server.env()["AWS_ENDPOINT_URL_S3"] == server.endpoint_url
    assert server.endpoint_url == ""


def test_a_server_that_cannot_start_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    # A binary that exits at once stands in for a broken install.
    monkeypatch.setattr(servers, "fake_gcs_server_binary", lambda: Path("/bin/false"))
    with pytest.raises(ServerStartError, match="exited"):
        FakeGcsServer().start()
