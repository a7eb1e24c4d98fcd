"""Local-disk specifics: path forms, rename publication, self-contained checkpoints."""

from __future__ import annotations

import os
import shutil

import numpy as np

import partialstore


def test_pathlike_and_file_url_name_the_same_checkpoint(tmp_path):
    partialstore.save(tmp_path / "ckpt", {"a": np.arange(5)})
    partialstore.save(f"file://{tmp_path}/ckpt", {"b": 2})
    assert (tmp_path / "ckpt.partial_save").is_dir()
    assert not (tmp_path / "ckpt").exists()  # nothing visible before finalize
    partialstore.finalize(str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt.partial_save").exists()  # renamed, not copied
    loaded = partialstore.load(tmp_path / "ckpt")
    assert loaded["b"] == 2
    np.testing.assert_array_equal(loaded["a"], np.arange(5))


def test_finalize_renames_array_files_in_place(tmp_path):
    partialstore.save(tmp_path / "ckpt", {"w": np.ones((256, 256), np.float32)})
    staged = {
        p.relative_to(tmp_path / "ckpt.partial_save"): os.stat(p).st_ino
        for p in (tmp_path / "ckpt.partial_save" / "data").rglob("*")
        if p.is_file()
    }
    partialstore.finalize(tmp_path / "ckpt")
    for relative, inode in staged.items():
        assert os.stat(tmp_path / "ckpt" / relative).st_ino == inode  # same file, not a copy


def test_finalized_checkpoint_is_self_contained(tmp_path):
    values = np.random.default_rng(0).standard_normal((100, 100))
    partialstore.save(tmp_path / "a" / "ckpt", {"w": values, "s": "x"})
    partialstore.finalize(tmp_path / "a" / "ckpt")
    shutil.copytree(tmp_path / "a" / "ckpt", tmp_path / "b" / "moved")
    shutil.rmtree(tmp_path / "a")
    loaded = partialstore.load(tmp_path / "b" / "moved")
    np.testing.assert_array_equal(loaded["w"], values)
    assert loaded["s"] == "x"


def test_arrays_are_plain_zarr3_readable_by_tensorstore(tmp_path):
    import tensorstore as ts

    values = np.arange(512 * 1024, dtype=np.int32).reshape(512, 1024)  # above the pack limit
    partialstore.save(tmp_path / "ckpt", {"w": values})
    partialstore.finalize(tmp_path / "ckpt")
    arrays = [p.parent for p in (tmp_path / "ckpt" / "data").rglob("zarr.json")]
    assert len(arrays) == 1
    opened = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(arrays[0])}})
    np.testing.assert_array_equal(opened.result().read().result(), values)
