"""503 bursts against the request paths this round added, at the HTTP level (moto behind the proxy).

- the run index of :class:`partialstore.CheckpointManager` (its compare-and-swap upload);
- the reads of chunk objects that hold zarr3 inner chunks.

Each fault must fire (the rule is waited on) and the outcome must be exactly
what it is without the fault.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import partialstore
from partialstore.testing.faultrules import Fault, error


def test_run_index_upload_survives_a_503_burst(proxied_s3_url: Any) -> None:
    target = proxied_s3_url
    root = f"{target.url}/run"
    rule = target.proxy.add(
        Fault(error(503, retry_after=0), method="PUT", key=r"partialstore\.run\.json", times=3)
    )
    with partialstore.CheckpointManager(root, storage_options=target.options) as manager:
        for step in (1, 2):
            manager.save(step, {"step": step})
            manager.finalize(step)
    assert rule.wait(3)
    with partialstore.CheckpointManager(root, storage_options=target.options) as manager:
        assert (manager.latest_step(), manager.steps()) == (2, [1, 2])
        assert manager.load() == {"step": 2}


def test_inner_chunk_reads_survive_a_503_burst(proxied_s3_url: Any) -> None:
    target = proxied_s3_url
    path = f"{target.url}/ck"
    w = np.random.default_rng(3).standard_normal((512, 640), np.float32)
    partialstore.save(path, {"w": w}, storage_options=target.options)
    partialstore.finalize(path, storage_options=target.options)
    # GETs of the chunk objects (each a zarr3 shard of inner chunks, read by range).
    rule = target.proxy.add(
        Fault(error(503, retry_after=0), method="GET", key=r"/c/\d+/\d+$", times=3)
    )
    loaded = partialstore.load(path, storage_options=target.options)
    assert rule.wait(3)
    np.testing.assert_array_equal(loaded["w"], w)
