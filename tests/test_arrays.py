"""Array I/O: every dtype round-trips bit-exactly through zarr3 and packs on real backends.

The ``backend`` fixture runs each test on the local backend (TensorStore
writes files directly through its ``file`` kvstore) and on the memory
backend (no kvstore: the same zarr3 bytes move through ``read``/``write``),
so both codec paths are covered. S3 (moto) and GCS (fake-gcs-server) get a
round trip of their own that proves their ``kvstore_spec`` end to end.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import uuid
from collections.abc import Coroutine
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

import partialstore
from partialstore import registry
from partialstore._arrays.arrays import (
    PACK_THRESHOLD,
    descriptor_nbytes,
    dtype_from_name,
    dtype_name,
    read_arrays,
    write_arrays,
)
from partialstore._arrays.descriptors import Leaf, normalize_index
from partialstore._arrays.dtypes import SUPPORTED_DTYPE_NAMES, check_array_supported
from partialstore._arrays.packing import PackedLeaf, coalesce, plan_packs
from partialstore._arrays.zarr3 import choose_chunks, chunk_keys
from partialstore._runtime.aio import run
from partialstore.backend import Backend, join_key
from partialstore.errors import (
    CorruptCheckpointError,
    InvalidInputError,
    UnsupportedLeafError,
)

ROOT = "ckpt.partial_save"
SAVE = "data/s1"
# Force every leaf into one format: zarr3 (threshold 0) or packed (threshold huge).
ZARR3 = {"pack_threshold": 0}
PACKED = {"pack_threshold": 1 << 40}

# Significant bits of the ml_dtypes narrower than their 1-byte storage; a
# byte with higher bits set is not a value of that type.
_SUB_BYTE_BITS = {
    "int1": 1,
    "uint1": 1,
    "int2": 2,
    "uint2": 2,
    "int4": 4,
    "uint4": 4,
    "float4_e2m1fn": 4,
    "float6_e2m3fn": 6,
    "float6_e3m2fn": 6,
}


@pytest.fixture(params=["local", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Backend:
    if request.param == "local":
        return registry.open_backend(str(tmp_path / "root"))
    return registry.open_backend(f"memory://{uuid.uuid4().hex}")


def _uint(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return np.dtype(f"u{dtype.itemsize}")


def _every_pattern(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """An array of ``name`` filled with random valid bit patterns (NaN payloads included)."""
    dtype = dtype_from_name(name)
    rng = np.random.default_rng(seed)
    if name == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    raw = np.frombuffer(rng.bytes(math.prod(shape) * dtype.itemsize), np.uint8)
    if name in _SUB_BYTE_BITS:
        raw = raw & np.uint8(2 ** _SUB_BYTE_BITS[name] - 1)
    array = raw.view(dtype).reshape(shape).copy()
    if name in ("float32", "float64", "float16", "bfloat16"):
        # Make sure quiet and signalling NaNs with payloads are in there.
        flat = array.reshape(-1).view(_uint(dtype))
        exponent = {2: 0x7C00, 4: 0x7F800000, 8: 0x7FF0000000000000}[dtype.itemsize]
        if name == "bfloat16":
            exponent = 0x7F80
        flat[:3] = [exponent | 1, exponent | 0x15, exponent | (exponent >> 1) | 3]
    return array


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = [np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in (a, b)]
    return bool(np.array_equal(*as_bytes))


def _encoded(writing: Coroutine[Any, Any, list[Leaf]]) -> list[dict[str, Any]]:
    """Run ``write_arrays``; return the descriptors' JSON form, as records store them."""
    return [leaf.encode() for leaf in run(writing)]


def _roundtrip(backend: Backend, arrays: list[np.ndarray], **options: Any) -> list[np.ndarray]:
    descriptors = _encoded(write_arrays(backend, ROOT, SAVE, arrays, **options))
    json.dumps(descriptors)  # the manifest stores them as JSON
    return run(read_arrays(backend, ROOT, [(d, None) for d in descriptors]))


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("options", [ZARR3, PACKED], ids=["zarr3", "packed"])
def test_every_dtype_round_trips_bit_exactly(backend: Backend, options: dict[str, int]) -> None:
    names = sorted(SUPPORTED_DTYPE_NAMES)
    arrays = [_every_pattern(name, (6, 7), seed) for seed, name in enumerate(names)]
    loaded = _roundtrip(backend, arrays, chunk_bytes=64, **options)
    for name, saved, got in zip(names, arrays, loaded, strict=True):
        assert got.dtype == dtype_from_name(name), name
        assert _same_bits(saved, got), name


