"""Bytes read by a load against the bytes it returns, across load shardings.

A tree of 2-D leaves is saved from numpy and read as a JAX job of N
processes (1 or 8) with each target sharding on 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set by :func:`main`
before JAX starts) would read it: each process makes the one
``read_arrays`` call ``partialstore.load(path, target)`` makes, for its
distinct shards of every leaf; the processes' calls run one after another
here (:func:`read_as_processes`), every block checked bit for bit.
"Returned" is the bytes of those blocks, summed over processes. What was
read is counted where the bytes really move:

- ``local``: TensorStore's own file kvstore counters (its ``bytes_read`` and
  ``batch_read`` metrics), which see every chunk read, plus every read at
  the Backend contract (the store is reached through a counting wrapper,
  :func:`~partialstore.testing.faulty_backend.install_faulty`).
- ``s3``: every request at a :class:`~partialstore.testing.faultproxy.FaultProxy`
  in front of moto (TensorStore reads chunks through its own S3 client, so
  the proxy's log is the only complete count); a GET's bytes are its
  ``Range`` or, without one, the object's stored size (none for a 304).

``--job`` adds a real JAX job on S3: 8 processes with one CPU device each
save the tree sharded by rows and load it with each layout, every process
checking its shards bit for bit; the proxy counts all their GETs together.

Example::

    python -m benchmarks.load_bytes --quick --stores local,s3 --out /tmp/bench
    python -m benchmarks.load_bytes --quick --stores s3 --job --out /tmp/bench
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from benchmarks.cli import Measured, Run, Script
from benchmarks.common import REPO_ROOT, fmt_bytes

STORES = ("local", "s3")
#: name -> (mesh shape, partition spec axes), on 8 devices.
SHARDINGS: dict[str, tuple[tuple[int, ...], tuple[Any, ...]]] = {
    "rows8": ((8,), ("x", None)),
    "cols8": ((8,), (None, "x")),
    "grid2x4": ((2, 4), ("x", "y")),
    "grid4x2T": ((4, 2), ("y", "x")),
    "replicated": ((8,), ()),
}
LOADS = tuple(SHARDINGS)
PROCESSES = (1, 8)
_FILE_METRICS = "/tensorstore/kvstore/file/"


def tree_shapes(quick: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """The checkpoint: a few 2-D leaves of different shapes and dtypes, all stored as zarr3."""
    scale = 2 if quick else 1
    return {
        "w": ((2048 // scale, 1024 // scale), "float32"),
        "emb": ((4096 // scale, 256), "bfloat16"),
        "k": ((512, 1536 // scale), "float32"),
    }


def make_tree(quick: bool) -> dict[str, np.ndarray]:
    """Deterministic arrays, neighbours distinct (so misplaced bytes show)."""
    import ml_dtypes

    out = {}
    for name, (shape, dtype) in tree_shapes(quick).items():
        values = np.arange(math.prod(shape), dtype=np.float32).reshape(shape) % 4093
        out[name] = values.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    return out


def sharding(name: str) -> Any:
    """The ``NamedSharding`` called ``name`` in :data:`SHARDINGS`, on the first 8 devices."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh_shape, axes = SHARDINGS[name]
    names = ("x", "y")[: len(mesh_shape)]
    devices = np.array(jax.devices()[: math.prod(mesh_shape)]).reshape(mesh_shape)
    return NamedSharding(Mesh(devices, names), PartitionSpec(*axes))


Box = tuple[tuple[int, int], ...]


