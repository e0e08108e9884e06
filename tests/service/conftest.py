"""Fixtures for the API tests: a real Redis (db 11 of $REDIS_URL), apps built per test, a fake worker, a live
uvicorn server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from scripts.processes import free_port, stop_process
from service.app import create_app
from service.config import Settings
from tests.conftest import flushed_database
from tests.service.fakeworker import BackgroundWorker, FakeWorker

REPO = Path(__file__).resolve().parents[2]
TEST_DB = 11


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = _with_db(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), TEST_DB)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"the API tests need Redis at {url} (run them through `make test`): {exc}")
    return url


@pytest.fixture(autouse=True)
def _no_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apps built in tests see only the settings the test passes (not API_KEYS etc. of the shell)."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the test db, emptied before and after each test."""
    yield from flushed_database(redis_url)


@pytest.fixture
def make_settings(redis_url: str) -> Callable[..., Settings]:
    def make(**overrides) -> Settings:
        return Settings(**{"redis_url": redis_url, **overrides})

    return make


@pytest.fixture
def make_client(conn: redis.Redis, make_settings) -> Iterator[Callable[..., TestClient]]:
    """Builds a TestClient on a fresh app with the given setting overrides."""
    clients = []

    def make(**overrides) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


@pytest.fixture
def fake_worker(conn: redis.Redis) -> FakeWorker:
    """A fake worker on the default queue; call ``.drain()`` to run what is queued."""
    return FakeWorker(conn)


class LiveServer:
    """``python -m service`` in a subprocess, as deployed; its output goes to ``log_path`` when given."""

    def __init__(self, redis_url: str, env: dict[str, str] | None = None, log_path: Path | None = None,
                 log_level: str = "warning", start_timeout_s: float = 90):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path or os.devnull, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", log_level],
            cwd=REPO,
            env={**os.environ, "REDIS_URL": redis_url, "API_KEYS": "", "ADMIN_API_KEYS": "", **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"python -m service did not start on port {self.port}")
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


@pytest.fixture(scope="module")
def live_server(redis_url: str) -> Iterator[LiveServer]:
    server = LiveServer(redis_url)
    yield server
    server.stop()


@pytest.fixture
def background_worker(conn: redis.Redis, redis_url: str) -> Iterator[BackgroundWorker]:
    """A fake worker thread that serves the queue (and publishes its model) for the whole test."""
    with BackgroundWorker(redis_url) as worker:
        yield worker
