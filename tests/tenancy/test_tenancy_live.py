"""Tenancy as deployed: real API keys through ``python -m service`` (uvicorn) and ``python -m worker`` on a tiny
checkpoint. Another key's job is invisible on every route, concurrent bursts never overshoot a key's quota, one
key's flood does not hold back another key's job, and no key reaches a log line or a metric."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.routing import iter_route_contexts
from rq.job import Job

from facegen.contract import spec
from facegen.contract.job_serializer import JOB_SERIALIZER
from service.app import create_app
from service.config import Settings
from service.tenancy import LABEL_CHARS, KeyLabels
from tests.conftest import flushed_database, redis_url_for_db
from tests.reliability.conftest import WorkerProcess, wait_for
from tests.service.conftest import LiveServer

REDIS_URL = redis_url_for_db(10)
# Random keys, so that finding one in a log cannot be a coincidence.
KEYS = {name: f"{name}-{secrets.token_urlsafe(24)}" for name in ("a", "b", "admin", "jobs", "units", "rate")}
# Work units of the burst's requests (facegen/contract/cost.py): 1 image costs 25, 3 images 75.
LIMITED = {"jobs": {"queued_jobs": 5}, "units": {"queued_units": 250}, "rate": {"units_per_minute": 7 * 25}}
BURST = 40
FLOOD_JOBS, FLOOD_IMAGES = 50, 16
ENDED = ("finished", "failed", "canceled", "stopped")


def key_id(name: str) -> str:
    return hashlib.sha256(KEYS[name].encode()).hexdigest()[:32]


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def conn():
    yield from flushed_database(REDIS_URL)


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tenancy-logs")


@pytest.fixture(scope="module")
def api(conn, logs):
    env = {
        "API_KEYS": ",".join(KEYS[name] for name in ("a", "b", "jobs", "units", "rate")),
        "ADMIN_API_KEYS": KEYS["admin"],
        "QUOTA_OVERRIDES": json.dumps({key_id(name): quota for name, quota in LIMITED.items()}),
        "RETRY_AFTER_S": "3",
    }
    server = LiveServer(REDIS_URL, env=env, log_path=logs / "api.log", log_level="info")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(api, conn, tiny_checkpoints):
    """One worker (batches of up to 32 images), started after the quota tests, which need an idle queue (their
    jobs are dropped)."""
    conn.flushdb()
    process = WorkerProcess(REDIS_URL, tiny_checkpoints, MAX_BATCH="32")
    wait_for(lambda: httpx.get(f"{api.url}/readyz", timeout=5).status_code == 200 or not process.alive(), 180,
             "the worker to publish its model")
    assert process.alive(), process.output()
    yield process
    process.stop()


def post(url: str, name: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/generate", json={"label": "smiling", "steps": 2, **body}, headers=auth(name),
                      timeout=30)


def waiting(conn: redis.Redis, name: str) -> int:
    """The key's jobs waiting: in its list, or already handed to the RQ queue."""
    dispatched = [conn.hget(Job.key_for(job_id.decode()), spec.OWNER_FIELD)
                  for job_id in conn.lrange(f"rq:queue:{spec.DEFAULT_QUEUE}", 0, -1)]
    return conn.llen(spec.key_queue_key(spec.DEFAULT_QUEUE, key_id(name))) + dispatched.count(key_id(name).encode())


async def burst(url: str, name: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60, headers=auth(name)) as client:
        return await asyncio.gather(*(client.post("/generate", json={"label": "smiling", "count": count, "seed": i})
                                      for i in range(BURST)))


@pytest.mark.parametrize(("name", "count", "accepted"), [("jobs", 1, 5), ("units", 3, 3), ("rate", 1, 7)])
def test_a_concurrent_burst_never_exceeds_the_keys_quota(api, conn, name, count, accepted):
    responses = asyncio.run(burst(api.url, name, count))
    limit = next(iter(LIMITED[name]))
    assert Counter(r.status_code for r in responses) == {202: accepted, 429: BURST - accepted}
    refused = [r for r in responses if r.status_code == 429]
    assert {r.json()["limit"] for r in refused} == {limit}
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert waiting(conn, name) == accepted  # refused jobs left nothing behind
    # Another key is still accepted while this one is at its limit.
    assert post(api.url, "b").status_code == 202
    assert post(api.url, name, count=count, steps=spec.DEFAULT_STEPS[spec.DEFAULT_SAMPLER]).status_code == 429
    print(f"[tenancy] {BURST} concurrent submissions by one key, limit {limit}: {accepted} x 202, "
          f"{BURST - accepted} x 429; another key: 202")