def process_boxes(shape: tuple[int, ...], load: str, processes: int) -> list[list[Box]]:
    """Per process (devices split in order, as JAX assigns them), its distinct shard boxes."""
    import jax

    index_map = sharding(load).devices_indices_map(shape)
    per = len(jax.devices()[:8]) // processes
    groups: list[list[Box]] = [[] for _ in range(processes)]
    for device, index in index_map.items():
        box = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        group = groups[jax.devices().index(device) // per]
        if box not in group:
            group.append(box)
    return groups


Plan = list[list[tuple[str, Box]]]


def jax_plan(tree: dict[str, np.ndarray], load: str, processes: int) -> Plan:
    """Per process, the (leaf, box) pairs a load with sharding ``load`` reads."""
    return [
        [
            (name, box)
            for name, array in tree.items()
            for box in process_boxes(array.shape, load, processes)[p]
        ]
        for p in range(processes)
    ]


def grid_plan(tree: dict[str, np.ndarray], parts: tuple[int, ...]) -> Plan:
    """One process per block of every leaf split into ``parts`` equal blocks per axis.

    Example::

        grid_plan({"w": np.zeros((4, 4))}, (1, 2))
        # [[('w', ((0, 4), (0, 2)))], [('w', ((0, 4), (2, 4)))]]
    """
    plan: Plan = []
    for position in itertools.product(*(range(k) for k in parts)):
        plan.append([])
        for name, array in tree.items():
            box = tuple(
                (i * n // k, (i + 1) * n // k)
                for i, n, k in zip(position, array.shape, parts, strict=True)
            )
            plan[-1].append((name, box))
    return plan


def read_as_processes(path: str, tree: dict[str, np.ndarray], plan: Plan, options: Any) -> int:
    """Read ``plan`` as its processes would, one after another; bytes returned.

    Each simulated process makes the one ``read_arrays`` call a real process
    of a JAX job makes in ``load(path, target)`` (its distinct shards of every
    leaf), so chunks that several processes need are read by each of them.
    Every block is checked bit for bit against ``tree``.
    """
    from partialstore._arrays import arrays
    from partialstore._commit import loading
    from partialstore._commit.location import resolve
    from partialstore._runtime.aio import run

    location = resolve(path, options)
    manifest = run(loading.read_manifest(location))
    stored = {leaf.path[-1][1]: leaf.data for leaf in manifest.leaves}
    returned = 0
    for p, wanted in enumerate(plan):
        requests = [(stored[name], tuple(slice(lo, hi) for lo, hi in box)) for name, box in wanted]
        got = run(arrays.read_arrays(location.backend, location.final_prefix, requests))
        for (name, box), block in zip(wanted, got, strict=True):
            want = tree[name][tuple(slice(lo, hi) for lo, hi in box)]
            if block.dtype != want.dtype or block.tobytes() != want.tobytes():
                raise AssertionError(f"{path}: {name}{box} read as process {p} differs")
            returned += block.nbytes
    return returned


def file_counters() -> dict[str, int]:
    """TensorStore's file kvstore counters (``bytes_read``, ``batch_read``, ...) so far."""
    import tensorstore as ts

    counts: dict[str, int] = {}
    for metric in ts.experimental_collect_matching_metrics(_FILE_METRICS):
        for value in metric.get("values", []):
            if "value" in value:
                counts[metric["name"].removeprefix(_FILE_METRICS)] = int(value["value"])
    return counts


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def range_bytes(header: str | None, size: int) -> int:
    """Bytes a read of an object of ``size`` bytes returns for HTTP ``Range`` ``header``.

    Example::

        range_bytes("bytes=10-19", 100), range_bytes("bytes=-8", 100), range_bytes(None, 100)
        # (10, 8, 100)
    """
    match = _RANGE.fullmatch(header or "")
    if match is None:
        return size
    if not match.group(1):
        return min(size, int(match.group(2)))
    start = int(match.group(1))
    end = int(match.group(2)) + 1 if match.group(2) else size
    return max(0, min(end, size) - start)


def get_bytes(records: list[Any], sizes: dict[str, int]) -> tuple[int, int]:
    """``(bytes, GETs)`` the proxy ``records`` answered with a body, given object ``sizes``.

    ``sizes`` is keyed like a record's ``key`` (the object key, bucket left out);
    a 304 (unchanged since the client's cached copy) or an error carries no body.
    """
    total = count = 0
    for record in records:
        if record.method != "GET" or record.key not in sizes:
            continue
        count += 1
        if record.status in (200, 206):
            total += range_bytes(record.headers.get("range"), sizes[record.key])
    return total, count


def s3_sizes(url: str, options: dict[str, Any]) -> dict[str, int]:
    """``{key: size}`` of every object under ``url`` (an ``s3://`` prefix), bucket left out."""
    import s3fs

    fs = s3fs.S3FileSystem(
        key=options.get("key"),
        secret=options.get("secret"),
        client_kwargs={"endpoint_url": options["endpoint_url"]},
    )
    found = fs.find(url.removeprefix("s3://"), detail=True)
    return {path.split("/", 1)[1]: int(info["size"]) for path, info in found.items()}


@contextlib.contextmanager
def s3_store() -> Iterator[tuple[str, Any, Any]]:
    """A moto server with a proxy in front: ``(root url, proxy, server)``."""
    from partialstore.testing.faultproxy import FaultProxy
    from partialstore.testing.servers import MotoS3Server

    with MotoS3Server(in_process=False) as server, FaultProxy(server.endpoint_url) as proxy:
        bucket = f"loadbytes-{uuid.uuid4().hex[:8]}"
        server.create_bucket(bucket)
        with proxy.patched_env(server):
            yield f"s3://{bucket}/run", proxy, server


Counter = Callable[[], tuple[int, int]]


def local_counter(url: str, inner_root: str, faulty: Any) -> Counter:
    """Bytes and reads so far on a local store: TensorStore's file reads plus the
    backend reads ``faulty`` (the wrapper ``url`` goes through) saw."""

    def count() -> tuple[int, int]:
        counts = file_counters()
        calls = faulty.calls("read")
        own = 0
        for call in calls:
            file = os.path.join(inner_root, call.key)
            if not os.path.exists(file):  # a read of the save session, renamed since
                continue
            size = os.path.getsize(file)
            start, end = call.detail.get("start") or 0, call.detail.get("end") or size
            own += min(end, size) - start
        return counts.get("bytes_read", 0) + own, counts.get("batch_read", 0) + len(calls)

    return count


def s3_counter(path: str, proxy: Any, options: dict[str, Any]) -> Counter:
    """Bytes and GETs so far at ``proxy``, for objects under ``path``."""
    sizes = s3_sizes(path, options)

    def count() -> tuple[int, int]:
        proxy.wait_idle()
        return get_bytes(proxy.requests(), sizes)

    return count


def measure_load(
    path: str,
    tree: dict[str, np.ndarray],
    load: str,
    processes: int,
    counter: Counter,
    options: Any,
) -> dict[str, Any]:
    """One load, counted: bytes read and requests against bytes returned."""
    before = counter()
    returned = read_as_processes(path, tree, jax_plan(tree, load, processes), options)
    after = counter()
    read, requests = after[0] - before[0], after[1] - before[1]
    return {"read": read, "requests": requests, "returned": returned, "ratio": read / returned}


def run_store(
    store: str, root: str, quick: bool, make_counter: Callable[[str], Counter], options: Any
) -> list[dict[str, Any]]:
    """Save the tree from numpy once, then every (load sharding, process count) on it."""
    import partialstore

    tree = make_tree(quick)
    path = f"{root}/ck-{uuid.uuid4().hex[:6]}"
    partialstore.save(path, tree, storage_options=options)
    partialstore.finalize(path, storage_options=options)
    counter = make_counter(path)
    rows = []
    for processes in PROCESSES:
        for load in LOADS:
            row = measure_load(path, tree, load, processes, counter, options)
            rows.append({"store": store, "load": load, "processes": processes, **row})
    return rows


def _job_worker(port: str, count: str, index: str, job_file: str) -> None:
    """One process of a real JAX job: save the tree sharded by rows, load it as each layout."""
    import json

    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=int(count),
        process_id=int(index),
        initialization_timeout=60,
    )
    import partialstore

    with open(job_file) as f:
        job = json.load(f)
    tree, options = make_tree(job["quick"]), job["options"]
    saved = sharding("rows8")
    state = {
        k: jax.make_array_from_callback(v.shape, saved, lambda i, v=v: v[i])
        for k, v in tree.items()
    }
    for load, path in job["paths"].items():
        partialstore.save(path, state, storage_options=options)
        partialstore.finalize(path, storage_options=options)
        target = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding(load))
            for k, v in tree.items()
        }
        loaded = partialstore.load(path, target, storage_options=options)
        for k, array in loaded.items():
            for shard in array.addressable_shards:
                if np.asarray(shard.data).tobytes() != tree[k][shard.index].tobytes():
                    raise AssertionError(f"process {index}: {k}{shard.index} loaded as {load}")
    jax.distributed.shutdown()


