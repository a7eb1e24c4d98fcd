"""Names every doctest in ``partialstore/`` and ``backends/`` can use without importing.

The docstring examples run as doctests (``--doctest-modules`` in
``pyproject.toml``). ``np``, ``jax`` and ``json`` are given here so that each
example shows only the call it documents, and ``tmp_dir`` is a fresh empty
directory (pytest's ``tmp_path``) for examples that write local files.
Everything else an example needs it imports itself.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import pytest
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctest_names(request: pytest.FixtureRequest, doctest_namespace: dict[str, Any]) -> None:
    if isinstance(request.node, DoctestItem):
        tmp_path = request.getfixturevalue("tmp_path")
        doctest_namespace.update(np=np, jax=jax, json=json, tmp_dir=str(tmp_path))
