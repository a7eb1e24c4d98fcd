"""The GCS backend against a real fake-gcs-server: the conformance suite plus GCS specifics."""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request

import gcsfs.core
import pytest
from gcsfs.retry import HttpError

from partialstore import registry
from partialstore._runtime.aio import run
from partialstore.backends.gcs import GCSBackend, map_gcs_error
from partialstore.errors import (
    AlreadyExistsError,
    BackendError,
    InvalidInputError,
    NotFoundError,
    TransientBackendError,
)
from partialstore.testing.conformance import BackendConformance
from partialstore.testing.servers import FakeGcsServer


class TestGCSBackend(BackendConformance):
    @pytest.fixture
    def backend_url(self, gcs_url: tuple[str, dict]) -> tuple[str, dict]:
        return gcs_url

    # Out-of-band hooks: the server's JSON API over plain HTTP (the backend
    # uses gcsfs and TensorStore).
    @staticmethod
    def _object(where: tuple[str, dict], key: str) -> tuple[str, str, str]:
        url, options = where
        bucket, _, root = url.split("://", 1)[1].partition("/")
        name = f"{root}/{key}" if root else key
        return options["endpoint_url"].rstrip("/"), bucket, name

    def raw_write(self, where: tuple[str, dict], key: str, data: bytes) -> None:
        endpoint, bucket, name = self._object(where, key)
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        request = urllib.request.Request(
            f"{endpoint}/upload/storage/v1/b/{bucket}/o?{query}", data=data, method="POST"
        )
        request.add_header("Content-Type", "application/octet-stream")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200

    def raw_read(self, where: tuple[str, dict], key: str) -> bytes:
        endpoint, bucket, name = self._object(where, key)
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(
            f"{endpoint}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=30
        ) as response:
            return bytes(response.read())

    def raw_exists(self, where: tuple[str, dict], key: str) -> bool:
        endpoint, bucket, name = self._object(where, key)
        quoted = urllib.parse.quote(name, safe="")
        try:
            with urllib.request.urlopen(
                f"{endpoint}/storage/v1/b/{bucket}/o/{quoted}", timeout=30
            ) as response:
                return response.status == 200
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return False
            raise


def _open(url: str, options: dict) -> GCSBackend:
    backend = registry.open_backend(url, options)
    assert isinstance(backend, GCSBackend)
    return backend


def test_uses_the_plain_gcsfs_class(gcs_url) -> None:
    # gcsfs.GCSFileSystem may be the experimental subclass that probes every
    # bucket over gRPC (about 60 s per call against an emulator).
    backend = _open(*gcs_url)
    assert type(backend._fs) is gcsfs.core.GCSFileSystem


def test_create_of_a_large_object_is_conditional(gcs_url) -> None:
    # Past 50 MiB gcsfs would switch to a resumable upload, whose precondition
    # fake-gcs-server ignores; create must stay one conditional request.
    backend = _open(*gcs_url)
    run(backend.create("big", b"original"))
    with pytest.raises(AlreadyExistsError):
        run(backend.create("big", b"b" * (50 * 2**20 + 1)))
    assert run(backend.read("big")) == b"original"
    run(backend.close())


def test_kvstore_spec_only_when_tensorstore_reaches_the_same_endpoint(gcs_url, monkeypatch) -> None:
    url, options = gcs_url
    backend = _open(url, options)
    bucket = url.split("/")[2]
    # The gcs_server fixture exported TENSORSTORE_GCS_HTTP_URL for this server.
    assert backend.kvstore_spec("data/x") == {
        "driver": "gcs",
        "bucket": bucket,
        "path": "root/data/x/",
    }
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://127.0.0.1:1")
    assert backend.kvstore_spec("data/x") is None
    monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL")
    assert backend.kvstore_spec("data/x") is None
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    google = GCSBackend("gs://bucket/p", {"token": "anon"})
    assert google.kvstore_spec("") == {"driver": "gcs", "bucket": "bucket", "path": "p/"}


def test_endpoint_from_storage_emulator_host(gcs_url) -> None:
    url, options = gcs_url
    assert os.environ["STORAGE_EMULATOR_HOST"] == options["endpoint_url"]
    backend = _open(url, {"token": "anon"})
    run(backend.create("k", b"v"))
    assert run(_open(url, options).read("k")) == b"v"


def test_folder_placeholders_are_not_keys(gcs_url) -> None:
    url, options = gcs_url
    backend = _open(url, options)
    run(backend.write("dir/real", b"x"))
    # The console's "create folder" makes an empty object named "dir/".
    backend._fs.pipe_file(f"{backend.bucket}/root/dir/", b"")
    assert run(backend.list()) == ["dir/real"]
    assert run(backend.list_children()) == ["dir"]
    assert run(backend.list_children("dir")) == ["real"]


def test_missing_bucket_is_reported(gcs_server: FakeGcsServer) -> None:
    backend = _open("gs://no-such-bucket-here/x", gcs_server.storage_options())
    with pytest.raises(NotFoundError, match="no-such-bucket-here"):
        run(backend.read("k"))
    with pytest.raises(NotFoundError, match="no-such-bucket-here"):
        run(backend.create("k", b"x"))
    with pytest.raises(NotFoundError):
        run(backend.list())


def test_capabilities_need_no_server() -> None:
    backend = GCSBackend("gs://bucket/x", {"token": "anon"})
    assert backend.capabilities.atomic_create and backend.capabilities.compare_and_swap
    assert not backend.capabilities.atomic_rename


@pytest.mark.parametrize("url", ["gs://", "gs:///x", "gcs://b/../x", "gs://b/a//c", "s3://b/x"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidInputError):
        GCSBackend(url, {"token": "anon"})


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (FileNotFoundError("b/k"), NotFoundError),
        (HttpError({"code": 503, "message": "unavailable"}), TransientBackendError),
        (HttpError({"code": 429, "message": "rate"}), TransientBackendError),
        (HttpError({"code": 403, "message": "denied"}), BackendError),
        (TimeoutError("timed out"), TransientBackendError),
    ],
)
def test_error_mapping(error: Exception, expected: type[Exception]) -> None:
    mapped = map_gcs_error(error, "read", "gs://b/k")
    assert type(mapped) is expected
    assert "gs://b/k" in str(mapped)


def test_backends_with_equal_options_share_one_filesystem(gcs_url) -> None:
    url, options = gcs_url
    # Options no other test uses, so no cached backend elsewhere shares the pool entry.
    options = {**options, "requests_timeout": 17.5}
    other = _open(f"{url}/run-a", {**options, "requests_timeout": 18.5})
    first = _open(f"{url}/run-a", options)
    second = _open(f"{url}/run-b", options)
    assert first._fs is second._fs
    assert other._fs is not first._fs
    run(first.create("k", b"1"))
    run(second.create("k", b"2"))
    run(first.close())
    assert run(second.read("k")) == b"2"  # closing one backend leaves the others working
    run(second.close())
    third = _open(f"{url}/run-a", options)  # the last close closed it: a fresh one
    assert third._fs is not second._fs
    assert run(third.read("k")) == b"1"
    run(third.close())
    run(other.close())
