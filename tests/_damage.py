"""Helpers of the damage tests: a real checkpoint, its stored objects, and the oracle.

A :class:`Pristine` is a real two-save checkpoint on one store, kept as the
bytes of every object of its session (before finalize) and of the finalized
checkpoint, with what a correct ``load`` and ``metadata`` return. Tests damage
one object of a copy and check the oracle (:func:`check_reads`): every
reader raises :class:`CorruptCheckpointError` naming the damaged key, or
returns exactly the pristine data.

Example::

    pristine = build_pristine(str(tmp_path / "root"), {})
    path, location = pristine.materialize("final")
    check_reads(pristine, path, location.manifest_key)
"""

from __future__ import annotations

import contextlib
import math
import resource
import shutil
import signal
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

import partialstore
from partialstore._commit.location import Location, resolve
from partialstore._runtime import aio
from partialstore.backend import join_key
from partialstore.errors import CorruptCheckpointError

# Where a local-disk Pristine keeps a copy of its unfinalized session.
_SESSION_COPY = "session-copy"

#: A generous bound for every reader: a damaged object must fail fast, never hang.
SECONDS = 60


class Pair(NamedTuple):
    left: int
    right: Any


def first_state() -> dict[str, Any]:
    """The first save: every leaf kind, packed and zarr3 arrays, nested containers.

    No dimension is 0 or 1, so repeating a shape entry always changes the size.
    """
    rng = np.random.default_rng(7)
    return {
        "params": {
            "w": rng.standard_normal((3, 4)).astype(np.float32),
            "big": rng.standard_normal((512, 512)).astype(np.float32),  # 1 MiB: zarr3
            "i8": np.arange(6, dtype=np.int8).reshape(2, 3),
        },
        "scalar": np.float32(1.5),
        "step": 7,
        "lr": 0.25,
        "big_int": 2**70,
        "name": "run",
        "flag": True,
        "none": None,
        "pair": Pair(1, [2, {}]),
        "by_int": {3: "x", 0: 1},
        "empty": (),
    }


def second_state() -> dict[str, Any]:
    """The second save: replaces ``step``, adds ``later``."""
    return {"later": np.arange(5, dtype=np.int64), "step": 8}


class Pristine:
    """A real checkpoint's objects (relative keys -> bytes) and its correct contents."""

    def __init__(
        self,
        parent: str,
        options: dict[str, Any],
        session: dict[str, bytes],
        final: dict[str, bytes],
        tree: Any,
        meta_tree: Any,
        template: Location,
    ) -> None:
        self.parent = parent
        self.options = options
        self.session = session
        self.final = final
        self.tree = tree
        self.meta_tree = meta_tree
        self.template = template

    def __repr__(self) -> str:  # short: hypothesis prints it with every failure
        return f"Pristine({self.template.path!r})"

    def materialize(self, which: str) -> tuple[str, Location]:
        """Copy the ``"session"`` or ``"final"`` objects to a fresh path; return it."""
        path = f"{self.parent}/c{uuid.uuid4().hex[:12]}"
        location = resolve(path, self.options)
        objects = self.session if which == "session" else self.final
        prefix = location.staging_prefix if which == "session" else location.final_prefix
        source = _SESSION_COPY if which == "session" else self.template.final_prefix
        if self.parent.startswith("/"):  # local disk: a plain copy, no fsync per file
            shutil.copytree(f"{self.parent}/{source}", f"{self.parent}/{prefix}")
        else:
            for key, data in objects.items():
                put(location, join_key(prefix, key), data)
        return path, location


def put(location: Location, key: str, data: bytes) -> None:
    """Overwrite ``key`` of ``location``'s store with ``data``."""
    aio.run(location.backend.write(key, data))


def get(location: Location, key: str) -> bytes:
    """The bytes at ``key`` of ``location``'s store."""
    return aio.run(location.backend.read(key))


def _objects(location: Location, prefix: str) -> dict[str, bytes]:
    keys = aio.run(location.backend.list(prefix))
    return {key[len(prefix) + 1 :]: get(location, key) for key in keys}


def build_pristine(parent: str, options: dict[str, Any]) -> Pristine:
    """Save two states to ``<parent>/template``, keep every object, finalize, read back."""
    path = f"{parent}/template"
    partialstore.save(path, first_state(), custom_metadata={"lr": 0.25}, storage_options=options)
    partialstore.save(path, second_state(), storage_options=options)
    location = resolve(path, options)
    session = _objects(location, location.staging_prefix)
    if parent.startswith("/"):  # a copy of the session on disk, for materialize
        shutil.copytree(f"{parent}/{location.staging_prefix}", f"{parent}/{_SESSION_COPY}")
    partialstore.finalize(path, storage_options=options)
    final = _objects(location, location.final_prefix)
    tree = partialstore.load(path, storage_options=options)
    meta = partialstore.metadata(path, storage_options=options)
    return Pristine(parent, options, session, final, tree, meta.tree, location)


def same(a: Any, b: Any) -> bool:
    """Exact equality: types, dtypes, shapes, values (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


@contextlib.contextmanager
def within(seconds: int = SECONDS) -> Iterator[None]:
    """Fail with TimeoutError if the block runs longer than ``seconds`` (a hang)."""

    def expire(_signum: int, _frame: Any) -> None:
        raise TimeoutError(f"no answer within {seconds} s: a damaged object made a reader hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(call: Any, damaged_key: str) -> Any:
    """Run ``call``; return its result, or ``None`` if it raised a keyed CorruptCheckpointError.

    Any other exception propagates (the test fails with it); a corrupt error
    whose message does not name ``damaged_key`` fails the test too.
    """
    with within():
        try:
            return call()
        except CorruptCheckpointError as error:
            assert damaged_key in str(error), f"{damaged_key!r} not named in: {error}"
            return None


def check_reads(pristine: Pristine, path: str, damaged_key: str) -> list[str]:
    """``load``, ``metadata`` and ``gc`` each raise naming the key or give exact data.

    Returns the names of the readers that reported damage.
    """
    options = pristine.options
    reported = []
    loaded = outcome(lambda: partialstore.load(path, storage_options=options), damaged_key)
    if loaded is None:
        reported.append("load")
    else:
        assert same(loaded, pristine.tree), f"load returned wrong data: {loaded!r}"
    meta = outcome(lambda: partialstore.metadata(path, storage_options=options), damaged_key)
    if meta is None:
        reported.append("metadata")
    else:
        assert meta.tree == pristine.meta_tree, f"metadata returned a wrong tree: {meta.tree!r}"
    removed = outcome(lambda: partialstore.gc(path, storage_options=options), damaged_key)
    if removed is None:
        reported.append("gc")
    else:
        assert removed == [], f"gc deleted data a correct manifest uses: {removed}"
    return reported


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
