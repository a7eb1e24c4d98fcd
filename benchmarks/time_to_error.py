"""Time from a call to its error when the store cannot serve it, on S3 (moto) and GCS.

Bounded failure promises that a misconfigured or failing store makes a call
fail with one clear error within a bound: 10 s for a refused endpoint, a
host name that does not resolve, missing credentials and a missing bucket;
120 s for a store that answers 503 to every request. This script measures
that through the public API: each case is one ``partialstore.save`` of a
small tree (an 8-element array and an int), and on the 503 store also one
``partialstore.load`` of a finalized checkpoint.

Cases, each on S3 (a moto server in a child process) and GCS
(fake-gcs-server), both on free ports of 127.0.0.1:

- ``refused``: ``endpoint_url`` is a 127.0.0.1 port nothing listens on.
- ``invalid_host``: ``endpoint_url`` names a host under ``.invalid``
  (RFC 6761: it never resolves).
- ``no_credentials``: the real server and an existing bucket, with a client
  that finds no credentials (:mod:`partialstore.testing.misconfig`: the
  variables removed, empty shared files, no metadata server; on GCS
  ``token="google_default"``, since without a token gcsfs falls back to
  anonymous access).
- ``missing_bucket``: the real server, a bucket never created.
- ``503_*``: a :class:`~partialstore.testing.faultproxy.FaultProxy` in front
  of the real server answers 503 to every request
  (``Fault(error(503), times=None)``); with the default ``deadline`` and
  ``retries`` options (left out by ``--quick``) and with ``deadline=5``. The
  load reads a checkpoint saved and finalized directly on the server
  beforehand (untimed, in a process of its own).

Every measurement runs in a fresh Python process, so no client, connection
pool or credential cache of one case helps the next. The clock starts just
before the call (partialstore and numpy already imported) and stops when it
raises. A case meets its bound when the call raised a ``PartialStoreError``
within the bound.

Usage::

    python -m benchmarks.time_to_error [--quick] [--stores s3,gcs] [--out DIR]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import network, report
from benchmarks.cli import Measured, Run, Script, run_script
from benchmarks.common import REPO_ROOT

STORES = ("s3", "gcs")
FAST_BOUND_S = 10.0
FAILING_BOUND_S = 120.0
_CHILD_FLAG = "--measure-one"
_MARK = "TIME_TO_ERROR_RESULT "
# A child still running this long past its case's bound is killed and reported as hung.
_KILL_SLACK_S = 60.0
_PREPARE_TIMEOUT_S = 180.0
# Variables that point clients at a store: a child gets only those its case sets.
_STORE_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "STORAGE_EMULATOR_HOST",
    "TENSORSTORE_GCS_HTTP_URL",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One way a store can fail, the public call made against it, and its bound."""

    id: str
    label: str
    call: str  # "save" or "load"
    bound_s: float
    deadline: float | None = None  # the ``deadline`` storage option; None: the default
    full_only: bool = False  # left out by --quick


CASES = (
    Case("refused", "refused endpoint", "save", FAST_BOUND_S),
    Case("invalid_host", "unresolvable host (.invalid)", "save", FAST_BOUND_S),
    Case("no_credentials", "missing credentials", "save", FAST_BOUND_S),
    Case("missing_bucket", "missing bucket", "save", FAST_BOUND_S),
    Case("503_save_default", "503 always: save, default", "save", FAILING_BOUND_S, full_only=True),
    Case("503_load_default", "503 always: load, default", "load", FAILING_BOUND_S, full_only=True),
    Case("503_save_deadline5", "503 always: save, deadline=5", "save", FAILING_BOUND_S, 5.0),
    Case("503_load_deadline5", "503 always: load, deadline=5", "load", FAILING_BOUND_S, 5.0),
)


# Cases that never reach a server: a network profile changes nothing for them.
_NO_NETWORK = ("refused", "invalid_host")


def cases(quick: bool, profiled: bool = False) -> list[Case]:
    """The cases of a run, in the order they run (``profiled``: behind a latency proxy).

    Example::

        [c.id for c in cases(quick=True)]  # no 503_*_default
    """
    return [
        case
        for case in CASES
        if not (quick and case.full_only) and not (profiled and case.id in _NO_NETWORK)
    ]


