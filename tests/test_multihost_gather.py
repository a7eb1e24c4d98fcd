"""The gather protocol of :mod:`partialstore._runtime.kvgather` on a real coordination service.

One JAX coordination service on 127.0.0.1 and eight of its clients, all in
this process (``jaxlib``'s own service and client, as
``jax.distributed.initialize`` starts them, without touching JAX's global
state): client 0 plays the primary, clients 1-7 the other processes, each
reporting from a thread of its own. The primary's requests are counted by
a wrapper that passes every call through to its real client.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from partialstore._runtime import kvgather
from partialstore._runtime.multihost import encode_outcome

PROCESSES = 8
REPORTING = PROCESSES - 1
PLAIN = encode_outcome(None)
_keys = itertools.count()


class Counting:
    """A real client whose calls are counted by method name."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return method(*args, **kwargs)

        return counted


@pytest.fixture(scope="module")
def clients() -> Iterator[list[Any]]:
    from jax._src.lib import _jax

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    service = _jax.get_distributed_runtime_service(address, PROCESSES)
    made = [
        _jax.get_distributed_runtime_client(
            address, i, init_timeout=60, shutdown_on_destruction=False
        )
        for i in range(PROCESSES)
    ]
    _in_threads([client.connect for client in made])  # each waits for all to register
    yield made
    _in_threads([client.shutdown for client in made])
    service.shutdown()


def _in_threads(calls: list[Any]) -> None:
    threads = [threading.Thread(target=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)


def _report_all(clients: list[Any], key: str, values: dict[int, str]) -> None:
    """Processes 1-7 report at once, each from its own thread; ``values`` default to PLAIN."""
    _in_threads(
        [
            lambda i=i: kvgather.report(clients[i], key, i, REPORTING, values.get(i, PLAIN), PLAIN)
            for i in range(1, PROCESSES)
        ]
    )


def _op() -> str:
    return f"partialstore/test-gather/{next(_keys)}"


def test_plain_reports_cost_the_primary_one_request(clients: list[Any]) -> None:
    key = f"{_op()}/wrote"
    _report_all(clients, key, {})
    primary = Counting(clients[0])
    assert kvgather.wait_for_reports(primary, key, REPORTING, 10_000, 0) == {}
    assert primary.calls == ["blocking_key_value_get"]
    # A plain report is a count alone: no process set a key of its own.
    assert clients[0].key_value_dir_get(f"{key}/") == []


def test_values_other_than_plain_reach_the_primary_by_process(clients: list[Any]) -> None:
    key = f"{_op()}/wrote"
    failures = {
        6: encode_outcome(OSError(28, "No space left on device")),
        3: encode_outcome(TimeoutError("deadline")),
    }
    _report_all(clients, key, failures)
    primary = Counting(clients[0])
    sent = kvgather.wait_for_reports(primary, key, REPORTING, 10_000, 0)
    assert sent == failures
    assert json.loads(sent[3])["error"]["type"] == "TimeoutError"
    assert primary.calls == ["blocking_key_value_get", "key_value_dir_get"]


def test_the_primary_waits_until_the_last_process_reports(clients: list[Any]) -> None:
    key = f"{_op()}/wrote"
    for i in range(1, PROCESSES - 1):  # all but process 7
        kvgather.report(clients[i], key, i, REPORTING, PLAIN, PLAIN)
    assert kvgather.wait_for_reports(clients[0], key, REPORTING, 50, 0) is None
    late = encode_outcome(ValueError("late"))
    waiting: list[Any] = []
    waiter = threading.Thread(
        target=lambda: waiting.append(
            kvgather.wait_for_reports(clients[0], key, REPORTING, 30_000, 0)
        )
    )
    waiter.start()
    kvgather.report(clients[7], key, 7, REPORTING, late, PLAIN)
    waiter.join(timeout=60)
    assert waiting == [{7: late}]


def test_a_full_count_without_its_all_key_still_completes(clients: list[Any]) -> None:
    # As if the process completing the count stopped before setting {key}.all.
    key = f"{_op()}/wrote"
    clients[1].key_value_set(f"{key}/1", "sent")
    clients[1].key_value_increment(f"{key}.count", 1 + kvgather.SENT)
    for i in range(2, PROCESSES):
        clients[i].key_value_increment(f"{key}.count", 1)
    assert kvgather.wait_for_reports(clients[0], key, REPORTING, 50, 0) == {1: "sent"}


def test_deleting_the_operation_removes_every_key_of_its_gather(clients: list[Any]) -> None:
    op = _op()
    _report_all(clients, f"{op}/wrote", {5: "sent"})
    assert kvgather.wait_for_reports(clients[0], f"{op}/wrote", REPORTING, 10_000, 0) == {5: "sent"}
    names = sorted(name for name, _ in clients[0].key_value_dir_get(op))
    assert names == [f"{op}/wrote.all", f"{op}/wrote.count", f"{op}/wrote/5"]
    clients[4].key_value_delete(op)
    assert clients[0].key_value_dir_get(op) == []


def test_get_or_none_returns_a_value_or_none_after_its_wait(clients: list[Any]) -> None:
    key = f"{_op()}/outcome"
    assert kvgather.get_or_none(clients[2], key, 20, 2, "process 0") is None
    clients[0].key_value_set(key, "done")
    assert kvgather.get_or_none(clients[2], key, 20, 2, "process 0") == "done"


def test_the_heartbeat_stops_before_the_interpreter_exits(
    clients: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exit handler ends the beat thread, so no beat is inside jaxlib at finalization.

    This process poses as process 1 of the eight-client job for the test.
    """
    from jax._src import distributed

    from partialstore._runtime import multihost

    monkeypatch.setenv("PARTIALSTORE_MULTIHOST_LIVENESS_S", "0.3")  # a beat every 50 ms
    state = distributed.global_state
    monkeypatch.setattr(state, "client", clients[1])
    monkeypatch.setattr(state, "num_processes", PROCESSES)
    monkeypatch.setattr(state, "process_id", 1)
    key = "partialstore/heartbeat/1"
    try:
        multihost._ensure_heartbeat()
        thread = multihost._beats[-1]
        assert thread.is_alive()
        first = clients[0].blocking_key_value_get(key, 5_000)
        beat = first
        for _ in range(100):  # it beats: the counter moves
            beat = clients[0].key_value_try_get(key)
            if beat != first:
                break
            thread.join(timeout=0.05)
        assert int(beat) > int(first)
        multihost._stop_beating()  # what the interpreter's exit runs
        assert not thread.is_alive()
        stopped = clients[0].key_value_try_get(key)
        thread.join(timeout=0.3)
        assert clients[0].key_value_try_get(key) == stopped  # no beat since
    finally:
        multihost._exiting.clear()
        monkeypatch.undo()
        multihost._heartbeat_client = None
