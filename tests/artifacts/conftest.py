"""A SeaweedFS S3 server per test module (scripts/s3ctl.py), and settings pointing at it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from facegen.contract.artifacts import ArtifactSettings
from scripts.s3ctl import S3Server


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_settings(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> ArtifactSettings:
    """The artifact settings the API and the worker would read with the server's environment."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return ArtifactSettings()
