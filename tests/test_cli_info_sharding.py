"""``partialstore info`` shows each leaf's saved sharding (issue 11), run as a console script.

A checkpoint is saved in this process: a ``jax.Array`` with a
``NamedSharding`` on a 1-device mesh (recorded), one on a single device, a
numpy array and an int (none recorded). One leaf's recorded sharding is then
rewritten to an 8-device mesh, as a bigger job would have saved it: ``info``
reads only the manifest, so it shows it on this 1-device machine too. With
``--json`` every leaf has ``"sharding"``: the manifest's JSON, or ``null``; the
human tree says the mesh and spec in words, wrapped (not cropped) on a
narrow terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

import partialstore

SCRIPT = Path(sys.executable).with_name("partialstore")
#: Generous: a command that hangs must fail the test, not the session.
TIMEOUT = 120
#: As a job of 8 devices would have recorded it (format.md §8).
EIGHT = {
    "kind": "named",
    "mesh": {"axis_names": ["data", "model"], "axis_types": ["auto", "auto"], "shape": [2, 4]},
    "spec": ["model"],
}


def _run(*args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    assert SCRIPT.exists(), f"console script missing: {SCRIPT}"
    # 200: wide enough that rich does not wrap a leaf's line inside the tree.
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=TIMEOUT, env=env
    )


@pytest.fixture
def checkpoint(tmp_path: Path) -> str:
    explicit = (jax.sharding.AxisType.Explicit,)
    mesh = jax.make_mesh((1,), ("data",), axis_types=explicit)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    state = {
        "params": {
            "w": jax.device_put(np.arange(8, dtype=np.float32).reshape(2, 4), sharding),
            "b": jax.device_put(np.zeros(4, np.float32), sharding.update(spec=())),
        },
        "single": jax.numpy.ones(3),  # one device: no NamedSharding to record
        "host": np.ones(2, np.int16),
        "step": 7,
    }
    path = str(tmp_path / "ckpt")
    partialstore.save(path, state)
    partialstore.finalize(path)
    manifest = tmp_path / "ckpt" / "partialstore.json"
    body = json.loads(manifest.read_text())
    entry = next(e for e in body["leaves"] if e["path"] == [["key", "params"], ["key", "b"]])
    assert entry["sharding"]["spec"] == []  # recorded: replicated over the 1-device mesh
    entry["sharding"] = EIGHT
    manifest.write_text(json.dumps(body))
    return path


def test_info_json_has_each_leafs_sharding(checkpoint: str) -> None:
    done = _run("info", checkpoint, "--json")
    assert done.returncode == 0, done.stderr
    leaves: dict[str, Any] = {leaf["path"]: leaf for leaf in json.loads(done.stdout)["leaves"]}
    assert sorted(leaves) == ["host", "params/b", "params/w", "single", "step"]
    assert leaves["params/w"]["sharding"] == {
        "kind": "named",
        "mesh": {"axis_names": ["data"], "axis_types": ["explicit"], "shape": [1]},
        "spec": [None, "data"],
    }
    assert leaves["params/b"]["sharding"] == EIGHT
    for name in ("single", "host", "step"):
        assert "sharding" in leaves[name] and leaves[name]["sharding"] is None, name
    assert leaves["params/w"]["shape"] == [2, 4] and leaves["params/w"]["bytes"] == 32


def test_info_tree_says_each_leafs_sharding(checkpoint: str) -> None:
    done = _run("info", checkpoint)
    assert done.returncode == 0, done.stderr
    lines = {line.split(":")[0].strip("│├└─ "): line for line in done.stdout.splitlines()}
    assert "sharded: mesh {'data': 1} (1 devices), spec (None, 'data')" in lines["w"]
    assert "sharded: mesh {'data': 2, 'model': 4} (8 devices), spec ('model',)" in lines["b"]
    for name in ("single", "host"):
        assert "float" in lines[name] or "int16" in lines[name], lines[name]
        assert "sharded" not in lines[name], lines[name]
    assert done.stdout.count("sharded:") == 2


def test_info_tree_wraps_a_long_sharding_on_a_narrow_terminal(checkpoint: str) -> None:
    done = _run("info", checkpoint, columns=50)
    assert done.returncode == 0, done.stderr
    tree = done.stdout.split("\n<root>\n")[1].split("\nsaves")[0].splitlines()
    assert max(len(line) for line in tree) <= 50
    # Without the tree's guides, the wrapped lines say it all.
    words = " ".join(" ".join(line.lstrip("│├└─ ").split()) for line in tree)
    assert "sharded: mesh {'data': 2, 'model': 4} (8 devices), spec ('model',)" in words
