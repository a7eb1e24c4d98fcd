"""Network profiles: a latency proxy in front of the emulators, and request accounting.

The emulators answer in about 1-10 ms per request, mostly their own CPU, so
the figures they give hide what decides performance on a real bucket: how
many requests an operation makes and how many of them wait for each other.
``--network 20ms`` puts a :class:`~partialstore.testing.faultproxy.FaultProxy`
in front of moto and fake-gcs-server that delays every request by one round
trip (``--rtt-ms``, default 20) and shares one capped link among all
transfers (``--bandwidth-mbps``, default 1,000 Mbit/s). Every client goes
through it: partialstore (s3fs / gcsfs and TensorStore alike, since the
endpoint is in ``storage_options`` and in ``AWS_ENDPOINT_URL_S3`` /
``TENSORSTORE_GCS_HTTP_URL``), Orbax and the raw TensorStore baseline (its
kvstore spec takes the store's ``endpoint_url``).

A store behind the proxy is a store of its own in every table, labelled
``s3@20ms`` / ``gcs@20ms`` next to the plain ``s3`` / ``gcs`` (local disk has
no network, so it has no profile). The proxy runs in the parent process
(idle while a worker measures), logs every request with its start time and
duration on the system-wide monotonic clock, and workers report when each
operation started and ended on the same clock, so the parent can count the
requests of each operation (:func:`account`) and the longest chain of
requests in series (:func:`serial_chain`): the round trips on the
operation's critical path.

Example::

    profile = NetworkProfile.from_args(rtt_ms=20, bandwidth_mbps=1000)
    labels = store_labels(["local", "s3"], ["plain", "20ms"], profile)  # local, s3, s3@20ms
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

NETWORKS = ("plain", "20ms")
DEFAULT_RTT_MS = 20.0
# One host's link to the object store, shared by every transfer in both
# directions: 1 Gbit/s is what a mid-sized cloud VM sustains to S3 / GCS over
# a handful of connections (large accelerator hosts get 10-100 Gbit/s).
DEFAULT_BANDWIDTH_MBPS = 1000.0
# How long the parent waits for the proxy to log the end of requests a worker
# has already seen answered.
_SETTLE_S = 2.0


@dataclasses.dataclass(frozen=True)
class NetworkProfile:
    """A round trip added to every request and a bandwidth cap shared by all transfers.

    Example::

        NetworkProfile.from_args(20, 1000).label  # '20ms'
    """

    rtt_s: float
    bandwidth_bps: float | None

    @classmethod
    def from_args(cls, rtt_ms: float, bandwidth_mbps: float | None) -> NetworkProfile:
        bandwidth = bandwidth_mbps * 1e6 / 8 if bandwidth_mbps else None
        return cls(rtt_s=rtt_ms / 1000.0, bandwidth_bps=bandwidth)

    @property
    def label(self) -> str:
        return f"{self.rtt_s * 1000:g}ms"

    def to_json(self) -> dict[str, Any]:
        mbps = self.bandwidth_bps * 8 / 1e6 if self.bandwidth_bps else None
        return {"rtt_ms": self.rtt_s * 1000, "bandwidth_mbps": mbps, "label": self.label}


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """``--network``, ``--rtt-ms`` and ``--bandwidth-mbps`` (shared by every script)."""
    from benchmarks.cli import parse_list

    parser.add_argument(
        "--network",
        default=",".join(NETWORKS),
        type=lambda text: parse_list(text, NETWORKS, "network"),
        help="comma-separated network profiles for S3 and GCS: plain (the emulator as it "
        "is) and 20ms (a proxy adding --rtt-ms per request and a --bandwidth-mbps cap); "
        "default: plain,20ms. Local disk always runs plain.",
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=DEFAULT_RTT_MS,
        help=f"round trip added to every request by the 20ms profile (default {DEFAULT_RTT_MS:g})",
    )
    parser.add_argument(
        "--bandwidth-mbps",
        type=float,
        default=DEFAULT_BANDWIDTH_MBPS,
        help="link of the 20ms profile in Mbit/s, shared by all transfers in both "
        f"directions (default {DEFAULT_BANDWIDTH_MBPS:g}; 0: no cap)",
    )


def profile_of(args: argparse.Namespace) -> NetworkProfile:
    """The latency profile the options describe."""
    return NetworkProfile.from_args(args.rtt_ms, args.bandwidth_mbps)


def store_labels(
    stores: Sequence[str], networks: Sequence[str], profile: NetworkProfile
) -> list[str]:
    """Every store under every network, plain first: ``s3``, ``s3@20ms``; local only plain.

    Example::

        store_labels(["local", "gcs"], ["20ms"], profile)  # ['local', 'gcs@20ms']
    """
    labels = []
    for store in stores:
        if store == "local" or "plain" in networks:
            labels.append(store)
        if store != "local" and "20ms" in networks:
            labels.append(f"{store}@{profile.label}")
    return labels


def split_label(label: str) -> tuple[str, str]:
    """``("s3", "20ms")`` for ``s3@20ms``; ``("s3", "plain")`` for ``s3``."""
    kind, _, network = label.partition("@")
    return kind, network or "plain"


def serial_chain(records: Sequence[Any]) -> list[Any]:
    """The longest chain of requests each started after the previous one ended.

    A lower bound of the operation's time is ``len(chain) x rtt``: these are the
    round trips in series on its critical path. Requests that overlap are in
    parallel and count once.

    Example::

        serial_chain(records)  # [HEAD partialstore.json, LIST log/, PUT log/00000001.json]
    """
    spans = sorted((r.started, r.started + (r.duration or 0.0), i) for i, r in enumerate(records))
    # Sweep: ends before starts at equal times; best chain ending at or before now.
    events = sorted([(end, 0, i) for _, end, i in spans] + [(start, 1, i) for start, _, i in spans])
    length: dict[int, int] = {}
    previous: dict[int, int | None] = {}
    best: tuple[int, int | None] = (0, None)
    for _, kind, i in events:
        if kind == 1:
            length[i] = best[0] + 1
            previous[i] = best[1]
        elif length[i] > best[0]:
            best = (length[i], i)
    chain = []
    node = best[1]
    while node is not None:
        chain.append(records[node])
        node = previous[node]
    return chain[::-1]


def verb(record: Any) -> str:
    """The request's method, with listings (S3 ``list-type``, GCS ``prefix``) as ``LIST``."""
    if record.method == "GET" and ("list-type" in record.query or "prefix=" in record.query):
        return "LIST"
    return str(record.method)


