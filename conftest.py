"""Names every doctest in ``partialstore/`` and ``backends/`` can use without importing.

The docstring examples run as doctests (``--doctest-modules`` in
``pyproject.toml``); ``np``, ``jax`` and ``json`` are given here so that each
example shows only the call it documents. Everything else an example needs it
imports itself.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict[str, Any]) -> None:
    doctest_namespace.update(np=np, jax=jax, json=json)