def run_job(root: str, proxy: Any, server: Any, quick: bool, scratch: str) -> list[dict[str, Any]]:
    """A real JAX job of 8 processes (one CPU device each) on S3: bytes at the proxy."""
    import json
    import socket
    import subprocess

    options = proxy.storage_options(server)
    paths = {load: f"{root}/job-{load}-{uuid.uuid4().hex[:6]}" for load in LOADS}
    job_file = os.path.join(scratch, "job.json")
    with open(job_file, "w") as f:
        json.dump({"quick": quick, "options": options, "paths": paths}, f)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, **proxy.env(server), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    command = [sys.executable, "-m", "benchmarks.load_bytes", "--job-worker", port, "8"]
    children = [
        subprocess.Popen([*command, str(i), job_file], env=env, cwd=REPO_ROOT) for i in range(8)
    ]
    if any(child.wait(timeout=900) != 0 for child in children):
        raise RuntimeError("a process of the load_bytes job failed (its output is above)")
    proxy.wait_idle()
    tree, rows = make_tree(quick), []
    for load, path in paths.items():
        prefix = path.removeprefix("s3://").split("/", 1)[1] + "/data/"
        sizes = {k: n for k, n in s3_sizes(path, options).items() if k.startswith(prefix)}
        read, requests = get_bytes(proxy.requests(), sizes)
        returned = sum(
            math.prod(hi - lo for lo, hi in box) * array.itemsize
            for array in tree.values()
            for boxes in process_boxes(array.shape, load, 8)
            for box in boxes
        )
        row = {"read": read, "requests": requests, "returned": returned}
        rows.append({"store": "s3 (JAX job)", "load": load, "processes": 8, **row})
        rows[-1]["ratio"] = read / returned
    return rows


