"""The S3 backend passes the conformance suite against a real moto server."""

from __future__ import annotations

import pytest

from partialstore.testing.conformance import BackendConformance


class TestS3Backend(BackendConformance):
    @pytest.fixture
    def backend_url(self, s3_url: tuple[str, dict]) -> tuple[str, dict]:
        return s3_url
