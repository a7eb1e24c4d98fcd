"""``partialstore.verify`` (behind ``partialstore verify``): every byte read, every damage named.

Damage is done behind the backend's back, on local files, through both read
paths: the local backend (TensorStore reads the files itself) and the
generic fsspec backend over the same disk (chunks fetched with
``Backend.read`` and decoded from memory).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore._commit import verifying
from partialstore.errors import CorruptCheckpointError, NotFoundError


@pytest.fixture(params=["local", "fsspec"])
def checkpoint(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    """``(path as the API takes it, its folder on disk)`` of a finalized checkpoint."""
    folder = tmp_path / "step_1"
    path = str(folder) if request.param == "local" else f"local://{folder}"
    partialstore.save(
        path,
        {
            # 16 MiB: split into 4 chunk rows of 4 MiB, so small slabs read it in 4 steps.
            "big": np.arange(2048 * 2048, dtype=np.float32).reshape(2048, 2048),
            "small": [np.arange(4, dtype=np.int16), np.arange(6, dtype=np.float32)],
            "step": 3,
        },
    )
    partialstore.finalize(path)
    return path, folder


def _descriptors(folder: Path) -> dict[tuple[Any, ...], dict[str, Any]]:
    manifest = json.loads((folder / "partialstore.json").read_text())
    return {tuple(e["data"]["shape"]): e["data"] for e in manifest["leaves"] if "data" in e}


def _flip(file: Path, at: int) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0x10
    file.write_bytes(bytes(data))


def _small_slabs(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    big = _descriptors(folder)[(2048, 2048)]
    assert big["chunks"][0] < 2048, big  # the leaf has several chunk rows
    monkeypatch.setattr(verifying, "SLAB_BYTES", 1 << 20)


def test_sound_checkpoint_reports_every_byte(
    checkpoint: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, folder = checkpoint
    _small_slabs(monkeypatch, folder)
    seen: list[tuple[int, int]] = []
    report = partialstore.verify(path, progress=lambda done, total: seen.append((done, total)))
    total = (16 << 20) + 8 + 24
    assert report.ok and report.damaged == [] and report.unchecksummed == []
    assert (report.leaves, report.arrays, report.nbytes) == (4, 3, total)
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert len(seen) >= 1 + 4  # one step per slab of the big leaf at least


def test_damage_in_a_later_slab_and_a_packed_leaf_are_both_named(
    checkpoint: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, folder = checkpoint
    _small_slabs(monkeypatch, folder)
    chunks = sorted(p for p in folder.glob("data/*/a*/c/**/*") if p.is_file())
    _flip(chunks[-1], 100)  # the last chunk row: read in the last slab
    packed = _descriptors(folder)[(4,)]
    _flip(folder / packed["path"], packed["offset"] + 1)
    report = partialstore.verify(path)
    assert not report.ok
    assert [d.path for d in report.damaged] == ["big", "small[0]"]
    assert "damaged" in report.damaged[0].reason
    assert "Checksum mismatch" in report.damaged[1].reason
    assert report.nbytes == (16 << 20) + 32  # every leaf counted, damaged or not


def test_a_missing_chunk_is_damage_not_zeros(checkpoint: tuple[str, Path]) -> None:
    path, folder = checkpoint
    chunks = sorted(p for p in folder.glob("data/*/a*/c/**/*") if p.is_file())
    chunks[0].unlink()
    report = partialstore.verify(path)
    assert [d.path for d in report.damaged] == ["big"]
    assert np.array_equal(partialstore.load(path, select=["small"])["small"][0], np.arange(4))


def test_a_truncated_pack_damages_only_the_leaves_it_cuts(checkpoint: tuple[str, Path]) -> None:
    path, folder = checkpoint
    first, second = _descriptors(folder)[(4,)], _descriptors(folder)[(6,)]
    assert first["path"] == second["path"]
    cut = max(first["offset"], second["offset"])  # the later leaf loses its bytes
    pack = folder / first["path"]
    pack.write_bytes(pack.read_bytes()[:cut])
    report = partialstore.verify(path)
    later = "small[0]" if first["offset"] > second["offset"] else "small[1]"
    assert [d.path for d in report.damaged] == [later]


def test_damaged_manifest_and_missing_checkpoint_raise(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="No finalized checkpoint"):
        partialstore.verify(str(tmp_path / "nothing"))
    path = tmp_path / "step_1"
    partialstore.save(str(path), {"w": np.zeros(3)})
    partialstore.finalize(str(path))
    (path / "partialstore.json").write_text("{}")
    with pytest.raises(CorruptCheckpointError):
        partialstore.verify(str(path))


def _rewrite_without_checksum(folder: Path) -> None:
    """Replace the zarr3 leaf by the same array written with ``checksum=False``."""
    import shutil

    from partialstore import registry
    from partialstore._arrays.arrays import write_arrays
    from partialstore._runtime.aio import run

    manifest_file = folder / "partialstore.json"
    manifest = json.loads(manifest_file.read_text())
    (entry,) = (e for e in manifest["leaves"] if e.get("data", {}).get("format") == "zarr3")
    old = entry["data"]
    shutil.rmtree(folder / old["path"])
    save_dir = old["path"].rsplit("/", 1)[0]
    array = np.arange(2048 * 2048, dtype=np.float32).reshape(2048, 2048)
    backend = registry.open_backend(str(folder.parent))
    (leaf,) = run(
        write_arrays(backend, folder.name, save_dir, [array], pack_threshold=0, checksum=False)
    )
    entry["data"] = leaf.encode()
    assert entry["data"]["checksum"] is None
    manifest_file.write_text(json.dumps(manifest))


def test_a_leaf_without_checksum_is_read_and_decoded_and_reported(tmp_path: Path) -> None:
    folder = tmp_path / "step_1"
    partialstore.save(str(folder), {"big": np.zeros((2048, 2048), np.float32), "step": 1})
    partialstore.finalize(str(folder))
    _rewrite_without_checksum(folder)
    report = partialstore.verify(str(folder))
    assert report.ok and report.unchecksummed == ["big"]
    shown = subprocess.run(
        [str(Path(sys.executable).with_name("partialstore")), "verify", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (
        shown.returncode == 0
        and "big" in shown.stdout
        and "1 array leaves have no checksum" in shown.stdout
    ), shown
    chunks = sorted(p for p in folder.glob("data/*/a*/c/**/*") if p.is_file())
    _flip(chunks[0], 10)  # undetectable without a checksum: still "ok", and said so
    assert partialstore.verify(str(folder)).unchecksummed == ["big"]
    chunks[1].write_bytes(chunks[1].read_bytes()[:-4])  # a short chunk does not decode
    damaged = partialstore.verify(str(folder)).damaged
    assert [d.path for d in damaged] == ["big"]


def test_reads_in_flight_stay_within_the_byte_budget_and_slots() -> None:
    import asyncio

    from partialstore._runtime.aio import run

    held = {"bytes": 0, "reads": 0}
    peaks = {"bytes": 0, "reads": 0}
    budget = verifying._Budget(100, 3)
    sizes = [60, 30, 30, 10, 10, 10, 500, 40]  # 500: more than the budget, runs alone

    async def read(nbytes: int) -> None:
        async with budget.hold(nbytes):
            held["bytes"] += min(nbytes, 100)
            held["reads"] += 1
            for key in peaks:
                peaks[key] = max(peaks[key], held[key])
            await asyncio.sleep(0.01)
            held["bytes"] -= min(nbytes, 100)
            held["reads"] -= 1

    async def all_reads() -> None:
        await asyncio.gather(*(read(n) for n in sizes))

    run(all_reads())
    assert peaks["bytes"] <= 100 and peaks["reads"] <= 3
    assert peaks["reads"] >= 2  # it does run reads in parallel
    assert held == {"bytes": 0, "reads": 0} and (budget.free, budget.slots) == (100, 3)
