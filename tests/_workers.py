"""Worker processes for the crash-safety and many-writer tests.

The tests run saves, finalizes and crashes in real processes of their own
(and kill some with SIGKILL), exactly as in a training job. A test starts a
worker with :class:`Child`, naming a mode (a function of this module) and its
JSON-able arguments; the worker reports on its output, one flushed line per
event, so the parent knows what returned before the process died:

- ``ready``: the worker is up; it now waits for ``go_file`` (if given) to
  appear, so that several workers start together.
- ``committed <tag>``: a save (or, with tag ``finalize``, a finalize) returned.
- ``exists <tag>``: it raised ``FileExistsError``.
- ``error <tag> <type>: <message>``: anything else; the tests fail on it.

The parent and the workers derive every saved array from its tag with
:func:`make_array`, so the parent checks what it loads bit for bit without
being sent the data.

Example (what a test does)::

    child = Child({"mode": "save_keys", "path": url, "options": opts, "writer": 1, "count": 3})
    assert child.wait() == 0 and child.tags("committed") == ["w1_s0", "w1_s1", "w1_s2"]
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "Child",
    "assert_same_bits",
    "assert_state",
    "make_array",
    "make_state",
    "read_stored_json",
    "shrink_chunks",
    "stored_chunks",
]

# Workers wait at most this long for a go file: a parent that died must not
# leave children polling forever.
_GO_TIMEOUT_S = 120.0


def make_array(tag: str, shape: tuple[int, ...] = (64,), dtype: str = "float32") -> np.ndarray:
    """A deterministic array for ``tag``: the parent recomputes it to check a load.

    Every element depends on the tag, so two saves never write equal bytes and a
    leaf made of chunks from two different saves (a torn leaf) cannot compare equal.

    Example::

        np.array_equal(make_array("w1_s3"), make_array("w1_s3"))  # True
    """
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(size=shape).astype(dtype)


def make_state(tag: str, shape: tuple[int, ...] = (64,)) -> dict[str, Any]:
    """The subtree a worker saves under key ``tag``: arrays of two dtypes and scalars.

    Example::

        partialstore.save(path, {"A": make_state("A")})
    """
    return {
        "w": make_array(f"{tag}/w", shape, "float32"),
        "i": make_array(f"{tag}/i", (7, 3), "int64"),
        "name": tag,
        "n": zlib.crc32(tag.encode()),
    }


# Workers are forked from a multiprocessing fork server that has imported
# partialstore, JAX, TensorStore and the backends once: a worker then starts
# in ~0.1 s instead of the 2-5 s a fresh interpreter needs for those imports
# on a 2-core machine, which is most of these tests' time. They are still
# real, separate processes (own memory, own background I/O loop, own
# connections), killed with a real SIGKILL. Preloading is safe to fork from:
# importing these modules starts no thread (checked: only numpy's idle
# OpenBLAS pool exists, which handles fork itself) and opens no connection.
_PRELOAD = [
    __name__,
    "partialstore._api",
    "partialstore._arrays.arrays",
    "partialstore._commit.finalizing",
    "partialstore._commit.loading",
    "partialstore._commit.saving",
    "partialstore._pytree.tree",
    "partialstore.backends.local",
    "partialstore.backends.fsspec",
    "partialstore.backends.s3",
    "partialstore.backends.gcs",
    # The S3 and GCS backends import these on first use (~2 s).
    "s3fs",
    "gcsfs",
]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(_PRELOAD)


def _child_main(args: dict[str, Any], env: dict[str, str], log_path: str) -> None:
    """Entry point of a worker process (runs in the child)."""
    # The fork server's environment is the parent's at its start; the
    # emulators' variables may have been exported since, so apply the
    # parent's current environment before anything reads it.
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if args.get("chunk_bytes"):
        shrink_chunks(args["chunk_bytes"])
    MODES[args["mode"]](args)


class Child:
    """A worker process started by a test; its output lines are read as they come.

    The child's stdout and stderr go to one temporary file, which the parent
    reads; each ``print(..., flush=True)`` of the child is a ``write`` that has
    reached the kernel before the child goes on, so a line printed before a
    SIGKILL is never lost.

    Example::

        child = Child({"mode": "save_loop", ...}, crash_at="save.after_data:2")
        child.wait_for("ready")
        child.kill()
        assert child.wait() == -signal.SIGKILL
    """

    def __init__(self, args: dict[str, Any], *, crash_at: str | None = None) -> None:
        env = os.environ.copy()  # the emulators' endpoints and credentials
        env.pop("PARTIALSTORE_CRASH_AT", None)
        if crash_at:
            env["PARTIALSTORE_CRASH_AT"] = crash_at
        self.args = args
        self._final: str | None = None  # the output, kept once the file is gone
        fd, self._log_path = tempfile.mkstemp(prefix="partialstore-worker-", suffix=".log")
        os.close(fd)
        self.proc = _CONTEXT.Process(
            target=_child_main, args=(args, env, self._log_path), daemon=True
        )
        self.proc.start()

    def _output(self) -> str:
        if self._final is not None:
            return self._final
        with open(self._log_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    @property
    def lines(self) -> list[str]:
        """The complete lines the child has written so far."""
        return self._output().split("\n")[:-1]

    def tags(self, word: str) -> list[str]:
        """Tags of the lines ``<word> <tag>`` (``""`` for a bare ``<word>``), in order."""
        return [([*line.split(" "), ""])[1] for line in self.lines if line.split(" ", 1)[0] == word]

    def wait_for(self, word: str, count: int = 1, timeout: float = 120.0) -> None:
        """Block until ``count`` lines start with ``word`` (fail if the child ends first)."""
        deadline = time.monotonic() + timeout
        while True:
            alive = self.proc.is_alive()
            if len(self.tags(word)) >= count:
                return
            if not alive or time.monotonic() > deadline:
                raise AssertionError(f"worker never printed {count} x {word!r}: {self.describe()}")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL the child (a no-op if it has exited)."""
        if self.proc.exitcode is None:
            self.proc.kill()

    def wait(self, timeout: float = 180.0) -> int:
        """Wait for the child to exit; return its exit code (``-9`` after SIGKILL)."""
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.kill()
            self.proc.join()
            raise AssertionError(f"worker hung for {timeout} s: {self.describe()}")
        return self.proc.exitcode

    def describe(self) -> str:
        """Arguments, exit code and output (the last 4,000 characters), for failures."""
        code = self.proc.exitcode if self._final is None else "closed"
        return f"args={self.args} exitcode={code} output={self._output()[-4000:]}"

    def close(self) -> None:
        """Kill the child if still running and delete its output file (keeping its text)."""
        if self._final is not None:
            return
        self.kill()
        self.proc.join()
        self.proc.close()
        self._final = self._output()
        os.unlink(self._log_path)


