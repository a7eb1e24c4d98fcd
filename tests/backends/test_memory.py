"""The memory backend passes the conformance suite, plus its own sharing rules."""

from __future__ import annotations

import uuid

import pytest

from partialstore import registry
from partialstore._runtime.aio import run
from partialstore.backends import memory
from partialstore.errors import InvalidInputError
from partialstore.testing.conformance import BackendConformance


class TestMemoryBackend(BackendConformance):
    # The store lives in this process only; cross-process races cannot apply.
    shared_across_processes = False

    @pytest.fixture
    def backend_url(self) -> tuple[str, dict]:
        return f"memory://{uuid.uuid4().hex}/root", {}

    # Out-of-band hooks: the process-wide dict behind every MemoryBackend.
    @staticmethod
    def _full(where: tuple[str, dict], key: str) -> str:
        return f"{where[0].removeprefix('memory://')}/{key}"

    def raw_write(self, where: tuple[str, dict], key: str, data: bytes) -> None:
        with memory._lock:
            memory._store[self._full(where, key)] = (bytes(data), next(memory._versions))

    def raw_read(self, where: tuple[str, dict], key: str) -> bytes:
        with memory._lock:
            return memory._store[self._full(where, key)][0]

    def raw_exists(self, where: tuple[str, dict], key: str) -> bool:
        with memory._lock:
            return self._full(where, key) in memory._store


def test_instances_share_one_store() -> None:
    root = f"memory://{uuid.uuid4().hex}"
    first = registry.open_backend(root)
    second = registry.open_backend(root)
    run(first.write("k", b"v"))
    assert run(second.read("k")) == b"v"
    nested = registry.open_backend(f"{root}/sub")
    run(first.write("sub/x", b"y"))
    assert run(nested.list()) == ["x"]
    run(first.delete_prefix(""))
    assert run(second.list()) == []


def test_roots_do_not_leak_into_each_other() -> None:
    base = uuid.uuid4().hex
    a = registry.open_backend(f"memory://{base}/a")
    ab = registry.open_backend(f"memory://{base}/ab")
    run(ab.write("x", b"1"))
    assert run(a.list()) == []
    run(a.delete_prefix(""))
    assert run(ab.read("x")) == b"1"
    run(ab.delete_prefix(""))


def test_unknown_options_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="storage options"):
        registry.open_backend("memory://x", {"anon": True})
