"""Admission waits for a replica: with a replica attached, a 202 means the job is on two nodes (Redis WAIT); when
the replica does not acknowledge in time, the job is withdrawn and the answer is 503. Real primary and replica
processes; the app is built per test."""

from __future__ import annotations

import signal

import pytest
import redis
from fastapi.testclient import TestClient
from rq.job import Job

from facegen.contract import spec
from scripts.redisctl import RedisServer
from service.app import create_app
from service.config import Settings
from tests.reliability.conftest import wait_for

BODY = {"label": "smiling", "count": 1}


@pytest.fixture(scope="module")
def pair():
    primary = RedisServer().start()
    replica = RedisServer(replica_of=primary.port).start()
    try:
        wait_for(primary.replicas_acknowledge, 30, "the replica to acknowledge writes")
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


@pytest.fixture
def paused(pair):
    """The replica stops answering (SIGSTOP) but stays connected: the primary still counts it."""
    _, replica = pair
    replica.process.send_signal(signal.SIGSTOP)
    yield
    replica.process.send_signal(signal.SIGCONT)


def client_for(primary: RedisServer, **settings) -> TestClient:
    return TestClient(create_app(Settings(redis_url=primary.url, redis_timeout_s=0.5, **settings)))


def test_an_accepted_job_is_already_on_the_replica(pair) -> None:
    primary, replica = pair
    with client_for(primary) as client:
        response = client.post("/generate", json=BODY)
    assert response.status_code == 202, response.text
    job_key = Job.key_for(response.json()["job_id"])
    assert redis.Redis.from_url(replica.url).exists(job_key)  # WAIT returned: no polling needed


def test_a_job_no_replica_acknowledges_is_withdrawn_and_refused(pair, paused) -> None:
    primary, _ = pair
    conn = redis.Redis.from_url(primary.url)

    def jobs_left() -> tuple[int, set[bytes]]:
        return conn.llen(f"rq:queue:{spec.DEFAULT_QUEUE}"), set(conn.scan_iter("rq:job:*"))

    before = jobs_left()
    with client_for(primary) as client:
        response = client.post("/generate", json=BODY)
        metrics = client.get("/metrics").text
    assert response.status_code == 503, response.text
    assert "Retry-After" in response.headers
    assert jobs_left() == before  # neither queued nor stored
    assert 'facegen_api_jobs_rejected_total{reason="not_replicated"} 1.0' in metrics


def test_without_min_replicas_ack_admission_does_not_wait(pair, paused) -> None:
    primary, _ = pair
    with client_for(primary, redis_min_replicas_ack=0) as client:
        assert client.post("/generate", json=BODY).status_code == 202
