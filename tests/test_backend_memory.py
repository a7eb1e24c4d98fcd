"""The memory backend passes the conformance suite, plus its own sharing rules."""

from __future__ import annotations

import uuid

import pytest

from partialstore import registry
from partialstore._runtime.aio import run
from partialstore.errors import InvalidInputError
from partialstore.testing.conformance import BackendConformance


class TestMemoryBackend(BackendConformance):
    # The store lives in this process only; cross-process races cannot apply.
    shared_across_processes = False

    @pytest.fixture
    def backend_url(self) -> tuple[str, dict]:
        return f"memory://{uuid.uuid4().hex}/root", {}


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


def test_single_writer_option_is_popped_and_unknown_options_refused() -> None:
    backend = registry.open_backend(f"memory://{uuid.uuid4().hex}", {"single_writer": True})
    assert backend.single_writer is True
    assert backend.capabilities.atomic_create
    with pytest.raises(InvalidInputError, match="storage options"):
        registry.open_backend("memory://x", {"anon": True})
    with pytest.raises(InvalidInputError, match="single_writer"):
        registry.open_backend("memory://x", {"single_writer": "yes"})
