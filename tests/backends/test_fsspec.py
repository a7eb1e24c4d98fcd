"""The generic fsspec backend passes the conformance suite where it can, and refuses the rest.

- over fsspec's ``LocalFileSystem`` (reached through a ``local://`` URL and
  the registry's fallback): allow-listed atomic create, full suite;
- over fsspec's ``MemoryFileSystem`` passed explicitly: no atomic create, so
  the suite checks the refusal and runs the create tests in single-writer mode;
- over ``AsyncFileSystemWrapper`` (an async filesystem), which drives the
  coroutine-forwarding path.
"""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
import pytest
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from fsspec.implementations.local import LocalFileSystem

from partialstore import registry
from partialstore._runtime.aio import run
from partialstore.backend import Backend
from partialstore.backends.fsspec import FsspecBackend
from partialstore.errors import (
    AlreadyExistsError,
    InvalidInputError,
    UnsupportedOperationError,
)
from partialstore.testing.conformance import BackendConformance


class TestFsspecLocalFileSystem(BackendConformance):
    @pytest.fixture
    def backend_url(self, tmp_path: pathlib.Path) -> tuple[str, dict]:
        return f"local://{tmp_path}/root", {}

    # Out-of-band hooks: the files on disk, with plain file I/O.
    def _file(self, where: tuple[str, dict], key: str) -> pathlib.Path:
        return pathlib.Path(where[0].removeprefix("local://"), *key.split("/"))

    def raw_write(self, where: tuple[str, dict], key: str, data: bytes) -> None:
        path = self._file(where, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def raw_read(self, where: tuple[str, dict], key: str) -> bytes:
        return self._file(where, key).read_bytes()

    def raw_exists(self, where: tuple[str, dict], key: str) -> bool:
        return self._file(where, key).is_file()


class FsspecMemoryStore(BackendConformance):
    """Out-of-band hooks: fsspec's memory filesystem, used directly."""

    def raw_write(self, where: tuple[str, dict], key: str, data: bytes) -> None:
        fsspec.filesystem("memory").pipe_file(f"{where[0]}/{key}", data)

    def raw_read(self, where: tuple[str, dict], key: str) -> bytes:
        return bytes(fsspec.filesystem("memory").cat_file(f"{where[0]}/{key}"))

    def raw_exists(self, where: tuple[str, dict], key: str) -> bool:
        return bool(fsspec.filesystem("memory").isfile(f"{where[0]}/{key}"))


class TestFsspecMemoryFileSystem(FsspecMemoryStore):
    # fsspec's memory filesystem lives in this process only.
    shared_across_processes = False

    def open_backend(self, url: str, storage_options: Mapping[str, Any]) -> Backend:
        return FsspecBackend(url, storage_options, fs=fsspec.filesystem("memory"))

    @pytest.fixture
    def backend_url(self) -> tuple[str, dict]:
        return f"memory://{uuid.uuid4().hex}/root", {}


class TestFsspecAsyncWrapper(FsspecMemoryStore):
    shared_across_processes = False

    def open_backend(self, url: str, storage_options: Mapping[str, Any]) -> Backend:
        fs = AsyncFileSystemWrapper(fsspec.filesystem("memory"), asynchronous=False)
        return FsspecBackend(url, storage_options, fs=fs)

    @pytest.fixture
    def backend_url(self) -> tuple[str, dict]:
        return f"memory://{uuid.uuid4().hex}/root", {}


def test_registry_sends_unclaimed_schemes_here(tmp_path: pathlib.Path) -> None:
    backend = registry.open_backend(f"local://{tmp_path}")
    assert isinstance(backend, FsspecBackend)
    assert isinstance(backend.fs, LocalFileSystem)
    assert backend.capabilities.atomic_create
    assert not backend.capabilities.atomic_rename
    assert not backend.capabilities.compare_and_swap
    assert backend.kvstore_spec("x") is None


def test_allow_list_is_exact_about_classes(tmp_path: pathlib.Path) -> None:
    class CustomLocal(LocalFileSystem):
        """A subclass may change open/pipe semantics, so it is not trusted."""

    backend = FsspecBackend(str(tmp_path), {}, fs=CustomLocal(skip_instance_cache=True))
    assert backend.capabilities.atomic_create is False
    with pytest.raises(UnsupportedOperationError, match="single_writer=True"):
        run(backend.create("k", b"x"))
    assert not (tmp_path / "k").exists()


def test_memory_refuses_create_and_single_writer_checks_then_writes() -> None:
    url = f"memory://{uuid.uuid4().hex}"
    memory = fsspec.filesystem("memory")
    refusing = FsspecBackend(url, {}, fs=memory)
    assert refusing.single_writer is False
    with pytest.raises(UnsupportedOperationError, match="no atomic create"):
        run(refusing.create("k", b"x"))
    single = FsspecBackend(url, {"single_writer": True}, fs=memory)
    run(single.create("k", b"x"))
    with pytest.raises(AlreadyExistsError):
        run(single.create("k", b"y"))
    assert run(refusing.read("k")) == b"x"
    run(single.delete_prefix(""))


def test_bad_options_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidInputError, match="configure the filesystem"):
        FsspecBackend("memory://x", {"anon": True}, fs=fsspec.filesystem("memory"))
    with pytest.raises(InvalidInputError):
        registry.open_backend("nosuchprotocol-xyz://bucket/x")
    bound = AsyncFileSystemWrapper(fsspec.filesystem("memory"), asynchronous=True)
    with pytest.raises(InvalidInputError, match="asynchronous=True"):
        FsspecBackend("memory://x", {}, fs=bound)


def test_s3fs_create_is_conditional(s3_url: tuple[str, dict]) -> None:
    # Passing on moto is no proof of atomicity (moto checks without a lock);
    # it proves s3fs sends If-None-Match, which a plain PUT would not.
    import s3fs

    url, options = s3_url
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    backend = FsspecBackend(url, {}, fs=fs)
    assert backend.capabilities.atomic_create
    run(backend.create("log/1", b"first"))
    with pytest.raises(AlreadyExistsError):
        run(backend.create("log/1", b"second"))
    assert run(backend.read("log/1")) == b"first"
    assert run(backend.list()) == ["log/1"]


def test_gcsfs_create_is_conditional(gcs_url: tuple[str, dict]) -> None:
    from gcsfs.core import GCSFileSystem

    url, options = gcs_url
    fs = GCSFileSystem(**options, skip_instance_cache=True)
    backend = FsspecBackend(url, {}, fs=fs)
    assert backend.capabilities.atomic_create
    run(backend.create("log/1", b"first"))
    with pytest.raises(AlreadyExistsError):
        run(backend.create("log/1", b"second"))
    assert run(backend.read("log/1")) == b"first"
    assert run(backend.list()) == ["log/1"]


def test_extended_gcsfs_is_not_trusted_with_create() -> None:
    from gcsfs.extended_gcsfs import ExtendedGcsFileSystem

    fs = ExtendedGcsFileSystem(token="anon", skip_instance_cache=True)
    backend = FsspecBackend("gs://bucket/root", {}, fs=fs)
    assert backend.capabilities.atomic_create is False