def assert_same_bits(expected: np.ndarray, actual: Any, where: str) -> None:
    """Equal dtype, shape and bytes: a torn or stale leaf cannot pass.

    Example::

        assert_same_bits(make_array("A/w"), loaded["A"]["w"], "A/w")
    """
    assert isinstance(actual, np.ndarray), f"{where}: got {type(actual).__name__}"
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
    assert actual.tobytes() == expected.tobytes(), f"{where}: bytes differ (torn or stale leaf)"


def assert_state(tag: str, loaded: Any) -> None:
    """``loaded`` is exactly :func:`make_state` of ``tag``, bit for bit."""
    expected = make_state(tag)
    assert set(loaded) == set(expected), tag
    assert_same_bits(expected["w"], loaded["w"], f"{tag}/w")
    assert_same_bits(expected["i"], loaded["i"], f"{tag}/i")
    assert loaded["name"] == expected["name"] and loaded["n"] == expected["n"], tag


def read_stored_json(path: str, options: dict[str, Any], relative: str) -> Any:
    """Read a JSON object of the finalized checkpoint at ``path`` through its backend.

    ``relative`` is e.g. ``"partialstore.json"`` or ``"log/00000003.json"``: the
    on-disk format itself, for checks that must not trust the code under test.
    """
    from partialstore._commit.location import resolve
    from partialstore._runtime.aio import run
    from partialstore.backend import join_key

    location = resolve(path, options)
    return json.loads(run(location.backend.read(join_key(location.final_prefix, relative))))


def stored_chunks(path: str, options: dict[str, Any], key: str) -> list[int]:
    """The zarr3 chunk shape stored for the top-level leaf ``key`` of the checkpoint."""
    for leaf in read_stored_json(path, options, "partialstore.json")["leaves"]:
        if leaf["path"] == [["key", key]]:
            assert leaf["data"]["format"] == "zarr3", leaf
            return list(leaf["data"]["chunks"])
    raise AssertionError(f"no leaf {key!r} in the manifest of {path}")


def _say(*parts: Any) -> None:
    print(" ".join(str(p) for p in parts), flush=True)


def _wait_for_go(args: dict[str, Any]) -> None:
    go_file = args.get("go_file")
    if not go_file:
        return
    deadline = time.monotonic() + _GO_TIMEOUT_S
    while not os.path.exists(go_file):
        if time.monotonic() > deadline:
            _say("error go timeout: no go file", go_file)
            sys.exit(3)
        time.sleep(0.005)


