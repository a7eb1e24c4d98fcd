"""Storage options given once (``partialstore.configure_storage``), issue 11 item 6.

Each test configures a prefix, then calls with only the path; the emulator's
own environment variables (which would reach the server without any option)
are removed for the test, so only the configured options can reach it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import partialstore
from partialstore import registry
from partialstore._commit.location import resolve
from partialstore.errors import InvalidInputError

BackendUrl = tuple[str, dict[str, Any]]


@pytest.fixture
def configured() -> Iterator[list[str]]:
    """Prefixes the test configures; all removed afterwards."""
    prefixes: list[str] = []
    yield prefixes
    for prefix in prefixes:
        partialstore.configure_storage(prefix, None)


def _configure(configured: list[str], prefix: str, options: dict[str, Any] | None) -> None:
    partialstore.configure_storage(prefix, options)
    configured.append(prefix)


def _round_trip_with_only_the_path(path: str) -> None:
    w = np.arange(6, dtype=np.float32)
    partialstore.save(path, {"params": {"w": w}})
    partialstore.save_async(path, {"step": 3}).result()
    partialstore.finalize(path)
    loaded = partialstore.load(path)
    np.testing.assert_array_equal(loaded["params"]["w"], w)
    assert loaded["step"] == 3
    assert partialstore.metadata(path).tree["params"]["w"].shape == (6,)


def test_s3_configured_once_then_only_the_path(
    s3_url: BackendUrl, configured: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, options = s3_url
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    _configure(configured, url, options)
    path = f"{url}/ckpt"
    assert resolve(path).key is not None
    assert registry.configured_options(path)["endpoint_url"] == options["endpoint_url"]
    _round_trip_with_only_the_path(path)


def test_gcs_configured_once_then_only_the_path(
    gcs_url: BackendUrl, configured: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, options = gcs_url
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    bucket = url.split("/")[2]
    _configure(configured, f"gcs://{bucket}", options)  # another spelling of gs://
    _round_trip_with_only_the_path(f"{url}/ckpt")


def test_layers_merge_protocol_first_then_longer_prefixes_then_the_call(
    configured: list[str],
) -> None:
    _configure(configured, "s3", {"retries": 1, "client_kwargs": {"region_name": "a"}})
    _configure(configured, "s3://bkt", {"deadline": 5, "retries": 2})
    _configure(configured, "s3a://bkt/runs/", {"retries": 3})
    merged = registry.configured_options(
        "s3://bkt/runs/step_1", {"client_kwargs": {"verify": False}}
    )
    assert merged == {
        "retries": 3,
        "deadline": 5,
        "client_kwargs": {"region_name": "a", "verify": False},
    }
    # A per-call option wins over every configured one.
    assert registry.configured_options("s3://bkt/runs/x", {"retries": 9})["retries"] == 9
    # Prefixes match whole path components only, and only their own store.
    assert registry.configured_options("s3://bkt/runs2/x")["retries"] == 2
    assert registry.configured_options("s3://other/x")["retries"] == 1
    assert registry.configured_options("gs://bkt/runs/x") == {}


def test_none_removes_an_entry(configured: list[str]) -> None:
    _configure(configured, "s3://bkt", {"retries": 2})
    partialstore.configure_storage("s3://bkt/", None)
    assert registry.configured_options("s3://bkt/x") == {}


@pytest.mark.parametrize(
    ("prefix", "options", "suggestion"),
    [
        ("s3://bkt/runs", {"endpont_url": "http://127.0.0.1:1"}, "endpoint_url"),
        ("gs", {"projet": "p"}, "project"),
        ("memory", {"single_writter": True}, "single_writer"),
    ],
)
def test_a_mistyped_option_is_refused_at_configure_time(
    prefix: str, options: dict[str, Any], suggestion: str, configured: list[str]
) -> None:
    with pytest.raises(InvalidInputError, match=f"Did you mean '{suggestion}'"):
        partialstore.configure_storage(prefix, options)
    assert registry.configured_options(f"{prefix}/x" if "://" in prefix else "s3://b/x") == {}


def test_local_prefix_takes_single_writer_only(tmp_path: Path, configured: list[str]) -> None:
    with pytest.raises(InvalidInputError, match="Did you mean 'single_writer'"):
        partialstore.configure_storage(str(tmp_path), {"single_writr": True})
    _configure(configured, f"file://{tmp_path}", {"single_writer": True})
    assert registry.configured_options(str(tmp_path / "ckpt")) == {"single_writer": True}
    _round_trip_with_only_the_path(str(tmp_path / "ckpt"))


def test_bad_prefixes_are_refused() -> None:
    for prefix in ("", "s 3"):
        with pytest.raises(InvalidInputError, match="configure_storage"):
            partialstore.configure_storage(prefix, {})