def wait_ended(url: str, job_id: str, name: str, timeout: float = 240) -> dict:
    def ended():
        body = httpx.get(f"{url}/jobs/{job_id}", headers=auth(name), timeout=10).json()
        return body if body["status"] in ENDED else None

    return wait_for(ended, timeout, f"job {job_id} to end", poll=0.3)


def job_routes() -> list[tuple[str, str]]:
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    return [(method, route.path) for route in iter_route_contexts(app.routes) if "{job_id}" in route.path
            for method in sorted(route.methods or ())]


def test_another_keys_job_is_invisible_on_every_route(api, conn, worker):
    accepted = post(api.url, "a", count=1, animation=True, animation_frames=2)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    assert wait_ended(api.url, job_id, "a")["status"] == "finished"
    routes = job_routes()
    assert {p for _, p in routes} >= {"/jobs/{job_id}", "/jobs/{job_id}/result", "/jobs/{job_id}/animation"}
    for method, template in routes:
        path = f"{api.url}{template.format(job_id=job_id, index=0)}"
        other = httpx.request(method, path, headers=auth("b"), timeout=10)
        assert other.status_code == 404, (method, template, other.text)
        owner = httpx.request(method, path, headers=auth("a"), timeout=10).status_code
        admin = httpx.request(method, path, headers=auth("admin"), timeout=10).status_code
        assert owner == admin == (409 if method == "DELETE" else 200), (method, template)  # DELETE: it ended


def test_a_flood_of_one_key_delays_another_keys_job_by_at_most_one_batch(api, conn, worker):
    flood = []
    for i in range(FLOOD_JOBS):
        response = post(api.url, "a", count=FLOOD_IMAGES, seed=i)
        assert response.status_code == 202, response.text
        flood.append(response.json()["job_id"])
    first = Job.fetch(flood[0], connection=conn, serializer=JOB_SERIALIZER)
    wait_for(lambda: first.get_status() != "queued", 120, "the flood to start")
    single = post(api.url, "b", count=1).json()["job_id"]
    assert wait_ended(api.url, single, "b")["status"] == "finished"
    jobs = {job.id: job
            for job in Job.fetch_many([*flood, single], connection=conn, serializer=JOB_SERIALIZER)}
    for job_id in flood:  # the rest of the flood is not needed
        httpx.delete(f"{api.url}/jobs/{job_id}", headers=auth("admin"), timeout=10)
    batch_start: dict[str, float] = {}
    members: dict[str, set[str]] = {}
    for job in jobs.values():
        batch = job.meta.get(spec.META_BATCH_RUN)
        if batch:
            batch_start[batch["id"]] = datetime.fromisoformat(batch["started_at"]).timestamp()
            members.setdefault(batch["id"], set()).add(job.id)
    own = jobs[single].meta[spec.META_BATCH_RUN]["id"]
    submitted = jobs[single].enqueued_at.timestamp()
    ahead = [b for b, start in batch_start.items() if submitted < start < batch_start[own] and b != own]
    started_before = sum(len(members[b] - {single}) for b, start in batch_start.items() if start <= batch_start[own])
    print(f"[tenancy] flood of {FLOOD_JOBS} x {FLOOD_IMAGES}-image jobs: the other key's 1-image job ran in a batch "
          f"of {jobs[single].meta[spec.META_BATCH]['images']} images; {len(ahead)} flood batch(es) started between "
          f"its submission and its batch; {started_before} flood jobs had started by then (FIFO: all {FLOOD_JOBS})")
    assert len(ahead) <= 1
    assert started_before < FLOOD_JOBS // 2


def test_no_key_in_any_log_line_or_metric(api, worker, logs):
    metrics = httpx.get(f"{api.url}/metrics", timeout=10).text
    labels = KeyLabels(Settings(api_keys=",".join(KEYS[name] for name in ("a", "b", "jobs", "units", "rate")),
                                admin_api_keys=KEYS["admin"]))  # the server's keys: the same secret
    assert f'key="{labels(key_id("a"))}"' in metrics  # work is labelled by a keyed hash of the key id
    assert all(key_id(name)[:LABEL_CHARS] not in metrics for name in KEYS)
    texts = {"metrics": metrics, "api log": (logs / "api.log").read_text(errors="replace"),
             "worker log": worker.log_path.read_text(errors="replace")}
    assert "POST /generate" in texts["api log"]  # the access log was captured
    for name, key in KEYS.items():
        for where, text in texts.items():
            assert key not in text, f"key {name} in the {where}"
