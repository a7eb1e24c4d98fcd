"""Conformance tests that look behind the backend's back, and the options every backend takes.

A mixin of :class:`~partialstore.testing.conformance.BackendConformance`
(which is what backends subclass). Round trips through one backend cannot
show that ``write`` stored the bytes it was given rather than something it
alone can decode, nor that ``read``, ``exists`` and ``list`` see objects
another program put there. The out-of-band hooks close that gap, as
zarr-python's ``StoreTests.get``/``set`` do: each backend's test module
implements them on the store itself (files on disk, the memory store's
dict, the S3 or GCS HTTP API), never through the backend under test.

``where`` is the ``(url, storage_options)`` of the ``backend_url`` fixture
and ``key`` is relative to that root, as the backend's own keys are.

The hooks of a backend over local files look like this::

    class TestLocal(BackendConformance):
        def raw_write(self, where, key, data):
            path = os.path.join(where[0], key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pathlib.Path(path).write_bytes(data)

        def raw_read(self, where, key):
            return pathlib.Path(where[0], key).read_bytes()

        def raw_exists(self, where, key):
            return os.path.isfile(os.path.join(where[0], key))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from partialstore._runtime.aio import run
from partialstore.backend import Backend
from partialstore.errors import (
    AlreadyExistsError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    UnsupportedOperationError,
)

__all__ = ["HOOKS", "BackendUrl", "OutOfBandConformance"]

BackendUrl = tuple[str, dict[str, Any]]
#: The hooks every concrete test class must implement.
HOOKS = ("raw_write", "raw_read", "raw_exists")
OOB_PAYLOAD = 1024 * 1024


class OutOfBandConformance:
    """Out-of-band and option tests; needs ``backend``, ``creator`` and ``backend_url``."""

    # ------------------------------------------------------------------- hooks

    def raw_write(self, where: BackendUrl, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` without the backend (replacing any object there)."""
        raise NotImplementedError(f"{type(self).__name__} must implement raw_write")

    def raw_read(self, where: BackendUrl, key: str) -> bytes:
        """The bytes stored at ``key``, read without the backend."""
        raise NotImplementedError(f"{type(self).__name__} must implement raw_read")

    def raw_exists(self, where: BackendUrl, key: str) -> bool:
        """Whether an object is stored at exactly ``key``, asked without the backend."""
        raise NotImplementedError(f"{type(self).__name__} must implement raw_exists")

    if TYPE_CHECKING:
        # Provided by BackendConformance, the only class that mixes this one in.
        def open_backend(self, url: str, storage_options: Mapping[str, Any]) -> Backend: ...

        def _expect_create_refused(self, backend: Backend) -> None: ...

    # ------------------------------------------------------------------- tests

    def test_stored_bytes_are_the_bytes_given(
        self, backend: Backend, creator: Backend, backend_url: BackendUrl
    ) -> None:
        self._expect_create_refused(backend)
        data = np.random.default_rng().integers(0, 256, OOB_PAYLOAD, dtype=np.uint8).tobytes()
        unicode_key = "oob/dir with space/ünï ключ.json"
        run(creator.create("oob/created.bin", data))
        run(creator.create(unicode_key, "ключ".encode()))
        run(backend.write("oob/written", b"first, longer"))
        run(backend.write("oob/written", b"second"))
        run(backend.write("oob/empty", b""))
        assert self.raw_read(backend_url, "oob/created.bin") == data
        assert self.raw_read(backend_url, unicode_key) == "ключ".encode()
        assert self.raw_read(backend_url, "oob/written") == b"second"
        assert self.raw_read(backend_url, "oob/empty") == b""
        assert self.raw_exists(backend_url, "oob/written")
        assert not self.raw_exists(backend_url, "oob")  # a prefix is not an object
        run(backend.delete("oob/written"))
        assert not self.raw_exists(backend_url, "oob/written")
        assert self.raw_exists(backend_url, "oob/created.bin")
        run(backend.delete_prefix("oob"))
        for key in ("oob/created.bin", unicode_key, "oob/empty"):
            assert not self.raw_exists(backend_url, key)

    def test_objects_stored_out_of_band_are_seen(
        self, backend: Backend, creator: Backend, backend_url: BackendUrl
    ) -> None:
        self.raw_write(backend_url, "oob/a", b"alpha")
        self.raw_write(backend_url, "oob/sub/b", bytes(range(256)))
        self.raw_write(backend_url, "oob/ü c", b"")
        assert run(backend.read("oob/a")) == b"alpha"
        assert run(backend.read("oob/sub/b", start=3, end=9)) == bytes(range(3, 9))
        assert run(backend.read("oob/ü c")) == b""
        assert run(backend.exists("oob/ü c")) and run(backend.exists("oob/sub/b"))
        assert not run(backend.exists("oob/sub"))
        assert run(backend.list("oob")) == ["oob/a", "oob/sub/b", "oob/ü c"]
        assert run(backend.list_children("oob")) == ["a", "sub", "ü c"]
        # An object another program stored counts as existing for create.
        if backend is creator:
            with pytest.raises(AlreadyExistsError):
                run(creator.create("oob/a", b"intruder"))
        self.raw_write(backend_url, "oob/a", b"replaced behind its back")
        assert run(backend.read("oob/a")) == b"replaced behind its back"
        assert self.raw_read(backend_url, "oob/a") == b"replaced behind its back"

    def test_compare_and_swap_sees_out_of_band_writers(
        self, backend: Backend, backend_url: BackendUrl
    ) -> None:
        # The optional capability is there for a writer that is not this one.
        run(backend.write("oob/cas", b"v1"))
        if not backend.capabilities.compare_and_swap:
            # Refused, and refused without touching what another writer stored.
            self.raw_write(backend_url, "oob/cas", b"another writer")
            with pytest.raises(UnsupportedOperationError):
                run(backend.write("oob/cas", b"stale", if_version="any"))
            assert self.raw_read(backend_url, "oob/cas") == b"another writer"
            return
        data, version = run(backend.read_versioned("oob/cas"))
        assert data == b"v1"
        self.raw_write(backend_url, "oob/cas", b"another writer")
        with pytest.raises(ConflictError):
            run(backend.write("oob/cas", b"stale", if_version=version))
        assert self.raw_read(backend_url, "oob/cas") == b"another writer"
        data, version = run(backend.read_versioned("oob/cas"))
        assert data == b"another writer"
        run(backend.write("oob/cas", b"v3", if_version=version))
        assert self.raw_read(backend_url, "oob/cas") == b"v3"

    # ----------------------------------------------------------------- options

    def test_single_writer_option(self, backend: Backend, backend_url: BackendUrl) -> None:
        url, options = backend_url
        assert backend.single_writer is bool(options.get("single_writer", False))
        promised = self.open_backend(url, {**options, "single_writer": True})
        try:
            assert promised.single_writer is True
            # A promise of the user changes nothing the store guarantees.
            assert promised.capabilities == backend.capabilities
        finally:
            run(promised.close())
        for bad in ("yes", 1):
            with pytest.raises(InvalidInputError, match="single_writer"):
                self.open_backend(url, {**options, "single_writer": bad})

    def test_read_range_edges(self, backend: Backend) -> None:
        run(backend.write("k", b"0123456789"))
        assert run(backend.read("k", end=0)) == b""
        assert run(backend.read("k", start=4, end=2)) == b""
        assert run(backend.read("k", start=10)) == b""
        assert run(backend.read("k", start=0)) == b"0123456789"
        assert run(backend.read("k", end=3)) == b"012"
        with pytest.raises(NotFoundError):
            run(backend.read("gone", end=0))
        for bad in ({"start": -1}, {"end": -2}, {"start": 1.5}):
            with pytest.raises(InvalidInputError):
                run(backend.read("k", **bad))