def test_dtype_names_are_stable_and_ignore_byte_order() -> None:
    assert dtype_name(np.dtype(">f4")) == "float32"
    assert dtype_name(np.dtype("<i8")) == "int64"
    assert dtype_name(np.bool_) == "bool"
    assert dtype_name(ml_dtypes.bfloat16) == "bfloat16"
    assert dtype_name(ml_dtypes.float8_e4m3fn) == "float8_e4m3fn"
    assert dtype_name(ml_dtypes.uint1) == "uint1"  # shares the type char 'E' with bfloat16
    expected = {
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e4m3b11fnuz",
        "int4",
        "uint4",
        "int2",
        "uint2",
        "complex64",
        "complex128",
    }
    assert expected <= SUPPORTED_DTYPE_NAMES
    for name in SUPPORTED_DTYPE_NAMES:
        assert dtype_name(dtype_from_name(name)) == name


@pytest.mark.parametrize(
    "array",
    [
        np.array([object()], dtype=object),
        np.array(["a", "bc"]),
        np.array([b"a"]),
        np.zeros(2, dtype=[("x", "f4"), ("y", "i4")]),
        np.array(["2024-01-01"], dtype="datetime64[D]"),
        np.array([1], dtype="timedelta64[s]"),
        np.zeros(2, dtype=np.longdouble),
    ],
    ids=["object", "str", "bytes", "struct", "datetime", "timedelta", "longdouble"],
)
def test_unsupported_dtypes_are_rejected_before_any_write(
    tmp_path: pathlib.Path, array: np.ndarray
) -> None:
    with pytest.raises(UnsupportedLeafError, match=re.escape(str(array.dtype))):
        check_array_supported(array)
    # The one check runs when save snapshots the tree: nothing reaches the store.
    path = tmp_path / "ckpt"
    with pytest.raises(UnsupportedLeafError, match=re.escape(str(array.dtype))):
        partialstore.save(str(path), {"fine": np.ones(3), "refused": array})
    assert list(tmp_path.iterdir()) == []


def test_unknown_dtype_name_is_corruption() -> None:
    with pytest.raises(CorruptCheckpointError, match="float99"):
        dtype_from_name("float99")


# ------------------------------------------------------------------ shapes and layouts


@pytest.mark.parametrize("options", [ZARR3, PACKED], ids=["zarr3", "packed"])
def test_scalars_empty_strided_and_big_endian_inputs(
    backend: Backend, options: dict[str, int]
) -> None:
    base = np.arange(24 * 10, dtype=np.float64).reshape(24, 10)
    arrays = [
        np.array(3.5, np.float32),  # 0-d
        np.zeros((0, 5), np.int16),  # zero-size
        np.zeros((4, 0, 3), ml_dtypes.bfloat16),
        base.T,  # transposed (F-order)
        base[::3, 1::2],  # strided view
        np.arange(30, dtype=">i4").reshape(5, 6),  # big-endian
        np.arange(8, dtype=">c16") * (1 + 2j),
    ]
    loaded = _roundtrip(backend, arrays, chunk_bytes=128, **options)
    for saved, got in zip(arrays, loaded, strict=True):
        assert got.shape == saved.shape
        assert got.dtype == saved.dtype.newbyteorder("=")
        assert got.dtype.isnative
        np.testing.assert_array_equal(got, saved)
        assert got.flags.writeable and got.flags.c_contiguous


def test_sizes_pick_the_format_and_paths_use_a_counter(backend: Backend) -> None:
    arrays = [np.zeros(10), np.zeros(PACK_THRESHOLD, np.uint8), np.zeros(1)]
    descriptors = _encoded(write_arrays(backend, ROOT, SAVE, arrays))
    assert [d["format"] for d in descriptors] == ["packed", "zarr3", "packed"]
    assert descriptors[1]["path"] == "data/s1/a00001"
    assert descriptors[0]["path"] == descriptors[2]["path"] == "data/s1/packed-0000.bin"
    assert descriptors[2]["offset"] % 64 == 0
    assert [descriptor_nbytes(d) for d in descriptors] == [80, PACK_THRESHOLD, 8]


