"""Reference reader of finalized partialstore checkpoints (docs/format.md, version 1)."""

import itertools
import json
import os
import re
import struct
from functools import reduce
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

ZARR_CORE = {"bool", "float16", "float32", "float64", "complex64", "complex128"}
ZARR_CORE |= {f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)}
DATA_PATH = re.compile(r"data(/(?!\.\.?(/|$))[^/\\\x00]+){2,}")  # data/<save-id>/<name>...
TABLE = [reduce(lambda c, _: c >> 1 ^ (c & 1) * 0x82F63B78, range(8), n) for n in range(256)]


def crc32c(data: bytes) -> int:  # pure Python, slow on large chunks: a reference, not a tool
    return reduce(lambda c, b: TABLE[(c ^ b) & 255] ^ c >> 8, data, 2**32 - 1) ^ 2**32 - 1


def dtype(name: str) -> np.dtype[Any]:  # numpy's own names, or ml_dtypes' (bfloat16, int4)
    return np.dtype(getattr(ml_dtypes, name, name))


def from_le(raw: bytes, dt: np.dtype[Any], shape: Any) -> np.ndarray:  # raw bits, then a view
    unit = dt.itemsize // 2 if "complex" in dt.name else dt.itemsize  # (real, imag) pairs
    bits = np.frombuffer(raw, f"<u{unit}").astype(f"=u{unit}")
    return bits.view(dt).reshape(shape)


def read_packed(kv: ts.KvStore, spec: dict[str, Any], d: dict[str, Any]) -> np.ndarray:
    if d["nbytes"] == 0:  # no bytes: never issue an empty ranged read (S3 answers 416)
        return np.zeros(d["shape"], dtype(d["dtype"]))
    raw = kv.read(d["path"], byte_range=slice(at := d["offset"], at + d["nbytes"])).result().value
    if d["offset"] % 64 or len(raw) != d["nbytes"] or crc32c(raw) != d["crc32c"]:
        raise ValueError(f"{d['path']} at {d['offset']}: misaligned, missing or bad CRC-32C")
    return from_le(raw, dtype(d["dtype"]), d["shape"])


def read_zarr3(kv: ts.KvStore, spec: dict[str, Any], d: dict[str, Any]) -> np.ndarray:
    meta = json.loads(kv[f"{d['path']}/zarr.json"])  # KeyError if missing
    shape, chunks, dt = d["shape"], d["chunks"], dtype(d["dtype"])
    stored = (meta["shape"], meta["data_type"], meta["chunk_grid"]["configuration"]["chunk_shape"])
    if stored != (shape, d.get("storage_dtype", d["dtype"]), chunks):
        raise ValueError(f"{d['path']}/zarr.json does not match the manifest")
    if meta["data_type"] in ZARR_CORE:  # any zarr v3 tool opens these; raw bits are viewed
        kvstore = {**spec, "path": f"{spec['path']}{d['path']}/"}
        store = ts.open({"driver": "zarr3", "kvstore": kvstore, "fill_missing_data_reads": False})
        return store.result().read().result().view(dt)
    # Not zarr v3 core types (bfloat16, float8_*, int4, ...): decode the chunks as raw bits.
    codec = meta["codecs"][0]  # sharding_indexed: inner chunks and an index per object (§11)
    sharded = codec["name"] == "sharding_indexed"
    inner = codec["configuration"]["chunk_shape"] if sharded else chunks
    codecs = codec["configuration"]["codecs"] if sharded else meta["codecs"]
    out = np.empty(shape, dt)
    for pos in itertools.product(*(range(-(-n // c)) for n, c in zip(shape, chunks, strict=True))):
        raw = kv[f"{d['path']}/c" + "".join(f"/{i}" for i in pos)]  # KeyError if missing
        parts = [((0,) * len(shape), raw)]
        if sharded:  # index at the end: (offset, nbytes) per inner chunk in C order, CRC-32C
            grid = [c // i for c, i in zip(chunks, inner, strict=True)]
            count = reduce(lambda a, b: a * b, grid, 1)
            index, index_crc = raw[-16 * count - 4 : -4], struct.unpack("<I", raw[-4:])[0]
            if len(raw) < 16 * count + 4 or crc32c(index) != index_crc:
                raise ValueError(f"{d['path']} chunk {pos}: shard index damaged")
            spans = struct.unpack(f"<{2 * count}Q", index)
            parts = [
                (
                    sub,
                    None if spans[2 * k] == 2**64 - 1 else raw[spans[2 * k] :][: spans[2 * k + 1]],
                )
                for k, sub in enumerate(itertools.product(*(range(g) for g in grid)))
            ]
        for sub, part in parts:
            origin = [p * c + s * i for p, c, s, i in zip(pos, chunks, sub, inner, strict=True)]
            box = [slice(o, min(o + i, n)) for o, i, n in zip(origin, inner, shape, strict=True)]
            if any(b.start >= b.stop for b in box):
                continue  # an inner chunk wholly outside the array is not stored
            if part is None:
                raise ValueError(f"{d['path']} chunk {pos}: inner chunk {sub} missing")
            if any(codec["name"] == "crc32c" for codec in codecs):
                part, stored_crc = part[:-4], struct.unpack("<I", part[-4:])[0]
                if crc32c(part) != stored_crc:
                    raise ValueError(f"{d['path']} chunk {pos} {sub}: CRC-32C mismatch")
            block = from_le(part, dt, inner)  # edge chunks are stored whole
            out[tuple(box)] = block[tuple(slice(b.stop - b.start) for b in box)]
    return out


def inline(kind: str, value: Any) -> Any:
    if isinstance(value, dict) and kind == "int":  # outside int64: a hex string
        return int(value["int"], 16)
    if isinstance(value, dict) and value["float"] == "nan":  # sign and payload kept
        return struct.unpack(">d", bytes.fromhex(value.get("bits", "7ff8000000000000")))[0]
    return float(value["float"]) if isinstance(value, dict) else value  # "inf", "-inf"


def read_checkpoint(url: str, endpoint: str | None = None) -> dict[str, Any]:
    """``{jax keystr: array or value}`` of a local directory or ``s3://bucket/prefix``."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3")  # else AWS itself
    s3 = {"driver": "s3", "bucket": bucket, "path": prefix.strip("/") + "/"}
    spec = {**s3, **({"endpoint": endpoint} if endpoint else {})}
    if not url.startswith("s3://"):
        spec = {"driver": "file", "path": os.path.abspath(url) + "/"}
    kv = ts.KvStore.open(spec).result()
    manifest = json.loads(kv["partialstore.json"])  # KeyError: not finalized
    if (manifest.get("format"), manifest.get("version")) != ("partialstore", 1):
        raise ValueError("not a version-1 partialstore manifest: upgrade this reader")
    save_ids, leaves = {save["save_id"] for save in manifest["saves"]}, {}
    for leaf in manifest["leaves"]:
        key = "".join(f".{k}" if kind == "attr" else f"[{k!r}]" for kind, k in leaf["path"])
        if (d := leaf.get("data")) is None:
            leaves[key] = inline(leaf["kind"], leaf["value"])
        elif not DATA_PATH.fullmatch(d["path"]) or d["path"].split("/")[1] not in save_ids:
            raise ValueError(f"array path {d['path']!r} is outside the checkpoint's saves")
        else:
            read = {"packed": read_packed, "zarr3": read_zarr3}[d["format"]]  # else KeyError
            array = read(kv, spec, d)
            leaves[key] = array[()] if leaf["kind"] == "np_scalar" else array
    return leaves
