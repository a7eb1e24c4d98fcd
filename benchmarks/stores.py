"""The three stores a benchmark runs on: local disk, S3 (moto) and GCS (fake-gcs-server).

The parent process starts the emulators on free ports of 127.0.0.1 (through
:mod:`partialstore.testing.servers`) and describes each store as a plain
JSON-able :class:`StoreEnv`, which worker processes receive. Every
measurement gets a fresh prefix from :meth:`StoreEnv.fresh`, removed again by
:meth:`StoreEnv.remove` so the emulators do not accumulate gigabytes.

The emulators are slower than the real services and run on the same two
cores as the code being measured; the figures show protocol costs (number
and kind of requests), not what S3 or GCS would deliver.

Example::

    with started_stores(["local", "s3"], tmp_root) as stores:
        url = stores["s3"].fresh("bytes-1MiB")   # s3://bench-xxxx/run/bytes-1MiB-<id>/ckpt
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

STORE_NAMES = ("local", "s3", "gcs")


@dataclasses.dataclass
class StoreEnv:
    """How to reach one store; JSON-able so it can be handed to worker processes.

    Attributes:
      name: ``local``, ``s3`` or ``gcs``.
      root: a local directory, or ``s3://bucket/prefix`` / ``gs://bucket/prefix``.
      storage_options: what partialstore and fsspec take for this store.
      env: environment variables a process needs to reach the store.
      endpoint_url: the emulator's URL (empty for local disk).
      server: which emulator serves it, in words.
      kind: ``local``, ``s3`` or ``gcs`` where ``name`` is a label such as
        ``s3@20ms`` (a store behind a network profile); empty: ``name``.
      network: ``plain``, or the profile's label (``20ms``).
      direct_options: ``storage_options`` reaching the emulator itself, not the
        proxy: for the untimed cleanup and probes (empty: ``storage_options``).
    """

    name: str
    root: str
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    endpoint_url: str = ""
    server: str = ""
    kind: str = ""
    network: str = "plain"
    direct_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoreEnv:
        return cls(**data)

    @property
    def is_local(self) -> bool:
        return self.store_kind == "local"

    @property
    def store_kind(self) -> str:
        """``local``, ``s3`` or ``gcs`` whatever the label."""
        return self.kind or self.name

    def fresh(self, label: str) -> str:
        """A new, empty checkpoint path ``<root>/<label>-<id>/ckpt`` for one measurement.

        Characters other than letters, digits, ``.``, ``_`` and ``-`` in ``label``
        become ``-``: the S3 backend sends a commit's small requests through
        TensorStore only for such plain keys, so a point named "4 saves" would
        otherwise measure its slower fallback client instead.
        """
        group = f"{re.sub(r'[^A-Za-z0-9._-]', '-', label)}-{uuid.uuid4().hex[:8]}"
        return f"{self.root.rstrip('/')}/{group}/ckpt"

    def group_of(self, url: str) -> str:
        """The per-measurement folder of a path from :meth:`fresh`."""
        return url.rsplit("/", 1)[0]

    def filesystem(self) -> Any:
        """An fsspec filesystem for this store (used for cleanup and raw probes).

        It reaches the emulator directly, past any latency proxy: nothing it
        does is timed.
        """
        import fsspec

        protocol = {"local": "file", "s3": "s3", "gcs": "gcs"}[self.store_kind]
        options = self.direct_options or self.storage_options
        # skip_instance_cache: a worker may outlive the store it first talked to.
        return fsspec.filesystem(protocol, skip_instance_cache=True, **options)

    def remove(self, url: str) -> None:
        """Delete everything a measurement left under its folder (not timed)."""
        group = self.group_of(url)
        if self.is_local:
            shutil.rmtree(group, ignore_errors=True)
            return
        fs = self.filesystem()
        with contextlib.suppress(FileNotFoundError):
            fs.rm(group, recursive=True)

    def kvstore(self, url: str) -> dict[str, Any]:
        """TensorStore kvstore spec for the folder ``url`` (for the raw baseline).

        Example::

            StoreEnv("local", "/tmp/x").kvstore("/tmp/x/a")  # {'driver': 'file', ...}
        """
        if self.is_local:
            return {"driver": "file", "path": url.rstrip("/") + "/"}
        _, rest = url.split("://", 1)
        bucket, _, path = rest.partition("/")
        path = path.rstrip("/") + "/"
        if self.store_kind == "s3":
            return {
                "driver": "s3",
                "bucket": bucket,
                "path": path,
                "endpoint": self.endpoint_url,
                "aws_region": self.env.get("AWS_REGION", "us-east-1"),
                "aws_credentials": {"type": "environment"},
            }
        # TensorStore's gcs driver has no endpoint member; TENSORSTORE_GCS_HTTP_URL
        # in the worker's environment points it at the emulator.
        return {"driver": "gcs", "bucket": bucket, "path": path}


def _emulator(kind: str, stack: contextlib.ExitStack, bucket: str) -> tuple[Any, StoreEnv]:
    """Start the emulator of ``kind`` (``s3`` or ``gcs``) with ``bucket``; its plain store."""
    if kind == "s3":
        from partialstore.testing.servers import MotoS3Server

        # A child process, so moto does not share a GIL with the worker.
        server: Any = stack.enter_context(MotoS3Server(in_process=False))
        root, what = f"s3://{bucket}/run", "moto server (child process)"
    else:
        from partialstore.testing.servers import FakeGcsServer

        server = stack.enter_context(FakeGcsServer())
        root, what = f"gs://{bucket}/run", "fake-gcs-server (memory backend)"
    server.create_bucket(bucket)
    env = StoreEnv(
        name=kind,
        root=root,
        storage_options=server.storage_options(),
        env=server.env(),
        endpoint_url=server.endpoint_url,
        server=f"{what} at {server.endpoint_url}",
    )
    return server, env


def _behind_proxy(
    label: str, server: Any, plain: StoreEnv, profile: Any, stack: contextlib.ExitStack
) -> tuple[Any, StoreEnv]:
    """A latency proxy in front of ``server`` and the store seen through it."""
    from partialstore.testing.faultproxy import FaultProxy

    proxy = stack.enter_context(
        FaultProxy(server.endpoint_url, rtt=profile.rtt_s, bandwidth=profile.bandwidth_bps)
    )
    mbps = profile.to_json()["bandwidth_mbps"]
    link = f"{mbps:g} Mbit/s" if mbps else "no bandwidth cap"
    env = dataclasses.replace(
        plain,
        name=label,
        kind=plain.name,
        network=profile.label,
        storage_options=proxy.storage_options(server),
        env=proxy.env(server),
        endpoint_url=proxy.endpoint_url,
        server=f"{plain.server} behind a proxy at {proxy.endpoint_url} "
        f"(+{profile.rtt_s * 1000:g} ms per request, {link})",
        direct_options=plain.storage_options,
    )
    return proxy, env


@contextlib.contextmanager
def started_stores(
    names: list[str],
    tmp_root: str,
    profile: Any = None,
    proxies: dict[str, Any] | None = None,
) -> Iterator[dict[str, StoreEnv]]:
    """Start what ``names`` need and yield ``{name: StoreEnv}``; stop everything after.

    A name ``s3@20ms`` / ``gcs@20ms`` (see :mod:`benchmarks.network`) is the
    same emulator as ``s3`` / ``gcs`` seen through a latency proxy built from
    ``profile`` (a :class:`benchmarks.network.NetworkProfile`); the proxies
    are put into ``proxies`` by name, for the parent's request counts.

    Raises whatever the server helpers raise when an emulator cannot start:
    a benchmark that was asked for S3 must not quietly run without it.
    """
    kinds = {name.partition("@")[0] for name in names}
    unknown = sorted(kinds - set(STORE_NAMES))
    if unknown:
        raise ValueError(f"unknown store(s) {unknown}; choose from {', '.join(STORE_NAMES)}")
    if profile is None and any("@" in name for name in names):
        raise ValueError(f"stores {names} name a network profile, but none was given")
    run_id = uuid.uuid4().hex[:8]
    stores: dict[str, StoreEnv] = {}
    started: dict[str, tuple[Any, StoreEnv]] = {}
    with contextlib.ExitStack() as stack:
        for name in names:
            kind = name.partition("@")[0]
            if kind == "local":
                root = os.path.join(tmp_root, "local")
                os.makedirs(root, exist_ok=True)
                stores[name] = StoreEnv(name="local", root=root, server="local disk")
                continue
            if kind not in started:
                started[kind] = _emulator(kind, stack, f"bench-{run_id}")
            server, plain = started[kind]
            if name == kind:
                stores[name] = plain
                continue
            proxy, stores[name] = _behind_proxy(name, server, plain, profile, stack)
            if proxies is not None:
                proxies[name] = proxy
        yield stores
