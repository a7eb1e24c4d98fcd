"""Coordination cost of a multi-process JAX job: per save, per finalize, as processes grow.

Starts real JAX jobs of N = 1, 2, 4, 8 processes (``jax.distributed.initialize``,
coordination service on 127.0.0.1, CPU, one device per process); each saves
a tiny tree (an array sharded over every process, an int) to local disk.
Timed on the primary, after a barrier (so one step's stragglers do not count
in the next):

- ``barrier``: one ``wait_at_barrier`` of JAX's own client, the floor of any
  step every process takes part in on this machine;
- ``protocol``: the coordination of one collective save alone (``broadcast``
  of the save id, ``gather_to_primary`` of the outcomes, ``broadcast`` of the
  result; :mod:`partialstore._runtime.multihost`), nothing written;
- ``save``: a whole ``partialstore.save``, and the part of it spent in those
  collective calls (the wait for the slowest process's writes included);
- ``finalize`` after each checkpoint's saves;
- the primary's requests to the coordination service per save and per
  finalize (its heartbeat thread left out), and the coordination keys left
  under ``partialstore/`` (heartbeats excepted) after every save, finalize,
  a discard and a gc.

Each job runs direct and, with ``--rtt-ms``, through a proxy that delays
every byte between the clients and the service by half the round trip each
way, as a network between hosts would: there the requests in series decide
the time. Direct, the N processes share the machine's cores, so on a small
machine N = 8 costs CPU contention whatever partialstore does (the barrier
column shows how much). N = 1 has no coordination at all.

Usage::

    nice -n 10 python -m benchmarks.multihost [--quick] [--processes 1,2,4,8]
        [--rtt-ms 0,5] [--saves 5] [--reps 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.cli import Measured, Run, Script, run_script
from benchmarks.common import REPO_ROOT, fmt_ratio, fmt_stats, ratio, stats_json

_CHILD_FLAG = "--job-process"
STORES = ("local",)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ in a job process


class _CountingClient:
    """Wraps JAX's distributed client: counts each request made outside the heartbeat."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)  # the client's attributes are all methods

        def counted(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread().name != "partialstore-beat":
                with self._lock:
                    self.counts[name] = self.counts.get(name, 0) + 1
            return method(*args, **kwargs)

        return counted

    def take(self) -> dict[str, int]:
        with self._lock:
            counts, self.counts = self.counts, {}
        return counts


class _Timed:
    """Accumulates the time spent in the collective calls of ``multihost``."""

    seconds = 0.0

    def wrap(self, module: Any, name: str) -> None:
        original = getattr(module, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(module, name, timed)


async def _protocol_round(name: str) -> None:
    """What a collective save coordinates, with nothing written (as in ``saving.commit_save``)."""
    from partialstore._runtime import multihost

    op = multihost.next_op(name)
    primary = multihost.is_primary()
    await multihost.broadcast(f"{op}/save_id", "bench" if primary else None)
    await multihost.gather_to_primary(f"{op}/wrote", multihost.encode_outcome(None))
    outcome = multihost.encode_outcome(None, "0") if primary else None
    multihost.decode_outcome(await multihost.broadcast(f"{op}/outcome", outcome), "bench")


def _barrier(client: Any, name: str) -> None:
    if client is not None:
        client.wait_at_barrier(name, 600_000)


def _job_state(count: int) -> dict[str, Any]:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("p",))
    value = np.arange(count * 64 * 16, dtype=np.float32).reshape(count * 64, 16)
    sharding = NamedSharding(mesh, PartitionSpec("p"))
    array = jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])
    return {"rows": array, "step": 1}


