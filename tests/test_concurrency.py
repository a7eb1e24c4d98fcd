"""Many writers on one checkpoint path: separate processes, and threads of one process.

The rules under test (issue 3): separate processes may save to one path
concurrently, and every save that returned is in the checkpoint (or it
raised); of concurrent finalizers exactly one succeeds and the others get
``FileExistsError``; a save that loses the race against a finalize raises
``FileExistsError`` and is then not in the checkpoint, so none is lost
silently. Inside one process, ``save_async`` calls run in call order,
``finalize`` waits for them, and the caller may mutate its arrays as soon
as ``save_async`` returns.

Workers are real processes (``tests/_workers.py``, forked from a preloaded
fork server) that start together on a go file, on local disk, S3 (moto), GCS
(fake-gcs-server) and the generic fsspec backend. The memory backend lives
inside one process, so it gets the in-process variants only (which run on
every backend). Arrays that matter for tearing span several chunks.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from _workers import (
    Child,
    assert_same_bits,
    assert_state,
    make_array,
    make_state,
    read_stored_json,
    stored_chunks,
)

import partialstore
from partialstore._arrays import arrays

# Backends reachable from several processes.
MULTI_PROCESS = ("local", "s3", "gcs", "fsspec")
WRITERS = 4
SHARED_SHAPE = (512, 1024)  # float32: 2 MiB, 4 chunks of CHUNK_BYTES: a torn value would show
# Lowered from arrays.py's 16 MiB so a 2 MiB array spans several chunks.
CHUNK_BYTES = 512 << 10


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saves of this process split arrays into CHUNK_BYTES chunks (workers: ``chunk_bytes``)."""
    monkeypatch.setattr(arrays, "CHUNK_BYTES", CHUNK_BYTES)


