"""The reference reader (docs/) reads every leaf kind and dtype, local and S3, without partialstore.

The reader runs in a child process that must never import partialstore; its
leaves are compared bit-exact with ``partialstore.load`` of the same checkpoint.
The checkpoint holds every leaf kind (zarr3 and packed arrays, numpy scalars,
``jax.Array``, inline ints, big ints, floats with NaN payloads, bools, strings,
``None``), zero-size arrays, nested and empty containers, every dtype
partialstore saves (natively and as raw bits), and a second save that replaces
leaves, so ``data/`` holds arrays the manifest no longer uses.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import s3fs
from test_dtype_coverage import sample

import partialstore
from partialstore._pytree.dtype_rules import SUPPORTED_DTYPE_NAMES
from partialstore.testing.servers import MotoS3Server

DOCS = Path(__file__).resolve().parents[1] / "docs"

pytestmark = pytest.mark.usefixtures("small_zarr3")


@pytest.fixture
def small_zarr3(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrays of 256 bytes and more become zarr3 arrays of several chunks (format unchanged)."""
    from partialstore._arrays import arrays

    defaults = arrays.write_arrays.__kwdefaults__
    assert defaults is not None and "pack_threshold" in defaults
    monkeypatch.setitem(defaults, "pack_threshold", 256)
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 128)


class Point(NamedTuple):
    x: Any
    y: Any


class Pair:
    """A custom pytree node flattened without keys (its children get "flat" key paths)."""

    def __init__(self, left: Any, right: Any) -> None:
        self.left, self.right = left, right


jax.tree_util.register_pytree_node(
    Pair, lambda p: ((p.left, p.right), None), lambda _, children: Pair(*children)
)

NAN_WITH_PAYLOAD = struct.unpack("<d", struct.pack("<Q", 0xFFF8_0000_DEAD_BEEF))[0]


def _state() -> dict[str, Any]:
    dtypes = {
        name: {
            "packed": sample(name, (5,), number),
            "zarr3": sample(name, (7, 50), number),
            "empty": sample(name, (0, 3), number),
            "scalar": sample(name, (1,), number)[0],
        }
        for number, name in enumerate(sorted(SUPPORTED_DTYPE_NAMES))
    }
    inline = {
        "int": 7,
        "int64_min": -(2**63),
        "big": 2**100 + 1,
        "big_negative": -(2**64),
        "float": 0.1,
        "negative_zero": -0.0,
        "inf": math.inf,
        "minus_inf": -math.inf,
        "nan": NAN_WITH_PAYLOAD,
        "true": True,
        "text": "héllo ☃ \u0000 'quoted'",
        "empty_text": "",
        "none": None,
    }
    containers = {
        "list": [1, [2.5, {"a": np.arange(3, dtype=np.int16)}]],
        "tuple": (np.ones(2), "x"),
        "namedtuple": Point(np.int8(1), None),
        "custom": Pair(1.5, np.arange(300, dtype=np.float32)),
        "int_keys": {0: "zero", 7: np.zeros((0,), np.float64)},
        "empty": {"dict": {}, "list": [], "tuple": ()},
    }
    jax_leaves = {"small": jnp.arange(6, dtype=jnp.bfloat16), "large": jnp.ones((40, 3))}
    return {"dtypes": dtypes, "inline": inline, "containers": containers, "jax": jax_leaves}


def _replacements() -> dict[str, Any]:
    return {"inline": {"int": 8}, "dtypes": {"float32": {"zarr3": np.full((9, 9), 2.0, "f4")}}}


def _write(path: str, options: dict[str, Any] | None = None) -> None:
    partialstore.save(path, _state(), storage_options=options)
    partialstore.save(path, _replacements(), storage_options=options)
    partialstore.finalize(path, storage_options=options)


