"""A worker is SIGKILLed in the middle of a job: the job runs again (at-least-once) and finishes, or, with no
retries left, ends ``failed`` with a clear reason; it is never left ``started``, and the queued jobs all finish."""

from __future__ import annotations

import time

import httpx
import pytest
from rq.job import Job

from facegen.contract.job_serializer import JOB_SERIALIZER
from tests.conftest import redis_url_for_db
from tests.reliability.conftest import WorkerProcess, job_state, wait_ended, wait_for
from tests.service.conftest import LiveServer

REDIS_URL = redis_url_for_db(14)
# A dead worker's job is noticed once its heartbeat (HEARTBEAT_TTL) expires, at the next maintenance pass.
FAST_RECOVERY = {"HEARTBEAT_TTL": "10", "MAINTENANCE_INTERVAL": "1", "MAX_BATCH": "1"}
LONG_JOB = {"label": "smiling", "count": 1, "seed": 3, "sampler": "ddpm", "steps": 1000}
SHORT_JOB = {"label": "not_smiling", "count": 2, "steps": 4}


def submit(url: str, body: dict) -> str:
    response = httpx.post(f"{url}/generate", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def crash_during(server: LiveServer, checkpoints, job_id: str) -> float:
    """Start a worker, wait until it is denoising ``job_id``, then SIGKILL it; returns the time of the kill."""
    first = WorkerProcess(REDIS_URL, checkpoints, **FAST_RECOVERY)
    try:
        wait_for(lambda: (job_state(server.url, job_id).get("progress") or {}).get("step", 0) > 0, 120,
                 "the first worker to start denoising")
    except AssertionError:
        first.stop()
        raise AssertionError(first.output()) from None
    first.kill()
    killed_at = time.monotonic()
    assert job_state(server.url, job_id)["status"] == "started"  # what a dead worker leaves behind
    return killed_at


@pytest.mark.timeout(300)
def test_killed_worker_job_is_retried_and_every_job_finishes(tiny_checkpoints, conn) -> None:
    server = LiveServer(REDIS_URL)
    try:
        crashed = submit(server.url, LONG_JOB)
        queued = [submit(server.url, {**SHORT_JOB, "seed": seed}) for seed in range(3)]
        killed_at = crash_during(server, tiny_checkpoints, crashed)
        second = WorkerProcess(REDIS_URL, tiny_checkpoints, **FAST_RECOVERY)
        try:
            states = wait_ended(server.url, [crashed, *queued], timeout=180)
            recovered_s = time.monotonic() - killed_at
        finally:
            second.stop()
        assert {job_id: state["status"] for job_id, state in states.items()} == dict.fromkeys(
            [crashed, *queued], "finished")
        # ran twice: once killed, once to the end
        assert Job.fetch(crashed, connection=conn, serializer=JOB_SERIALIZER).retries_left == 1
        result = httpx.get(f"{server.url}/jobs/{crashed}/result", timeout=10)
        assert result.status_code == 200 and result.content.startswith(b"\x89PNG")
        print(f"[worker crash] killed mid-job; all {1 + len(queued)} jobs finished {recovered_s:.1f} s after the kill "
              f"(HEARTBEAT_TTL={FAST_RECOVERY['HEARTBEAT_TTL']} s)")
    finally:
        server.stop()


@pytest.mark.timeout(300)
def test_killed_worker_job_without_retries_fails_with_a_reason(tiny_checkpoints, conn) -> None:
    server = LiveServer(REDIS_URL, env={"JOB_RETRIES": "0"})
    try:
        crashed = submit(server.url, LONG_JOB)
        queued = submit(server.url, SHORT_JOB)
        killed_at = crash_during(server, tiny_checkpoints, crashed)
        second = WorkerProcess(REDIS_URL, tiny_checkpoints, **FAST_RECOVERY)
        try:
            states = wait_ended(server.url, [crashed, queued], timeout=180)
            failed_s = time.monotonic() - killed_at
        finally:
            second.stop()
        assert states[crashed]["status"] == "failed"
        assert "worker running this job stopped unexpectedly" in states[crashed]["error"]
        assert states[queued]["status"] == "finished"
        assert httpx.get(f"{server.url}/jobs/{crashed}/result", timeout=10).status_code == 409
        print(f"[worker crash, no retries] job failed with a reason {failed_s:.1f} s after the kill")
    finally:
        server.stop()