@pytest.fixture
def ckpt(any_backend_url: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """(checkpoint path, storage_options) on a fresh root of the backend."""
    root, options = any_backend_url
    return f"{root}/ckpt", options


def start_together(children: list[Child], go_file: Path) -> None:
    """Release workers waiting on ``go_file`` once all of them are ready."""
    for child in children:
        child.wait_for("ready")
    go_file.touch()


def finish(children: list[Child]) -> None:
    """Wait for every worker; each must exit cleanly and report no unexpected error."""
    try:
        for child in children:
            assert child.wait() == 0, child.describe()
            assert not child.tags("error"), child.describe()
    finally:
        for child in children:
            child.close()


def assert_states(loaded: Any, tags: list[str]) -> None:
    for tag in tags:
        assert_state(tag, loaded[tag])


def last_logged_tag(path: str, options: dict[str, Any]) -> str:
    """The ``custom_metadata["shared"]`` of the save with the highest log number.

    Read from the log record itself (the checkpoint keeps its log), not from
    the merged metadata, so the check does not trust the merge it tests.
    """
    return logged_tags(path, options)[-1]


def logged_tags(path: str, options: dict[str, Any]) -> list[str]:
    """``custom_metadata["shared"]`` of every save of the checkpoint, in log order."""
    saves = partialstore.metadata(path, storage_options=options).saves
    logs = [save["log"] for save in saves]
    assert logs == sorted(logs), "metadata().saves is not in log order"
    return [read_stored_json(path, options, log)["custom_metadata"]["shared"] for log in logs]


@pytest.mark.parametrize("any_backend_url", MULTI_PROCESS, indirect=True)
def test_processes_saving_disjoint_keys(ckpt: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    path, options = ckpt
    go = tmp_path / "go"
    children = [
        Child(
            {
                "mode": "save_keys",
                "path": path,
                "options": options,
                "writer": w,
                "count": 3,
                "go_file": str(go),
            }
        )
        for w in range(WRITERS)
    ]
    start_together(children, go)
    finish(children)
    tags = [tag for child in children for tag in child.tags("committed")]
    assert len(tags) == WRITERS * 3

    partialstore.finalize(path, storage_options=options)
    loaded = partialstore.load(path, storage_options=options)
    assert sorted(loaded) == sorted(tags)
    assert_states(loaded, tags)
    assert len(partialstore.metadata(path, storage_options=options).saves) == len(tags)


@pytest.mark.parametrize("any_backend_url", MULTI_PROCESS, indirect=True)
def test_processes_saving_the_same_key(ckpt: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    path, options = ckpt
    go = tmp_path / "go"
    children = [
        Child(
            {
                "mode": "save_keys",
                "path": path,
                "options": options,
                "writer": w,
                "count": 2,
                "shared_shape": SHARED_SHAPE,
                "chunk_bytes": CHUNK_BYTES,
                "go_file": str(go),
            }
        )
        for w in range(WRITERS)
    ]
    start_together(children, go)
    finish(children)
    tags = [tag for child in children for tag in child.tags("committed")]
    assert len(tags) == WRITERS * 2

    partialstore.finalize(path, storage_options=options)
    loaded = partialstore.load(path, storage_options=options)
    assert sorted(loaded) == sorted([*tags, "shared"])
    assert_states(loaded, tags)
    # The value is one written array, whole, and the one of the last save in log order.
    winner = last_logged_tag(path, options)
    assert winner in tags
    assert stored_chunks(path, options, "shared")[0] < SHARED_SHAPE[0]
    assert_same_bits(make_array(f"shared/{winner}", SHARED_SHAPE), loaded["shared"], "shared")
    assert partialstore.metadata(path, storage_options=options).custom_metadata == {
        "shared": winner
    }


@pytest.mark.parametrize("any_backend_url", MULTI_PROCESS, indirect=True)
def test_concurrent_finalizers_one_wins(ckpt: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    path, options = ckpt
    partialstore.save(path, {"A": make_state("A")}, storage_options=options)
    partialstore.save(path, {"B": make_state("B")}, storage_options=options)
    go = tmp_path / "go"
    children = [
        Child({"mode": "finalize", "path": path, "options": options, "go_file": str(go)})
        for _ in range(WRITERS)
    ]
    start_together(children, go)
    finish(children)
    won = [child for child in children if child.tags("committed") == ["finalize"]]
    lost = [child for child in children if child.tags("exists") == ["finalize"]]
    assert (len(won), len(lost)) == (1, WRITERS - 1), [child.lines for child in children]

    loaded = partialstore.load(path, storage_options=options)
    assert sorted(loaded) == ["A", "B"]
    assert_states(loaded, ["A", "B"])
    with pytest.raises(FileExistsError):
        partialstore.finalize(path, storage_options=options)


@pytest.mark.parametrize("any_backend_url", MULTI_PROCESS, indirect=True)
def test_saves_racing_a_finalize(ckpt: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    path, options = ckpt
    go = tmp_path / "go"
    writers = [
        Child(
            {"mode": "save_until_sealed", "path": path, "options": options, "writer": w, "max": 400}
        )
        for w in range(3)
    ]
    finalizer = Child({"mode": "finalize", "path": path, "options": options, "go_file": str(go)})
    # Finalize once every writer has committed twice, so saves are in flight
    # on every side of the seal.
    for writer in writers:
        writer.wait_for("committed", count=2)
    start_together([finalizer], go)
    finish([*writers, finalizer])
    assert finalizer.tags("committed") == ["finalize"], finalizer.describe()

    returned = [tag for w in writers for tag in w.tags("committed")]
    refused = [tag for w in writers for tag in w.tags("exists")]
    # Each writer saved until refused, and was refused exactly once (then stopped).
    assert [len(w.tags("exists")) for w in writers] == [1] * len(writers)
    loaded = partialstore.load(path, storage_options=options)
    assert sorted(loaded) == sorted(returned)  # every returned save, no refused one
    assert not set(refused) & set(loaded)
    assert_states(loaded, returned)


# In-process variants: every backend, memory included.


def test_save_async_runs_in_call_order_and_finalize_waits(
    ckpt: tuple[str, dict[str, Any]], small_chunks: None
) -> None:
    path, options = ckpt
    responses = [
        partialstore.save_async(
            path,
            {"k": make_array(f"k{i}", SHARED_SHAPE), f"only{i}": i},
            custom_metadata={"shared": f"k{i}"},
            storage_options=options,
        )
        for i in range(5)
    ]
    # No result() first: finalize must wait for the queued saves itself.
    partialstore.finalize(path, storage_options=options)
    assert all(response.done() for response in responses)
    for response in responses:
        response.result()

    loaded = partialstore.load(path, storage_options=options)
    assert sorted(loaded) == sorted(["k", *(f"only{i}" for i in range(5))])
    assert [loaded[f"only{i}"] for i in range(5)] == list(range(5))
    # The later call replaced the earlier value of "k", and log order is call order.
    assert_same_bits(make_array("k4", SHARED_SHAPE), loaded["k"], "k")
    assert last_logged_tag(path, options) == "k4"
    assert logged_tags(path, options) == [f"k{i}" for i in range(5)]


def test_save_async_snapshots_before_returning(
    ckpt: tuple[str, dict[str, Any]], small_chunks: None
) -> None:
    path, options = ckpt
    big = make_array("big", SHARED_SHAPE)
    small = make_array("small", (5, 3), "int64")
    state: dict[str, Any] = {"big": big, "nested": {"small": small, "items": [small]}}
    expected_big, expected_small = big.copy(), small.copy()
    response = partialstore.save_async(path, state, storage_options=options)
    # Mutate everything the caller handed over, at once.
    big[...] = 0
    small[...] = -1
    state["late"] = 1
    state["nested"]["items"].append(2)
    response.result()
    partialstore.finalize(path, storage_options=options)

    loaded = partialstore.load(path, storage_options=options)
    assert sorted(loaded) == ["big", "nested"]
    assert_same_bits(expected_big, loaded["big"], "big")
    assert_same_bits(expected_small, loaded["nested"]["small"], "nested/small")
    assert len(loaded["nested"]["items"]) == 1
    assert_same_bits(expected_small, loaded["nested"]["items"][0], "nested/items[0]")


def test_threads_saving_to_one_path(ckpt: tuple[str, dict[str, Any]], small_chunks: None) -> None:
    path, options = ckpt
    barrier = threading.Barrier(WRITERS)
    failures: list[BaseException] = []
    returned: list[str] = []

    def writer(w: int) -> None:
        try:
            barrier.wait(timeout=60)
            for j in range(3):
                tag = f"w{w}_s{j}"
                state = {tag: make_state(tag), "shared": make_array(f"shared/{tag}", SHARED_SHAPE)}
                if j % 2:
                    partialstore.save_async(
                        path, state, custom_metadata={"shared": tag}, storage_options=options
                    ).result()
                else:
                    partialstore.save(
                        path, state, custom_metadata={"shared": tag}, storage_options=options
                    )
                returned.append(tag)
        except BaseException as error:  # surfaced by the main thread below
            failures.append(error)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert len(returned) == WRITERS * 3

    partialstore.finalize(path, storage_options=options)
    loaded = partialstore.load(path, storage_options=options)
    assert sorted(loaded) == sorted([*returned, "shared"])
    assert_states(loaded, returned)
    winner = last_logged_tag(path, options)
    assert_same_bits(make_array(f"shared/{winner}", SHARED_SHAPE), loaded["shared"], "shared")
    assert sorted(logged_tags(path, options)) == sorted(returned)