def _run_reader(url: str, tmp_path: Path, endpoint: str | None, env: dict[str, str]) -> Any:
    out = tmp_path / "leaves.pickle"
    code = textwrap.dedent(
        f"""
        import pickle, sys
        sys.path.insert(0, {str(DOCS)!r})
        import reference_reader
        leaves = reference_reader.read_checkpoint({url!r}, {endpoint!r})
        imported = sorted(m for m in sys.modules if m.split(".")[0] == "partialstore")
        with open({str(out)!r}, "wb") as f:
            pickle.dump((leaves, imported), f)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env=env, cwd=tmp_path)
    with out.open("rb") as f:
        leaves, imported = pickle.load(f)
    assert imported == [], f"the reference reader imported {imported}"
    return leaves


def _keystr(path: list[list[Any]]) -> str:
    return "".join(f".{key}" if kind == "attr" else f"[{key!r}]" for kind, key in path)


def _walk(tree: Any, path: list[list[Any]]) -> Any:
    for _, key in path:  # load gives NamedTuples and custom nodes as dicts/lists
        tree = tree[key]
    return tree


def _assert_same(got: Any, want: Any, where: str) -> None:
    assert type(got) is type(want), (where, type(got), type(want))
    if isinstance(want, np.ndarray | np.generic):
        got, want = np.asarray(got), np.asarray(want)
        assert (got.dtype, got.shape) == (want.dtype, want.shape), where
        assert got.tobytes() == want.tobytes(), where
    elif isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want), where
    else:
        assert got == want, where


def _check(leaves: dict[str, Any], manifest: dict[str, Any], loaded: Any) -> None:
    paths = [leaf["path"] for leaf in manifest["leaves"]]
    assert sorted(leaves) == sorted(_keystr(path) for path in paths)
    for path in paths:
        _assert_same(leaves[_keystr(path)], _walk(loaded, path), _keystr(path))
    formats = {leaf["data"]["format"] for leaf in manifest["leaves"] if "data" in leaf}
    assert formats == {"packed", "zarr3"}
    # The replaced leaves come from the second save; the first save's arrays stay in data/.
    assert leaves["['inline']['int']"] == 8
    assert leaves["['dtypes']['float32']['zarr3']"].shape == (9, 9)
    assert math.isnan(leaves["['inline']['nan']"])
    assert leaves["['containers']['namedtuple'].x"] == np.int8(1)


def test_reference_reader_reads_a_local_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    _write(str(path))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    leaves = _run_reader(str(path), tmp_path, None, env)
    manifest = json.loads((path / "partialstore.json").read_text())
    _check(leaves, manifest, partialstore.load(path))
    used = {leaf["data"]["path"].split("/")[1] for leaf in manifest["leaves"] if "data" in leaf}
    assert len(used) == 2 == len(list((path / "data").iterdir()))


def test_reference_reader_reads_an_s3_checkpoint(
    s3_url: tuple[str, dict[str, Any]], moto_server: MotoS3Server, tmp_path: Path
) -> None:
    root, options = s3_url
    path = f"{root}/ck"
    _write(path, options)
    # The endpoint reaches the reader as an argument; credentials and region from the env.
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL_S3"}
    env.update({k: v for k, v in moto_server.env().items() if k != "AWS_ENDPOINT_URL_S3"})
    leaves = _run_reader(path, tmp_path, moto_server.endpoint_url, env)
    fs = s3fs.S3FileSystem(**options)
    manifest = json.loads(fs.cat_file(f"{path.removeprefix('s3://')}/partialstore.json"))
    _check(leaves, manifest, partialstore.load(path, storage_options=options))


def _ranges(records: list[Any]) -> list[tuple[int, int]]:
    spans = []
    for record in records:
        first, _, last = record.headers["range"].removeprefix("bytes=").partition("-")
        spans.append((int(first), int(last)))
    return spans


def test_zero_size_packed_leaves_are_never_read_on_s3(
    proxied_s3_url: Any, moto_server: MotoS3Server, tmp_path: Path
) -> None:
    proxy, options = proxied_s3_url.proxy, proxied_s3_url.options
    path = f"{proxied_s3_url.url}/ck"
    # "last" ends its pack (its offset is the pack's size); "alone" is its save's only leaf.
    first = {"a": np.arange(3, dtype=np.int8), "last": np.zeros((0, 4), np.float32)}
    partialstore.save(path, first, storage_options=options)
    partialstore.save(path, {"alone": np.zeros((2, 0), np.int64)}, storage_options=options)
    partialstore.finalize(path, storage_options=options)
    fs = s3fs.S3FileSystem(**moto_server.storage_options())
    bucket_path = path.removeprefix("s3://")
    manifest = json.loads(fs.cat_file(f"{bucket_path}/partialstore.json"))
    data = {leaf["path"][0][1]: leaf["data"] for leaf in manifest["leaves"]}
    assert (data["last"]["format"], data["last"]["nbytes"], data["alone"]["nbytes"]) == (
        "packed",
        0,
        0,
    )
    # Why docs/format.md forbids reading them: S3 refuses a range at the object's end.
    pack = f"{bucket_path}/{data['last']['path']}"
    assert fs.size(pack) == data["last"]["offset"]
    with pytest.raises(OSError, match="range"):
        fs.cat_file(pack, start=data["last"]["offset"], end=data["last"]["offset"])

    proxy.reset_log()
    loaded = partialstore.load(path, storage_options=options)
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL_S3"}
    leaves = _run_reader(path, tmp_path, options["endpoint_url"], env)
    for name, shape, dtype in (("last", (0, 4), "float32"), ("alone", (2, 0), "int64")):
        for got in (loaded[name], leaves[f"[{name!r}]"]):
            assert (got.shape, got.dtype) == (shape, np.dtype(dtype))
    np.testing.assert_array_equal(leaves["['a']"], first["a"])
    reads = proxy.requests("GET", key=r"/packed-\d+\.bin$")
    assert len(reads) == 2  # one ranged read of "a" each, by partialstore and by the reader
    assert all(record.status == 206 for record in reads)
    assert _ranges(reads) == [(0, 2), (0, 2)]  # bytes [0, 3): never an empty range
    assert not proxy.requests("GET", key=data["alone"]["path"])


def test_reader_crc32c_is_the_castagnoli_crc_of_the_spec() -> None:
    spec = importlib.util.spec_from_file_location("reference_reader", DOCS / "reference_reader.py")
    assert spec is not None and spec.loader is not None
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    assert reader.crc32c(b"123456789") == 0xE3069283  # the check value docs/format.md gives
    assert reader.crc32c(b"") == 0
    data = np.random.default_rng(1).bytes(1000)
    assert reader.crc32c(data) == google_crc32c.value(data)