def test_bad_save_dir_is_rejected(backend: Backend) -> None:
    for save_dir in ("../x", "log/x", "data", "/data/x", "data/../x"):
        with pytest.raises(InvalidInputError):
            _encoded(write_arrays(backend, ROOT, save_dir, [np.ones(2)]))


# ------------------------------------------------------------------- chunked arrays


def test_chunk_shape_splits_leading_dims_evenly() -> None:
    assert choose_chunks([65536, 4096], 4, 16 << 20) == [1024, 4096]
    assert choose_chunks([1000, 10], 8, 600 * 80) == [500, 10]  # 2 x 500, not 600 + 400
    assert choose_chunks([8, 1 << 22], 4, 4 << 20) == [1, 1 << 20]
    assert choose_chunks([3, 4], 4, 1 << 20) == [3, 4]
    assert choose_chunks([0, 7], 4, 8) == [1, 2]
    assert choose_chunks([], 4, 1) == []


def test_large_array_partial_reads(backend: Backend) -> None:
    array = np.arange(512 * 300, dtype=np.float32).reshape(512, 300)
    (descriptor,) = _encoded(
        write_arrays(backend, ROOT, SAVE, [array], pack_threshold=0, chunk_bytes=64 << 10)
    )
    assert descriptor["format"] == "zarr3"
    assert descriptor["chunks"] == [52, 300]
    keys = run(backend.list(join_key(ROOT, descriptor["path"], "c")))
    assert len(keys) == math.ceil(512 / 52)
    indexes = [
        (slice(0, 52),),  # exactly one chunk
        (slice(50, 60), slice(10, 20)),  # across a chunk boundary
        (slice(-5, None), slice(None, None, 7)),  # negative start, step
        (slice(None, None, -37),),  # reversed
        (slice(100, 100),),  # empty
        (),  # everything
    ]
    got = run(read_arrays(backend, ROOT, [(descriptor, index) for index in indexes]))
    for index, part in zip(indexes, got, strict=True):
        np.testing.assert_array_equal(part, array[index])
        assert part.flags.writeable


def test_partial_read_touches_only_needed_chunks(backend: Backend) -> None:
    array = np.arange(64 * 100, dtype=np.int64).reshape(64, 100)
    (descriptor,) = _encoded(
        write_arrays(backend, ROOT, SAVE, [array], pack_threshold=0, chunk_bytes=16 * 800)
    )
    assert descriptor["chunks"] == [16, 100]
    # Lose the last chunk: a shard that does not need it still loads, the whole does not.
    run(backend.delete(join_key(ROOT, descriptor["path"], "c/3/0")))
    (head,) = run(read_arrays(backend, ROOT, [(descriptor, (slice(0, 40),))]))
    np.testing.assert_array_equal(head, array[:40])
    with pytest.raises(CorruptCheckpointError, match="c/3/0"):
        run(read_arrays(backend, ROOT, [(descriptor, None)]))


def test_chunk_keys_for_an_index() -> None:
    from partialstore._arrays.descriptors import Zarr3Leaf

    f4 = np.dtype("f4")
    leaf = Zarr3Leaf("data/s/a", f4, f4, (25, 8), (10, 4))
    assert chunk_keys(leaf, normalize_index((slice(5, 15), slice(4, 8)), leaf.shape)) == [
        "c/0/1",
        "c/1/1",
    ]
    assert chunk_keys(leaf, normalize_index((slice(3, 3),), leaf.shape)) == []
    scalar = Zarr3Leaf("data/s/b", f4, f4, (), ())
    assert chunk_keys(scalar, normalize_index(None, ())) == ["c"]


def test_bad_index_is_invalid_input(backend: Backend) -> None:
    (descriptor,) = _encoded(write_arrays(backend, ROOT, SAVE, [np.zeros((4, 4))]))
    for index in [(1, 2), (slice(None),) * 3, "0:2"]:
        with pytest.raises(InvalidInputError):
            run(read_arrays(backend, ROOT, [(descriptor, index)]))


