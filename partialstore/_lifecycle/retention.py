"""The ``keep_*`` retention policy: a pure function from a run's steps to the steps to delete.

A step is kept when any rule keeps it: the newest ``keep_last`` steps,
every step divisible by ``keep_every``, the ``n`` best steps by a metric
(``keep_best=(metric, "max"|"min", n)``), and always the latest step.
Without any rule nothing is deleted. A step whose metric is unknown (not
read yet) is kept; a step known to lack the metric is ranked by no
``keep_best`` rule (the other rules may still keep it).

Example:
    >>> policy = Policy.of(keep_last=2, keep_every=None, keep_best=None)
    >>> plan_deletions([1, 2, 3, 4], {}, policy)
    [1, 2]
    >>> best = Policy.of(keep_last=1, keep_every=None, keep_best=("loss", "min", 1))
    >>> plan_deletions([1, 2, 3], {1: 0.5, 2: 0.1, 3: 0.9}, best)
    [1]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

from partialstore.errors import InvalidInputError

__all__ = ["Policy", "plan_deletions"]

#: A step's metric value; ``None`` when the step is known to lack the metric.
Metric = float | None


def _positive(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive int or None, got {value!r}.")
    return value


@dataclasses.dataclass(frozen=True)
class Policy:
    """Checked retention settings (see the module docstring)."""

    keep_last: int | None = None
    keep_every: int | None = None
    best_metric: str | None = None
    best_mode: str = "max"
    best_n: int = 0

    @classmethod
    def of(cls, *, keep_last: object, keep_every: object, keep_best: object) -> Policy:
        """Check the manager's ``keep_*`` arguments and build the policy.

        Example:
            >>> Policy.of(keep_last=None, keep_every=None, keep_best=("acc", "best", 2))
            Traceback (most recent call last):
            partialstore.errors.InvalidInputError: keep_best must be (metric, "max"|"min", n) ...
        """
        last = _positive("keep_last", keep_last)
        every = _positive("keep_every", keep_every)
        if keep_best is None:
            return cls(keep_last=last, keep_every=every)
        usage = (
            'keep_best must be (metric, "max"|"min", n) with metric a non-empty str naming a '
            "number in each step's custom_metadata and n a positive int"
        )
        if not isinstance(keep_best, tuple | list) or len(keep_best) != 3:
            raise InvalidInputError(f"{usage}; got {keep_best!r}.")
        metric, mode, n = keep_best
        if not isinstance(metric, str) or not metric or mode not in ("max", "min"):
            raise InvalidInputError(f"{usage}; got {keep_best!r}.")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInputError(f"{usage}; got {keep_best!r}.")
        return cls(last, every, metric, mode, n)

    @property
    def active(self) -> bool:
        """Whether any rule is set (without one, nothing is ever deleted)."""
        return (
            self.keep_last is not None
            or self.keep_every is not None
            or self.best_metric is not None
        )


def metric_value(custom_metadata: object, metric: str) -> Metric:
    """The finite number at ``custom_metadata[metric]``, else ``None``.

    Example:
        >>> metric_value({"loss": 0.25}, "loss"), metric_value({"loss": "n/a"}, "loss")
        (0.25, None)
    """
    if not isinstance(custom_metadata, Mapping):
        return None
    value = custom_metadata.get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _best(steps: list[int], metrics: Mapping[int, Metric], policy: Policy) -> set[int]:
    unknown = {step for step in steps if step not in metrics}
    ranked = [(value, step) for step in steps if (value := metrics.get(step)) is not None]
    # Ties go to the newer step; "min" ranks by the negated value.
    sign = 1.0 if policy.best_mode == "max" else -1.0
    ranked.sort(key=lambda pair: (sign * pair[0], pair[1]), reverse=True)
    return unknown | {step for _, step in ranked[: policy.best_n]}


def plan_deletions(
    steps: Iterable[int], metrics: Mapping[int, Metric], policy: Policy
) -> list[int]:
    """The finalized steps ``policy`` lets go, ascending; never the latest one.

    ``metrics`` maps a step to its ``keep_best`` metric (``None``: the step
    has none); a step missing from it is kept by a ``keep_best`` rule.
    """
    ordered = sorted(set(steps))
    if not ordered or not policy.active:
        return []
    kept = {ordered[-1]}
    if policy.keep_last is not None:
        kept.update(ordered[-policy.keep_last :])
    if policy.keep_every is not None:
        kept.update(step for step in ordered if step % policy.keep_every == 0)
    if policy.best_metric is not None:
        kept |= _best(ordered, metrics, policy)
    return [step for step in ordered if step not in kept]
