"""The GCS backend passes the conformance suite against a real fake-gcs-server."""

from __future__ import annotations

import pytest

from partialstore.testing.conformance import BackendConformance


class TestGCSBackend(BackendConformance):
    @pytest.fixture
    def backend_url(self, gcs_url: tuple[str, dict]) -> tuple[str, dict]:
        return gcs_url
