"""Each operation's figures: the INFO log line, listeners, ``AsyncResponse.stats``.

Request counts are checked against what really went over the wire: the
fault proxy in front of moto and fake-gcs logs every HTTP request, and a
503 burst injected there must show up as retries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore.testing.faultrules import Fault, error

BackendUrl = tuple[str, dict[str, Any]]


@pytest.fixture
def seen() -> Iterator[list[partialstore.OperationStats]]:
    stats: list[partialstore.OperationStats] = []
    remove = partialstore.add_stats_listener(stats.append)
    yield stats
    remove()


STATE = {"w": np.arange(4096, dtype=np.float32), "b": np.ones(3, np.int64), "step": 7}
STATE_BYTES = 4096 * 4 + 3 * 8


def test_every_operation_reports_its_figures(
    any_backend_url: BackendUrl, seen: list[partialstore.OperationStats]
) -> None:
    url, options = any_backend_url
    path = f"{url}/ck"
    response = partialstore.save_async(path, STATE, storage_options=options)
    response.result()
    partialstore.finalize(path, storage_options=options)
    loaded = partialstore.load(path, storage_options=options)
    partialstore.gc(path, storage_options=options)
    assert [s.operation for s in seen] == ["save", "finalize", "load", "gc"]
    save, finalize, load, _ = seen
    assert response.stats == save
    assert (save.path, save.nbytes, save.leaves) == (path, STATE_BYTES, 3)
    assert list(save.phases) == ["snapshot", "write", "commit"]
    assert (load.nbytes, load.leaves) == (STATE_BYTES, 3)
    np.testing.assert_array_equal(loaded["w"], STATE["w"])
    assert set(finalize.phases) == {"wait", "finalize"}
    for stats in seen:
        assert stats.requests >= 1 and stats.retries == 0, stats
        assert stats.seconds >= max(stats.phases.values())


def test_requests_match_the_wire_and_503s_count_as_retries(
    proxied_s3_url: Any, seen: list[partialstore.OperationStats]
) -> None:
    target = proxied_s3_url
    path = f"{target.url}/ck"
    partialstore.save(path, {"step": 1}, storage_options=target.options)
    target.proxy.wait_idle()
    target.proxy.reset_log()
    # Two 503s on the seal's upload (a record key, not the seal notice's): each is
    # retried by the backend's one retry layer.
    rule = target.proxy.add(Fault(error(503, retry_after=0), method="PUT", key="/log/0", times=2))
    partialstore.finalize(path, storage_options=target.options)
    target.proxy.wait_idle()
    assert rule.wait(2)
    finalize = seen[-1]
    # finalize sends only contract requests (no TensorStore chunk I/O): the counts are the wire's
    assert finalize.operation == "finalize" and finalize.retries == 2
    assert finalize.requests == len(target.proxy.requests())
    assert partialstore.load(path, storage_options=target.options) == {"step": 1}


def test_one_info_line_per_operation(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "ck")
    with caplog.at_level(logging.INFO, logger="partialstore"):
        partialstore.save(path, STATE)
        partialstore.finalize(path)
    lines = [r.getMessage() for r in caplog.records if r.name == "partialstore"]
    assert len(lines) == 2
    assert lines[0].startswith(f"save {path}: 0.0 MiB in 3 leaves, ")
    assert "requests (0 retries)" in lines[0] and "commit " in lines[0]
    assert lines[1].startswith(f"finalize {path}: ")


def test_a_failing_listener_never_fails_a_checkpoint(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(stats: partialstore.OperationStats) -> None:
        raise RuntimeError("metrics backend down")

    remove = partialstore.add_stats_listener(broken)
    try:
        path = str(tmp_path / "ck")
        partialstore.save(path, STATE)
        partialstore.finalize(path)
    finally:
        remove()
    assert partialstore.load(path)["step"] == 7
    assert "metrics backend down" in caplog.text
    remove()  # removing twice is harmless


def test_load_of_a_tree_with_mixed_dict_keys_counts_its_leaves(
    tmp_path: Any, seen: list[partialstore.OperationStats]
) -> None:
    # JAX cannot flatten {0: ..., "a": ...} (it sorts the keys); the figures must not need it.
    path = str(tmp_path / "ck")
    partialstore.save(path, {"a": {}, "w": np.ones(3)})
    partialstore.save(path, {0: {"x": [np.ones(2, np.int8), 5]}})
    partialstore.finalize(path)
    assert set(partialstore.load(path)) == {0, "a", "w"}
    assert (seen[-1].operation, seen[-1].nbytes, seen[-1].leaves) == ("load", 26, 3)