@dataclasses.dataclass
class _Store:
    name: str  # the label: s3, gcs, s3@20ms, gcs@20ms (benchmarks.network)
    server: Any  # MotoS3Server or FakeGcsServer
    proxy: Any  # FaultProxy answering 503 to everything
    rule: Any  # its always-503 Rule
    latency: Any = None  # a FaultProxy that only adds the profile's round trip

    @property
    def kind(self) -> str:
        return self.name.partition("@")[0]


@contextlib.contextmanager
def _started(
    names: list[str], profile: network.NetworkProfile | None = None
) -> Iterator[dict[str, _Store]]:
    """Start each store's server and its always-503 proxy; stop them after.

    A label ``s3@20ms`` shares the ``s3`` server; its proxies add ``profile``'s
    round trip and bandwidth cap to every request.
    """
    from partialstore.testing.faultproxy import Fault, FaultProxy, error
    from partialstore.testing.servers import FakeGcsServer, MotoS3Server

    with contextlib.ExitStack() as stack:
        stores: dict[str, _Store] = {}
        servers: dict[str, Any] = {}
        for name in names:
            kind = name.partition("@")[0]
            if kind not in servers:
                # moto in a child process, as in the other benchmarks: no GIL shared
                # with the proxy.
                server = MotoS3Server(in_process=False) if kind == "s3" else FakeGcsServer()
                servers[kind] = stack.enter_context(server)
            server = servers[kind]
            net: dict[str, Any] = {"log": False}
            if "@" in name and profile is not None:
                net |= {"rtt": profile.rtt_s, "bandwidth": profile.bandwidth_bps}
            proxy = stack.enter_context(FaultProxy(server.endpoint_url, **net))
            rule = proxy.add(Fault(error(503), times=None, label="always 503"))
            latency = None
            if "@" in name:
                latency = stack.enter_context(FaultProxy(server.endpoint_url, **net))
            stores[name] = _Store(name, server, proxy, rule, latency)
        yield stores


def _redirected(server: Any, endpoint: str) -> tuple[dict[str, Any], dict[str, str | None]]:
    """The server's options and environment with every mention of it replaced by ``endpoint``."""
    options = {**server.storage_options(), "endpoint_url": endpoint}
    env: dict[str, str | None] = {
        name: endpoint if value.rstrip("/") == server.endpoint_url else value
        for name, value in server.env().items()
    }
    return options, env


def _without_credentials(
    store: _Store, folder: Path
) -> tuple[dict[str, Any], dict[str, str | None]]:
    from partialstore.testing.misconfig import no_aws_credentials_env, no_google_credentials_env

    server = store.server
    endpoint, env = server.endpoint_url, server.env()
    if store.latency is not None:
        endpoint, env = store.latency.endpoint_url, store.latency.env(server)
    if store.kind == "s3":
        options = {"endpoint_url": endpoint, "client_kwargs": {"region_name": server.region}}
        return options, {**env, **no_aws_credentials_env(folder)}
    options = {"endpoint_url": endpoint, "token": "google_default", "project": server.project}
    return options, {**env, **no_google_credentials_env(folder)}


def plan(store: _Store, case: Case, scratch: Path) -> dict[str, Any]:
    """What one measurement does: url, storage options, environment changes, preparation.

    Creates the case's bucket on the server where the case needs one.

    Example::

        task = plan(stores["s3"], CASES[0], Path("/tmp/x"))  # refused endpoint on S3
    """
    from partialstore.testing.misconfig import UNRESOLVABLE_ENDPOINT, refused_endpoint

    server = store.server
    bucket = f"tte-{uuid.uuid4().hex[:12]}"
    url = f"{'s3' if store.kind == 's3' else 'gs'}://{bucket}/ckpt"
    task: dict[str, Any] = {"case": case.id, "store": store.name, "call": case.call, "url": url}
    if case.id in ("refused", "invalid_host"):
        endpoint = refused_endpoint() if case.id == "refused" else UNRESOLVABLE_ENDPOINT
        options, env = _redirected(server, endpoint)
    elif case.id == "no_credentials":
        server.create_bucket(bucket)
        options, env = _without_credentials(store, scratch / f"{store.name}-{case.id}")
    elif case.id == "missing_bucket" and store.latency is not None:
        options, env = store.latency.storage_options(server), dict(store.latency.env(server))
    elif case.id == "missing_bucket":
        options, env = server.storage_options(), dict(server.env())
    else:  # the store answering 503 to everything
        server.create_bucket(bucket)
        options, env = store.proxy.storage_options(server), dict(store.proxy.env(server))
        if case.call == "load":
            task["prepare"] = {"options": server.storage_options(), "env": server.env()}
    if case.deadline is not None:
        options = {**options, "deadline": case.deadline}
    return task | {"options": options, "env": env}