def _job_main(spec: dict[str, Any]) -> dict[str, Any]:
    """One process of a job: every measurement; the report the primary writes."""
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{spec['port']}",
        coordinator_bind_address=f"127.0.0.1:{spec['bind_port']}",
        num_processes=spec["count"],
        process_id=spec["index"],
        initialization_timeout=300,
    )
    from jax._src import distributed

    from partialstore._runtime import aio, multihost

    state = _job_state(spec["count"])
    raw = distributed.global_state.client if spec["count"] > 1 else None
    counting = _CountingClient(raw) if raw is not None else None
    if counting is not None:  # partialstore reads the client from here at each call
        distributed.global_state.client = counting
    out: dict[str, Any] = {"protocol": [], "barrier": []}
    for round_ in range(spec["protocol_rounds"] if raw is not None else 0):
        _barrier(raw, f"bench/b/{round_}")
        start = time.perf_counter()
        _barrier(raw, f"bench/floor/{round_}")
        out["barrier"].append(time.perf_counter() - start)
    for round_ in range(spec["protocol_rounds"] if raw is not None else 0):
        _barrier(raw, f"bench/p/{round_}")
        start = time.perf_counter()
        aio.run(_protocol_round(f"{spec['root']}/protocol"))
        out["protocol"].append(time.perf_counter() - start)
    timed = _Timed()
    timed.wrap(multihost, "broadcast")
    timed.wrap(multihost, "gather_to_primary")
    out.update(_saves_and_finalizes(spec, state, raw, counting, timed))
    out["leftover_keys"] = _after_discard_and_gc(spec["root"], state, raw)
    return out


def _saves_and_finalizes(
    spec: dict[str, Any], state: dict[str, Any], raw: Any, counting: Any, timed: _Timed
) -> dict[str, list[Any]]:
    """``reps`` checkpoints of ``saves`` saves each, then a finalize; every figure of each."""
    import partialstore

    def requests() -> dict[str, int]:
        return counting.take() if counting is not None else {}

    out: dict[str, list[Any]] = {name: [] for name in ("save", "in_save", "requests")}
    out.update(finalize=[], finalize_requests=[])
    for rep in range(spec["reps"]):
        path = f"{spec['root']}/ckpt{rep}"
        for number in range(spec["saves"]):
            _barrier(raw, f"bench/s/{rep}/{number}")
            requests()
            timed.seconds = 0.0
            start = time.perf_counter()
            partialstore.save(path, {**state, "step": number})
            out["save"].append(time.perf_counter() - start)
            out["in_save"].append(timed.seconds)
            out["requests"].append(requests())
        _barrier(raw, f"bench/f/{rep}")
        requests()
        start = time.perf_counter()
        partialstore.finalize(path)
        out["finalize"].append(time.perf_counter() - start)
        out["finalize_requests"].append(requests())
    return out


def _after_discard_and_gc(root: str, state: dict[str, Any], client: Any) -> list[str] | None:
    """A discard and a gc, then the coordination keys left (heartbeats excepted)."""
    import partialstore

    partialstore.save(f"{root}/dropped", state)
    partialstore.discard(f"{root}/dropped")
    partialstore.gc(f"{root}/ckpt0")
    if client is None:
        return None
    _barrier(client, "bench/end")
    keys = [key for key, _ in client.key_value_dir_get("partialstore/")]
    return [key for key in keys if not key.startswith("partialstore/heartbeat/")]


def _child(argv: list[str]) -> int:
    import jax

    spec = json.loads(argv[0])
    result = _job_main(spec)
    if spec["index"] == 0:
        Path(spec["report"]).write_text(json.dumps(result))
    if spec["count"] > 1:
        jax.distributed.shutdown()
    return 0


# ------------------------------------------------------------------ the driver


