"""The anchors partialstore is measured against.

- **Orbax** v1 partial saving (``orbax.checkpoint.experimental.v1.partial``):
  ``save`` per piece, ``finalize``, then ``ocp.load``. Whether stock Orbax runs
  on a store is not assumed: :func:`orbax_probe` tries a tiny round trip on
  the store in the same run and reports what happened (on S3, Orbax
  normalises ``s3://b/x`` with ``os.path.normpath`` into the local path
  ``s3:/b/x``).
- **Raw TensorStore**: every array written as its own zarr3 array with
  TensorStore on the same store and, where partialstore's own ``zarr.json``
  files say how it chunks and encodes an array of that shape, with exactly
  that chunk grid and codec chain (:func:`discover_layouts`). This is the
  limit of "just write the arrays" with no checkpoint protocol at all.
- **numpy** (local disk only): ``np.save`` of every array to its own file,
  ``fsync`` of each file and of the folder; load is ``np.load``.

Example::

    arrays = {"a0": np.ones((1024, 1024), np.float32)}
    raw_write(store.kvstore(url), arrays, layouts=[])
    back = raw_read(store.kvstore(url), list(arrays))
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

# Chunk size used when partialstore's own layout for a shape is unknown
# (e.g. a leaf it packs with others); one chunk per array below it.
DEFAULT_CHUNK_BYTES = 16 << 20


# ---------------------------------------------------------------------------
# Orbax


def _ocp() -> Any:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import orbax.checkpoint.experimental.v1 as ocp

    return ocp


def orbax_version() -> str | None:
    try:
        return importlib.metadata.version("orbax-checkpoint")
    except importlib.metadata.PackageNotFoundError:
        return None


class OrbaxSystem:
    """Orbax v1 partial saving behind the benchmarks' checkpoint-system interface.

    Example::

        system = OrbaxSystem()
        system.save(path, {"a": array}); system.finalize(path); system.load(path)
    """

    name = "orbax"
    # Finalize checks every pair of keys for prefix conflicts: quadratic.
    cost_exponent = 2.0

    def __init__(self) -> None:
        self._ocp = _ocp()

    def save(self, url: str, state: Any) -> None:
        self._ocp.partial.save(url, state)

    def finalize(self, url: str) -> None:
        self._ocp.partial.finalize(url)

    def load(self, url: str) -> Any:
        return self._ocp.load(url)


def orbax_missing(stores: list[str], systems: list[str]) -> dict[tuple[str, str], str]:
    """``{(store, "orbax"): reason}`` for every store when Orbax is asked for but not installed."""
    if "orbax" not in systems or orbax_version() is not None:
        return {}
    reason = "orbax-checkpoint is not installed (pip install 'partialstore[bench]')"
    return {(store, "orbax"): reason for store in stores}


def _local_files(root: str) -> list[str]:
    found = []
    for folder, _, files in os.walk(root):
        found.extend(os.path.relpath(os.path.join(folder, f), root) for f in files)
    return sorted(found)


def orbax_probe(store: Any) -> str | None:
    """Try a tiny Orbax save/finalize/load on ``store``; ``None`` if it round-trips.

    Otherwise returns why it does not run, from what happened in this probe:
    the exception Orbax raised, or the files it wrote on local disk instead of
    the store. Runs in a scratch working directory, so relative local paths
    that Orbax may derive from a URL land there and are seen.

    Example::

        orbax_probe(stores["s3"])  # "stock Orbax ... wrote 7 files under the local path ..."
    """
    version = orbax_version()
    if version is None:
        return "orbax-checkpoint is not installed (pip install 'partialstore[bench]')"
    ocp = _ocp()
    scratch = tempfile.mkdtemp(prefix="orbax-probe-cwd-")
    old_cwd = os.getcwd()
    os.chdir(scratch)
    url = store.fresh("orbax-probe")
    value = np.arange(16, dtype=np.float32)
    error = ""
    ok = False
    try:
        try:
            ocp.partial.save(url, {"probe": value})
            ocp.partial.finalize(url)
            ok = np.array_equal(np.asarray(ocp.load(url)["probe"]), value)
        except Exception as err:
            first_line = (str(err).strip().splitlines() or [""])[0][:240]
            error = f"raised {type(err).__name__}: {first_line}"
        stray = _local_files(scratch)
        remote: list[str] = []
        if not store.is_local:
            try:
                remote = store.filesystem().find(store.group_of(url))
            except Exception:
                remote = []
    finally:
        os.chdir(old_cwd)
        store.remove(url)
    if not store.is_local and stray:
        where = os.path.join(scratch, stray[0].split(os.sep)[0])
        scheme = url.split("://", 1)[0]
        return (
            f"stock Orbax {version} turns {scheme}:// URLs into local paths; "
            f"the probe wrote {len(stray)} files under {where} and {len(remote)} objects "
            f"reached the {store.name} server" + (f"; it then {error}" if error else "")
        )
    if error:
        scheme = url.split("://", 1)[0]
        if f"{scheme}:/" in error and f"{scheme}://" not in error:
            # Seen on S3: Orbax builds TensorStore paths with os.path.normpath,
            # which folds "s3://b/x" into the relative local path "s3:/b/x".
            error += (
                f" (Orbax normalised the URL with os.path.normpath into the local path "
                f"'{scheme}:/...')"
            )
        return f"stock Orbax {version} on {store.name} {error}"
    if not ok:
        return f"Orbax {version} loaded wrong values back on {store.name}"
    if not store.is_local and not remote:
        return f"Orbax {version} reported success but no object reached the server"
    return None


# ---------------------------------------------------------------------------
# Raw TensorStore


def discover_layouts(store: Any, url: str) -> list[dict[str, Any]]:
    """The zarr3 array layouts partialstore wrote under ``url`` (from its zarr.json files).

    Returns one entry per distinct (shape, data_type) with the chunk grid, codec
    chain and chunk key encoding, so the raw baseline can write the same arrays
    with the same chunking.
    """
    fs = store.filesystem()
    root = url if not store.is_local else os.path.abspath(url)
    layouts: dict[tuple[Any, ...], dict[str, Any]] = {}
    for path in sorted(fs.find(root)):
        if not path.endswith("zarr.json"):
            continue
        try:
            meta = json.loads(fs.cat(path))
        except (OSError, ValueError):
            continue
        if meta.get("node_type") != "array":
            continue
        key = (tuple(meta.get("shape", ())), json.dumps(meta.get("data_type")))
        entry = layouts.setdefault(
            key,
            {
                "shape": list(meta.get("shape", ())),
                "data_type": meta.get("data_type"),
                "chunk_grid": meta.get("chunk_grid"),
                "codecs": meta.get("codecs"),
                "chunk_key_encoding": meta.get("chunk_key_encoding"),
                "count": 0,
            },
        )
        entry["count"] += 1
    return list(layouts.values())


def _default_chunk_shape(shape: tuple[int, ...], itemsize: int) -> list[int]:
    nbytes = math.prod(shape) * itemsize
    if not shape or nbytes <= DEFAULT_CHUNK_BYTES:
        return [max(1, s) for s in shape]
    row_bytes = max(1, nbytes // max(1, shape[0]))
    rows = max(1, DEFAULT_CHUNK_BYTES // row_bytes)
    return [min(rows, shape[0]), *shape[1:]]


def _zarr3_spec(
    kvstore: Mapping[str, Any], name: str, array: np.ndarray, layouts: list[dict[str, Any]]
) -> tuple[dict[str, Any], str]:
    kv = dict(kvstore)
    kv["path"] = kv.get("path", "") + f"{name}/"
    data_type = array.dtype.name
    metadata: dict[str, Any] = {"shape": list(array.shape), "data_type": data_type}
    source = "default"
    for layout in layouts:
        if list(layout["shape"]) == list(array.shape) and layout["data_type"] == data_type:
            for field in ("chunk_grid", "codecs", "chunk_key_encoding"):
                if layout.get(field) is not None:
                    metadata[field] = layout[field]
            source = "partialstore"
            break
    else:
        metadata["chunk_grid"] = {
            "name": "regular",
            "configuration": {
                "chunk_shape": _default_chunk_shape(array.shape, array.dtype.itemsize)
            },
        }
    spec = {"driver": "zarr3", "kvstore": kv, "metadata": metadata}
    return spec, source


def raw_write(
    kvstore: Mapping[str, Any], arrays: Mapping[str, np.ndarray], layouts: list[dict[str, Any]]
) -> dict[str, int]:
    """Create and write every array as its own zarr3 array, all concurrently.

    Returns how many arrays used partialstore's layout and how many the default.
    """
    import tensorstore as ts

    context = ts.Context()
    specs = {name: _zarr3_spec(kvstore, name, array, layouts) for name, array in arrays.items()}
    opened = {
        name: ts.open(spec, create=True, open=False, context=context)
        for name, (spec, _) in specs.items()
    }
    writes = [opened[name].result().write(array) for name, array in arrays.items()]
    for future in writes:
        future.result()
    sources: dict[str, int] = {}
    for _, source in specs.values():
        sources[source] = sources.get(source, 0) + 1
    return sources


def raw_read(kvstore: Mapping[str, Any], names: list[str]) -> dict[str, np.ndarray]:
    """Open and read every array written by :func:`raw_write`, all concurrently."""
    import tensorstore as ts

    context = ts.Context()
    opened = {}
    for name in names:
        kv = dict(kvstore)
        kv["path"] = kv.get("path", "") + f"{name}/"
        opened[name] = ts.open({"driver": "zarr3", "kvstore": kv}, open=True, context=context)
    reads = {name: future.result().read() for name, future in opened.items()}
    return {name: np.asarray(future.result()) for name, future in reads.items()}


class TensorStorePerSaveSystem:
    """Raw TensorStore, one blocking call per save: the bound of blocking saves.

    Each ``save`` writes the state's arrays as :func:`raw_write` does (every
    array its own zarr3 array, in partialstore's layout, all at once) and
    returns when they are written; ``finalize`` does nothing; ``load`` reads
    them all back into the merged tree. It runs through the same per-call
    measurement as partialstore, so the two differ only by the checkpoint
    protocol, where raw TensorStore in one call also has every save's
    arrays in flight together.

    Example::

        system = TensorStorePerSaveSystem(store)
        system.layouts = discover_layouts(store, partialstore_url)
        system.save(url, {"s0": {"w": np.ones(3)}})
    """

    name = "tensorstore-per-save"
    cost_exponent = 1.0

    def __init__(self, store: Any) -> None:
        self._store = store
        #: partialstore's layouts for the workload (set by the worker before each one).
        self.layouts: list[dict[str, Any]] = []
        self._paths: dict[str, dict[str, tuple[str, ...]]] = {}  # url -> array -> key path

    def save(self, url: str, state: Any) -> None:
        paths = self._paths.setdefault(url, {})
        arrays = {}
        for path, array in _leaves(state):
            name = f"a{len(paths)}"
            paths[name] = path
            arrays[name] = array
        raw_write(self._store.kvstore(url), arrays, self.layouts)

    def finalize(self, url: str) -> None:
        pass  # nothing to publish: every save's arrays are already where load reads them

    def load(self, url: str) -> Any:
        paths = self._paths.pop(url, {})
        loaded = raw_read(self._store.kvstore(url), list(paths))
        tree: dict[str, Any] = {}
        for name, path in paths.items():
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = loaded[name]
        return tree


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """The arrays of a tree of dicts, with their key paths."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path, tree


# ---------------------------------------------------------------------------
# numpy + fsync (local disk)


def numpy_write(folder: str, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.save`` every array to ``folder/<name>.npy``, fsync each file and the folder."""
    os.makedirs(folder, exist_ok=True)
    for name, array in arrays.items():
        with open(os.path.join(folder, f"{name}.npy"), "wb") as handle:
            np.save(handle, array, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def numpy_read(folder: str, names: list[str]) -> dict[str, np.ndarray]:
    """``np.load`` every array written by :func:`numpy_write`."""
    return {
        name: np.load(os.path.join(folder, f"{name}.npy"), allow_pickle=False) for name in names
    }
