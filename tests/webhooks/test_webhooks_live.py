"""Webhooks as deployed: ``python -m service`` (uvicorn), ``python -m worker`` on a tiny checkpoint and ``python -m
service.webhooks`` on a real Redis, delivering to a real HTTP receiver that verifies each signature with the
Standard Webhooks reference library (with the secret ``GET /webhooks/secret`` gives, not the server's master secret)
and fails the first two attempts of every delivery.

``WEBHOOK_JOBS`` (default 30) sets the scenario's size; the issue's target is ``WEBHOOK_JOBS=200``."""

from __future__ import annotations

import json
import os
import time
import uuid

import httpx
import pytest
from rq.job import Job, JobStatus

from facegen.contract import spec
from facegen.contract.job_serializer import JOB_SERIALIZER
from service.schemas import WebhookEvent
from service.webhooks import sender
from tests.conftest import flushed_database, redis_url_for_db
from tests.reliability.conftest import WorkerProcess, metric_total, wait_for
from tests.service.conftest import LiveServer, free_port
from tests.webhooks.conftest import SECRET, DeliveryProcess, Receiver, dumps, payload_types, tenant_secret

REDIS_URL = redis_url_for_db(8)
JOBS = int(os.environ.get("WEBHOOK_JOBS", "30"))
# Retries 1 s apart (the default backoff spreads 6 attempts over ~10 minutes), swept every second; the receiver's
# port is added to WEBHOOK_ALLOWED_PORTS.
FAST = {"WEBHOOK_RETRY_INTERVALS": "1,1,1,1,1", "WEBHOOK_SWEEP_INTERVAL_S": "1", "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_SECRET": SECRET}


@pytest.fixture(scope="module")
def conn():
    yield from flushed_database(REDIS_URL)


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver(fail_first=2)
    server, url = receiver.serve()
    receiver.url = url
    receiver.env = {**FAST, "WEBHOOK_ALLOWED_PORTS": url.split(":")[2].split("/")[0]}
    yield receiver
    server.shutdown()