class _DelayProxy:
    """A TCP forwarder on 127.0.0.1 that delays every byte by ``rtt_s / 2`` each way.

    The coordination service binds one port; every process's client
    connects to this proxy's, so each request and each answer (a blocking
    get's too) takes the round trip of a network between hosts. Delays are
    absolute per chunk, so requests in flight together are not serialized.
    """

    def __init__(self, target_port: int, rtt_s: float) -> None:
        self.target_port = target_port
        self.one_way_s = rtt_s / 2
        self.port = _free_port()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._serve, args=(started,), daemon=True).start()
        started.wait(30)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", self.port)
        )
        started.set()
        self.loop.run_forever()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _connection(self, reader: Any, writer: Any) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:  # the service is not up yet: the client retries
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, source: Any, sink: Any) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                if not data:
                    break
                sink.write(data)
                await sink.drain()
            sink.close()

        sender = asyncio.ensure_future(send())
        try:
            while data := await source.read(1 << 16):
                queue.put_nowait((self.loop.time() + self.one_way_s, data))
        except OSError:
            pass
        queue.put_nowait((self.loop.time() + self.one_way_s, b""))
        with contextlib.suppress(OSError):
            await sender


def _run_job(
    count: int, rtt_ms: float, args: argparse.Namespace, scratch: str, log: Any
) -> dict[str, Any]:
    """Start one job of ``count`` processes; return the primary's report."""
    bind_port = _free_port()
    proxy = _DelayProxy(bind_port, rtt_ms / 1000) if rtt_ms > 0 else None
    try:
        port = proxy.port if proxy is not None else bind_port
        return _run_processes(count, port, bind_port, args, scratch, log)
    finally:
        if proxy is not None:
            proxy.close()


