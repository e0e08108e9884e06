"""Redis restarts (and crashes) under a running API and worker, with the append-only file configured as compose
and k8s run it (``appendonly yes``, ``appendfsync everysec``): accepted jobs survive and finish, the API answers
503 while Redis is away and recovers by itself."""

from __future__ import annotations

import time

import httpx
import pytest

from scripts.redisctl import RedisServer
from tests.reliability.conftest import SupervisedWorker, wait_ended, wait_for
from tests.service.conftest import LiveServer

# A worker that loses Redis mid-job may exit; like the Deployment's restartPolicy, the test starts it again.
WORKER_ENV = {"HEARTBEAT_TTL": "10", "MAINTENANCE_INTERVAL": "1", "MAX_BATCH": "1"}
FSYNC_PERIOD_S = 1.0  # appendfsync everysec


def submit(url: str, body: dict) -> str:
    response = httpx.post(f"{url}/generate", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["restart", "crash"])
def test_accepted_jobs_survive_a_redis_restart(tiny_checkpoints, how) -> None:
    server = RedisServer(appendonly=True, appendfsync="everysec").start()
    api = LiveServer(server.url, env={"REDIS_TIMEOUT_S": "1", "RETRY_AFTER_S": "2"})
    worker = None
    try:
        # One long job keeps the worker busy while short ones wait in the queue.
        accepted = [submit(api.url, {"label": "smiling", "count": 1, "seed": 1, "sampler": "ddpm", "steps": 1000})]
        accepted += [submit(api.url, {"label": "not_smiling", "count": 2, "seed": s, "steps": 4}) for s in range(5)]
        worker = SupervisedWorker(server.url, tiny_checkpoints, **WORKER_ENV)
        wait_for(lambda: httpx.get(f"{api.url}/jobs/{accepted[0]}").json()["status"] == "started", 120,
                 "the worker to start the long job")
        if how == "restart":
            server.stop()  # SIGTERM: Redis writes the AOF out before it exits
        else:
            time.sleep(2 * FSYNC_PERIOD_S)  # everysec: writes older than a second are on disk
            server.kill()

        while_down = [httpx.post(f"{api.url}/generate", json={"label": "smiling"}, timeout=10),
                      httpx.get(f"{api.url}/jobs/{accepted[1]}", timeout=10),
                      httpx.get(f"{api.url}/readyz", timeout=10)]
        assert [r.status_code for r in while_down] == [503, 503, 503], [r.text for r in while_down]
        assert while_down[0].headers["Retry-After"] == "2"
        assert httpx.get(f"{api.url}/healthz", timeout=10).status_code == 200  # the process itself is fine

        server = RedisServer(port=server.port, workdir=server.workdir, appendonly=True, appendfsync="everysec").start()
        accepted.append(wait_for(lambda: _accepted_id(api.url), 30, "the API to accept jobs again"))

        def all_done() -> bool:
            worker.check()
            return all(httpx.get(f"{api.url}/jobs/{j}").json()["status"] in ("finished", "failed") for j in accepted)

        wait_for(all_done, 240, "every accepted job to end", poll=0.5)
        states = wait_ended(api.url, accepted, timeout=10)
        assert [states[j]["status"] for j in accepted] == ["finished"] * len(accepted), states
        for job_id in accepted:
            grid = httpx.get(f"{api.url}/jobs/{job_id}/result", timeout=10)
            assert grid.status_code == 200 and grid.content.startswith(b"\x89PNG")
        print(f"[redis {how}] {len(accepted)} accepted jobs finished; worker restarts: {worker.restarts}")
    finally:
        if worker is not None:
            worker.stop()
        api.stop()
        server.stop()


def _accepted_id(url: str) -> str | None:
    response = httpx.post(f"{url}/generate", json={"label": "smiling", "count": 1, "steps": 4}, timeout=10)
    return response.json()["job_id"] if response.status_code == 202 else None
