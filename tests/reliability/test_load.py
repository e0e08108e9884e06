"""200 concurrent POST /generate against a real uvicorn process with a queue cap: exactly ``MAX_QUEUED`` are
accepted (the admission check is atomic), the rest get 429 with Retry-After, and every accepted job finishes."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest
import redis

from tests.conftest import redis_url_for_db
from tests.reliability.conftest import WorkerProcess, wait_ended
from tests.service.conftest import LiveServer

REDIS_URL = redis_url_for_db(14)
CLIENTS = 200
MAX_QUEUED = 60


async def burst(url: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        bodies = [{"label": ("smiling", "not_smiling")[i % 2], "count": 1, "seed": i, "steps": 4}
                  for i in range(CLIENTS)]
        return await asyncio.gather(*(client.post("/generate", json=body) for body in bodies))


@pytest.mark.timeout(300)
def test_concurrent_burst_with_a_queue_cap_loses_nothing(tiny_checkpoints) -> None:
    conn = redis.Redis.from_url(REDIS_URL)
    conn.flushdb()
    api = LiveServer(REDIS_URL, env={"MAX_QUEUED": str(MAX_QUEUED), "RETRY_AFTER_S": "7"})
    try:
        responses = asyncio.run(burst(api.url))
        counts = Counter(r.status_code for r in responses)
        assert counts == {202: MAX_QUEUED, 429: CLIENTS - MAX_QUEUED}, counts
        assert all(r.headers["Retry-After"] == "7" and "queue full" in r.json()["detail"]
                   for r in responses if r.status_code == 429)
        accepted = [r.json()["job_id"] for r in responses if r.status_code == 202]
        assert len(set(accepted)) == MAX_QUEUED
        assert conn.llen("rq:queue:facegen") == MAX_QUEUED  # refused jobs left nothing behind in the queue
        worker = WorkerProcess(REDIS_URL, tiny_checkpoints, MAX_BATCH="32")
        try:
            states = wait_ended(api.url, accepted, timeout=240)
        finally:
            worker.stop()
        assert Counter(state["status"] for state in states.values()) == {"finished": MAX_QUEUED}
        assert all(httpx.get(f"{api.url}/jobs/{j}/result", timeout=10).status_code == 200 for j in accepted)
        assert all(states[j]["resolved"]["steps"] == 4 for j in accepted)
        print(f"[load] {CLIENTS} concurrent requests: {counts[202]} accepted and finished, {counts[429]} refused (429)")
    finally:
        api.stop()
        conn.flushdb()
