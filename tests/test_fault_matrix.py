"""The fault matrix: every request of save, finalize, discard and gc, each fault.

For each operation the test first runs it fault-free and records every
request it makes (at the HTTP level through :class:`FaultProxy` on S3 and
GCS, at the Backend contract through :class:`FaultyBackend` on memory,
local disk and the generic fsspec backend). Then, for every recorded
request and every fault, it prepares the same state on a fresh checkpoint
path, injects the fault on the request that plays that part, runs the
operation and checks what it answered against what is actually stored:

- a fault that loses a response after the store applied the request (the
  client retries, or the call fails);
- a fault that answers an error after applying it (HTTP 503; a lost answer
  at the contract);
- a fault that answers an error without applying it (HTTP 503 once;
  ``before`` at the contract).

The promises checked (README, "Guarantees"): a save that returned is in the
checkpoint and one that raised is not, unless it raised
``OutcomeUnknownError``; a finalize that raised can be called again and
then succeeds, and no finalize ever answers ``FileExistsError`` or
``FileNotFoundError`` about its own session; discard and gc delete nothing
that is not theirs, and after a failure can be called again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore import errors
from partialstore._commit.location import resolve
from partialstore._runtime.aio import run
from partialstore.testing.faultproxy import drop_response, error, error_after, fault_like
from partialstore.testing.faulty_backend import BackendFault, after, after_as_retry, before

PROXY_FAULTS = {"drop": drop_response, "503-after": lambda: error_after(503), "503": error}
CONTRACT_FAULTS = {"before": before, "after": after, "retry-after": after_as_retry}
BIG = np.arange(400_000, dtype=np.float32)  # 1.6 MiB: a zarr3 array, past packing


@dataclasses.dataclass
class Case:
    """One checkpoint path of the matrix, with everything a check needs."""

    root: str
    name: str
    options: dict[str, Any]

    @property
    def path(self) -> str:
        return f"{self.root}/{self.name}"

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, storage_options=self.options, **kwargs)


# ------------------------------------------------------------------ scenarios
# Each scenario: prepare(case) builds the state before the operation,
# act(case) runs it, check(case, outcome) checks the answer against storage
# (with every fault removed).


def _save_prepare(case: Case) -> None:
    case.call(partialstore.save, case.path, {"base": 1})


def _save_act(case: Case) -> Any:
    return case.call(partialstore.save, case.path, {"k": {"big": BIG, "small": np.arange(5)}})


def _save_check(case: Case, outcome: Any) -> None:
    case.call(partialstore.finalize, case.path)
    loaded = case.call(partialstore.load, case.path)
    if outcome is None or (isinstance(outcome, errors.OutcomeUnknownError) and "k" in loaded):
        assert sorted(loaded) == ["base", "k"], f"lost save: {outcome!r}"
        np.testing.assert_array_equal(loaded["k"]["big"], BIG)
    else:
        _assert_store_failure(outcome)
        assert loaded == {"base": 1}, f"phantom save after {outcome!r}"
    _assert_gc_leaves_only_used(case)


def _finalize_prepare(case: Case) -> None:
    case.call(partialstore.save, case.path, {"base": 1})
    case.call(partialstore.save, case.path, {"k": BIG})


def _finalize_act(case: Case) -> Any:
    return case.call(partialstore.finalize, case.path)


def _finalize_check(case: Case, outcome: Any) -> None:
    if outcome is not None:
        _assert_store_failure(outcome)
        case.call(partialstore.finalize, case.path)  # called again, it must succeed
    loaded = case.call(partialstore.load, case.path)
    assert sorted(loaded) == ["base", "k"]
    np.testing.assert_array_equal(loaded["k"], BIG)
    with pytest.raises(FileExistsError):  # and later calls are new finalizes
        case.call(partialstore.finalize, case.path)


FOREIGN = "train-00000.tfrecord"


def _discard_prepare(case: Case) -> None:
    case.call(partialstore.save, f"{case.path}/nested", {"n": 1})
    case.call(partialstore.finalize, f"{case.path}/nested")
    location = resolve(case.path, case.options)
    run(location.backend.write(f"{location.staging_prefix}/{FOREIGN}", b"user bytes"))
    case.call(partialstore.save, case.path, {"base": BIG})


def _discard_act(case: Case) -> Any:
    return case.call(partialstore.discard, case.path)


def _discard_check(case: Case, outcome: Any) -> None:
    if outcome is not None:
        _assert_store_failure(outcome)
        with contextlib.suppress(FileNotFoundError):  # it had discarded it after all
            case.call(partialstore.discard, case.path)
    with pytest.raises(FileNotFoundError):
        case.call(partialstore.finalize, case.path)
    assert case.call(partialstore.load, f"{case.path}/nested") == {"n": 1}
    location = resolve(case.path, case.options)
    assert run(location.backend.read(f"{location.staging_prefix}/{FOREIGN}")) == b"user bytes"
    left = run(location.backend.list(f"{location.staging_prefix}/data"))
    assert left == [], f"discard left data: {left}"


def _gc_prepare(case: Case) -> None:
    case.call(partialstore.save, case.path, {"w": BIG})
    case.call(partialstore.save, case.path, {"w": BIG + 1})  # wholly replaces the first
    case.call(partialstore.finalize, case.path)


def _gc_act(case: Case) -> Any:
    return case.call(partialstore.gc, case.path)


def _gc_check(case: Case, outcome: Any) -> None:
    if outcome is not None:
        _assert_store_failure(outcome)
        case.call(partialstore.gc, case.path)
    np.testing.assert_array_equal(case.call(partialstore.load, case.path)["w"], BIG + 1)
    _assert_gc_leaves_only_used(case)


SCENARIOS = {
    "save": (_save_prepare, _save_act, _save_check),
    "finalize": (_finalize_prepare, _finalize_act, _finalize_check),
    "discard": (_discard_prepare, _discard_act, _discard_check),
    "gc": (_gc_prepare, _gc_act, _gc_check),
}


def _assert_store_failure(outcome: Any) -> None:
    """A failed call under a store fault reports a store failure, never a false verdict."""
    assert isinstance(outcome, errors.BackendError), f"unexpected answer {outcome!r}"


def _assert_gc_leaves_only_used(case: Case) -> None:
    case.call(partialstore.gc, case.path)
    location = resolve(case.path, case.options)
    used = {s["save_id"] for s in case.call(partialstore.metadata, case.path).saves}
    dirs = set(run(location.backend.list_children(f"{location.final_prefix}/data")))
    assert dirs <= used, f"unused data after gc: {dirs - used}"


# ------------------------------------------------------------------ driver


def _attempt(act: Callable[[Case], Any], case: Case) -> Any:
    try:
        act(case)
    except Exception as error:
        return error
    return None


def _run_matrix(
    scenario: str,
    make_case: Callable[[int], Case],
    enumerate_requests: Callable[[Callable[[], Any]], int],
    inject: Callable[[int, str, str], Any],
    faults: list[str],
) -> None:
    """Run ``scenario`` once per (recorded request, fault); collect every broken promise."""
    prepare, act, check = SCENARIOS[scenario]
    first = make_case(0)
    prepare(first)
    count = enumerate_requests(lambda: act(first))
    assert count > 0
    failures = []
    number = 0
    for index in range(count):
        for fault in faults:
            number += 1
            case = make_case(number)
            prepare(case)
            rule = inject(index, fault, case.name)
            try:
                outcome = _attempt(act, case)
            finally:
                rule.remove()
            if not rule.fired:  # the repeat made no such request: nothing was tested
                failures.append(f"request #{index} {fault}: the fault never fired")
                continue
            try:
                check(case, outcome)
            except AssertionError as broken:
                failures.append(f"request #{index} {fault}: {broken}")
    print(f"{scenario}: {count} requests, {number} faulted runs")
    assert not failures, f"{len(failures)} of {number} cases broke a promise:\n" + "\n".join(
        failures
    )


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_http_faults(scenario: str, proxied_url: Any) -> None:
    proxy, options = proxied_url.proxy, proxied_url.options

    def make_case(number: int) -> Case:
        return Case(proxied_url.url, f"c{number:03d}", options)

    def enumerate_requests(action: Callable[[], Any]) -> int:
        proxy.reset_log()
        action()
        proxy.wait_idle()
        return len(proxy.requests())

    seen: list[Any] = []

    def inject(index: int, fault: str, name: str) -> Any:
        if not seen:
            seen.extend(proxy.requests())
        return proxy.add(fault_like(seen, index, PROXY_FAULTS[fault](), substitute={"c000": name}))

    _run_matrix(scenario, make_case, enumerate_requests, inject, list(PROXY_FAULTS))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_contract_faults(scenario: str, faulty_url: Any) -> None:
    url, faulty = faulty_url

    def make_case(number: int) -> Case:
        return Case(url, f"c{number:03d}", {})

    def enumerate_requests(action: Callable[[], Any]) -> int:
        faulty.reset_log()
        action()
        return len(faulty.calls())

    seen: list[Any] = []

    def inject(index: int, fault: str, name: str) -> Any:
        if not seen:
            seen.extend(faulty.calls())
        return faulty.add(_backend_fault_like(seen, index, CONTRACT_FAULTS[fault](), name))

    _run_matrix(scenario, make_case, enumerate_requests, inject, list(CONTRACT_FAULTS))


def _key_pattern(key: str, name: str) -> str:
    text = re.escape(key.replace("c000", name))
    return "^" + re.sub(r"[0-9a-f]{32}", "[0-9a-f]{32}", text) + "$"


def _backend_fault_like(calls: list[Any], index: int, action: Any, name: str) -> BackendFault:
    """The contract-level twin of ``fault_like``: same method, key shape and rank."""
    target = calls[index]
    earlier = _key_pattern(target.key, "c000")
    skip = sum(
        c.method == target.method and re.search(earlier, c.key) is not None for c in calls[:index]
    )
    return BackendFault(action, method=target.method, key=_key_pattern(target.key, name), skip=skip)
