"""Sentinel failover: a primary, one replica and three Sentinels on localhost; the API and a worker find the primary
through the Sentinels. Jobs are submitted continuously and the primary is SIGKILLed in the middle of the run: every
job the API accepted (202) finishes on the promoted replica, none is lost, the service is ready again within 30 s,
and the worker follows the failover without a restart.

A 202 means the job is on two nodes: admission waits (Redis WAIT) until the replica has acknowledged it.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import redis

from scripts.processes import free_port
from scripts.redisctl import RedisServer, SentinelServer
from tests.reliability.conftest import ENDED, SupervisedWorker, job_state, metric_total, wait_for
from tests.service.conftest import LiveServer

MASTER = "facegen"
READY_AGAIN_S = 30  # the bound: primary killed -> /readyz 200 and jobs accepted again
# A job whose worker lost the primary mid-run is retried once its heartbeat expires (maintenance every second).
WORKER_ENV = {"HEARTBEAT_TTL": "10", "MAINTENANCE_INTERVAL": "1", "REDIS_TIMEOUT_S": "1"}
JOB = {"label": "smiling", "count": 1, "steps": 20}


class Submitter(threading.Thread):
    """POSTs a job every ``period_s`` until stopped; keeps the id and acceptance time of every 202."""

    def __init__(self, url: str, period_s: float = 0.2):
        super().__init__(daemon=True)
        self.url, self.period_s = url, period_s
        self.accepted: list[tuple[float, str]] = []
        self.refused: dict[int, int] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        seed = 0
        while not self.halt.is_set():
            seed += 1
            try:
                response = httpx.post(f"{self.url}/generate", json={**JOB, "seed": seed}, timeout=10)
            except httpx.HTTPError:
                self.refused[0] = self.refused.get(0, 0) + 1
            else:
                if response.status_code == 202:
                    self.accepted.append((time.monotonic(), response.json()["job_id"]))
                else:
                    self.refused[response.status_code] = self.refused.get(response.status_code, 0) + 1
            self.halt.wait(self.period_s)

    def accepted_since(self, moment: float) -> list[str]:
        return [job_id for at, job_id in list(self.accepted) if at > moment]


def replicated(primary: RedisServer, sentinels: list[SentinelServer]) -> bool:
    """The replica acknowledges the primary's writes and every Sentinel knows it and the two other Sentinels."""
    if not primary.replicas_acknowledge():
        return False
    for sentinel in sentinels:
        state = redis.Redis(port=sentinel.port).sentinel_master(MASTER)
        if state["num-slaves"] < 1 or state["num-other-sentinels"] < len(sentinels) - 1:
            return False
    return True


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def oldest_open_job_started(url: str, submitter: Submitter, ended: set[str]) -> bool:
    """Whether the worker is running the oldest accepted job that has not ended (the queue is first in, first out,
    so the newest job may wait behind a backlog while older ones run; the oldest open one is the next to start).
    ``ended`` keeps the ids already seen ended between calls."""
    for _, job_id in list(submitter.accepted):
        if job_id in ended:
            continue
        status = job_state(url, job_id)["status"]
        if status not in ENDED:
            return status == "started"
        ended.add(job_id)
    return False


@pytest.mark.timeout(400)
def test_every_accepted_job_survives_the_loss_of_the_primary(tiny_checkpoints) -> None:
    primary = RedisServer().start()
    replica = RedisServer(replica_of=primary.port).start()
    sentinels = [SentinelServer(MASTER, primary.port).start() for _ in range(3)]
    env = {"REDIS_URL": "redis://127.0.0.1/0", "REDIS_SENTINEL_MASTER": MASTER,
           "REDIS_SENTINELS": ",".join(f"127.0.0.1:{s.port}" for s in sentinels)}
    api = worker = submitter = None
    try:
        wait_for(lambda: replicated(primary, sentinels), 60, "the replica and the Sentinels")
        api = LiveServer(env["REDIS_URL"], env={**env, "REDIS_TIMEOUT_S": "1", "RETRY_AFTER_S": "1"})
        metrics_port = free_port()
        worker = SupervisedWorker(env["REDIS_URL"], tiny_checkpoints, METRICS_PORT=str(metrics_port), **WORKER_ENV,
                                  **env)
        wait_for(lambda: ready(api.url), 120, "a live worker")
        submitter = Submitter(api.url)
        submitter.start()
        wait_for(lambda: len(submitter.accepted) >= 10, 60, "ten accepted jobs")
        assert redis.Redis.from_url(primary.url).info("replication")["connected_slaves"] == 1
        ended_early: set[str] = set()
        wait_for(lambda: oldest_open_job_started(api.url, submitter, ended_early), 60,
                 "the worker to be running a job", poll=0.05)

        primary.kill()
        killed_at = time.monotonic()
        wait_for(lambda: (worker.check(), ready(api.url))[1] and submitter.accepted_since(killed_at), READY_AGAIN_S,
                 "the service to be ready and accept jobs again", poll=0.2)
        ready_after = time.monotonic() - killed_at
        promoted = redis.Redis(port=sentinels[0].port).sentinel_get_master_addr_by_name(MASTER)
        assert int(promoted[1]) == replica.port
        time.sleep(3)  # keep submitting to the promoted primary for a while
        submitter.halt.set()
        submitter.join()

        accepted = [job_id for _, job_id in submitter.accepted]
        states: dict[str, str] = {}

        def all_ended() -> bool:
            worker.check()
            for job_id in accepted:
                if states.get(job_id) not in ("finished", "failed", "canceled", "stopped"):
                    response = httpx.get(f"{api.url}/jobs/{job_id}", timeout=10)
                    states[job_id] = response.json()["status"] if response.status_code == 200 else str(response.status_code)
            return all(state in ("finished", "failed", "canceled", "stopped", "404") for state in states.values())

        wait_for(all_ended, 240, "every accepted job to end", poll=0.5)
        print(f"[failover] {len(accepted)} jobs accepted ({len(submitter.accepted_since(killed_at))} after the kill), "
              f"refused {submitter.refused}; ready again {ready_after:.1f} s after the primary's SIGKILL; "
              f"worker restarts: {worker.restarts}; final states: {sorted(set(states.values()))}")
        assert states == {job_id: "finished" for job_id in accepted}
        assert worker.restarts == 0  # the worker followed the failover (it rides out OUTAGE_PATIENCE_S)
        # Both processes met the dead primary, and counted it.
        assert metric_total(f"http://127.0.0.1:{metrics_port}/metrics", "facegen_worker_redis_errors_total") > 0
        assert metric_total(f"{api.url}/metrics", "facegen_api_redis_errors_total") > 0
    finally:
        if submitter is not None:
            submitter.halt.set()
        for process in (worker, api, *sentinels, replica, primary):
            if process is not None:
                process.stop()
