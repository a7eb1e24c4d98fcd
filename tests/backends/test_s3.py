"""The S3 backend against a real moto server: the conformance suite plus S3 specifics."""

from __future__ import annotations

import functools
import os
import stat
from typing import Any

import boto3
import numpy as np
import pytest
import tensorstore as ts
from botocore.exceptions import ClientError, EndpointConnectionError

from partialstore import registry
from partialstore._runtime.aio import run
from partialstore.backends.s3 import S3Backend, map_s3_error
from partialstore.errors import (
    BackendError,
    InvalidInputError,
    NotFoundError,
    TransientBackendError,
)
from partialstore.testing.conformance import BackendConformance
from partialstore.testing.servers import MotoS3Server


class TestS3Backend(BackendConformance):
    # Stock moto checks If-None-Match/If-Match without a lock, so racing
    # conditional writes could all win (measured: 8 MiB creates had several
    # winners in 13 of 30 rounds; compare-and-swap had 2 winners in 3 of 180
    # rounds under load). MotoS3Server serializes moto's writes, which gives
    # it S3's atomic conditions, so no race needs to be marked xfail.
    xfail_reasons: dict[str, str] = {}

    @pytest.fixture
    def backend_url(self, s3_url: tuple[str, dict]) -> tuple[str, dict]:
        return s3_url

    # Out-of-band hooks: plain boto3 requests to the server (the backend uses
    # s3fs and TensorStore, never boto3).
    @staticmethod
    def _object(where: tuple[str, dict], key: str) -> tuple[Any, dict[str, str]]:
        url, options = where
        bucket, _, root = url.removeprefix("s3://").partition("/")
        client = _boto3_client(
            options["endpoint_url"],
            options["key"],
            options["secret"],
            options["client_kwargs"]["region_name"],
        )
        return client, {"Bucket": bucket, "Key": f"{root}/{key}" if root else key}

    def raw_write(self, where: tuple[str, dict], key: str, data: bytes) -> None:
        client, target = self._object(where, key)
        client.put_object(Body=data, **target)

    def raw_read(self, where: tuple[str, dict], key: str) -> bytes:
        client, target = self._object(where, key)
        return client.get_object(**target)["Body"].read()

    def raw_exists(self, where: tuple[str, dict], key: str) -> bool:
        client, target = self._object(where, key)
        try:
            client.head_object(**target)
        except ClientError as exc:
            if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
                return False
            raise
        return True


