"""Every dtype JAX has round-trips bit-exact, and the README lists exactly the saved set.

JAX's dtypes are enumerated from ``jax.numpy`` itself (every exported scalar type
with a concrete dtype), not from partialstore's table, so a dtype a new JAX adds
fails here until partialstore saves it. ``tests/test_raw_bit_dtypes.py`` covers
the raw-bit kinds on local and memory; this file covers the whole set in one
checkpoint, packed and as multi-chunk zarr3 arrays, numpy and ``jax.Array``.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import partialstore
from partialstore._arrays import arrays
from partialstore._arrays.dtypes import storage_dtype_name
from partialstore._pytree.dtype_rules import SUPPORTED_DTYPE_NAMES

README = Path(__file__).resolve().parents[1] / "README.md"
#: ml_dtypes kinds partialstore saves that JAX has no type for.
ML_DTYPES_ONLY = {"complex32", "bcomplex32"}
#: Stored as raw bits in the zarr3 unsigned integer of the same width (docs/format.md).
RAW_BITS = {"float8_e4m3", "float6_e2m3fn", "float6_e3m2fn", "int1", "uint1", "uint2", "uint4"}
RAW_BITS |= ML_DTYPES_ONLY
#: Kinds narrower than their byte: random bytes would set bits they do not have.
SUB_BYTE = {"int1", "int2", "int4", "uint1", "uint2", "uint4", "float4_e2m1fn"}
SUB_BYTE |= {"float6_e2m3fn", "float6_e3m2fn"}


def jax_dtype_names() -> set[str]:
    """Names of the concrete dtypes ``jax.numpy`` exports a scalar type for."""
    names = set()
    for attr in dir(jnp):
        scalar = getattr(jnp, attr)
        if isinstance(scalar, type) and isinstance(getattr(scalar, "dtype", None), np.dtype):
            names.add(scalar.dtype.name)
    return names


def sample(name: str, shape: Any, seed: int = 0) -> np.ndarray:
    """Values of dtype ``name``; full-byte kinds get every bit pattern (NaN payloads, -0)."""
    dtype = np.dtype(getattr(ml_dtypes, name, name))
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    if name == "bool":
        return rng.integers(0, 2, size).astype(bool).reshape(shape)
    raw = rng.integers(0, 256, size * dtype.itemsize, dtype=np.uint8).view(dtype)
    if name in SUB_BYTE:  # land on representable values
        raw = raw.astype(np.float32).astype(dtype)
    return raw.reshape(shape)


@pytest.fixture
def small_zarr3(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrays of 256 bytes and more become zarr3, in chunks of about 128 bytes.

    The stored format is the same at any size; small thresholds keep the test
    fast while every dtype still gets several chunks, edge chunks included.
    """
    defaults = arrays.write_arrays.__kwdefaults__
    assert defaults is not None and "pack_threshold" in defaults
    monkeypatch.setitem(defaults, "pack_threshold", 256)
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 128)


def test_partialstore_saves_every_jax_dtype() -> None:
    jax_names = jax_dtype_names()
    assert {"bfloat16", "int4", "uint4", "float8_e4m3fn", "float4_e2m1fn"} <= jax_names
    assert jax_names <= SUPPORTED_DTYPE_NAMES
    assert SUPPORTED_DTYPE_NAMES - jax_names == ML_DTYPES_ONLY


def _readme_dtypes() -> list[str]:
    text = README.read_text()
    match = re.search(r"<!-- dtypes -->(.*?)<!-- /dtypes -->", text, re.S)
    assert match, "README.md lost its <!-- dtypes --> list"
    return re.findall(r"`([a-z0-9_]+)`", match.group(1))


def test_readme_lists_exactly_the_saved_dtypes() -> None:
    listed = _readme_dtypes()
    assert len(listed) == len(set(listed)), "a dtype is listed twice"
    assert set(listed) == SUPPORTED_DTYPE_NAMES == jax_dtype_names() | ML_DTYPES_ONLY


