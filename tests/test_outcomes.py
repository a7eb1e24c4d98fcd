"""Every answer is true: outcomes checked against what is stored.

The fault matrix (``test_fault_matrix.py``) injects lost responses, errors
and hangs; these are the deterministic cases that need no fault: a path that
a file occupies, a finalize called again, and writers interleaved at chosen
points.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import partialstore


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