def measure(run: Run) -> Measured:
    import jax

    from partialstore.testing.faulty_backend import install_faulty

    if len(jax.devices()) < 8:
        raise SystemExit("load_bytes needs 8 devices: run it in a fresh interpreter")
    rows: list[dict[str, Any]] = []
    for store in run.args.stores:
        if store == "local":
            inner = os.path.join(run.scratch, "local")
            url, faulty = install_faulty(inner)
            rows += run_store(
                "local",
                url,
                run.args.quick,
                functools.partial(local_counter, inner_root=inner, faulty=faulty),
                None,
            )
        else:
            with s3_store() as (root, proxy, server):
                opts = proxy.storage_options(server)
                counter = functools.partial(s3_counter, proxy=proxy, options=opts)
                rows += run_store("s3", root, run.args.quick, counter, opts)
                if run.args.job:
                    rows += run_job(root, proxy, server, run.args.quick, run.scratch)
    worst = max(row["ratio"] for row in rows)
    config = {"stores": run.args.stores, "loads": list(LOADS), "processes": list(PROCESSES)}
    config["job"] = bool(run.args.job)
    return Measured(config=config, body={"rows": rows, "worst_ratio": worst}, status=0)


def render(result: dict[str, Any]) -> str:
    lines = [
        "## Bytes read by loads with another sharding (8 CPU devices)",
        "",
        "Saved from numpy; N processes: each process's read made in turn in one interpreter.",
        '"s3 (JAX job)": a real job of 8 processes (one device each) that saved sharded by',
        "rows; bytes are every GET of array data at the proxy, all processes together.",
        "",
        "| store | loaded as | processes | read | returned | read / returned | requests |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['store']} | {row['load']} | {row['processes']} | {fmt_bytes(row['read'])} | "
            f"{fmt_bytes(row['returned'])} | {row['ratio']:.2f} | {row['requests']} |"
        )
    lines += ["", f"Worst read / returned: {result['worst_ratio']:.2f}"]
    return "\n".join(lines)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--job",
        action="store_true",
        help="on s3, also run a real JAX job of 8 processes (1 CPU device each) that saves "
        "sharded by rows and loads every layout (about a minute per layout on 2 cores)",
    )


SCRIPT = Script(
    name="load_bytes",
    description="Bytes read against bytes returned by loads with another sharding.",
    stores=STORES,
    add_arguments=_add_arguments,
    measure=measure,
    render=render,
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--job-worker"]:
        _job_worker(*argv[1:5])
        return 0
    if "jax" not in sys.modules:  # the 8 devices must be asked for before JAX starts
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    return SCRIPT.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
