"""Every answer is true: outcomes checked against what is stored.

The fault matrix (``test_fault_matrix.py``) injects lost responses, errors
and hangs; these are the deterministic cases that need no fault: a path that
a file occupies, a finalize called again, and writers interleaved at chosen
points.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore._pytree.keypaths import MAX_DEPTH
from partialstore.testing.faulty_backend import BackendFault, before, call, install_faulty


def test_a_file_at_the_path_is_refused_before_the_seal(tmp_path: Path) -> None:
    (tmp_path / "ck").write_text("not a checkpoint")
    path = str(tmp_path / "ck")
    partialstore.save(path, {"a": 1})  # the session lives at ck.partial_save
    with pytest.raises(FileExistsError, match="not a partialstore checkpoint"):
        partialstore.finalize(path)
    # The session was not sealed, so it still takes saves and can be published
    # once the path is free.
    partialstore.save(path, {"b": 2})
    (tmp_path / "ck").unlink()
    partialstore.finalize(path)
    assert partialstore.load(path) == {"a": 1, "b": 2}


def test_a_file_at_the_path_fails_the_first_save_without_rename(tmp_path: Path) -> None:
    (tmp_path / "ck").write_text("not a checkpoint")
    path = f"local://{tmp_path / 'ck'}"  # no rename: the session lives at ck/ itself
    with pytest.raises(OSError, match="cannot both exist"):
        partialstore.save(path, {"a": 1})
    assert (tmp_path / "ck").read_text() == "not a checkpoint"


def test_a_second_finalize_after_success_raises_as_orbax_does(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    partialstore.save(path, {"a": 1})
    partialstore.finalize(path)
    with pytest.raises(FileExistsError, match="already exists"):
        partialstore.finalize(path)


def test_a_refused_save_says_so_even_when_its_cleanup_fails() -> None:
    inner = f"memory://{uuid.uuid4().hex}"
    url, faulty = install_faulty(inner)
    partialstore.save(f"{url}/ck", {"a": 1})
    # Just before the second save's record, another writer finalizes the session...
    faulty.add(
        BackendFault(
            call(lambda _: partialstore.finalize(f"{inner}/ck"), when="before"),
            method="create",
            key=r"^ck[^/]*/log/",
        )
    )
    # ... and the store then refuses every delete, so the save cannot clean up.
    faulty.add(BackendFault(before(), method="delete_prefix", times=None))
    with pytest.raises(FileExistsError) as refused:
        partialstore.save(f"{url}/ck", {"b": np.arange(3)})
    assert any("gc removes it" in note for note in refused.value.__notes__)
    assert partialstore.load(f"{inner}/ck") == {"a": 1}


def test_custom_metadata_nested_past_the_depth_limit_is_refused(tmp_path: Path) -> None:
    deep: dict[str, Any] = {}
    for _ in range(MAX_DEPTH + 1):
        deep = {"k": deep}
    with pytest.raises(ValueError, match="nests more than"):
        partialstore.save(str(tmp_path / "ck"), {"a": 1}, custom_metadata=deep)
    with pytest.raises(FileNotFoundError):  # nothing was written
        partialstore.discard(str(tmp_path / "ck"))
