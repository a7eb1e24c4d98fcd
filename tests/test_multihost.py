"""Multi-host saving: real multi-process JAX jobs save one sharded tree together.

Two worker processes (``tests/_multihost_worker.py``) join one JAX job with
``jax.distributed.initialize`` on 127.0.0.1 (CPU, two devices each, so the
mesh spans both processes) and save the same global tree to local disk, S3
(moto) and the generic fsspec backend, then finalize. This process (a
single one, no JAX job) then loads every checkpoint and checks every value
bit for bit, and checks from the keys each worker's backend wrote that
only the primary wrote log records, packs and metadata, that the workers
wrote disjoint chunks, and that chunks tile the shards. Finally a write that
fails in one worker fails that save in both, and nothing is committed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _multihost_worker import DEVICES_PER_PROCESS, expected_state

import partialstore
from partialstore.multihost import ShardedArray, shard_chunks

WORKER = Path(__file__).with_name("_multihost_worker.py")
PROCESSES = 2


def test_shard_chunks_divide_every_shard_edge() -> None:
    f32 = np.dtype(np.float32)

    def chunks(
        shape: tuple[int, ...], edges: tuple[tuple[int, ...], ...], target: int
    ) -> list[int]:
        return shard_chunks(ShardedArray(shape, f32, edges, []), target)

    # Shards of 16 rows; the byte target allows 10 rows: the largest divisor is 8.
    assert chunks((64, 6), ((0, 16, 32, 48, 64), (0, 6)), 240) == [8, 6]
    # Big targets keep whole shards; an unsharded axis may stay whole.
    assert chunks((64, 6), ((0, 32, 64), (0, 6)), 1 << 20) == [32, 6]
    # Uneven shards (edges 0, 6, 12, 14): the chunk divides gcd(6, 12) = 6.
    assert chunks((14, 2), ((0, 6, 12, 14), (0, 2)), 1 << 20) == [6, 2]
    # Splitting a trailing axis only once the leading one is down to 1.
    assert chunks((4, 1024), ((0, 1, 2, 3, 4), (0, 512, 1024)), 1024) == [1, 256]
    assert chunks((), (), 16) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_job(
    tmp_path: Path, targets: list[tuple[str, dict[str, Any]]], failing: tuple[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"targets": targets, "failing": failing}))
    env = dict(os.environ)  # carries the moto server's credentials and endpoint
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        PARTIALSTORE_MULTIHOST_TIMEOUT_S="60",
    )
    port = _free_port()
    reports = [tmp_path / f"report{i}.json" for i in range(PROCESSES)]
    children = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(PROCESSES), str(i), str(job), str(r)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, r in enumerate(reports)
    ]
    outputs = []
    for child in children:
        try:
            output, _ = child.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for other in children:
                other.kill()
            raise
        outputs.append(output)
    for i, child in enumerate(children):
        assert child.returncode == 0, f"worker {i} failed:\n{outputs[i][-6000:]}"
    return [json.loads(r.read_text()) for r in reports]


def _assert_same_bits(loaded: Any, expected: Any) -> None:
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        if isinstance(value, np.ndarray):
            got = loaded[name]
            assert got.dtype == value.dtype and got.shape == value.shape, name
            assert got.tobytes() == value.tobytes(), name
        else:
            assert loaded[name] == value and type(loaded[name]) is type(value), name


def _is_chunk(key: str) -> bool:
    return "/data/" in key and "/c/" in key


def test_processes_save_their_own_shards_into_one_checkpoint(
    tmp_path: Path, s3_url: tuple[str, dict[str, Any]]
) -> None:
    s3_root, s3_options = s3_url
    targets = [
        (str(tmp_path / "local" / "ckpt"), {}),
        (f"{s3_root}/ckpt", s3_options),
        ("local://" + str(tmp_path / "fsspec" / "ckpt"), {}),
    ]
    failing = ("local://" + str(tmp_path / "fsspec" / "failing"), {})
    reports = _run_job(tmp_path, targets, failing)
    assert [r["process"] for r in reports] == list(range(PROCESSES))

    expected = expected_state()
    for number, (path, options) in enumerate(targets):
        _assert_same_bits(partialstore.load(path, storage_options=options), expected)
        info = partialstore.metadata(path, storage_options=options)
        assert info.custom_metadata == {"by": "all"}
        assert len(info.saves) == 2  # one record per collective save, not one per process

        per_process = [set(r["targets"][number]["wrote"]) for r in reports]
        for report in reports:
            entry = report["targets"][number]
            assert entry["mismatched"] == []  # each process loaded its own shards back
            assert entry["late_save"] == "refused"
        primary, secondary = per_process
        # The primary alone writes log records, packs, metadata and the manifest.
        assert any("/log/" in key for key in primary)
        assert not [key for key in secondary if not _is_chunk(key)], sorted(secondary)
        if path.startswith("local://"):
            # This backend has no TensorStore kvstore, so chunks go through the
            # backend's write too: every process wrote some, none the same one.
            primary_chunks = {key for key in primary if _is_chunk(key)}
            assert primary_chunks and secondary
            assert not primary_chunks & secondary

    # Chunks of a sharded leaf tile its shards, and each chunk is stored once.
    local = Path(targets[0][0])
    manifest = json.loads((local / "partialstore.json").read_text())
    data = {entry["path"][0][1]: entry.get("data") for entry in manifest["leaves"]}
    # (64, 6) float32 over 4 devices: shards of 16 rows; 256-byte chunks -> 8 rows.
    assert data["rows"]["format"] == "zarr3" and data["rows"]["chunks"] == [8, 6]
    assert sorted(p.name for p in (local / data["rows"]["path"] / "c").iterdir()) == [
        str(i) for i in range(8)
    ]
    # (8, 12) int32 split 2 x 2: shards of 4 x 6 (96 bytes) are single chunks.
    assert data["grid"]["chunks"] == [4, 6]
    # Small leaves that are not sharded across processes are packed by the primary.
    assert data["replicated"]["format"] == "packed"

    # Process 1's chunk writes failed: every process's save raised the
    # backend error, nothing was committed, and finalize found no session.
    assert [r["failing_save"] for r in reports] == ["BackendError"] * PROCESSES
    assert [r["failing_finalize"] for r in reports] == ["NotFoundError"] * PROCESSES
