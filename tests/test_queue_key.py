"""Every spelling of one checkpoint shares one queue, one backend and one finalize wait.

A save held at its commit under one spelling, then a finalize under another
spelling: the finalize must wait for the save queued before it and publish a
checkpoint that holds it. The hold is a gate on the real backend's ``create``
(the Backend contract), opened once the finalize has been left a moment to
run ahead; a finalize that does not wait seals the log first, so the save
then raises and the checkpoint lacks it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore._commit.location import freeze_options, job_wide_name, resolve
from partialstore._runtime.ordering import UnobservedSaveError
from partialstore.errors import BackendError, InvalidInputError

WAIT_S = 30.0
#: How long the save is held after the finalize starts; a finalize that does
#: not wait for it finishes well within this on every store the tests use.
HOLD_S = 1.0

Spelling = tuple[str, dict[str, Any]]


class Gate:
    """Holds (or fails) the first save record's ``create`` until released."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.entered = threading.Event()
        self.release = threading.Event()
        self.used = False


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``install(backend_class, fail=False)`` gates that class's ``create``."""
    gates: list[Gate] = []

    def install(backend_class: type, fail: bool = False) -> Gate:
        gate = Gate(fail)
        original = backend_class.create

        async def create(self: Any, key: str, data: bytes) -> None:
            if not gate.used and b'"kind":"save"' in data:
                gate.used = True
                gate.entered.set()
                await asyncio.to_thread(gate.release.wait, WAIT_S)
                if gate.fail:
                    raise BackendError(f"injected failure creating {key}")
            await original(self, key, data)

        monkeypatch.setattr(backend_class, "create", create)
        gates.append(gate)
        return gate

    yield install
    for gate in gates:  # never leave a save hanging
        gate.release.set()


def _finalize_in_thread(path: str, options: dict[str, Any]) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            partialstore.finalize(path, storage_options=options)
            outcome.append("finalized")
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _assert_finalize_waits_across(install: Any, first: Spelling, second: Spelling) -> None:
    """A save_async held under ``first``; finalize under ``second`` must include it."""
    (path_a, options_a), (path_b, options_b) = first, second
    partialstore.save(path_a, {"early": np.arange(3)}, storage_options=options_a)
    gate = install(type(resolve(path_a, options_a).backend))
    pending = partialstore.save_async(path_a, {"late": np.arange(4)}, storage_options=options_a)
    assert gate.entered.wait(WAIT_S), "the save never reached its commit"
    finalizer, outcome = _finalize_in_thread(path_b, options_b)
    finalizer.join(HOLD_S)
    waited = finalizer.is_alive()
    gate.release.set()
    finalizer.join(WAIT_S)
    pending.result(timeout=WAIT_S)  # the held save committed: nothing sealed it out
    assert outcome == ["finalized"]
    assert waited, f"finalize({path_b!r}) did not wait for the save to {path_a!r}"
    loaded = partialstore.load(path_b, storage_options=options_b)
    assert sorted(loaded) == ["early", "late"]
    np.testing.assert_array_equal(loaded["late"], np.arange(4))