@pytest.fixture(scope="module")
def stack(conn, receiver, tiny_checkpoints, tmp_path_factory):
    logs = tmp_path_factory.mktemp("webhook-logs")
    metrics_port = free_port()
    api = LiveServer(REDIS_URL, env=receiver.env)
    worker = WorkerProcess(REDIS_URL, tiny_checkpoints, MAX_BATCH="32")
    delivery = DeliveryProcess(REDIS_URL, logs / "webhooks.log", WEBHOOK_METRICS_PORT=str(metrics_port),
                               **receiver.env)
    state = {"api": api, "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    # the open API's secret (every job is everyone's), as a receiver gets it; it is not the master secret
    secret = httpx.get(f"{api.url}/webhooks/secret", timeout=10).json()
    assert secret == {"key_id": None, "secret": tenant_secret(SECRET, None), "previous_secret": None}
    receiver.secret = secret["secret"]
    yield state
    state["api"].stop()
    worker.stop()
    delivery.stop()


def submit(url: str, body: dict, key: str) -> httpx.Response | None:
    """POST /generate once; ``None`` when the API could not be reached (it is restarting)."""
    try:
        return httpx.post(f"{url}/generate", json=body, headers={"Idempotency-Key": key}, timeout=10)
    except httpx.TransportError:
        return None


def test_every_job_gets_one_verified_delivery_through_failures_and_an_api_restart(stack, receiver, conn):
    body = {"label": "smiling", "count": 1, "steps": 2, "webhook": {"url": receiver.url}}
    accepted: list[str] = []
    for n in range(JOBS):
        if n == JOBS // 2:  # restart the API once, mid-way
            stack["api"].stop()
            stack["api"] = LiveServer(REDIS_URL, env=receiver.env)
        request, key = {**body, "seed": n}, str(uuid.uuid4())  # one Idempotency-Key for all tries
        response = wait_for(lambda r=request, k=key: submit(stack["api"].url, r, k), 30, "the API to accept")
        assert response.status_code == 202, response.text
        accepted.append(response.json()["job_id"])
    url = stack["api"].url

    def all_delivered() -> bool:
        return all(receiver.delivered.get(job_id) for job_id in accepted)

    started = time.monotonic()
    wait_for(all_delivered, 240, f"{sum(1 for j in accepted if j not in receiver.delivered)} of {JOBS} deliveries",
             poll=0.5)
    elapsed = time.monotonic() - started
    duplicates = sum(len(receiver.delivered[job_id]) - 1 for job_id in accepted)
    print(f"\n{JOBS} jobs: {JOBS} deliveries verified {elapsed:.1f} s after the last submission; "
          f"attempts {sum(receiver.attempts.values())}, duplicates {duplicates}, forged {receiver.forged}")
    assert receiver.forged == 0
    assert duplicates == 0  # at-least-once allows duplicates only when a delivery process dies mid-attempt
    for job_id in accepted:
        (payload,) = receiver.delivered[job_id]
        assert payload["type"] == "job.completed", dumps(payload)
        assert payload["data"]["status"] == "finished"
        assert payload["data"]["links"]["result"] == f"/jobs/{job_id}/result"
        assert receiver.attempts[f"{job_id}-webhook"] == 3  # one webhook-id across the three attempts
        state = httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()
        assert state["webhook"] == {"attempts": 3, "delivered": True, "last_status": 204, "last_error": None}
        assert httpx.get(f"{url}/jobs/{job_id}/result", timeout=10).status_code == 200
    assert metric_total(stack["metrics"], "facegen_webhook_deliveries_total") == 3 * JOBS
    text = httpx.get(stack["metrics"], timeout=5).text
    assert f'facegen_webhook_deliveries_total{{outcome="delivered"}} {float(JOBS)}' in text
    assert f'facegen_webhook_deliveries_total{{outcome="retrying"}} {float(2 * JOBS)}' in text


def test_a_job_canceled_while_queued_reports_job_canceled(stack, receiver):
    url = stack["api"].url
    body = {"label": "smiling", "count": 1, "steps": 1000, "sampler": "ddpm", "seed": 7,
            "webhook": {"url": receiver.url, "events": ["canceled"]}}
    running = httpx.post(f"{url}/generate", json=body, timeout=10).json()["job_id"]  # keeps the worker busy
    queued = httpx.post(f"{url}/generate", json={**body, "seed": 8}, timeout=10).json()["job_id"]
    for job_id in (queued, running):
        assert httpx.delete(f"{url}/jobs/{job_id}", timeout=10).status_code in (200, 202)
    wait_for(lambda: receiver.delivered.get(queued) and receiver.delivered.get(running), 120, "canceled webhooks")
    assert payload_types(receiver.delivered[queued]) == ["job.canceled"]
    assert payload_types(receiver.delivered[running]) == ["job.canceled"]
    assert receiver.delivered[queued][0]["data"]["status"] == "canceled"


def test_an_ending_not_subscribed_to_is_not_sent(stack, receiver, conn):
    url = stack["api"].url
    body = {"label": "smiling", "count": 1, "steps": 2, "seed": 9,
            "webhook": {"url": receiver.url, "events": ["failed"]}}
    job_id = httpx.post(f"{url}/generate", json=body, timeout=10).json()["job_id"]
    wait_for(lambda: conn.hget(f"rq:job:{job_id}-webhook", "status") == b"finished", 60, "the delivery job to run")
    assert job_id not in receiver.delivered
    assert httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()["webhook"]["attempts"] == 0


def test_a_transition_jobs_payload_links_its_animation(stack, receiver):
    """A transition's GIF is its animation (GET /jobs/{id}/animation), as the denoising trajectory is an animated
    job's: the completed event links it."""
    url = stack["api"].url
    body = {"label": "smiling", "count": 1, "steps": 2, "seed": 11, "transition": True, "transition_frames": 2,
            "webhook": {"url": receiver.url}}
    accepted = httpx.post(f"{url}/generate", json=body, timeout=10)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    assert accepted.json()["links"]["animation"] == f"/jobs/{job_id}/animation"
    wait_for(lambda: receiver.delivered.get(job_id), 120, "the transition's webhook")
    (payload,) = receiver.delivered[job_id]
    assert payload["type"] == "job.completed", dumps(payload)
    assert payload["data"]["links"] == {"self": f"/jobs/{job_id}", "result": f"/jobs/{job_id}/result",
                                        "animation": f"/jobs/{job_id}/animation"}, dumps(payload)
    animation = httpx.get(f"{url}{payload['data']['links']['animation']}", timeout=10)
    assert animation.status_code == 200 and animation.headers["content-type"] == "image/gif"


@pytest.mark.parametrize(("kind", "animated"), [({}, False), ({"animation": True}, True),
                                                ({"transition": True, "transition_frames": 2}, True)])
def test_a_finished_jobs_payload_links_its_animation_when_it_has_one(conn, kind, animated):
    """The payload the delivery process builds, from the job as RQ keeps it (no worker, no delivery process)."""
    job_spec = spec.JobSpec(attributes={"Smiling": True}, seed=1, count=1, **kind)
    job = Job.create(spec.JOB_FUNCTION, args=(job_spec.model_dump(mode="json"),), connection=conn,
                     serializer=JOB_SERIALIZER, id=str(uuid.uuid4()))
    job.set_status(JobStatus.FINISHED)
    data = json.loads(sender.payload(job, WebhookEvent.completed))["data"]
    assert data["status"] == "finished"
    assert ("animation" in data["links"]) is animated, data
    if animated:
        assert data["links"]["animation"] == f"/jobs/{job.id}/animation"
