"""The local backend passes the conformance suite, plus what only a filesystem has."""

from __future__ import annotations

import os
import pathlib

import pytest

from partialstore import registry
from partialstore._runtime.aio import run
from partialstore.backends import local
from partialstore.errors import (
    AlreadyExistsError,
    BackendError,
    InvalidInputError,
    NotFoundError,
    UnsupportedOperationError,
)
from partialstore.testing.conformance import BackendConformance


class LocalFiles(BackendConformance):
    """Out-of-band hooks: the files under the root, with plain file I/O."""

    def _file(self, where: tuple[str, dict], key: str) -> pathlib.Path:
        return pathlib.Path(local.root_from_url(where[0]), *key.split("/"))

    def raw_write(self, where: tuple[str, dict], key: str, data: bytes) -> None:
        path = self._file(where, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def raw_read(self, where: tuple[str, dict], key: str) -> bytes:
        return self._file(where, key).read_bytes()

    def raw_exists(self, where: tuple[str, dict], key: str) -> bool:
        return self._file(where, key).is_file()


class TestLocalBackendPath(LocalFiles):
    @pytest.fixture
    def backend_url(self, tmp_path: pathlib.Path) -> tuple[str, dict]:
        # A root that does not exist yet: the backend creates it on demand.
        return str(tmp_path / "root with space"), {}


class TestLocalBackendFileURL(LocalFiles):
    @pytest.fixture
    def backend_url(self, tmp_path: pathlib.Path) -> tuple[str, dict]:
        return f"file://{tmp_path}/root", {}


@pytest.fixture
def backend(tmp_path: pathlib.Path) -> local.LocalBackend:
    instance = registry.open_backend(tmp_path / "root")
    assert isinstance(instance, local.LocalBackend)
    return instance


def test_registry_routes_paths_and_file_urls(tmp_path: pathlib.Path) -> None:
    for url in (str(tmp_path), f"file://{tmp_path}", f"FILE://{tmp_path}", tmp_path):
        instance = registry.open_backend(url)
        assert isinstance(instance, local.LocalBackend)
        assert instance.root == str(tmp_path)
    assert local.root_from_url(f"file://localhost{tmp_path}") == str(tmp_path)
    assert local.root_from_url("relative/dir") == os.path.abspath("relative/dir")


def test_capabilities_on_this_filesystem(backend: local.LocalBackend) -> None:
    caps = backend.capabilities
    assert caps.atomic_create
    # ext4/xfs/btrfs/tmpfs on Linux support RENAME_NOREPLACE and directory flock.
    assert caps.atomic_rename and caps.compare_and_swap


def test_rename_refuses_an_empty_existing_target_directory(
    backend: local.LocalBackend, tmp_path: pathlib.Path
) -> None:
    run(backend.write("src/a", b"x"))
    (tmp_path / "root" / "dst").mkdir()
    with pytest.raises(AlreadyExistsError):
        run(backend.rename("src", "dst"))
    assert run(backend.list("src")) == ["src/a"]
    assert list((tmp_path / "root" / "dst").iterdir()) == []
    # A file in the way refuses too.
    run(backend.write("file", b"f"))
    with pytest.raises(AlreadyExistsError):
        run(backend.rename("src", "file"))
    assert run(backend.read("file")) == b"f"


def test_rename_into_itself_is_invalid(backend: local.LocalBackend) -> None:
    run(backend.write("a/x", b"x"))
    for src, dst in (("a", "a/b"), ("a/b", "a")):
        with pytest.raises(InvalidInputError):
            run(backend.rename(src, dst))
    with pytest.raises(NotFoundError):
        run(backend.rename("a/x", "y"))  # a key is not a prefix


def test_without_renameat2_rename_is_unsupported(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulates a platform whose libc has no renameat2: the probe must say so.
    monkeypatch.setattr(local, "_RENAMEAT2", None)
    monkeypatch.setattr(local, "_probe_cache", {})
    instance = local.LocalBackend(str(tmp_path / "root"), {})
    assert instance.capabilities.atomic_rename is False
    run(instance.write("src/a", b"x"))
    with pytest.raises(UnsupportedOperationError, match="atomic rename"):
        run(instance.rename("src", "dst"))
    assert run(instance.list()) == ["src/a"]


def test_temp_files_are_not_listed(backend: local.LocalBackend, tmp_path: pathlib.Path) -> None:
    run(backend.write("d/key", b"x"))
    in_flight = tmp_path / "root" / "d" / (".key.tmp-" + "a" * 32)
    in_flight.write_bytes(b"partial")
    assert run(backend.list()) == ["d/key"]
    assert local.is_temp_name(in_flight.name)
    assert not local.is_temp_name("key")


def test_create_leaves_no_temp_files(backend: local.LocalBackend, tmp_path: pathlib.Path) -> None:
    run(backend.create("d/key", b"x"))
    with pytest.raises(AlreadyExistsError):
        run(backend.create("d/key", b"y"))
    run(backend.write("d/key", b"z"))
    assert sorted(p.name for p in (tmp_path / "root" / "d").iterdir()) == ["key"]


def test_key_and_prefix_of_one_name_is_a_clear_error(backend: local.LocalBackend) -> None:
    run(backend.write("a", b"file"))
    with pytest.raises(BackendError, match="same name"):
        run(backend.write("a/b", b"x"))
    with pytest.raises(BackendError, match="same name"):
        run(backend.create("a/b", b"x"))
    run(backend.write("p/q", b"x"))
    with pytest.raises(BackendError, match="same name"):
        run(backend.write("p", b"x"))


def test_kvstore_spec_is_the_file_driver(
    backend: local.LocalBackend, tmp_path: pathlib.Path
) -> None:
    assert backend.kvstore_spec("data/x") == {
        "driver": "file",
        "path": f"{tmp_path}/root/data/x/",
    }
    assert backend.kvstore_spec("") == {"driver": "file", "path": f"{tmp_path}/root/"}
    with pytest.raises(InvalidInputError):
        backend.kvstore_spec("../escape")


def test_unknown_options_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidInputError, match="storage options"):
        registry.open_backend(tmp_path, {"auto_mkdir": True})
