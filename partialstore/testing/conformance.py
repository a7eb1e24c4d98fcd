"""The one conformance suite every backend runs unchanged.

The core relies on the :class:`~partialstore.backend.Backend` contract alone;
this suite is the proof that a backend keeps it. A backend's test module
subclasses :class:`BackendConformance` and provides the ``backend_url``
fixture (zarr-python's ``StoreTests`` pattern)::

    import uuid
    import pytest
    from partialstore.testing.conformance import BackendConformance

    class TestMemoryBackend(BackendConformance):
        shared_across_processes = False  # a memory store lives in one process

        @pytest.fixture
        def backend_url(self) -> tuple[str, dict]:
            return f"memory://{uuid.uuid4().hex}", {}

        # Out-of-band hooks: reach the store itself, not through the backend.
        def raw_write(self, where, key, data): ...
        def raw_read(self, where, key): ...
        def raw_exists(self, where, key): ...

Every concrete (``Test*``) subclass must implement the out-of-band hooks
``raw_write``, ``raw_read`` and ``raw_exists`` (see
:mod:`partialstore.testing.conformance_outofband`); a subclass that misses
one fails at import, so no backend loses those tests silently.

Optional class attributes and hooks:

- ``xfail_reasons``: ``{test_name: reason}`` for tests an emulator cannot
  pass (it is weaker than the real service). The suite marks those tests
  ``xfail(strict=True)``, so an emulator that gets fixed shows up.
- ``shared_across_processes``: ``False`` for stores that live inside one
  process; the cross-process races then check that another process indeed
  sees none of this one's keys.
- ``open_backend(url, storage_options)``: how the suite opens a backend
  (default :func:`partialstore.registry.open_backend`); override it to
  construct a backend directly (e.g. with an explicit fsspec filesystem).

Tests a backend cannot support are decided by capability, never skipped
silently: a backend without ``atomic_rename`` must raise
``UnsupportedOperationError`` from ``rename``; a backend without
``atomic_create`` must refuse ``create`` unless opened with the storage
option ``single_writer=True`` (then the non-race create tests run on it).
Nothing is skipped: where a capability is missing, the test checks the
documented alternative instead (racing creators all refused; zarr3 arrays
moved through ``read``/``write`` when ``kvstore_spec`` is ``None``). The
race tests live in :mod:`partialstore.testing.conformance_races` and the
rename, compare-and-swap and TensorStore tests in
:mod:`partialstore.testing.conformance_capabilities`, the out-of-band and
option tests in :mod:`partialstore.testing.conformance_outofband`, all mixed
in here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from partialstore import registry
from partialstore._runtime.aio import run
from partialstore.backend import Backend, Capabilities
from partialstore.errors import (
    AlreadyExistsError,
    InvalidInputError,
    NotFoundError,
    UnsupportedOperationError,
)
from partialstore.testing.conformance_capabilities import CapabilityConformance
from partialstore.testing.conformance_outofband import HOOKS, OutOfBandConformance
from partialstore.testing.conformance_races import RaceConformance

__all__ = ["BackendConformance"]

LARGE = 64 * 1024 * 1024
ATOMIC_WRITE_PAYLOAD, ATOMIC_WRITES = 4 * 1024 * 1024, 10
INVALID_KEYS = ("../x", "/abs", "a//b", "a/", "a/./b", "a/../b", "")


def _random(size: int) -> bytes:
    return np.random.default_rng().integers(0, 256, size, dtype=np.uint8).tobytes()


def _can_create(backend: Backend) -> bool:
    return backend.capabilities.atomic_create or backend.single_writer


class BackendConformance(CapabilityConformance, RaceConformance, OutOfBandConformance):
    """Subclass in a test module and provide the ``backend_url`` fixture.

    ``backend_url`` returns ``(root URL unique per test, storage_options)``;
    the options must be picklable, since child processes open their own
    backend from them.
    """

    #: test name -> why the emulator is weaker than the real service (strict xfail).
    xfail_reasons: dict[str, str] = {}
    # Also ``shared_across_processes: bool = True``, from RaceConformance.

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("Test"):
            return  # an intermediate base may leave the hooks to its subclasses
        missing = [h for h in HOOKS if getattr(cls, h) is getattr(OutOfBandConformance, h)]
        if missing:
            raise TypeError(
                f"{cls.__qualname__} subclasses BackendConformance but does not implement "
                f"the out-of-band hooks {missing}; implement them on the store itself "
                "(see partialstore.testing.conformance_outofband)."
            )

    # ----------------------------------------------------------------- fixtures

    def open_backend(self, url: str, storage_options: Mapping[str, Any]) -> Backend:
        """Open the backend under test; override to construct it directly."""
        return registry.open_backend(url, dict(storage_options))

    @pytest.fixture(autouse=True)
    def _apply_xfail_reasons(self, request: pytest.FixtureRequest) -> None:
        unknown = sorted(name for name in self.xfail_reasons if not hasattr(self, name))
        if unknown:
            pytest.fail(f"xfail_reasons names tests that do not exist: {unknown}")
        reason = self.xfail_reasons.get(request.node.originalname)
        if reason:
            request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))

    @pytest.fixture
    def backend(self, backend_url: tuple[str, dict[str, Any]]) -> Iterator[Backend]:
        url, options = backend_url
        instance = self.open_backend(url, options)
        yield instance
        # Roots are unique per test; emptying them keeps memory stores from growing.
        run(instance.delete_prefix(""))
        run(instance.close())

    @pytest.fixture
    def creator(
        self, backend: Backend, backend_url: tuple[str, dict[str, Any]]
    ) -> Iterator[Backend]:
        """A backend on the same root that may ``create``.

        The backend itself when it creates atomically (or was opened with
        ``single_writer``), otherwise a sibling opened with
        ``single_writer=True``: that mode is the user's promise that nobody
        races, so only the non-race tests use it.
        """
        if _can_create(backend):
            yield backend
            return
        url, options = backend_url
        sibling = self.open_backend(url, {**options, "single_writer": True})
        assert sibling.single_writer is True
        yield sibling
        run(sibling.close())

    def _expect_create_refused(self, backend: Backend) -> None:
        """Without atomic create (and no single-writer promise), create must refuse."""
        if _can_create(backend):
            return
        with pytest.raises(UnsupportedOperationError):
            run(backend.create("refused/key", b"x"))
        assert not run(backend.exists("refused/key"))

    # ------------------------------------------------------------------- basics

    def test_capabilities_and_url(
        self, backend: Backend, backend_url: tuple[str, dict[str, Any]]
    ) -> None:
        assert isinstance(backend.capabilities, Capabilities)
        assert isinstance(backend.url, str) and backend.url
        assert isinstance(backend.single_writer, bool)

    def test_create_then_read(self, backend: Backend, creator: Backend) -> None:
        self._expect_create_refused(backend)
        run(creator.create("c/one.json", b'{"a": 1}'))
        data = run(backend.read("c/one.json"))
        assert isinstance(data, bytes)
        assert data == b'{"a": 1}'
        assert run(backend.exists("c/one.json"))

    def test_create_existing_raises(self, backend: Backend, creator: Backend) -> None:
        self._expect_create_refused(backend)
        run(creator.create("c/key", b"original"))
        with pytest.raises(AlreadyExistsError) as info:
            run(creator.create("c/key", b"intruder"))
        assert isinstance(info.value, FileExistsError)
        assert run(backend.read("c/key")) == b"original"
        # A key written by plain write counts as existing too.
        run(backend.write("c/written", b"w"))
        with pytest.raises(FileExistsError):
            run(creator.create("c/written", b"intruder"))
        assert run(backend.read("c/written")) == b"w"

    def test_write_overwrite(self, backend: Backend) -> None:
        run(backend.write("w/key", b"first"))
        assert run(backend.read("w/key")) == b"first"
        run(backend.write("w/key", b"second, longer"))
        assert run(backend.read("w/key")) == b"second, longer"
        run(backend.write("w/key", b"3"))
        assert run(backend.read("w/key")) == b"3"
        assert run(backend.list("w")) == ["w/key"]

    def test_write_overwrite_is_atomic(self, backend: Backend) -> None:
        payloads = (_random(ATOMIC_WRITE_PAYLOAD), _random(ATOMIC_WRITE_PAYLOAD))
        run(backend.write("atomic/key", payloads[0]))
        first_read, stop = threading.Event(), threading.Event()
        seen: list[str] = []

        def reader() -> None:
            loop = asyncio.new_event_loop()
            try:
                while True:
                    done = stop.is_set()
                    data = loop.run_until_complete(backend.read("atomic/key"))
                    seen.append("ok" if data in payloads else f"torn read of {len(data)} bytes")
                    first_read.set()
                    if done:
                        return
            except Exception as exc:
                seen.append(f"error: {exc!r}")
                first_read.set()
            finally:
                loop.close()

        thread = threading.Thread(target=reader)
        thread.start()
        first_read.wait(60)
        try:
            for i in range(ATOMIC_WRITES):
                run(backend.write("atomic/key", payloads[(i + 1) % 2]))
        finally:
            stop.set()
            thread.join()
        bad = [s for s in seen if s != "ok"]
        assert not bad, f"{len(bad)} of {len(seen)} concurrent reads were not whole: {bad[:3]}"
        assert run(backend.read("atomic/key")) == payloads[ATOMIC_WRITES % 2]

    def test_read_ranges(self, backend: Backend) -> None:
        data = bytes(range(256)) * 4
        run(backend.write("r/key", data))
        assert run(backend.read("r/key", start=2, end=5)) == data[2:5]
        assert run(backend.read("r/key", start=1000)) == data[1000:]
        assert run(backend.read("r/key", end=7)) == data[:7]
        assert run(backend.read("r/key", start=0, end=len(data))) == data
        assert run(backend.read("r/key", start=10, end=10)) == b""
        # An end past the object is clipped, like a slice.
        assert run(backend.read("r/key", start=1020, end=5000)) == data[1020:]

    def test_list_after_writes(self, backend: Backend) -> None:
        keys = ["a/x", "a/y/z", "a/y/w", "a/y-1", "ab/x", "b", "c/d/e/f"]
        for key in keys:
            run(backend.write(key, key.encode()))
        assert run(backend.list()) == sorted(keys)
        assert run(backend.list("")) == sorted(keys)
        # Directory semantics: "a" must not match "ab/x" or "a/y-1"'s siblings' names.
        assert run(backend.list("a")) == ["a/x", "a/y-1", "a/y/w", "a/y/z"]
        assert run(backend.list("a/y")) == ["a/y/w", "a/y/z"]
        assert run(backend.list("ab")) == ["ab/x"]
        assert run(backend.list("c/d")) == ["c/d/e/f"]
        assert run(backend.list("b")) == []  # a key, not a prefix
        assert run(backend.list("nothing")) == []

    def test_list_start_after(self, backend: Backend) -> None:
        # The log's tail: record names sort by number, and a reader lists after one.
        keys = [f"log/{n:08d}.json" for n in range(1, 8)] + ["log/compact/x", "logs/y", "m"]
        for key in keys:
            run(backend.write(key, b"r"))
        log = sorted(k for k in keys if k.startswith("log/"))
        for after in (None, "log/00000003.json", "log/00000003", "log/00000007.json", "a", "z"):
            expected = [k for k in log if after is None or k > after]
            assert run(backend.list("log", start_after=after)) == expected, after
        # The bound is exclusive even where the service's offset is inclusive (GCS).
        assert run(backend.list("log", start_after="log/00000006.json"))[0] == "log/00000007.json"
        assert run(backend.list(start_after="logs/y")) == ["m"]
        assert run(backend.list("nothing", start_after="a")) == []

    def test_list_start_after_inside_folders(self, backend: Backend) -> None:
        # A log of version 3 keeps records in folders; a tail listing starts inside one
        # and must skip whole folders before it, however the backend walks them.
        keys = [f"log/{n:08d}.json" for n in (998, 999)] + [
            f"log/{n // 1000:05d}/{n:08d}.json" for n in (1000, 1999, 2000, 2001, 3000)
        ]
        keys += ["log/00001000.json", "log/seal-notice.json"]  # a flat name sorts after
        for key in keys:
            run(backend.write(key, b"r"))
        ordered = sorted(keys)
        for after in ("log/00002/00002000.json", "log/00001/00001000.json", "log/00001/"):
            expected = [k for k in ordered if k > after]
            assert run(backend.list("log", start_after=after)) == expected, after
        assert run(backend.list("log", start_after="log/00002/00002000.json")) == [
            "log/00002/00002001.json",
            "log/00003/00003000.json",
            "log/seal-notice.json",
        ]

    def test_list_children(self, backend: Backend) -> None:
        for key in ["a/x", "a/y/z", "a/y-1", "ab/x", "b"]:
            run(backend.write(key, b"."))
        assert run(backend.list_children()) == ["a", "ab", "b"]
        assert run(backend.list_children("a")) == ["x", "y", "y-1"]
        assert run(backend.list_children("a/y")) == ["z"]
        assert run(backend.list_children("nothing")) == []

    def test_delete_is_idempotent(self, backend: Backend) -> None:
        run(backend.write("d/key", b"x"))
        run(backend.write("d/other", b"y"))
        run(backend.delete("d/key"))
        assert not run(backend.exists("d/key"))
        with pytest.raises(NotFoundError):
            run(backend.read("d/key"))
        run(backend.delete("d/key"))
        run(backend.delete("never/there"))
        assert run(backend.list("d")) == ["d/other"]

    def test_delete_prefix(self, backend: Backend) -> None:
        for key in ["p/a", "p/b/c", "p/b/d", "p2/x", "pq"]:
            run(backend.write(key, b"."))
        run(backend.delete_prefix("p/b"))
        assert run(backend.list()) == ["p/a", "p2/x", "pq"]
        run(backend.delete_prefix("p"))
        assert run(backend.list()) == ["p2/x", "pq"]
        run(backend.delete_prefix("p"))  # already gone: not an error
        run(backend.delete_prefix("never/there"))
        assert run(backend.read("p2/x")) == b"."

    def test_exists(self, backend: Backend) -> None:
        assert not run(backend.exists("e/key"))
        run(backend.write("e/key", b"x"))
        assert run(backend.exists("e/key"))
        assert not run(backend.exists("e"))  # a prefix is not an object
        assert not run(backend.exists("e/ke"))
        run(backend.delete("e/key"))
        assert not run(backend.exists("e/key"))

    def test_large_object_through_create(self, backend: Backend, creator: Backend) -> None:
        self._expect_create_refused(backend)
        data = _random(LARGE)
        run(creator.create("big/created.bin", data))
        assert run(backend.read("big/created.bin")) == data
        assert run(backend.read("big/created.bin", start=LARGE - 10)) == data[-10:]

    def test_large_object_through_write(self, backend: Backend) -> None:
        data = _random(LARGE)
        run(backend.write("big/written.bin", data))
        assert run(backend.read("big/written.bin")) == data

    def test_empty_objects(self, backend: Backend, creator: Backend) -> None:
        self._expect_create_refused(backend)
        run(creator.create("empty/created", b""))
        run(backend.write("empty/written", b""))
        for key in ("empty/created", "empty/written"):
            assert run(backend.read(key)) == b""
            assert run(backend.read(key, start=0, end=0)) == b""
            assert run(backend.exists(key))
        assert run(backend.list("empty")) == ["empty/created", "empty/written"]

    def test_keys_with_spaces_and_unicode(self, backend: Backend, creator: Backend) -> None:
        self._expect_create_refused(backend)
        key = "dir with space/ünïcødé ключ.json"
        run(creator.create(key, "ключ".encode()))
        run(backend.write("dir with space/日本 語", b"jp"))
        assert run(backend.list("dir with space")) == sorted([key, "dir with space/日本 語"])
        assert run(backend.list_children()) == ["dir with space"]
        assert run(backend.read(key)) == "ключ".encode()
        assert run(backend.exists(key))
        run(backend.delete(key))
        assert run(backend.list("dir with space")) == ["dir with space/日本 語"]

    def test_keys_with_url_special_characters(self, backend: Backend) -> None:
        keys = sorted(["s/p%20ct", "s/plus+sign", "s/a&b=c", "s/q?mark", "s/hash#tag"])
        for key in keys:
            run(backend.write(key, key.encode()))
        assert run(backend.list("s")) == keys
        for key in keys:
            assert run(backend.read(key)) == key.encode()

    def test_missing_keys_raise_not_found(self, backend: Backend) -> None:
        calls: tuple[Callable[[], Coroutine[Any, Any, bytes]], ...] = (
            lambda: backend.read("missing/key"),
            lambda: backend.read("missing/key", start=1, end=2),
        )
        for call in calls:
            with pytest.raises(NotFoundError) as info:
                run(call())
            assert isinstance(info.value, FileNotFoundError)
            assert isinstance(info.value, KeyError)
            assert "missing/key" in str(info.value)
        with pytest.raises(KeyError):
            run(backend.read("missing/key"))
        assert not run(backend.exists("missing/key"))
        assert run(backend.list("missing")) == []
        run(backend.write("present/key", b"x"))
        with pytest.raises(FileNotFoundError):
            run(backend.read("present"))  # a prefix is not an object

    def test_invalid_keys_raise_invalid_input(self, backend: Backend, creator: Backend) -> None:
        for key in INVALID_KEYS:
            for call in (
                lambda k=key: creator.create(k, b"x"),
                lambda k=key: backend.write(k, b"x"),
                lambda k=key: backend.read(k),
                lambda k=key: backend.exists(k),
                lambda k=key: backend.delete(k),
            ):
                with pytest.raises(InvalidInputError):
                    run(call())
        for prefix in (k for k in INVALID_KEYS if k):
            with pytest.raises(InvalidInputError):
                run(backend.list(prefix))
            with pytest.raises(InvalidInputError):
                run(backend.delete_prefix(prefix))
        assert run(backend.list()) == []

    def test_awaitable_from_foreign_loops(self, backend: Backend) -> None:
        async def roundtrip(name: str) -> list[str]:
            await backend.write(f"loops/{name}", name.encode())
            assert await backend.read(f"loops/{name}") == name.encode()
            assert await backend.exists(f"loops/{name}")
            return await backend.list("loops")

        errors: list[BaseException] = []

        def in_thread(name: str) -> None:
            try:
                asyncio.run(roundtrip(name))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=in_thread, args=(f"t{i}",)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert asyncio.run(roundtrip("main")) == ["loops/main", "loops/t0", "loops/t1", "loops/t2"]
        assert run(backend.list("loops")) == ["loops/main", "loops/t0", "loops/t1", "loops/t2"]
