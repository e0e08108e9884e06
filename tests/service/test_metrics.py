"""GET /metrics: Prometheus text with request, job and queue metrics, per app."""

from __future__ import annotations

import uuid

from prometheus_client.parser import text_string_to_metric_families

from facegen.contract import spec
from tests.service.fakeworker import publish_model


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metric_names_are_exposed(client):
    client.get("/healthz")
    samples = scrape(client)
    names = {name for name, _ in samples}
    for expected in (
        "facegen_api_requests_total",
        "facegen_api_request_duration_seconds_bucket",
        "facegen_api_job_latency_seconds_count",
        "facegen_redis_up",
        "facegen_queue_depth",
        "facegen_queue_registry_jobs",
        "facegen_webhook_queue_depth",
        "facegen_redis_memory_used_bytes",
        "facegen_redis_memory_max_bytes",
    ):
        assert expected in names, expected
    assert value(samples, "facegen_redis_memory_used_bytes") > 0  # read from Redis's INFO memory


def test_requests_counted_by_route_template_and_status(client):
    before = scrape(client)
    for _ in range(3):
        assert client.get(f"/jobs/{uuid.uuid4()}").status_code == 404
    client.get("/does/not/exist")
    after = scrape(client)
    key = {"route": "/jobs/{job_id}", "method": "GET", "status": "404"}
    assert value(after, "facegen_api_requests_total", **key) - value(before, "facegen_api_requests_total", **key) == 3
    assert value(after, "facegen_api_requests_total", route="<unmatched>", method="GET", status="404") == 1
    assert value(after, "facegen_api_request_duration_seconds_count", route="/jobs/{job_id}", method="GET") >= 3
    assert not any("exist" in dict(labels).get("route", "") for _, labels in after)  # no raw paths as labels


def test_job_counters_and_queue_depth(make_client, conn, fake_worker):
    client = make_client(max_queued=3)
    assert value(scrape(client), "facegen_queue_depth", queue=spec.DEFAULT_QUEUE) == 0
    ids = [client.post("/generate", json={"label": "smiling", "sampler": s}).json()["job_id"]
           for s in ("dpmpp", "dpmpp", "ddim")]
    assert client.post("/generate", json={"label": "smiling"}).status_code == 429
    assert client.post("/generate", json={"label": "happy"}).status_code == 422
    samples = scrape(client)
    assert value(samples, "facegen_api_jobs_submitted_total", sampler="dpmpp") == 2
    assert value(samples, "facegen_api_jobs_submitted_total", sampler="ddim") == 1
    assert value(samples, "facegen_api_jobs_rejected_total", reason="queue_full") == 1
    assert value(samples, "facegen_api_jobs_rejected_total", reason="invalid") == 1
    assert value(samples, "facegen_queue_depth", queue=spec.DEFAULT_QUEUE) == 3
    assert value(samples, "facegen_redis_up") == 1

    fake_worker.drain()
    for job_id in ids + ids:  # each ended job counts once, however often it is read
        assert client.get(f"/jobs/{job_id}").json()["status"] == "finished"
    samples = scrape(client)
    assert value(samples, "facegen_queue_depth", queue=spec.DEFAULT_QUEUE) == 0
    assert value(samples, "facegen_queue_registry_jobs", queue=spec.DEFAULT_QUEUE, registry="finished") == 3
    assert value(samples, "facegen_api_jobs_ended_total", status="finished") == 3
    assert value(samples, "facegen_api_job_latency_seconds_count") == 3
    assert value(samples, "facegen_api_job_latency_seconds_sum") > 0
    # A second app (another replica) does not count them again: the first sighting is recorded in Redis.
    other = make_client()
    for job_id in ids:
        other.get(f"/jobs/{job_id}")
    assert value(scrape(other), "facegen_api_jobs_ended_total", status="finished") == 0


def test_idempotency_conflict_counted_once(client):
    headers = {"Idempotency-Key": "a"}
    assert client.post("/generate", json={"label": "smiling"}, headers=headers).status_code == 202
    assert client.post("/generate", json={"label": "smiling"}, headers=headers).status_code == 202  # replay
    assert client.post("/generate", json={"label": "not_smiling"}, headers=headers).status_code == 422
    samples = scrape(client)
    assert value(samples, "facegen_api_jobs_rejected_total", reason="idempotency_conflict") == 1
    assert value(samples, "facegen_api_jobs_rejected_total", reason="invalid") == 0
    assert value(samples, "facegen_api_jobs_submitted_total", sampler="dpmpp") == 1  # a replay is no new job


def test_live_models_gauge(client, conn):
    assert value(scrape(client), "facegen_models_live", version="fake-v1") == 0
    publish_model(conn)
    assert value(scrape(client), "facegen_models_live", version="fake-v1") == 1


def test_each_app_has_its_own_registry(make_client):
    first, second = make_client(), make_client()
    first.get("/healthz")
    first.get("/healthz")
    key = {"route": "/healthz", "method": "GET", "status": "200"}
    assert value(scrape(first), "facegen_api_requests_total", **key) == 2
    assert value(scrape(second), "facegen_api_requests_total", **key) == 0