# --------------------------------------------------------------------------- packing


def test_many_tiny_leaves_make_one_object(backend: Backend) -> None:
    arrays = [np.full((i % 7,), i, dtype=np.int32) for i in range(1000)]
    descriptors = _encoded(write_arrays(backend, ROOT, SAVE, arrays))
    assert run(backend.list(join_key(ROOT, SAVE))) == [join_key(ROOT, SAVE, "packed-0000.bin")]
    # One save, one read range: the whole load is a single ranged request.
    leaves = [(i, _packed(d)) for i, d in enumerate(descriptors)]
    assert len(coalesce(leaves)) == 1
    loaded = run(read_arrays(backend, ROOT, [(d, None) for d in descriptors]))
    for saved, got in zip(arrays, loaded, strict=True):
        np.testing.assert_array_equal(got, saved)


def test_packs_split_and_reads_coalesce(backend: Backend) -> None:
    arrays = [np.full(8001, i, dtype=np.uint8) for i in range(10)]
    descriptors = _encoded(write_arrays(backend, ROOT, SAVE, arrays, pack_bytes=20_000))
    paths = sorted({d["path"] for d in descriptors})
    assert paths == [f"data/s1/packed-{n:04d}.bin" for n in range(5)]
    assert run(backend.list(join_key(ROOT, SAVE))) == [join_key(ROOT, p) for p in paths]
    # Two leaves per pack, read as one range per pack; far leaves split a range.
    leaves = [(i, _packed(d)) for i, d in enumerate(descriptors)]
    assert len(coalesce(leaves)) == 5
    # 8001-byte leaves at 64-byte aligned offsets leave 63-byte holes.
    assert len(coalesce(leaves, gap=62)) == 10
    # Repeated and partial requests of one leaf.
    got = run(
        read_arrays(backend, ROOT, [(descriptors[3], None), (descriptors[3], (slice(10, 20),))])
    )
    np.testing.assert_array_equal(got[0], arrays[3])
    np.testing.assert_array_equal(got[1], arrays[3][10:20])


def test_plan_packs_aligns_and_splits() -> None:
    plan = plan_packs([(0, 10), (1, 100), (5, 0), (7, 60)], pack_bytes=200)
    assert [[(m.index, m.offset) for m in pack] for pack in plan] == [
        [(0, 0), (1, 64), (5, 192)],
        [(7, 0)],
    ]
    assert plan_packs([(0, 500)], pack_bytes=100)[0][0].offset == 0  # oversized leaf alone


def _packed(descriptor: dict[str, Any]) -> PackedLeaf:
    return PackedLeaf(
        descriptor["path"],
        descriptor["offset"],
        descriptor["nbytes"],
        dtype_from_name(descriptor["dtype"]),
        tuple(descriptor["shape"]),
        descriptor["crc32c"],
    )


# ------------------------------------------------------------------------ corruption


def _flip_byte(backend: Backend, key: str, position: int) -> None:
    data = bytearray(run(backend.read(key)))
    data[position] ^= 0x10
    run(backend.write(key, bytes(data)))


def test_flipped_byte_in_a_zarr3_chunk_is_detected(backend: Backend) -> None:
    array = np.arange(4096, dtype=np.float32)
    (descriptor,) = _encoded(
        write_arrays(backend, ROOT, SAVE, [array], pack_threshold=0, chunk_bytes=4096)
    )
    _flip_byte(backend, join_key(ROOT, descriptor["path"], "c/2"), 100)
    (fine,) = run(read_arrays(backend, ROOT, [(descriptor, (slice(0, 1024),))]))
    np.testing.assert_array_equal(fine, array[:1024])
    with pytest.raises(CorruptCheckpointError, match=r"[Dd]igest|checksum"):
        run(read_arrays(backend, ROOT, [(descriptor, None)]))