@functools.cache
def _boto3_client(endpoint: str, key: str, secret: str, region: str) -> Any:
    """One boto3 client per server (creating one costs more than a request)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=region,
    )


def _open(url: str, options: dict) -> S3Backend:
    backend = registry.open_backend(url, options)
    assert isinstance(backend, S3Backend)
    return backend


def test_kvstore_spec_uses_environment_credentials_when_they_match(s3_url) -> None:
    url, options = s3_url
    backend = _open(url, options)
    spec = backend.kvstore_spec("data/abc")
    bucket = url.split("/")[2]
    assert spec == {
        "driver": "s3",
        "bucket": bucket,
        "path": "root/data/abc/",
        "use_conditional_write": True,
        "endpoint": options["endpoint_url"],
        "aws_region": "us-east-1",
        "aws_credentials": {"type": "environment"},
    }
    run(backend.close())


def test_kvstore_spec_hands_explicit_keys_over_in_memory_not_on_disk(
    s3_url, monkeypatch, tmp_path
) -> None:
    url, options = s3_url
    # Keys that differ from the environment cannot use {"type": "environment"}.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where a temp file would have gone
    backend = _open(url, options)
    spec = backend.kvstore_spec("arr")
    credentials = spec["aws_credentials"]
    assert credentials["type"] == "profile"
    assert credentials["config_file"] == os.devnull
    path = credentials["credentials_file"]
    # An anonymous memory file (memfd) of this process, private to its owner.
    assert path.startswith("/proc/self/fd/")
    assert os.readlink(path).startswith("/memfd:partialstore-aws-credentials")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as handle:
        assert "aws_secret_access_key = testing" in handle.read()
    assert list(tmp_path.iterdir()) == []
    # TensorStore really opens the store with it, and reads that profile.
    kvstore = ts.KvStore.open(spec).result()
    kvstore.write("k", b"v").result()
    assert run(backend.read("arr/k")) == b"v"
    wrong = {**spec, "aws_credentials": {**credentials, "profile": "missing"}}
    with pytest.raises(ValueError):
        ts.KvStore.open(wrong).result()
    fd = int(path.rsplit("/", 1)[1])
    run(backend.close())
    # Closed with the backend: the number is free, or already reused by another
    # thread of this process for some other file, but no longer the memfd.
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = ""
    assert not target.startswith("/memfd:partialstore-aws-credentials"), target


def _no_aws_environment(monkeypatch, tmp_path) -> None:
    for name in (
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe


def test_kvstore_spec_names_the_provider_botocore_used(monkeypatch, tmp_path) -> None:
    _no_aws_environment(monkeypatch, tmp_path)
    anonymous = S3Backend("s3://bucket/p", {"anon": True})
    assert anonymous.kvstore_spec("")["aws_credentials"] == {"type": "anonymous"}
    # Nothing anywhere: TensorStore is not asked (s3fs reports the missing keys).
    assert S3Backend("s3://bucket", {"retries": 1}).kvstore_spec("x") is None
    # A profile in the shared credentials file: both files named explicitly, so
    # TensorStore never probes ~/.aws (and never logs that it is missing).
    shared = tmp_path / "absent-credentials"
    shared.write_text("[work]\naws_access_key_id = a\naws_secret_access_key = b\n")
    profile = S3Backend("s3://bucket", {"profile": "work"})
    assert profile.kvstore_spec("x") == {
        "driver": "s3",
        "bucket": "bucket",
        "path": "x/",
        "use_conditional_write": True,
        "aws_credentials": {
            "type": "profile",
            "profile": "work",
            "credentials_file": str(shared),
            "config_file": os.devnull,
        },
    }
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    environment = S3Backend("s3://bucket", {"retries": 2})
    assert environment.kvstore_spec("x")["aws_credentials"] == {"type": "environment"}
    for backend in (anonymous, profile, environment):
        run(backend.close())


def test_zarr_array_written_by_tensorstore_is_listed(s3_url) -> None:
    url, options = s3_url
    backend = _open(url, options)
    array = ts.open(
        {"driver": "zarr3", "kvstore": backend.kvstore_spec("a")},
        create=True,
        dtype=ts.int32,
        shape=[4],
    ).result()
    array.write(np.arange(4, dtype=np.int32)).result()
    assert run(backend.list("a")) == ["a/c/0", "a/zarr.json"]
    run(backend.close())


def test_directory_placeholders_are_not_keys(s3_url) -> None:
    url, options = s3_url
    backend = _open(url, options)
    run(backend.write("dir/real", b"x"))
    # The S3 console makes zero-byte "folder/" objects; they are not data.
    run(backend._s3("put_object", Key="root/dir/", Body=b""))
    run(backend._s3("put_object", Key="root/", Body=b""))
    assert run(backend.list()) == ["dir/real"]
    assert run(backend.list("dir")) == ["dir/real"]
    assert run(backend.list_children()) == ["dir"]
    assert run(backend.list_children("dir")) == ["real"]
    run(backend.close())


def test_missing_bucket_is_reported(moto_server: MotoS3Server) -> None:
    backend = _open("s3://no-such-bucket-here/x", moto_server.storage_options())
    with pytest.raises(NotFoundError, match="bucket does not exist"):
        run(backend.read("k"))
    with pytest.raises(NotFoundError, match="no-such-bucket-here"):
        run(backend.create("k", b"x"))
    run(backend.close())


def test_capabilities_need_no_server() -> None:
    backend = S3Backend("s3://bucket/x", {"anon": True})
    assert backend.capabilities.atomic_create and backend.capabilities.compare_and_swap
    assert not backend.capabilities.atomic_rename


@pytest.mark.parametrize("url", ["s3://", "s3:///x", "s3://b/../x", "s3://b/a//c", "gs://b/x"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidInputError):
        S3Backend(url, {"anon": True})


def _client_error(code: str, status: int) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_client_error("NoSuchKey", 404), NotFoundError),
        (_client_error("SlowDown", 503), TransientBackendError),
        (_client_error("InternalError", 500), TransientBackendError),
        (_client_error("ConditionalRequestConflict", 409), TransientBackendError),
        (_client_error("AccessDenied", 403), BackendError),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), TransientBackendError),
        (TimeoutError("read timed out"), TransientBackendError),
    ],
)
def test_error_mapping(error: Exception, expected: type[Exception]) -> None:
    mapped = map_s3_error(error, "read", "s3://b/k")
    assert type(mapped) is expected
    assert "s3://b/k" in str(mapped)


def test_backends_with_equal_options_share_one_filesystem(s3_url) -> None:
    # A new checkpoint path usually means a new backend: it must not pay for
    # a new aiobotocore client (measured 0.3-1.8 s before the first request).
    url, options = s3_url
    # Options no other test uses, so no cached backend elsewhere shares the pool entry.
    options = {**options, "config_kwargs": {"connect_timeout": 7}}
    first = _open(f"{url}/run-a", options)
    second = _open(f"{url}/run-b", options)
    other = _open(f"{url}/run-a", {**options, "config_kwargs": {"connect_timeout": 8}})
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


def test_log_requests_go_through_tensorstore(s3_url, monkeypatch) -> None:
    # With s3fs's request paths broken, the log's operations still work:
    # they are sent by TensorStore's client (1 ms of CPU each instead of 7).
    url, options = s3_url
    backend = _open(f"{url}/fast", options)
    fs = backend._fs

    def broken(*args, **kwargs):
        raise AssertionError("this request should have gone through TensorStore")

    monkeypatch.setattr(fs, "_call_s3", broken)
    monkeypatch.setattr(fs, "_pipe_file", broken)
    assert run(backend.exists("log/00000001.json")) is False
    run(backend.create("log/00000001.json", b"one"))
    assert run(backend.exists("log/00000001.json")) is True
    assert run(backend.read("log/00000001.json")) == b"one"
    assert run(backend.list("log")) == ["log/00000001.json"]
    assert run(backend.list("")) == ["log/00000001.json"]
    monkeypatch.undo()
    # A second create of the key is refused; S3 (through s3fs) confirms it exists.
    with pytest.raises(FileExistsError):
        run(backend.create("log/00000001.json", b"two"))
    assert run(backend.read("log/00000001.json")) == b"one"


def test_unusual_keys_take_the_s3fs_path(s3_url) -> None:
    # TensorStore does not unescape listed keys ("&amp;"): such keys go through s3fs.
    url, options = s3_url
    backend = _open(f"{url}/odd", options)
    run(backend.create("a&b <c>.json", b"x"))
    run(backend.create("plain.json", b"y"))
    assert run(backend.list("")) == ["a&b <c>.json", "plain.json"]
    assert run(backend.read("a&b <c>.json")) == b"x"
    with pytest.raises(FileNotFoundError):
        run(backend.read("missing.json"))