def _attempt(tag: str, action: Callable[[], None]) -> bool:
    """Run ``action``; report its outcome under ``tag``; return whether it returned."""
    try:
        action()
    except FileExistsError:
        _say("exists", tag)
        return False
    except Exception as error:  # report everything else: the parent fails on it
        _say("error", tag, f"{type(error).__name__}: {error}".replace("\n", " "))
        return False
    _say("committed", tag)
    return True


def crash_sequence(args: dict[str, Any]) -> None:
    """Save piece A, then piece B, then (for a ``finalize.*`` crash point) finalize.

    The parent arms ``PARTIALSTORE_CRASH_AT`` so that the process kills itself
    during B's save or during finalize; A always returns first.
    """
    import partialstore

    path, options = args["path"], args["options"]
    _say("ready")
    for tag in ("A", "B"):
        partialstore.save(
            path, {tag: make_state(tag)}, custom_metadata={tag: True}, storage_options=options
        )
        _say("committed", tag)
    if args.get("finalize"):
        partialstore.finalize(path, storage_options=options)
        _say("finalized")


def save_loop(args: dict[str, Any]) -> None:
    """Save ``count`` large states in a loop until killed: ``{prefix}_{i}`` and ``latest``.

    Every save also replaces the key ``latest`` and ``custom_metadata["latest"]``,
    so the parent can check that the last committed save won.
    """
    import partialstore

    path, options, prefix = args["path"], args["options"], args["prefix"]
    shape = tuple(args["shape"])
    _say("ready")
    for i in range(args["count"]):
        tag = f"{prefix}_{i}"
        big = make_array(tag, shape)
        state = {tag: {"big": big, "small": make_array(f"{tag}/s")}, "latest": big}
        partialstore.save(path, state, custom_metadata={"latest": tag}, storage_options=options)
        _say("committed", tag)


def save_keys(args: dict[str, Any]) -> None:
    """Writer ``writer`` saves ``count`` times after the go signal.

    Save ``j`` holds the disjoint key ``w{writer}_s{j}``; with ``shared_shape``
    it also replaces the key ``shared`` with an array of that shape, and
    records its tag in ``custom_metadata["shared"]`` (and in the save's log
    record), so the parent can tell which save's value won.
    """
    import partialstore

    path, options, writer = args["path"], args["options"], args["writer"]
    shared_shape = args.get("shared_shape")
    _say("ready")
    _wait_for_go(args)
    for j in range(args["count"]):
        tag = f"w{writer}_s{j}"
        state: dict[str, Any] = {tag: make_state(tag)}
        if shared_shape:
            state["shared"] = make_array(f"shared/{tag}", tuple(shared_shape))
        _attempt(
            tag,
            lambda state=state, tag=tag: partialstore.save(
                path, state, custom_metadata={"shared": tag}, storage_options=options
            ),
        )


def save_until_sealed(args: dict[str, Any]) -> None:
    """Save distinct keys in a loop until a save raises ``FileExistsError``.

    Runs against a concurrent finalize: every attempt is reported, so the
    parent can check that each returned save is in the checkpoint and each
    refused one is not. Gives up after ``max`` attempts (the parent then fails).
    """
    import partialstore

    path, options, writer = args["path"], args["options"], args["writer"]
    _say("ready")
    for j in range(args["max"]):
        tag = f"w{writer}_s{j}"
        returned = _attempt(
            tag,
            lambda tag=tag: partialstore.save(
                path, {tag: make_state(tag)}, storage_options=options
            ),
        )
        if not returned:
            return


def finalize(args: dict[str, Any]) -> None:
    """Finalize after the go signal; report ``committed finalize`` or ``exists finalize``."""
    import partialstore

    path, options = args["path"], args["options"]
    _say("ready")
    _wait_for_go(args)
    _attempt("finalize", lambda: partialstore.finalize(path, storage_options=options))


MODES: dict[str, Callable[[dict[str, Any]], None]] = {
    "crash_sequence": crash_sequence,
    "save_loop": save_loop,
    "save_keys": save_keys,
    "save_until_sealed": save_until_sealed,
    "finalize": finalize,
}


def shrink_chunks(chunk_bytes: int) -> None:
    """Make saves of this process split arrays into chunks of ``chunk_bytes``.

    ``arrays.write_arrays`` chunks arrays by ``arrays.CHUNK_BYTES`` (16 MiB),
    read at call time; tests lower it so that an array of a few MiB spans
    several chunks, which is what a torn leaf needs.

    Example::

        shrink_chunks(512 << 10)
    """
    from partialstore._arrays import arrays

    arrays.CHUNK_BYTES = chunk_bytes