def test_flipped_byte_or_truncation_in_a_pack_is_detected(backend: Backend) -> None:
    arrays = [np.arange(100, dtype=np.int64), np.arange(50, dtype=np.int16)]
    descriptors = _encoded(write_arrays(backend, ROOT, SAVE, arrays))
    key = join_key(ROOT, descriptors[1]["path"])
    _flip_byte(backend, key, descriptors[1]["offset"] + 3)
    (first,) = run(read_arrays(backend, ROOT, [(descriptors[0], None)]))
    np.testing.assert_array_equal(first, arrays[0])
    with pytest.raises(CorruptCheckpointError, match="crc32c"):
        run(read_arrays(backend, ROOT, [(descriptors[1], None)]))
    run(backend.write(key, run(backend.read(key))[:900]))
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        run(read_arrays(backend, ROOT, [(descriptors[1], None)]))


def test_missing_data_and_mismatched_metadata_are_corruption(backend: Backend) -> None:
    arrays = [np.zeros((40, 40), np.float32), np.ones(3)]
    zarr, packed = _encoded(write_arrays(backend, ROOT, SAVE, arrays, pack_threshold=1000))
    wrong_shape = {**zarr, "shape": [40, 41]}
    wrong_dtype = {**zarr, "dtype": "int32", "storage_dtype": "int32"}
    elsewhere = {**zarr, "path": "data/s2/a00000"}
    for descriptor in (wrong_shape, wrong_dtype, elsewhere, {**packed, "path": "data/s2/p"}):
        with pytest.raises(CorruptCheckpointError):
            run(read_arrays(backend, ROOT, [(descriptor, None)]))


def test_damaged_zarr_metadata_is_corruption(backend: Backend) -> None:
    (descriptor,) = _encoded(write_arrays(backend, ROOT, SAVE, [np.ones((8, 8))], pack_threshold=0))
    run(backend.write(join_key(ROOT, descriptor["path"], "zarr.json"), b'{"zarr_format": 3,'))
    with pytest.raises(CorruptCheckpointError, match=r"zarr\.json"):
        run(read_arrays(backend, ROOT, [(descriptor, None)]))


@pytest.mark.parametrize(
    "change",
    [
        {"path": "../x"},
        {"path": "/abs/data/x"},
        {"path": "log/.."},
        {"path": "data/../log/x"},
        {"path": "data/./x"},
        {"path": "data//x"},
        {"path": "data\\..\\x"},
        {"path": "log/00000001.json"},
        {"path": "data"},
        {"path": 7},
        {"format": "zip"},
        {"dtype": "object"},
        {"shape": [-1]},
        {"shape": [True]},
        {"nbytes": 9},
        {"offset": -64},
    ],
)
def test_bad_descriptors_are_rejected_before_any_read(change: dict[str, Any]) -> None:
    good = {
        "format": "packed",
        "path": "data/s1/packed-0000.bin",
        "offset": 0,
        "nbytes": 8,
        "dtype": "float64",
        "shape": [1],
        "crc32c": 0,
    }
    # A fresh memory root that holds nothing: a read that got past validation
    # would fail with "missing", not with the message checked here.
    empty = registry.open_backend(f"memory://{uuid.uuid4().hex}")
    with pytest.raises(CorruptCheckpointError, match=r"Bad array descriptor|Unknown dtype"):
        run(read_arrays(empty, ROOT, [({**good, **change}, None)]))
    with pytest.raises(CorruptCheckpointError):
        descriptor_nbytes({**good, **change})


def test_zarr3_descriptor_needs_matching_chunks() -> None:
    good = {
        "format": "zarr3",
        "path": "data/s1/a00000",
        "dtype": "float32",
        "shape": [4, 4],
        "chunks": [2, 4],
    }
    assert descriptor_nbytes(good) == 64
    for change in ({"chunks": [2]}, {"chunks": [0, 4]}, {"storage_dtype": "uint8"}):
        with pytest.raises(CorruptCheckpointError):
            descriptor_nbytes({**good, **change})


# ----------------------------------------------------------------- other tools, stores


