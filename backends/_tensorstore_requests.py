"""A bucket backend's small requests, sent by TensorStore's C++ HTTP client.

Every save commits with a few small requests in series (is it finalized,
list the log, read its last record, create the next one) and a finalize with a few more.
Through TensorStore's kvstore (the client that already writes the array
chunks) they cost a fraction of the Python CPU and about half the time they
take through aiobotocore (figures: benchmarks/README.md, "Figures behind code
decisions"). Both talk to the same service with the same credentials, so the
backend picks per request.

Only plain keys take this path (letters, digits, ``. _ - /``): TensorStore
does not XML-unescape the keys of a listing, and the backends keep their own
path for anything else. Each method returns ``None`` when it does not send
the request (an unusual key, or TensorStore cannot open the store) and
raises :class:`FastRequestError` when the request failed; the backend then
sends it through its own client, which reports errors precisely (a missing
bucket, denied access, ...). TensorStore retries a failed request once
(``FAST_RETRIES``): the backend's retry loop, not TensorStore's, decides
whether to go on (see :mod:`partialstore.backends._retry`).

The S3 backend builds one as ``TensorStoreRequests(spec, {"s3_request_retries":
FAST_RETRIES}, "/tensorstore/kvstore/s3/retries")``; its requests need a bucket,
so there is no doctest here (the backend tests on S3 and GCS exercise them).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import tensorstore as ts

__all__ = [
    "CREATED",
    "FAST_RETRIES",
    "REFUSED",
    "REFUSED_AFTER_RESEND",
    "FastRequestError",
    "TensorStoreRequests",
    "is_plain_key",
]

#: TensorStore's ``*_request_retries`` for these requests: one quick retry
#: (its minimum), after which the backend's own loop takes over.
FAST_RETRIES = {"max_retries": 1, "initial_delay": "0.05s", "max_delay": "0.05s"}

_PLAIN = re.compile(r"[A-Za-z0-9._/-]*")
# TensorStore's StorageGeneration::NoValue(): "only if the key is absent".
_ABSENT = b"\x02"


#: :meth:`TensorStoreRequests.create_if_absent`'s answers.
CREATED, REFUSED, REFUSED_AFTER_RESEND = "created", "refused", "refused after a resend"


class FastRequestError(Exception):
    """A request sent through TensorStore failed (its status text is the message)."""


def is_plain_key(key: str) -> bool:
    """Whether ``key`` uses only characters every client encodes the same way."""
    return _PLAIN.fullmatch(key) is not None


class TensorStoreRequests:
    """Create, test, read and list plain keys under a backend's root through one kvstore.

    Args:
      spec: awaits the kvstore spec of the backend's root (a trailing ``/``
        on its path), or None when TensorStore cannot reach the store; called
        on first use (again after it raised).
      context: TensorStore context resources for these requests.
      retries_metric: the driver's retry counter (``/tensorstore/kvstore/s3/retries``),
        which tells whether TensorStore resent anything during a create.
    """

    def __init__(
        self,
        spec: Callable[[], Awaitable[dict[str, Any] | None]],
        context: dict[str, Any],
        retries_metric: str,
    ) -> None:
        self._spec = spec
        self._context = context
        self._retries_metric = retries_metric
        self._store: ts.KvStore | None = None
        self._unavailable = False

    async def _open(self) -> ts.KvStore | None:
        if self._store is None and not self._unavailable:
            spec = await self._spec()
            if spec is None or not is_plain_key(str(spec.get("path", ""))):
                self._unavailable = True
                return None
            try:
                self._store = await ts.KvStore.open(spec, context=ts.Context(self._context))
            except ValueError:
                self._unavailable = True  # the backend's own client will report it
        return self._store

    async def _ask(self, key: str, request: Callable[[ts.KvStore], Any]) -> Any:
        """``await request(store)``; None if the key is not plain or the store cannot open.

        Raises:
          FastRequestError: the request was sent and failed.
        """
        store = await self._open() if is_plain_key(key) else None
        if store is None:
            return None
        try:
            return await request(store)
        except ValueError as err:
            raise FastRequestError(str(err)) from err

    def _retries(self) -> int | None:
        """TensorStore's count of resent requests so far (this driver, whole process)."""
        collect = getattr(ts, "experimental_collect_matching_metrics", None)
        if collect is None:  # pragma: no cover - older TensorStore
            return None
        metrics = collect(self._retries_metric)
        total: int = sum(v.get("value", 0) for m in metrics for v in m.get("values", ()))
        return total

    async def create_if_absent(self, key: str, data: bytes) -> str | None:
        """Write ``key`` only if absent; None if not sent.

        Returns ``CREATED``, ``REFUSED`` (the condition failed: 412, or 404
        for a missing bucket), or ``REFUSED_AFTER_RESEND`` when TensorStore
        resent some request meanwhile: the refusal may then answer this
        create's own first attempt, whose answer was lost.
        """
        before = self._retries()
        stamp = await self._ask(key, lambda store: store.write(key, data, if_equal=_ABSENT))
        if stamp is None:
            return None
        if stamp.generation:
            return CREATED
        # An unknown (empty) generation means the condition failed.
        return REFUSED if before is not None and self._retries() == before else REFUSED_AFTER_RESEND

    async def exists(self, key: str) -> bool | None:
        """Whether ``key`` exists (one HEAD: a zero-length read), or None to ask again."""
        result = await self._ask(key, lambda store: store.read(key, byte_range=slice(0, 0)))
        return None if result is None else result.state == "value"

    async def read(self, key: str) -> bytes | None:
        """The object's bytes; None if it is missing (the backend reports why) or unanswered."""
        result = await self._ask(key, lambda store: store.read(key))
        return result.value if result is not None and result.state == "value" else None

    async def bucket_listed(self) -> bool | None:
        """True once the store answers a listing of a key range nothing uses; None if not sent.

        A HEAD of a missing key and of a missing bucket look the same (404);
        a listing of a missing bucket fails with ``NoSuchBucket``.

        Raises:
          FastRequestError: the listing failed (its text names the reason).
        """
        probe = "partialstore.bucket-probe"
        found = await self._ask(
            probe, lambda store: store.list(ts.KvStore.KeyRange(probe, probe + "\x00"))
        )
        return None if found is None else True

    async def list(self, prefix_dir: str) -> list[str] | None:
        """Keys under ``prefix_dir`` (``""`` or ending in ``/``), or None to ask again."""
        # All keys starting with prefix_dir: up to the next string after its last char.
        end = prefix_dir[:-1] + chr(ord(prefix_dir[-1]) + 1) if prefix_dir else ""
        keys = await self._ask(
            prefix_dir, lambda store: store.list(ts.KvStore.KeyRange(prefix_dir, end))
        )
        if keys is None:
            return None
        names = [key.decode() for key in keys]
        if not all(is_plain_key(name) for name in names):
            return None  # XML-escaped ("&amp;") or unusual names: the backend lists
        return sorted(names)