def _local_spellings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Spelling]:
    """Pairs of local spellings of one checkpoint, by name; each pair in its own folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    return {
        "file-url": (f"file://{tmp_path}/a/ck", f"{tmp_path}/a/ck"),
        "localhost-url": (f"file://localhost{tmp_path}/b/ck", f"{tmp_path}/b/ck"),
        "trailing-slash": (f"{tmp_path}/c/ck/", f"{tmp_path}/c/ck"),
        "relative": ("d/ck", f"{tmp_path}/d/ck"),
        "dot-dot": (f"{tmp_path}/e/sub/../ck", f"{tmp_path}/e/ck"),
        "home": ("~/f/ck", f"{tmp_path}/home/f/ck"),
        "symlinked-parent": (f"{tmp_path}/link/ck", f"{tmp_path}/real/ck"),
    }


LOCAL_CASES = [
    "file-url",
    "localhost-url",
    "trailing-slash",
    "relative",
    "dot-dot",
    "home",
    "symlinked-parent",
]


@pytest.mark.parametrize("case", LOCAL_CASES)
def test_finalize_waits_for_a_save_spelled_otherwise_on_local_disk(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gate: Any
) -> None:
    path_a, path_b = _local_spellings(tmp_path, monkeypatch)[case]
    assert resolve(path_a).key == resolve(path_b).key
    assert resolve(path_a).backend is resolve(path_b).backend
    _assert_finalize_waits_across(gate, (path_a, {}), (path_b, {}))


def _reordered(options: dict[str, Any]) -> dict[str, Any]:
    reordered = dict(reversed(list(options.items())))
    assert list(reordered) != list(options)  # the test needs two keys or more
    return reordered


@pytest.mark.parametrize("case", ["s3a", "double-slash", "options-order"])
def test_finalize_waits_for_a_save_spelled_otherwise_on_s3(
    case: str, s3_url: tuple[str, dict[str, Any]], gate: Any
) -> None:
    root, options = s3_url  # s3://<bucket>/root
    second = (f"{root}/ck", options)
    first = {
        "s3a": (root.replace("s3://", "s3a://", 1) + "/ck", options),
        "double-slash": (f"{root}//ck/", options),
        "options-order": (f"{root}/ck", _reordered(options)),
    }[case]
    assert resolve(*first).backend is resolve(*second).backend
    _assert_finalize_waits_across(gate, first, second)


def test_finalize_waits_for_a_save_spelled_otherwise_on_gcs(
    gcs_url: tuple[str, dict[str, Any]], gate: Any
) -> None:
    root, options = gcs_url  # gs://<bucket>/root
    first = (root.replace("gs://", "gcs://", 1) + "/ck/", options)
    second = (f"{root}/ck", options)
    assert resolve(*first).backend is resolve(*second).backend
    _assert_finalize_waits_across(gate, first, second)


def test_finalize_waits_for_a_save_spelled_otherwise_in_memory(gate: Any) -> None:
    name = f"q{os.getpid()}-{threading.get_ident()}"
    first, second = (f"memory:///{name}/ck/", {}), (f"memory://{name}/ck", {})
    assert resolve(*first).key == resolve(*second).key
    _assert_finalize_waits_across(gate, first, second)


def test_finalize_reports_an_unread_failure_of_a_save_spelled_otherwise(
    tmp_path: Path, gate: Any
) -> None:
    path_a, path_b = f"file://{tmp_path}/ck", f"{tmp_path}/ck/"
    partialstore.save(path_a, {"early": 1})
    held = gate(type(resolve(path_a).backend), fail=True)
    failing = partialstore.save_async(path_a, {"late": 2})  # its result is never read
    assert held.entered.wait(WAIT_S)
    held.release.set()
    with pytest.raises(UnobservedSaveError, match="injected failure"):
        partialstore.finalize(path_b)
    assert failing.done()
    partialstore.finalize(path_b)  # reported once; the session still holds "early"
    assert partialstore.load(path_a) == {"early": 1}


def test_distinct_places_get_distinct_keys(
    tmp_path: Path, s3_url: tuple[str, dict[str, Any]]
) -> None:
    root, options = s3_url
    assert resolve(f"{root}/ck", options).key != resolve(f"{root}2/ck", options).key
    other_endpoint = {**options, "endpoint_url": "http://127.0.0.1:1"}
    assert resolve(f"{root}/ck", options).key != resolve(f"{root}/ck", other_endpoint).key
    assert resolve("memory://x/ck").key != resolve("memory://y/ck").key
    # Another backend (fsspec's local filesystem) keeps its session elsewhere.
    assert resolve(f"local://{tmp_path}/ck").key != resolve(f"{tmp_path}/ck").key


def test_storage_options_compare_by_value_and_type(tmp_path: Path) -> None:
    nested = {"a": 1, "b": [2, {"c": 3.5, "d": "e"}]}
    same = {"b": [2, {"d": "e", "c": 3.5}], "a": 1}
    assert freeze_options(nested) == freeze_options(same)
    assert hash(freeze_options(nested)) == hash(freeze_options(same))
    assert freeze_options({"a": 1}) != freeze_options({"a": True})
    assert freeze_options({"a": [1]}) != freeze_options({"a": (1,)})
    unhashable = bytearray(b"x")  # compared by identity
    assert freeze_options({"a": unhashable}) == freeze_options({"a": unhashable})
    assert freeze_options({"a": unhashable}) != freeze_options({"a": bytearray(b"x")})

    plain = resolve(f"{tmp_path}/ck", {"single_writer": True})
    assert resolve(f"{tmp_path}/ck/", {"single_writer": True}).backend is plain.backend
    # 1 == True in Python, but backends check types: the backend opened with
    # True must not serve (and so let through) single_writer=1.
    with pytest.raises(InvalidInputError, match="single_writer must be a bool"):
        resolve(f"{tmp_path}/ck", {"single_writer": 1})


def test_job_wide_names_ignore_spelling_but_not_symlinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    absolute = f"{tmp_path}/ck"
    for spelling in ("ck", "ck/", f"file://{absolute}", f"{tmp_path}/x/../ck"):
        assert job_wide_name(spelling) == absolute
    assert job_wide_name("s3a://b//run/ck/") == "s3://b/run/ck"
    assert job_wide_name("gcs://b/run/ck") == "gs://b/run/ck"
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    # Hosts may mount one store at different real paths: keep what was written.
    assert job_wide_name(f"{tmp_path}/link/ck") == f"{tmp_path}/link/ck"
