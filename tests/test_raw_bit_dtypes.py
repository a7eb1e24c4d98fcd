"""ml_dtypes kinds that TensorStore has no name for are stored as raw bits and round-trip.

``_arrays/dtypes.py`` stores these dtypes in a native integer of the same
width; a save, finalize and load must give back the same dtype and the
same bytes, on a store with a TensorStore kvstore (local) and one without
(memory).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import partialstore

RAW_BIT_DTYPES = [
    name
    for name in (
        "float8_e4m3",
        "float6_e2m3fn",
        "float6_e3m2fn",
        "int1",
        "uint1",
        "uint2",
        "uint4",
    )
    if hasattr(ml_dtypes, name)
]


def _sample(name: str, size: int) -> np.ndarray:
    dtype = np.dtype(getattr(ml_dtypes, name))
    raw = np.random.default_rng(7).integers(0, 256, size=size * dtype.itemsize, dtype=np.uint8)
    values = raw.view(dtype)
    # Sub-byte kinds keep only their valid bits: round-trip through float to land on values.
    return values.astype(np.float32).astype(dtype)


@pytest.mark.parametrize("store", ["local", "memory"])
@pytest.mark.parametrize("name", RAW_BIT_DTYPES)
def test_raw_bit_dtypes_round_trip_bit_exact(name: str, store: str, tmp_path: Path) -> None:
    root = str(tmp_path) if store == "local" else f"memory://{uuid.uuid4().hex}"
    path = f"{root}/ck"
    small, large = _sample(name, 37), _sample(name, 600_000)  # packed, and a zarr3 array
    partialstore.save(path, {"small": small, "large": large, "scalar": small[3]})
    partialstore.finalize(path)
    loaded = partialstore.load(path)
    for key, expected in (("small", small), ("large", large)):
        assert loaded[key].dtype == expected.dtype
        assert loaded[key].tobytes() == expected.tobytes()
    assert loaded["scalar"].dtype == small.dtype
    assert np.asarray(loaded["scalar"]).tobytes() == np.asarray(small[3]).tobytes()
    assert str(partialstore.metadata(path).tree["large"].dtype) == name