def _child_env(changes: dict[str, str | None]) -> dict[str, str]:
    from partialstore.testing.misconfig import applied_env

    env = applied_env({**dict.fromkeys(_STORE_VARIABLES), **changes})
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _log_tail(path: str, limit: int = 800) -> str:
    with open(path, "rb") as log:
        log.seek(0, os.SEEK_END)
        log.seek(max(0, log.tell() - limit))
        return log.read().decode(errors="replace")


def run_child(task: dict[str, Any], timeout_s: float, log_path: str, cwd: str) -> dict[str, Any]:
    """Run one call in a fresh ``python -m benchmarks.time_to_error --measure-one``.

    Returns its JSON answer, or ``status`` ``hung`` / ``crashed`` with a detail.

    Example::

        answer = run_child(task, 70, "/tmp/out/log", "/tmp")  # {"status": "raised", ...}
    """
    started = time.monotonic()
    command = [sys.executable, "-m", "benchmarks.time_to_error", _CHILD_FLAG]
    with open(log_path, "ab") as log:
        log.write(f"\n===== {task['store']} {task['case']} {task['call']}\n".encode())
        log.flush()
        try:
            done = subprocess.run(
                command,
                input=json.dumps(task).encode(),
                stdout=subprocess.PIPE,
                stderr=log,
                env=_child_env(task["env"]),
                cwd=cwd,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"status": "hung", "detail": f"no answer; killed after {timeout_s:.0f} s"}
    process_s = time.monotonic() - started
    for line in reversed(done.stdout.decode(errors="replace").splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :]) | {"process_s": process_s}
    detail = f"exit code {done.returncode}: {_log_tail(log_path)}"
    return {"status": "crashed", "detail": detail, "process_s": process_s}


def _measure_one(task: dict[str, Any]) -> dict[str, Any]:
    """In the child: make the task's call once and describe how it ended."""
    import numpy as np

    import partialstore
    from partialstore.errors import PartialStoreError

    url, options = task["url"], task["options"]
    tree = {"w": np.arange(8.0), "step": 3}
    if task["call"] == "prepare":
        partialstore.save(url, tree, storage_options=options)
        partialstore.finalize(url, storage_options=options)
        loaded = partialstore.load(url, storage_options=options)
        ok = loaded["step"] == 3 and np.array_equal(loaded["w"], tree["w"])
        return {"status": "ok" if ok else "crashed", "detail": "" if ok else "load differs"}
    start = time.perf_counter()
    try:
        if task["call"] == "save":
            partialstore.save(url, tree, storage_options=options)
        else:
            partialstore.load(url, storage_options=options)
    except Exception as err:
        seconds = time.perf_counter() - start
        kind = type(err)
        return {
            "status": "raised",
            "seconds": seconds,
            "error_type": kind.__name__,
            "error_class": f"{kind.__module__}.{kind.__qualname__}",
            "partialstore_error": isinstance(err, PartialStoreError),
            "message": str(err),
        }
    seconds = time.perf_counter() - start
    return {"status": "returned", "seconds": seconds, "message": "the call returned, no error"}


def measure_case(store: _Store, case: Case, scratch: Path, log_path: str) -> dict[str, Any]:
    """Plan, prepare (the 503 load) and run one case; the row of the JSON.

    Example::

        row = measure_case(stores["gcs"], CASES[3], Path(tmp), log)  # missing bucket on GCS
    """
    task = plan(store, case, scratch)
    row: dict[str, Any] = {
        "case": case.id,
        "label": case.label,
        "store": store.name,
        "call": case.call,
        "bound_s": case.bound_s,
        "deadline_option": case.deadline,
        "url": task["url"],
        "options": {k: v for k, v in task["options"].items() if k not in ("key", "secret")},
    }
    prepare = task.pop("prepare", None)
    if prepare is not None:
        setup = run_child(
            task | prepare | {"call": "prepare"}, _PREPARE_TIMEOUT_S, log_path, str(scratch)
        )
        if setup.get("status") != "ok":
            return row | {"status": "crashed", "detail": f"preparing the checkpoint: {setup}"}
    answered_503 = store.rule.fired
    answer = run_child(task, case.bound_s + _KILL_SLACK_S, log_path, str(scratch))
    row |= answer
    if case.id.startswith("503_"):
        row["requests_answered_503"] = store.rule.fired - answered_503
    row["met_bound"] = bool(
        answer.get("status") == "raised"
        and answer.get("partialstore_error")
        and answer["seconds"] <= case.bound_s
    )
    return row


