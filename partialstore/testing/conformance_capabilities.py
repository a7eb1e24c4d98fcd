"""Conformance tests that depend on a capability: rename, compare-and-swap, TensorStore.

A mixin of :class:`~partialstore.testing.conformance.BackendConformance`
(which is what backends subclass); kept apart because each test here checks
either the capability or, where the backend lacks it, the documented
alternative: ``rename`` without ``atomic_rename`` and versioned writes
without ``compare_and_swap`` must raise ``UnsupportedOperationError`` and
change nothing, and a backend with no ``kvstore_spec`` must carry zarr3
arrays through ``read``/``write``.

Run only these tests of one backend with
``pytest tests/backends/test_local.py -k "rename or compare_and_swap or zarr3"``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from partialstore._runtime.aio import run
from partialstore.backend import Backend
from partialstore.errors import (
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    UnsupportedOperationError,
)

__all__ = ["CapabilityConformance"]


class CapabilityConformance:
    """Capability-dependent tests; needs the ``backend`` fixture."""

    # ------------------------------------------------------------------ rename

    def test_rename_moves_all_keys(self, backend: Backend) -> None:
        for key in ["src/a", "src/b/c", "src/b/d", "srcx/keep"]:
            run(backend.write(key, key.encode()))
        if not backend.capabilities.atomic_rename:
            with pytest.raises(UnsupportedOperationError):
                run(backend.rename("src", "dst"))
            assert run(backend.list("src")) == ["src/a", "src/b/c", "src/b/d"]
            assert run(backend.list("dst")) == []
            return
        run(backend.rename("src", "deeper/dst"))
        assert run(backend.list("src")) == []
        assert run(backend.list("deeper/dst")) == [
            "deeper/dst/a",
            "deeper/dst/b/c",
            "deeper/dst/b/d",
        ]
        assert run(backend.read("deeper/dst/b/c")) == b"src/b/c"
        assert run(backend.list("srcx")) == ["srcx/keep"]

    def test_rename_never_replaces(self, backend: Backend) -> None:
        run(backend.write("src/a", b"src"))
        run(backend.write("dst/z", b"dst"))
        if not backend.capabilities.atomic_rename:
            with pytest.raises(UnsupportedOperationError):
                run(backend.rename("src", "dst"))
        else:
            with pytest.raises(AlreadyExistsError) as info:
                run(backend.rename("src", "dst"))
            assert isinstance(info.value, FileExistsError)
        assert run(backend.list("src")) == ["src/a"]
        assert run(backend.list("dst")) == ["dst/z"]
        assert run(backend.read("dst/z")) == b"dst"

    def test_rename_missing_source(self, backend: Backend) -> None:
        expected = (
            NotFoundError if backend.capabilities.atomic_rename else UnsupportedOperationError
        )
        with pytest.raises(expected):
            run(backend.rename("no/such/src", "dst"))
        assert run(backend.list()) == []

    # ---------------------------------------------------------- compare-and-swap

    def test_compare_and_swap(self, backend: Backend) -> None:
        run(backend.write("cas/key", b"v1"))
        if not backend.capabilities.compare_and_swap:
            with pytest.raises(UnsupportedOperationError):
                run(backend.read_versioned("cas/key"))
            with pytest.raises(UnsupportedOperationError):
                run(backend.write("cas/key", b"v2", if_version="any"))
            assert run(backend.read("cas/key")) == b"v1"
            return
        data, version = run(backend.read_versioned("cas/key"))
        assert data == b"v1" and isinstance(version, str)
        run(backend.write("cas/key", b"v2", if_version=version))
        with pytest.raises(ConflictError):
            run(backend.write("cas/key", b"stale", if_version=version))
        assert run(backend.read("cas/key")) == b"v2"
        data, version2 = run(backend.read_versioned("cas/key"))
        assert data == b"v2" and version2 != version
        # A plain write also moves the version on.
        run(backend.write("cas/key", b"v3"))
        with pytest.raises(ConflictError):
            run(backend.write("cas/key", b"stale", if_version=version2))
        with pytest.raises(NotFoundError):
            run(backend.read_versioned("cas/missing"))
        with pytest.raises((ConflictError, NotFoundError)):
            run(backend.write("cas/missing", b"x", if_version=version2))
        assert not run(backend.exists("cas/missing"))

    # --------------------------------------------------------------- TensorStore

    def test_tensorstore_zarr3_on_kvstore_spec(self, backend: Backend) -> None:
        spec = backend.kvstore_spec("arr")
        if spec is None:
            self._check_zarr3_through_backend(backend)
            return
        import tensorstore as ts

        context = backend.tensorstore_context()
        kwargs: dict[str, Any] = {"context": ts.Context(context)} if context else {}
        values = np.arange(24, dtype=np.float32).reshape(6, 4) + 1
        array = ts.open(
            {
                "driver": "zarr3",
                "kvstore": spec,
                "metadata": {
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [3, 2]}}
                },
            },
            create=True,
            dtype=ts.float32,
            shape=[6, 4],
            **kwargs,
        ).result()
        array.write(values).result()
        reopened = ts.open({"driver": "zarr3", "kvstore": spec}, **kwargs).result()
        np.testing.assert_array_equal(reopened.read().result(), values)
        expected = ["arr/c/0/0", "arr/c/0/1", "arr/c/1/0", "arr/c/1/1", "arr/zarr.json"]
        assert run(backend.list("arr")) == expected
        metadata = json.loads(run(backend.read("arr/zarr.json")))
        assert metadata["zarr_format"] == 3 and metadata["shape"] == [6, 4]
        assert len(run(backend.read("arr/c/1/1"))) > 0

    def _check_zarr3_through_backend(self, backend: Backend) -> None:
        """Without a kvstore spec, zarr3 arrays reach the store through read/write."""
        from partialstore._arrays import arrays

        values = np.arange(600_000, dtype=np.float32).reshape(600, 1000) + 1
        (leaf,) = run(arrays.write_arrays(backend, "root", "data/save", [values], pack_threshold=0))
        descriptor = leaf.encode()  # as the manifest stores it
        assert descriptor["format"] == "zarr3"
        keys = run(backend.list(f"root/{descriptor['path']}"))
        assert f"root/{descriptor['path']}/zarr.json" in keys
        assert any("/c/" in key for key in keys), keys  # chunk objects, not one blob
        metadata = json.loads(run(backend.read(f"root/{descriptor['path']}/zarr.json")))
        assert metadata["zarr_format"] == 3 and metadata["shape"] == [600, 1000]
        (loaded,) = run(arrays.read_arrays(backend, "root", [(descriptor, None)]))
        np.testing.assert_array_equal(loaded, values)
