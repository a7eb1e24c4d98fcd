"""The run index object: what it holds, and its checked encoding.

One JSON object at ``<root>/partialstore.run.json``::

    {"format": "partialstore.run", "version": 1, "update_id": "<32 hex>", "updated": "<ISO>",
     "steps": [10, 20, 30], "pending": [40], "deleting": [],
     "metrics": {"loss": {"20": null, "30": 0.25}}}

- ``steps``: finalized steps, each added only after its finalize published it;
- ``pending``: steps whose finalize was about to start (the intent), so a
  reader checks whether one above ``steps`` published meanwhile;
- ``deleting``: steps retention took out of ``steps`` and is deleting;
- ``metrics``: the ``keep_best`` metric of a step where it was looked up
  (``null``: the step has none).

Example:
    >>> index = RunIndex(steps=(1, 2), pending=(3,), metrics={"loss": {2: 0.5, 1: None}})
    >>> decode("run.json", encode(index)) == index
    True
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
from collections.abc import Iterable
from typing import Any

from partialstore._commit.record_checks import parse_versioned
from partialstore.errors import CorruptCheckpointError

__all__ = ["FORMAT", "INDEX_KEY", "VERSION", "Metrics", "RunIndex", "decode", "encode"]

#: ``{metric name: {step: value, or None when the step's custom_metadata lacks it}}``.
Metrics = dict[str, dict[int, float | None]]

FORMAT = "partialstore.run"
VERSION = 1
#: Where the index lives, relative to the run's root (no step name can be it:
#: a step name holds its step's digits and ``step_format`` is checked).
INDEX_KEY = "partialstore.run.json"


@dataclasses.dataclass(frozen=True)
class RunIndex:
    """A decoded run index (see the module docstring); every method returns a new one."""

    steps: tuple[int, ...] = ()
    pending: tuple[int, ...] = ()
    deleting: tuple[int, ...] = ()
    metrics: Metrics = dataclasses.field(default_factory=dict)

    def with_pending(self, step: int) -> RunIndex | None:
        """``step``'s finalize is about to start; ``None`` when nothing changes."""
        if step in self.pending or step in self.steps:
            return None
        return dataclasses.replace(self, pending=_sorted([*self.pending, step]))

    def with_published(
        self, steps: Iterable[int], metrics: Metrics | None = None
    ) -> RunIndex | None:
        """These steps are published; ``metrics`` holds metrics looked up (``None``: absent).

        A step being deleted stays out of ``steps``: its deletion goes on.
        """
        published = {s for s in steps if s not in self.deleting}
        new = dataclasses.replace(
            self,
            steps=_sorted([*self.steps, *published]),
            pending=tuple(s for s in self.pending if s not in published),
            metrics=_merge(self.metrics, metrics or {}),
        )
        return None if new == self else new

    def with_deleting(self, doomed: Iterable[int]) -> RunIndex | None:
        """Take ``doomed`` out of ``steps`` and mark them being deleted."""
        gone = set(doomed) & (set(self.steps) | set(self.pending))
        if not gone:
            return None
        return dataclasses.replace(
            self,
            steps=tuple(s for s in self.steps if s not in gone),
            pending=tuple(s for s in self.pending if s not in gone),
            deleting=_sorted([*self.deleting, *gone]),
            metrics={
                name: {s: v for s, v in values.items() if s not in gone}
                for name, values in self.metrics.items()
            },
        )

    def without_pending(self, step: int) -> RunIndex | None:
        """``step``'s finalize found no session: forget the intent."""
        if step not in self.pending:
            return None
        return dataclasses.replace(self, pending=tuple(s for s in self.pending if s != step))

    def without(self, done: Iterable[int]) -> RunIndex | None:
        """Forget ``done`` in ``deleting`` and ``pending`` (deleted, or a discarded session)."""
        gone = set(done)
        new = dataclasses.replace(
            self,
            pending=tuple(s for s in self.pending if s not in gone),
            deleting=tuple(s for s in self.deleting if s not in gone),
        )
        return None if new == self else new


def _merge(old: Metrics, new: Metrics) -> Metrics:
    merged = {name: dict(values) for name, values in old.items()}
    for name, values in new.items():
        merged.setdefault(name, {}).update(values)
    return merged


def _sorted(steps: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted(set(steps)))


def encode(index: RunIndex) -> bytes:
    """The index's bytes, with a fresh ``update_id`` so every write is unique."""
    body = {
        "format": FORMAT,
        "version": VERSION,
        "update_id": uuid.uuid4().hex,
        "updated": datetime.datetime.now(datetime.UTC).isoformat(),
        "steps": list(index.steps),
        "pending": list(index.pending),
        "deleting": list(index.deleting),
        "metrics": {
            name: {str(step): value for step, value in sorted(values.items())}
            for name, values in index.metrics.items()
        },
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _steps(body: dict[str, Any], field: str, key: str) -> tuple[int, ...]:
    values = body.get(field, [])
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise CorruptCheckpointError(
            f"Run index {key}: {field!r} must be a list of non-negative ints."
        )
    return _sorted(values)


def _metric_values(raw: Any, bad: CorruptCheckpointError) -> dict[int, float | None]:
    if not isinstance(raw, dict):
        raise bad
    values: dict[int, float | None] = {}
    for step, value in raw.items():
        if not step.isdigit() or isinstance(value, bool):
            raise bad
        if value is not None and not isinstance(value, int | float):
            raise bad
        values[int(step)] = None if value is None else float(value)
    return values


def _metrics(body: dict[str, Any], key: str) -> Metrics:
    raw = body.get("metrics", {})
    bad = CorruptCheckpointError(
        f"Run index {key}: 'metrics' must map metric names to {{step: number or null}}."
    )
    if not isinstance(raw, dict):
        raise bad
    return {name: _metric_values(values, bad) for name, values in raw.items()}


def decode(key: str, data: bytes) -> RunIndex:
    """Check and decode the index's bytes.

    Raises:
      CorruptCheckpointError: they are not a run index of a known version.
    """
    body = parse_versioned(f"Run index {key}", data, fmt=FORMAT, version=VERSION)
    return RunIndex(
        steps=_steps(body, "steps", key),
        pending=_steps(body, "pending", key),
        deleting=_steps(body, "deleting", key),
        metrics=_metrics(body, key),
    )
