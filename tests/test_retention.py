"""Property tests of the pure parts of CheckpointManager: the retention policy, step
names and the run index's encoding (hypothesis)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partialstore._lifecycle.indexformat import RunIndex, decode, encode
from partialstore._lifecycle.naming import StepNamer
from partialstore._lifecycle.retention import Policy, metric_value, plan_deletions
from partialstore.errors import CorruptCheckpointError

steps_st = st.sets(st.integers(0, 500), max_size=40)
positive = st.none() | st.integers(1, 12)
best_st = st.none() | st.tuples(
    st.sampled_from(["loss", "acc"]), st.sampled_from(["max", "min"]), st.integers(1, 6)
)


@st.composite
def cases(draw: Any) -> tuple[set[int], dict[int, float | None], Policy]:
    steps = draw(steps_st)
    metrics: dict[int, float | None] = {}
    for step in steps:
        choice = draw(st.sampled_from(["value", "none", "unknown"]))
        if choice == "value":
            metrics[step] = draw(st.floats(-10, 10, allow_nan=False))
        elif choice == "none":
            metrics[step] = None
    policy = Policy.of(keep_last=draw(positive), keep_every=draw(positive), keep_best=draw(best_st))
    return steps, metrics, policy


def _kept_by_rules(steps: set[int], metrics: dict[int, float | None], policy: Policy) -> set[int]:
    """The steps some rule keeps, computed the slow, obvious way."""
    ordered = sorted(steps)
    kept = set(ordered[-1:])
    if policy.keep_last:
        kept |= set(ordered[max(0, len(ordered) - policy.keep_last) :])
    if policy.keep_every:
        kept |= {s for s in ordered if s % policy.keep_every == 0}
    if policy.best_metric:
        kept |= {s for s in ordered if s not in metrics}
        valued = [s for s in ordered if metrics.get(s) is not None]
        for step in valued:
            value = metrics[step]
            assert value is not None
            better = 0
            for other in valued:
                other_value = metrics[other]
                assert other_value is not None
                diff = other_value - value if policy.best_mode == "max" else value - other_value
                if diff > 0 or (diff == 0 and other > step):
                    better += 1
            if better < policy.best_n:
                kept.add(step)
    return kept


@settings(max_examples=150, deadline=None)
@given(cases())
def test_deletes_exactly_the_steps_no_rule_keeps(case: Any) -> None:
    steps, metrics, policy = case
    deleted = plan_deletions(steps, metrics, policy)
    assert deleted == sorted(deleted) and set(deleted) <= steps
    if not policy.active or not steps:
        assert deleted == []
        return
    assert max(steps) not in deleted  # never the latest
    assert set(deleted) == steps - _kept_by_rules(steps, metrics, policy)


@settings(max_examples=200, deadline=None)
@given(cases(), st.integers(0, 500))
def test_a_new_step_never_revives_a_deleted_one(case: Any, new: int) -> None:
    """Retention is stable: steps deleted now would still be deleted after one more step
    (unless the new one is older, or a keep_best tie changes with it)."""
    steps, metrics, policy = case
    if policy.best_metric or not steps or new <= max(steps):
        return
    before = set(plan_deletions(steps, metrics, policy))
    after = set(plan_deletions(steps | {new}, metrics, policy))
    assert before <= after


def test_metric_values() -> None:
    assert metric_value({"loss": 2}, "loss") == 2.0
    assert metric_value({"loss": True}, "loss") is None
    assert metric_value({"loss": float("nan")}, "loss") is None
    assert metric_value({"other": 1.0}, "loss") is None
    assert metric_value(None, "loss") is None


@given(st.integers(0, 10**12), st.sampled_from(["step_{step:08d}", "{step}", "ck-{step:d}.v1"]))
def test_step_names_read_back(step: int, step_format: str) -> None:
    namer = StepNamer(step_format)
    assert namer.parse(namer.name(step)) == step
    assert namer.parse(namer.name(step) + "x") is None


index_st = st.builds(
    RunIndex,
    steps=st.lists(st.integers(0, 10**9), unique=True).map(lambda v: tuple(sorted(v))),
    pending=st.lists(st.integers(0, 10**9), unique=True).map(lambda v: tuple(sorted(v))),
    deleting=st.lists(st.integers(0, 10**9), unique=True).map(lambda v: tuple(sorted(v))),
    metrics=st.dictionaries(
        st.text(min_size=1, max_size=5),
        st.dictionaries(
            st.integers(0, 1000), st.none() | st.floats(allow_nan=False, allow_infinity=False)
        ),
        max_size=2,
    ),
)


@settings(max_examples=100, deadline=None)
@given(index_st)
def test_the_index_round_trips(index: RunIndex) -> None:
    assert decode("k", encode(index)) == index
    assert encode(index) != encode(index)  # a fresh update id every time


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"format": "other", "version": 1}',
        b'{"format": "partialstore.run", "version": 2}',
        b'{"format": "partialstore.run", "version": 1, "steps": [-1]}',
        b'{"format": "partialstore.run", "version": 1, "pending": [true]}',
        b'{"format": "partialstore.run", "version": 1, "metrics": {"loss": {"x": 1}}}',
        b'{"format": "partialstore.run", "version": 1, "metrics": {"loss": {"1": "a"}}}',
    ],
)
def test_a_damaged_index_is_reported(body: bytes) -> None:
    with pytest.raises(CorruptCheckpointError):
        decode("partialstore.run.json", body)