def test_zarr3_arrays_open_with_plain_tensorstore(tmp_path: pathlib.Path) -> None:
    backend = registry.open_backend(str(tmp_path / "root"))
    arrays = [
        np.random.default_rng(0).standard_normal((300, 70)).astype(ml_dtypes.bfloat16),
        (np.arange(5000, dtype=np.uint8) % 16).view(ml_dtypes.uint4),
    ]
    descriptors = _encoded(
        write_arrays(backend, ROOT, SAVE, arrays, pack_threshold=0, chunk_bytes=8192)
    )
    for array, descriptor in zip(arrays, descriptors, strict=True):
        directory = tmp_path / "root" / ROOT / descriptor["path"]
        store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(directory)}})
        data = store.result().read().result()
        assert _same_bits(data.view(array.dtype), array)
        metadata = json.loads((directory / "zarr.json").read_text())
        assert metadata["attributes"]["partialstore_dtype"] == dtype_name(array.dtype)
        assert metadata["codecs"][-1]["name"] == "crc32c"
    assert descriptors[1]["storage_dtype"] == "uint8"  # TensorStore's zarr3 has no uint4


def test_checksum_can_be_turned_off(backend: Backend) -> None:
    array = np.arange(1000, dtype=np.float64)
    (descriptor,) = _encoded(
        write_arrays(backend, ROOT, SAVE, [array], pack_threshold=0, checksum=False)
    )
    assert descriptor["checksum"] is None
    metadata = json.loads(run(backend.read(join_key(ROOT, descriptor["path"], "zarr.json"))))
    assert [codec["name"] for codec in metadata["codecs"]] == ["bytes"]
    (got,) = run(read_arrays(backend, ROOT, [(descriptor, None)]))
    np.testing.assert_array_equal(got, array)


def test_same_bytes_on_every_backend(tmp_path: pathlib.Path) -> None:
    """Local (TensorStore writes files) and memory (bytes moved by write) store identical keys."""
    arrays = [np.arange(3000, dtype=np.int32).reshape(30, 100), np.ones(5)]
    stored = []
    for url in (str(tmp_path / "root"), f"memory://{uuid.uuid4().hex}"):
        backend = registry.open_backend(url)
        _encoded(write_arrays(backend, ROOT, SAVE, arrays, pack_threshold=100, chunk_bytes=4000))
        keys = run(backend.list(ROOT))
        stored.append({key: run(backend.read(key)) for key in keys})
    assert stored[0] == stored[1]


def _store_roundtrip(url: str, options: dict[str, Any]) -> None:
    backend = registry.open_backend(url, options)
    assert backend.kvstore_spec(join_key(ROOT, SAVE)) is not None  # TensorStore talks directly
    big = np.arange(200 * 64, dtype=np.float32).reshape(200, 64)
    arrays = [big, np.arange(10, dtype=np.int8), np.array(2.5)]
    descriptors = _encoded(
        write_arrays(backend, ROOT, SAVE, arrays, pack_threshold=1024, chunk_bytes=8192)
    )
    assert [d["format"] for d in descriptors] == ["zarr3", "packed", "packed"]
    requests = [(d, None) for d in descriptors] + [(descriptors[0], (slice(150, 190),))]
    loaded = run(read_arrays(backend, ROOT, requests))
    for saved, got in zip([*arrays, big[150:190]], loaded, strict=True):
        np.testing.assert_array_equal(got, saved)
    _flip_byte(backend, join_key(ROOT, descriptors[0]["path"], "c/1/0"), 5)
    with pytest.raises(CorruptCheckpointError):
        run(read_arrays(backend, ROOT, [(descriptors[0], None)]))


def test_s3_round_trip(s3_url: tuple[str, dict[str, Any]]) -> None:
    _store_roundtrip(*s3_url)


def test_gcs_round_trip(gcs_url: tuple[str, dict[str, Any]]) -> None:
    _store_roundtrip(*gcs_url)


def test_generic_fsspec_round_trip(tmp_path: pathlib.Path) -> None:
    backend = registry.open_backend("local://" + str(tmp_path / "fsroot"))
    assert backend.kvstore_spec(SAVE) is None  # bytes go through backend.read/write
    arrays = [np.arange(2000, dtype=np.uint16).reshape(40, 50), np.zeros((2, 2), np.complex64)]
    loaded = _roundtrip(backend, arrays, pack_threshold=100, chunk_bytes=1000)
    for saved, got in zip(arrays, loaded, strict=True):
        np.testing.assert_array_equal(got, saved)