def _first(text: str, limit: int = 120) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[:limit]


def render_table(result: dict[str, Any]) -> str:
    """The markdown report of a time-to-error result (what is printed on stdout)."""
    out = [f"## Time to error ({'quick' if result['quick'] else 'full'} run)", ""]
    rows = []
    for row in result["measurements"]:
        seconds = f"{row['seconds']:.2f}" if row.get("seconds") is not None else row["status"]
        bound = f"{row['bound_s']:g} s"
        rows.append(
            [
                row["label"],
                row["store"],
                seconds,
                row.get("error_type") or "-",
                _first(row.get("message") or row.get("detail") or ""),
                f"yes (< {bound})" if row["met_bound"] else f"NO (bound {bound})",
            ]
        )
    headers = [
        "case",
        "store",
        "seconds to the error",
        "error type",
        "message (first 120 characters)",
        "met its bound",
    ]
    out.append(report.markdown_table(headers, rows))
    defaults = result["config"]["defaults"]
    out += [
        "",
        f"One call per row, each in a fresh process; default `deadline` "
        f"{defaults['deadline']:g} s and `retries` {defaults['retries']}. A row meets its "
        "bound when the call raised a partialstore error within it.",
    ]
    return "\n".join(out)


def _defaults() -> dict[str, Any]:
    from partialstore.backends._retry import RetryPolicy

    policy = RetryPolicy()
    return {"deadline": policy.deadline, "retries": policy.retries}


def measure(run: Run) -> Measured:
    """Run every case on every store, each call in a fresh process."""
    args, scratch = run.args, Path(run.scratch)
    profile = network.profile_of(args)
    labels = network.store_labels(args.stores, args.network, profile)
    todo = [(store, case) for store in labels for case in cases(args.quick, "@" in store)]
    measurements: list[dict[str, Any]] = []
    with _started(labels, profile) as running:
        bar = report.ProgressBar(len(todo), "time to error")
        for store, case in todo:
            row = measure_case(running[store], case, scratch, str(run.out.path("-workers.log")))
            measurements.append(row)
            took = f"{row['seconds']:.1f} s" if row.get("seconds") is not None else row["status"]
            bar.step(f"{store} {case.id}: {took}")
        bar.close()
        servers = {name: s.server.endpoint_url for name, s in running.items()}
    config = {
        "stores": labels,
        "network": args.network,
        "profile": profile.to_json(),
        "cases": [c.id for c in cases(args.quick)],
        "defaults": _defaults(),
    }
    body = {"servers": servers, "measurements": measurements}
    return Measured(config, body, 0 if all(row["met_bound"] for row in measurements) else 1)


SCRIPT = Script(
    name="time_to_error",
    description="Seconds from a partialstore call to its error against a refused "
    "endpoint, an unresolvable host, missing credentials, a missing bucket and a store "
    "answering 503 to everything, on S3 (moto) and GCS (fake-gcs-server).",
    stores=STORES,
    add_arguments=network.add_network_arguments,
    measure=measure,
    render=render_table,
    quick_help="leave out the 503 runs with the default deadline (each takes about a minute)",
    scratch_prefix="partialstore-tte-",
)


def main(argv: list[str] | None = None) -> int:
    """Run every case; print the table, write JSON and the table to ``--out``.

    Exit status 1 when a case missed its bound (or its process hung or crashed).
    Raw results go to ``--out`` (default ``benchmarks/results/``, ignored by git).

    Example::

        main(["--quick", "--stores", "s3", "--out", "/tmp/bench"])
    """
    if (sys.argv[1:] if argv is None else argv) == [_CHILD_FLAG]:
        answer = _measure_one(json.load(sys.stdin))
        print(_MARK + json.dumps(answer), flush=True)
        return 0
    return run_script(SCRIPT, argv)


if __name__ == "__main__":
    sys.exit(main())