def _state() -> dict[str, Any]:
    state: dict[str, Any] = {}
    for number, name in enumerate(sorted(SUPPORTED_DTYPE_NAMES)):
        entry = {"packed": sample(name, (5,), number), "zarr3": sample(name, (7, 50), number)}
        entry["scalar"] = sample(name, (1,), number)[0]
        dtype = entry["packed"].dtype
        # 64-bit kinds need jax_enable_x64; XLA's CPU backend cannot hold some kinds
        # (float6_*, int1 with jax 0.10 on CPU): those are saved from numpy only.
        if name in jax_dtype_names() and jax.dtypes.canonicalize_dtype(dtype) == dtype:
            with contextlib.suppress(jax.errors.JaxRuntimeError):
                entry["jax"] = jnp.asarray(entry["zarr3"])
        state[name] = entry
    with_jax = {name for name, entry in state.items() if "jax" in entry}
    assert {"bfloat16", "int4", "uint4", "float8_e4m3fn", "float32"} <= with_jax
    return state


def _same_bits(got: Any, want: Any) -> bool:
    got, want = np.asarray(got), np.asarray(want)
    return bool(
        got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()
    )


def _manifest(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / "partialstore.json").read_text()))


@pytest.mark.usefixtures("small_zarr3")
def test_every_dtype_round_trips_bit_exact(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "ck"
    partialstore.save(path, state)
    partialstore.finalize(path)
    loaded = partialstore.load(path)
    for name, entry in state.items():
        for role, value in entry.items():
            got = loaded[name][role]
            assert _same_bits(got, value), (name, role)
            assert type(got) is (np.ndarray if role != "scalar" else type(value)), (name, role)
    stored = {}
    for leaf in _manifest(path)["leaves"]:
        (_, name), (_, role) = leaf["path"]
        data = leaf["data"]
        assert data["dtype"] == name
        assert data["format"] == ("zarr3" if role in ("zarr3", "jax") else "packed")
        if data["format"] == "zarr3":
            stored[name] = data["storage_dtype"]
            chunks = [p for p in (path / data["path"] / "c").rglob("*") if p.is_file()]
            assert len(chunks) > 1, name  # several chunks, edge chunks included
    for name in SUPPORTED_DTYPE_NAMES:
        width = np.dtype(getattr(ml_dtypes, name, name)).itemsize * 8
        assert stored[name] == (f"uint{width}" if name in RAW_BITS else name), name


#: The zarr v3 specification's core data types (raw ``rN`` aside).
ZARR_CORE = {"bool", "float16", "float32", "float64", "complex64", "complex128"}
ZARR_CORE |= {f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)}


def _format_md_dtype_rows() -> list[list[str]]:
    text = (README.parent / "docs" / "format.md").read_text()
    section = text.split("## 10. Dtypes", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| `")]
    assert rows, "docs/format.md lost its dtype table"
    return [[cell.strip() for cell in row] for row in rows]


def test_format_md_dtype_table_matches_what_is_stored() -> None:
    listed = []
    for names_cell, bytes_cell, data_type_cell, core_cell in _format_md_dtype_rows():
        names = re.findall(r"`([a-z0-9_]+)`", names_cell)
        sizes = [int(n) for n in re.findall(r"\d+", bytes_cell.split("(")[0])]
        sizes = sizes * len(names) if len(sizes) == 1 else sizes
        for name, size in zip(names, sizes, strict=True):
            stored = storage_dtype_name(name)
            assert np.dtype(getattr(ml_dtypes, name, name)).itemsize == size, name
            cell = data_type_cell.split()[0].strip("`")
            assert cell == stored or (cell == "same" and stored == name), name
            assert core_cell.startswith("yes" if stored in ZARR_CORE else "no"), name
            listed.append(name)
    assert len(listed) == len(set(listed))
    assert set(listed) == SUPPORTED_DTYPE_NAMES
