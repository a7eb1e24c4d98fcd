"""CheckpointManager on every store: steps, the run index, retention, sessions, arguments.

Parametrized over local disk, memory, S3 (moto) and GCS (fake-gcs-server).
Faults and observations of call order go through
:mod:`partialstore.testing.faulty_backend` (a wrapper of a real backend at
the contract); request counts through the HTTP fault proxy in front of the
emulators. Kill-and-resume is in tests/test_manager_resume.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore import CheckpointManager, SessionInfo
from partialstore._lifecycle.indexformat import INDEX_KEY
from partialstore._runtime.aio import run
from partialstore.errors import (
    CheckpointFinalizedError,
    InvalidInputError,
    NotFoundError,
    TransientBackendError,
)
from partialstore.testing.faulty_backend import BackendFault, before, call, install_faulty

Root = tuple[str, dict[str, Any]]
STORES = ("local", "memory", "s3", "gcs")


@pytest.fixture(params=STORES)
def run_root(request: pytest.FixtureRequest, tmp_path: Path) -> Root:
    """``(root URL, storage_options)`` of a fresh run on each store in turn."""
    if request.param == "local":
        return str(tmp_path / "run"), {}
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}/run", {}
    return request.getfixturevalue(f"{request.param}_url")


def _state(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((16, 8)).astype(np.float32), "b": np.arange(step + 1)}


def _same(a: Any, b: Any) -> bool:
    return all(
        np.asarray(a[k]).dtype == np.asarray(b[k]).dtype
        and np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes()
        for k in ("w", "b")
    )


def _keys(root: str, options: dict[str, Any], prefix: str) -> list[str]:
    backend = partialstore.open_backend(root, options)
    return run(backend.list(prefix))


def _finalize_steps(manager: CheckpointManager, steps: list[int], **metadata: Any) -> None:
    for step in steps:
        manager.save(step, {"w": _state(step)["w"]})
        custom = {name: value(step) for name, value in metadata.items()}
        manager.save_async(step, {"b": _state(step)["b"]}, custom_metadata=custom or None)
        manager.finalize(step)


def test_save_finalize_latest_load(run_root: Root) -> None:
    root, options = run_root
    with CheckpointManager(root, storage_options=options) as manager:
        assert manager.latest_step() is None and manager.steps() == []
        _finalize_steps(manager, [0, 5, 10], loss=lambda s: 1.0 / (s + 1))
        manager.save(20, {"w": np.zeros(3)})  # an open session: never reported
        assert manager.latest_step() == 10
        assert manager.steps() == [0, 5, 10]
        assert _same(manager.load(), _state(10))
        assert _same(manager.load(5), _state(5))
        assert list(manager.load(select=["b"])) == ["b"]
        assert manager.metadata(0).custom_metadata == {"loss": 1.0}
        assert manager.path(5) == f"{root}/step_00000005"
        # The checkpoints are ordinary ones: the plain functions read them.
        assert _same(partialstore.load(manager.path(5), storage_options=options), _state(5))
        with pytest.raises(CheckpointFinalizedError):
            manager.save(5, {"w": np.ones(2)})
        with pytest.raises(NotFoundError):
            manager.load(7)
    # A second manager (another job) sees the same run.
    with CheckpointManager(root, storage_options=options) as other:
        assert other.latest_step() == 10 and other.steps() == [0, 5, 10]
        assert [s.step for s in other.sessions()] == [20]


def test_arguments_are_checked(tmp_path: Path) -> None:
    root = str(tmp_path)
    bad: list[dict[str, Any]] = [
        {"keep_best": ("loss", "lowest", 2)},
        {"keep_best": ("loss", "min")},
        {"keep_best": ("", "min", 1)},
        {"keep_best": ("loss", "min", 0)},
        {"keep_last": 0},
        {"keep_last": True},
        {"keep_every": -2},
        {"step_format": "checkpoint"},
        {"step_format": "{step}/{step}"},
        {"step_format": "a/{step}"},
        {"step_format": "{epoch}_{step}"},
        {"step_format": "{step:x}"},
        {"step_format": "{step}.partial_save"},
        {"storage_options": ["endpoint_url"]},
    ]
    for kwargs in bad:
        with pytest.raises(InvalidInputError):
            CheckpointManager(root, **kwargs)
    with pytest.raises(InvalidInputError):
        CheckpointManager("")
    manager = CheckpointManager(root, step_format="ckpt-{step}")
    for call_bad in (
        lambda: manager.save(-1, {"a": 1}),
        lambda: manager.finalize(True),  # type: ignore[arg-type]
        lambda: manager.load(1, select=["a"], target={"a": 1}),
        lambda: manager.sweep(-1),
        lambda: manager.delete_step(-3),
        lambda: manager.wait_for_step(-1, timeout=0),
        lambda: manager.reached_preemption(-1),
    ):
        with pytest.raises(InvalidInputError):
            call_bad()
    with pytest.raises(NotFoundError):
        manager.load()  # no step yet
    manager.close()
    with pytest.raises(InvalidInputError, match="closed"):
        manager.latest_step()


def test_retention_keeps_what_the_rules_keep(run_root: Root) -> None:
    root, options = run_root
    with CheckpointManager(
        root, storage_options=options, keep_last=2, keep_every=4, keep_best=("loss", "min", 1)
    ) as manager:
        manager.save(3, {"open": np.ones(4)})  # an open session below the kept steps
        # step 1 has the best loss; 0, 4 and 8 are multiples of 4; 8 and 9 the last two.
        losses = {0: 5.0, 1: 0.1, 2: 3.0, 5: 2.0, 6: 4.0, 7: 1.0, 8: 6.0, 9: 7.0}
        _finalize_steps(manager, [0, 1, 2, 4, 5, 6, 7, 8, 9], loss=lambda s: losses.get(s, 9.0))
        manager.wait()
        assert manager.steps() == [0, 1, 4, 8, 9]
        assert manager.latest_step() == 9
        for step in (2, 5, 6, 7):
            assert _keys(root, options, f"step_{step:08d}") == []  # every object is gone
        assert [s.step for s in manager.sessions()] == [3]  # never a session
        for step in (0, 1, 4, 8, 9):
            assert _same(manager.load(step), _state(step))


def test_retention_never_deletes_the_latest_step(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_best=("acc", "max", 1)) as manager:
        _finalize_steps(manager, [1, 2, 3], acc=lambda s: {1: 0.9, 2: 0.5, 3: 0.1}[s])
        manager.wait()
        assert manager.steps() == [1, 3]  # 1 is the best, 3 the latest


def test_the_index_forgets_a_step_before_its_data_is_deleted() -> None:
    url, faulty = install_faulty(f"memory://{uuid.uuid4().hex}")
    seen: list[list[int]] = []

    async def look(record: Any) -> None:
        body = json.loads(await faulty.inner.read(INDEX_KEY))
        seen.append(body["steps"])

    faulty.add(
        BackendFault(call(look), method=("delete", "delete_prefix"), key="step_", times=None)
    )
    with CheckpointManager(url, keep_last=1) as manager:
        _finalize_steps(manager, [1, 2])
        manager.wait()
        assert manager.steps() == [2]
    assert seen and all(steps == [2] for steps in seen)  # step 1 was out of the index first
    deletes = [r.key for r in faulty.calls("delete")]
    assert deletes[0] == "step_00000001/partialstore.json"  # the manifest goes first


def test_delete_step(run_root: Root) -> None:
    root, options = run_root
    with CheckpointManager(root, storage_options=options) as manager:
        _finalize_steps(manager, [1, 2, 3])
        manager.save(4, {"w": np.ones(2)})
        with pytest.raises(InvalidInputError, match="latest"):
            manager.delete_step(3)
        with pytest.raises(NotFoundError, match="sweep"):
            manager.delete_step(4)  # a session, not a finalized step
        manager.delete_step(1)
        assert manager.steps() == [2, 3]
        assert _keys(root, options, "step_00000001") == []
        manager.delete_step(3, force=True)
        assert manager.latest_step() == 2
        with pytest.raises(NotFoundError):
            manager.delete_step(3)


def test_sessions_and_sweep(run_root: Root) -> None:
    root, options = run_root
    with CheckpointManager(root, storage_options=options) as manager:
        _finalize_steps(manager, [1])
        manager.save(2, {"w": np.zeros((4, 4), np.float32)})
        manager.save(2, {"b": np.zeros(8, np.int64), "n": 3})
        (info,) = manager.sessions()
        assert isinstance(info, SessionInfo)
        assert (info.step, info.saves, info.nbytes, info.sealed) == (2, 2, 64 + 64, False)
        assert info.path == manager.path(2) and 0 <= info.age_s < 120
        assert manager.sweep(older_than_s=3600) == []  # not idle long enough
        assert [s.step for s in manager.sweep(older_than_s=0)] == [2]
        assert manager.sessions() == []
        with pytest.raises(FileNotFoundError):
            partialstore.finalize(manager.path(2), storage_options=options)
        assert manager.steps() == [1]  # sweep never touches a finalized step


def test_a_kill_between_finalize_and_the_index_hides_no_step() -> None:
    """The index write after a published finalize fails (as if killed): the step still counts."""
    url, faulty = install_faulty(f"memory://{uuid.uuid4().hex}")
    with CheckpointManager(url) as manager:
        _finalize_steps(manager, [1])
        manager.save(2, {"w": np.ones(3)})
        # The intent's write goes through; every later index write fails.
        faulty.add(BackendFault(before(), method="write", key=INDEX_KEY, skip=1, times=None))
        with pytest.raises(TransientBackendError):
            manager.finalize(2)  # published, then the index update failed
        faulty.clear()
        assert partialstore.load(f"{url}/step_00000002")["w"].tolist() == [1.0, 1.0, 1.0]
        index = json.loads(run(faulty.inner.read(INDEX_KEY)))
        assert (index["steps"], index["pending"]) == ([1], [2])
    with CheckpointManager(url, keep_last=1) as restarted:
        assert restarted.latest_step() == 2  # the intent sends the reader to check step 2
        assert restarted.steps() == [1, 2]
        _finalize_steps(restarted, [3])
        restarted.wait()
        assert restarted.steps() == [3]


def test_a_missing_or_damaged_index_is_rebuilt(run_root: Root) -> None:
    root, options = run_root
    backend = partialstore.open_backend(root, options)
    with CheckpointManager(root, storage_options=options) as manager:
        _finalize_steps(manager, [2, 4])
        manager.save(6, {"w": np.ones(2)})
        run(backend.delete(INDEX_KEY))
        assert manager.latest_step() == 4 and manager.steps() == [2, 4]
        run(backend.write(INDEX_KEY, b'{"format": "partialstore.run", "version": 1, "steps": 3}'))
        assert manager.latest_step() == 4
        _finalize_steps(manager, [6])  # the next update replaces the damaged index
        assert json.loads(run(backend.read(INDEX_KEY)))["steps"] == [2, 4, 6]
        # Steps written without a manager join with reindex().
        partialstore.save(f"{root}/step_00000009", {"a": 1}, storage_options=options)
        partialstore.finalize(f"{root}/step_00000009", storage_options=options)
        assert manager.latest_step() == 6
        assert manager.reindex() == [2, 4, 6, 9]
        assert manager.latest_step() == 9


def test_two_managers_on_one_root_stay_consistent(run_root: Root) -> None:
    """Two jobs finalize steps at once, and an evaluator follows them."""
    root, options = run_root
    a = CheckpointManager(root, storage_options=options)
    b = CheckpointManager(root, storage_options=options)
    evaluator = CheckpointManager(root, storage_options=options)
    seen: list[int] = []

    def follow() -> None:
        latest = None
        while latest != 9:
            latest = evaluator.wait_for_step(latest, timeout=60)
            seen.append(latest)

    follower = threading.Thread(target=follow)
    follower.start()
    workers = [
        threading.Thread(target=_finalize_steps, args=(a, [0, 2, 4, 6, 8])),
        threading.Thread(target=_finalize_steps, args=(b, [1, 3, 5, 7, 9])),
    ]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    follower.join(timeout=60)
    assert not follower.is_alive()
    for manager in (a, b, evaluator):
        assert manager.steps() == list(range(10)) and manager.latest_step() == 9
        manager.close()
    assert seen == sorted(seen) and seen[-1] == 9
    for step in seen:
        assert _same(
            partialstore.load(f"{root}/step_{step:08d}", storage_options=options), _state(step)
        )


def test_wait_for_step_times_out(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        with pytest.raises(TimeoutError, match=r"within 0\.2 s"):
            manager.wait_for_step(timeout=0.2)
        _finalize_steps(manager, [3])
        assert manager.wait_for_step(timeout=1) == 3
        with pytest.raises(TimeoutError):
            manager.wait_for_step(3, timeout=0.1)


def test_latest_step_takes_a_few_requests_whatever_the_number_of_steps(proxied_url: Any) -> None:
    root, options, proxy = proxied_url.url, proxied_url.options, proxied_url.proxy
    counts = []
    with CheckpointManager(root, storage_options=options) as manager:
        for steps in ([0, 1], [2, 3, 4, 5, 6, 7]):
            _finalize_steps(manager, steps)
            proxy.wait_idle()
            proxy.reset_log()
            assert manager.latest_step() == steps[-1]
            proxy.wait_idle()
            requests = proxy.requests()
            counts.append(len(requests))
            assert all(r.method == "GET" for r in requests)
            assert not any("list-type" in r.query or "prefix" in r.query for r in requests)
    assert counts[0] == counts[1] <= 3


def test_a_finalize_without_a_session_leaves_no_intent(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        _finalize_steps(manager, [1])
        with pytest.raises(FileNotFoundError):
            manager.finalize(2)
        index = json.loads((tmp_path / INDEX_KEY).read_text())
        assert (index["steps"], index["pending"]) == ([1], [])


def test_a_store_without_compare_and_swap_lists_instead(tmp_path: Path) -> None:
    """The generic fsspec backend has no compare-and-swap: no index is stored, and every
    answer comes from listing the root and checking manifests."""
    root = "local://" + str(tmp_path / "run")
    with CheckpointManager(root, keep_last=2) as manager:
        manager.save(9, {"open": 1})
        _finalize_steps(manager, [1, 2, 3])
        manager.wait()
        assert manager.steps() == [2, 3] and manager.latest_step() == 3
        assert _same(manager.load(), _state(3))
        assert [s.step for s in manager.sessions()] == [9]
    assert not (tmp_path / "run" / INDEX_KEY).exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "step_00000002",
        "step_00000003",
        "step_00000009",
    ]


@pytest.mark.parametrize("inner", ["memory", "local"])
def test_index_updates_survive_lost_answers(inner: str, tmp_path: Path) -> None:
    """Index writes that land but whose answer is lost (or that fail before landing) are
    resolved by reading the index again: every step is recorded once, none is lost."""
    from partialstore.testing.faulty_backend import after, after_as_retry

    base = f"memory://{uuid.uuid4().hex}" if inner == "memory" else str(tmp_path / "run")
    url, faulty = install_faulty(base)
    faulty.add(BackendFault(after_as_retry(), method="create", key=INDEX_KEY))
    faulty.add(BackendFault(after(), method="write", key=INDEX_KEY, skip=1, times=2))
    faulty.add(BackendFault(before(), method="write", key=INDEX_KEY, skip=4, times=1))
    with CheckpointManager(url, keep_last=2) as manager:
        _finalize_steps(manager, [1, 2, 3, 4])
        manager.wait()
        assert manager.steps() == [3, 4]
    faulty.clear()
    index = json.loads(run(faulty.inner.read(INDEX_KEY)))
    assert (index["steps"], index["pending"], index["deleting"]) == ([3, 4], [], [])
    writes = faulty.calls("write", key=INDEX_KEY)
    assert [r.outcome for r in writes if r.faults] == ["error"] * 3
    # The only other failures allowed are lost compare-and-swaps: retention's background
    # index update may race the next finalize's, and the loser reads the index again.
    assert {r.error for r in writes if not r.faults and r.outcome == "error"} <= {"ConflictError"}


def test_retention_on_s3_deletes_in_batches(proxied_s3_url: Any) -> None:
    """A retained step's objects go in DeleteObjects batches: one single DELETE (its
    manifest, first) and one batch for 200 more objects."""
    root, options, proxy = proxied_s3_url.url, proxied_s3_url.options, proxied_s3_url.proxy
    backend = partialstore.open_backend(root, options)

    async def fill() -> None:
        await asyncio.gather(
            *(backend.write(f"step_00000001/data/extra/{n:04d}", b"x") for n in range(200))
        )

    with CheckpointManager(root, storage_options=options, keep_last=1) as manager:
        _finalize_steps(manager, [1])
        run(fill())
        manager.save(2, {"w": np.ones(2)})
        proxy.wait_idle()
        proxy.reset_log()
        manager.finalize(2)
        manager.wait()
        proxy.wait_idle()
        deletes = proxy.requests("DELETE")
        batches = [r for r in proxy.requests("POST") if "delete" in r.query]
        assert len(deletes) == 1
        assert deletes[0].key == "root/step_00000001/partialstore.json"
        assert len(batches) == 1
    assert _keys(root, options, "step_00000001") == []


def test_keep_best_metrics_read_once_are_kept_in_the_index(tmp_path: Path) -> None:
    """After the index is lost, a retention pass reads each step's metric from its manifest
    once and records it, so the index again holds every kept step's metric."""
    losses = {1: 0.3, 2: 0.1, 3: 0.5, 4: 0.4, 5: 0.9}
    with CheckpointManager(tmp_path, keep_best=("loss", "min", 2)) as manager:
        _finalize_steps(manager, [1, 2, 3], loss=losses.get)
        manager.wait()
        assert manager.steps() == [1, 2, 3]
        (tmp_path / INDEX_KEY).unlink()
        _finalize_steps(manager, [4, 5], loss=losses.get)
        manager.wait()
        assert manager.steps() == [1, 2, 5]  # the best two, and the latest
    index = json.loads((tmp_path / INDEX_KEY).read_text())
    assert index["metrics"] == {"loss": {"1": 0.3, "2": 0.1, "5": 0.9}}