def most_in_flight(records: Sequence[Any]) -> int:
    """The most requests in flight at once (the client's effective concurrency).

    Example::

        most_in_flight(proxy.requests("GET"))  # 30: TensorStore's S3 default limit is 32
    """
    edges = sorted(
        [(r.started, 1) for r in records] + [(r.started + (r.duration or 0.0), -1) for r in records]
    )
    now = most = 0
    for _, step in edges:  # at equal times an end (-1) sorts before a start
        now += step
        most = max(most, now)
    return most


def _describe(record: Any) -> str:
    key = record.key or record.path
    key = key.split("/ckpt/", 1)[-1] if "/ckpt/" in key else key  # relative to the checkpoint
    return f"{verb(record)} {key}" + (" (conditional)" if _conditional(record) else "")


def _conditional(record: Any) -> bool:
    return any(h in record.headers for h in ("if-none-match", "if-match"))


def account(records: Sequence[Any]) -> dict[str, Any]:
    """Counts of one operation's requests: total, by method, bytes sent, serial chain.

    Example::

        account(proxy.requests())  # {'total': 5, 'by_method': {'GET': 2, ...}, 'serial': 4, ...}
    """
    by_method: dict[str, int] = {}
    by_client: dict[str, int] = {}
    for record in records:
        by_method[verb(record)] = by_method.get(verb(record), 0) + 1
        by_client[record.client] = by_client.get(record.client, 0) + 1
    chain = serial_chain(records)
    return {
        "total": len(records),
        "by_method": dict(sorted(by_method.items())),
        "by_client": dict(sorted(by_client.items())),
        "bytes_sent": sum(r.body_size for r in records),
        "serial": len(chain),
        "in_flight": most_in_flight(records),
        "chain": [_describe(r) for r in chain][:40],
    }


def _settle(proxy: Any, until: float) -> None:
    deadline = time.monotonic() + _SETTLE_S
    while time.monotonic() < deadline:
        if all(r.duration is not None for r in proxy.requests() if r.started <= until):
            return
        time.sleep(0.01)


def annotate(event: dict[str, Any], proxy: Any | None) -> None:
    """Replace ``event["windows"]`` (per repetition: operation -> [[start, end], ...]) by counts.

    ``event["requests"]`` becomes ``{operation: summary}`` (see :func:`summarize`),
    and the proxy forgets the requests before the last window's end.
    """
    windows = event.pop("windows", None)
    if proxy is None or not windows:
        return
    last = max(end for rep in windows for spans in rep.values() for _, end in spans)
    _settle(proxy, last)
    records = [r for r in proxy.requests() if r.started <= last]
    per_rep: dict[str, list[dict[str, Any]]] = {}
    for rep in windows:
        for operation, spans in rep.items():
            for start, end in spans:
                inside = [r for r in records if start <= r.started <= end]
                per_rep.setdefault(operation, []).append(account(inside))
    event["requests"] = {op: summarize(found) for op, found in per_rep.items()}
    proxy.forget_before(last)


def summarize(found: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and maxima over :func:`account` results, with the first one's detail.

    Example::

        summarize([account(a), account(b)])["serial_median"]
    """
    totals = [f["total"] for f in found]
    serials = [f["serial"] for f in found]
    return {
        "n": len(found),
        "total_median": statistics.median(totals),
        "total_max": max(totals),
        "serial_median": statistics.median(serials),
        "serial_max": max(serials),
        "by_method": found[0]["by_method"],
        "by_client": found[0].get("by_client", {}),
        "chain": found[0]["chain"],
        "in_flight_max": max(f.get("in_flight", 0) for f in found),
        "each": [
            {k: f.get(k, 0) for k in ("total", "serial", "in_flight", "bytes_sent")} for f in found
        ],
    }


def merge(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One ``requests`` entry from several rounds' (throughput merges rounds).

    Example::

        merge([round0["requests"], round1["requests"]])
    """
    present = [p for p in parts if p]
    if not present:
        return None
    merged: dict[str, Any] = {}
    for operation in present[0]:
        found = [
            {
                **each,
                "by_method": p[operation]["by_method"],
                "by_client": p[operation].get("by_client", {}),
                "chain": p[operation]["chain"],
            }
            for p in present
            if operation in p
            for each in p[operation]["each"]
        ]
        merged[operation] = summarize(found)
    return merged


def fmt_requests(entry: dict[str, Any] | None, per: int = 1) -> str:
    """``"5 (4 serial)"``: median requests and round trips in series, divided by ``per``.

    Example::

        fmt_requests(event["requests"]["finalize"])  # '4 (4 serial)'
    """
    if not entry:
        return "n/a"
    total, serial = entry["total_median"] / per, entry["serial_median"] / per
    return f"{total:.3g} ({serial:.3g} serial)"
