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
    """

    name: str
    root: str
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    endpoint_url: str = ""
    server: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoreEnv:
        return cls(**data)

    @property
    def is_local(self) -> bool:
        return self.name == "local"

    def fresh(self, label: str) -> str:
        """A new, empty checkpoint path ``<root>/<label>-<id>/ckpt`` for one measurement."""
        group = f"{label}-{uuid.uuid4().hex[:8]}"
        return f"{self.root.rstrip('/')}/{group}/ckpt"

    def group_of(self, url: str) -> str:
        """The per-measurement folder of a path from :meth:`fresh`."""
        return url.rsplit("/", 1)[0]

    def filesystem(self) -> Any:
        """An fsspec filesystem for this store (used for cleanup and raw probes)."""
        import fsspec

        protocol = {"local": "file", "s3": "s3", "gcs": "gcs"}[self.name]
        # skip_instance_cache: a worker may outlive the store it first talked to.
        return fsspec.filesystem(protocol, skip_instance_cache=True, **self.storage_options)

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
        if self.name == "s3":
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


@contextlib.contextmanager
def started_stores(names: list[str], tmp_root: str) -> Iterator[dict[str, StoreEnv]]:
    """Start what ``names`` need and yield ``{name: StoreEnv}``; stop everything after.

    Raises whatever the server helpers raise when an emulator cannot start:
    a benchmark that was asked for S3 must not quietly run without it.
    """
    unknown = sorted(set(names) - set(STORE_NAMES))
    if unknown:
        raise ValueError(f"unknown store(s) {unknown}; choose from {', '.join(STORE_NAMES)}")
    run_id = uuid.uuid4().hex[:8]
    stores: dict[str, StoreEnv] = {}
    with contextlib.ExitStack() as stack:
        for name in names:
            if name == "local":
                root = os.path.join(tmp_root, "local")
                os.makedirs(root, exist_ok=True)
                stores[name] = StoreEnv(name="local", root=root, server="local disk")
            elif name == "s3":
                from partialstore.testing.servers import MotoS3Server

                # A child process, so moto does not share a GIL with the worker.
                server = stack.enter_context(MotoS3Server(in_process=False))
                bucket = f"bench-{run_id}"
                server.create_bucket(bucket)
                stores[name] = StoreEnv(
                    name="s3",
                    root=f"s3://{bucket}/run",
                    storage_options=server.storage_options(),
                    env=server.env(),
                    endpoint_url=server.endpoint_url,
                    server=f"moto server (child process) at {server.endpoint_url}",
                )
            elif name == "gcs":
                from partialstore.testing.servers import FakeGcsServer

                server = stack.enter_context(FakeGcsServer())
                bucket = f"bench-{run_id}"
                server.create_bucket(bucket)
                stores[name] = StoreEnv(
                    name="gcs",
                    root=f"gs://{bucket}/run",
                    storage_options=server.storage_options(),
                    env=server.env(),
                    endpoint_url=server.endpoint_url,
                    server=f"fake-gcs-server (memory backend) at {server.endpoint_url}",
                )
        yield stores
