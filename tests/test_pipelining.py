"""Queued saves to one path write their arrays concurrently and commit in call order.

The store is the real memory backend with a gate in front of its ``write``:
a save's array bytes reach it as one ``data/<save-id>/packed-0000.bin``
write (small leaves are packed), so the gate sees when each save writes and
can hold one save back until another has written. Waits are bounded: a gate
that is never opened fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore import registry
from partialstore._runtime import ordering
from partialstore.backends.memory import MemoryBackend
from partialstore.errors import BackendError

SCHEME = "gatedmemory"
_SAVE_DIR = re.compile(r"data/([0-9a-f]{32})/")
WAIT_S = 20.0


class Gate:
    """What the gated backend saw, and the rule that holds a save's write back."""

    def __init__(self) -> None:
        self.started: list[str] = []  # save dirs, in the order their write began
        self.finished: list[str] = []
        self.inside = 0
        self.most_inside = 0
        self.hold: Callable[[int], bool] = lambda _: False  # by start position
        self.fail: Callable[[int], bool] = lambda _: False
        self.error: Callable[[int], Exception] = lambda position: BackendError(
            f"injected failure of save #{position}"
        )


_gate = Gate()


class GatedMemoryBackend(MemoryBackend):
    """The memory backend, with every data write passed through :data:`_gate`."""

    def __init__(self, url: str, storage_options: Mapping[str, Any]) -> None:
        super().__init__("memory://" + url.split("://", 1)[1], storage_options)

    async def write(self, key: str, data: bytes, *, if_version: str | None = None) -> None:
        match = _SAVE_DIR.search(key)
        if match is None:
            await super().write(key, data, if_version=if_version)
            return
        position = len(_gate.started)
        _gate.started.append(match.group(1))
        _gate.inside += 1
        _gate.most_inside = max(_gate.most_inside, _gate.inside)
        try:
            await _wait_while(lambda: _gate.hold(position))
            if _gate.fail(position):
                raise _gate.error(position)
            await super().write(key, data, if_version=if_version)
        finally:
            _gate.inside -= 1
        _gate.finished.append(match.group(1))


async def _wait_while(condition: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while condition():
        if loop.time() > deadline:
            raise TimeoutError("the gate was never opened: saves did not overlap")
        await asyncio.sleep(0.002)


@pytest.fixture
def gated_path() -> Iterator[str]:
    global _gate
    _gate = Gate()
    registry.register_backend(SCHEME, GatedMemoryBackend)
    yield f"{SCHEME}://{uuid.uuid4().hex}/ckpt"


def _leaf(value: float) -> np.ndarray:
    return np.full(64, value, dtype=np.float32)  # small: packed, one write per save


def test_second_save_writes_while_the_first_is_still_writing(gated_path):
    # Save 0's write waits until save 1's write has finished: only possible
    # if save 1 started writing before save 0 committed.
    _gate.hold = lambda position: position == 0 and len(_gate.finished) < 1
    first = partialstore.save_async(gated_path, {"x": _leaf(1)}, custom_metadata={"n": 1})
    second = partialstore.save_async(gated_path, {"x": _leaf(2)}, custom_metadata={"n": 2})
    first.result(timeout=WAIT_S * 2)
    second.result(timeout=WAIT_S * 2)
    assert _gate.finished == [_gate.started[1], _gate.started[0]]  # save 1's bytes landed first

    partialstore.finalize(gated_path)
    # ...yet the records went in in call order: the later call's value wins.
    np.testing.assert_array_equal(partialstore.load(gated_path)["x"], _leaf(2))
    saves = partialstore.metadata(gated_path).saves
    assert [s["save_id"] for s in saves] == _gate.started


def test_at_most_pipeline_depth_saves_write_at_once(gated_path):
    count = ordering.PIPELINE_DEPTH + 3
    # Hold every write until PIPELINE_DEPTH of them are inside the store.
    _gate.hold = lambda _: len(_gate.started) < ordering.PIPELINE_DEPTH
    responses = [partialstore.save_async(gated_path, {f"k{i}": _leaf(i)}) for i in range(count)]
    for response in responses:
        response.result(timeout=WAIT_S * 2)
    assert _gate.most_inside == ordering.PIPELINE_DEPTH
    partialstore.finalize(gated_path)
    assert sorted(partialstore.load(gated_path)) == sorted(f"k{i}" for i in range(count))


def test_failed_write_fails_only_its_own_save(gated_path):
    _gate.fail = lambda position: position == 0
    failing = partialstore.save_async(gated_path, {"a": _leaf(1)})
    following = partialstore.save_async(gated_path, {"b": _leaf(2)})
    with pytest.raises(BackendError, match="injected failure"):
        failing.result(timeout=WAIT_S)
    following.result(timeout=WAIT_S)
    partialstore.finalize(gated_path)
    assert list(partialstore.load(gated_path)) == ["b"]
    assert len(partialstore.metadata(gated_path).saves) == 1


def test_finalize_waits_for_saves_written_ahead(gated_path):
    # Both saves are still writing when finalize is called; it must include them.
    _gate.hold = lambda _: len(_gate.started) < 2
    responses = [partialstore.save_async(gated_path, {f"k{i}": _leaf(i)}) for i in range(2)]
    partialstore.finalize(gated_path)
    for response in responses:
        response.result(timeout=WAIT_S)
    assert sorted(partialstore.load(gated_path)) == ["k0", "k1"]


def test_result_tells_its_wait_running_out_from_the_save_raising_timeout_error(gated_path):
    released = threading.Event()
    _gate.hold = lambda position: position == 0 and not released.is_set()
    _gate.fail = lambda position: position == 1
    # e.g. a coordination service's deadline, raised by the save itself
    _gate.error = lambda position: TimeoutError(f"deadline exceeded in save #{position}")
    slow = partialstore.save_async(gated_path, {"a": _leaf(1)})
    failing = partialstore.save_async(gated_path, {"b": _leaf(2)})

    with pytest.raises(TimeoutError, match="still running") as waited:
        slow.result(timeout=0.05)
    assert "deadline exceeded" not in str(waited.value) and not slow.done()
    released.set()
    slow.result(timeout=WAIT_S)  # the wait ran out; the save did not fail

    with pytest.raises(TimeoutError, match=r"deadline exceeded in save #1") as raised:
        failing.result(timeout=WAIT_S)
    assert "still running" not in str(raised.value) and failing.done()
    assert failing.failure() is raised.value  # the save's own exception, unchanged
    partialstore.finalize(gated_path)  # the failure was read: nothing to report
    assert list(partialstore.load(gated_path)) == ["a"]