def _run_processes(
    count: int, port: int, bind_port: int, args: argparse.Namespace, scratch: str, log: Any
) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix=f"job{count}-", dir=scratch)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    base: dict[str, Any] = dict(
        port=port, bind_port=bind_port, count=count, saves=args.saves, reps=args.reps
    )
    base.update(root=f"{folder}/store", report=f"{folder}/report.json")
    base["protocol_rounds"] = args.saves * args.reps * 2
    command = [sys.executable, "-m", "benchmarks.multihost", _CHILD_FLAG]
    options = {"env": env, "cwd": str(REPO_ROOT), "stdout": log, "stderr": log}
    children = [
        subprocess.Popen([*command, json.dumps({**base, "index": i})], **options)
        for i in range(count)
    ]
    try:
        codes = [child.wait(timeout=args.timeout_s) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if any(codes) or not Path(base["report"]).exists():
        return {"processes": count, "error": f"job processes exited with {codes}"}
    return {"processes": count, **json.loads(Path(base["report"]).read_text())}


def _summarize(raw: dict[str, Any]) -> dict[str, Any]:
    if "error" in raw:
        return raw
    requests = [sum(r.values()) for r in raw["requests"][1:]] or [0]
    return {
        "processes": raw["processes"],
        "barrier": stats_json(raw["barrier"]),
        "protocol": stats_json(raw["protocol"]),
        "save": stats_json(raw["save"]),
        "in_save": stats_json(raw["in_save"]),
        "finalize": stats_json(raw["finalize"]),
        "requests_per_save": {"min": min(requests), "max": max(requests)},
        "request_kinds": raw["requests"][-1],
        "finalize_requests": [sum(r.values()) for r in raw["finalize_requests"]],
        "leftover_keys": raw["leftover_keys"],
        "raw": raw,
    }


def measure(run: Run) -> Measured:
    args = run.args
    counts = [1, 2] if args.quick and args.processes is None else (args.processes or [1, 2, 4, 8])
    rtts = [0.0] if args.quick and args.rtt_ms is None else (args.rtt_ms or [0.0, 5.0])
    if args.quick:
        args.saves, args.reps = min(args.saves, 2), min(args.reps, 2)
    rows = []
    bar = report.ProgressBar(len(counts) * len(rtts), "multihost")
    with open(run.out.path("-workers.log"), "w") as log:
        for rtt in rtts:
            for count in counts:
                row = _summarize(_run_job(count, rtt, args, run.scratch, log))
                rows.append({"rtt_ms": rtt, **row})
                bar.step(f"rtt {rtt:g} ms, N={count}")
    bar.close()
    ratios: dict[str, dict[str, float | None]] = {}
    for rtt in rtts:
        by_count = {r["processes"]: r for r in rows if r["rtt_ms"] == rtt and "error" not in r}
        if 2 in by_count and 8 in by_count:
            ratios[f"{rtt:g}"] = {
                name: ratio(by_count[8][name]["median"], by_count[2][name]["median"])
                for name in ("barrier", "protocol", "in_save", "save", "finalize")
            }
    config = {"processes": counts, "rtt_ms": rtts, "saves": args.saves, "reps": args.reps}
    status = 0 if all("error" not in row for row in rows) else 1
    return Measured(config, {"rows": rows, "ratios_8_over_2": ratios}, status)


HEADERS = [
    "round trip",
    "processes",
    "one JAX barrier (floor)",
    "coordination per save (protocol)",
    "coordination in a save (primary)",
    "save (primary)",
    "primary requests per save",
    "finalize",
    "primary requests per finalize",
    "keys left",
]


def _cells(row: dict[str, Any]) -> list[Any]:
    profile = f"{row['rtt_ms']:g} ms" if row["rtt_ms"] else "direct"
    if "error" in row:
        return [profile, row["processes"], row["error"], *[""] * 7]
    times = [fmt_stats(row[name]) for name in ("barrier", "protocol", "in_save", "save")]
    requests = row["requests_per_save"]
    finalizes = row["finalize_requests"]
    left = row["leftover_keys"]
    return [
        *(profile, row["processes"], *times),
        f"{requests['min']}..{requests['max']}",
        fmt_stats(row["finalize"]),
        f"{min(finalizes)}..{max(finalizes)}",
        "n/a" if left is None else len(left),
    ]


def render(result: dict[str, Any]) -> str:
    lines = [
        "## Multi-process coordination (local disk, CPU, 1 device per process)",
        "",
        report.markdown_table(HEADERS, [_cells(row) for row in result["rows"]]),
        "",
        "Requests: to the coordination service by the primary per save (min..max over "
        "every save but the job's first), heartbeats excepted. Keys left: under "
        "partialstore/ after every save, finalize, discard and gc, heartbeats excepted. "
        "Times: median [min .. max] on the primary.",
    ]
    for rtt, by_name in result.get("ratios_8_over_2", {}).items():
        text = ", ".join(f"{name} {fmt_ratio(value)}" for name, value in by_name.items())
        profile = f"{rtt} ms round trip" if float(rtt) else "direct"
        lines += ["", f"N=8 / N=2 (medians), {profile}: {text}"]
    return "\n".join(lines)


def _numbers(kind: type[float] | type[int]) -> Any:
    return lambda text: [kind(x) for x in text.split(",")]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--processes",
        type=_numbers(int),
        help="comma-separated job sizes (default 1,2,4,8; quick: 1,2)",
    )
    add(
        "--rtt-ms",
        type=_numbers(float),
        help="comma-separated round trips to the coordination service, each a run through "
        "a delaying proxy on 127.0.0.1; 0 is direct (default 0,5; quick: 0)",
    )
    add("--saves", type=int, default=5, help="saves per checkpoint (default 5)")
    add("--reps", type=int, default=3, help="checkpoints per job (default 3)")
    add("--timeout-s", type=float, default=900.0, help="limit per job (default 900)")


SCRIPT = Script(
    name="multihost",
    description="Coordination time per save and finalize time of partialstore in "
    "multi-process JAX jobs of 1 to 8 processes (CPU, coordination service on 127.0.0.1).",
    stores=STORES,
    add_arguments=_add_arguments,
    measure=measure,
    render=render,
    scratch_prefix="partialstore-multihost-",
)


def main(argv: list[str] | None = None) -> int:
    """Run the jobs; print the table, write JSON and the table to ``--out``.

    Exit status 1 when a job's process failed.

    Example::

        main(["--quick", "--out", "/tmp/bench"])
    """
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == [_CHILD_FLAG]:
        return _child(given[1:])
    return run_script(SCRIPT, argv)


if __name__ == "__main__":
    sys.exit(main())
