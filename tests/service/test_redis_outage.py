"""Redis stops: the API answers 503 (JSON, Retry-After), stays alive, and recovers by itself when Redis is back."""

from __future__ import annotations

import pytest
import redis
from fastapi.testclient import TestClient

from scripts.redisctl import RedisServer
from service.app import create_app
from service.config import Settings
from tests.service.fakeworker import publish_model


@pytest.fixture
def private_redis():
    server = RedisServer().start()
    yield server
    server.stop()


def test_503_while_redis_is_down_then_recovery(private_redis):
    # readyz_cache_s=0: /readyz checks on every call, so it sees the outage and the recovery at once
    app = create_app(Settings(redis_url=private_redis.url, redis_timeout_s=1.0, retry_after_s=3, readyz_cache_s=0))
    with TestClient(app) as client:
        accepted = client.post("/generate", json={"label": "smiling"})
        assert accepted.status_code == 202
        job_id = accepted.json()["job_id"]

        private_redis.stop()
        for method, path in (("POST", "/generate"), ("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/result"),
                             ("DELETE", f"/jobs/{job_id}"), ("GET", "/models")):
            response = client.request(method, path, json={"label": "smiling"} if method == "POST" else None)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["Retry-After"] == "3"
            assert "Redis" in response.json()["detail"]
            assert "Traceback" not in response.text and "Error" not in response.json()["detail"]
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is False
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert "facegen_redis_up 0.0" in metrics.text
        assert 'facegen_api_jobs_rejected_total{reason="redis_unavailable"} 1.0' in metrics.text

        # Same port, fresh (empty) server: the same app reconnects without a restart.
        restarted = RedisServer(port=private_redis.port, workdir=private_redis.workdir).start()
        try:
            assert client.post("/generate", json={"label": "smiling"}).status_code == 202
            assert client.get(f"/jobs/{job_id}").status_code == 404  # that Redis lost its data
            with redis.Redis.from_url(restarted.url) as restarted_conn:
                publish_model(restarted_conn)
            assert client.get("/readyz").status_code == 200
        finally:
            restarted.stop()
