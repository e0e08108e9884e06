"""Helpers for breaking things on purpose: real worker processes and a real API process on a real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from scripts.processes import stop_process
from tests.conftest import ROOT

ENDED = ("finished", "failed", "canceled", "stopped")


class WorkerProcess:
    """``python -m worker`` against ``redis_url``; ``kill()`` is a crash (SIGKILL), ``stop()`` a shutdown."""

    def __init__(self, redis_url: str, checkpoints: Path, **env: str):
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"facegen-worker-{os.getpid()}-{time.time_ns()}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()/kill()
        # fp32 on every CPU (PRECISION=auto is bf16 where native): these tests are about the queue, so each CPU
        # samples the tiny model at the same, fastest-everywhere precision
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker"], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "REDIS_URL": redis_url, "CHECKPOINT_DIR": str(checkpoints), "METRICS_PORT": "0",
                 "THREADS": "1", "PYTHONPATH": str(ROOT), "PRECISION": "fp32", **env},
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def stop(self) -> None:
        stop_process(self.process, grace_s=30)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


class SupervisedWorker:
    """Keeps one worker process running, restarting it when it exits (counted in ``restarts``), as a Deployment's
    restart policy does for a worker that lost Redis in the middle of a job."""

    def __init__(self, redis_url: str, checkpoints: Path, **env: str):
        self.args = (redis_url, checkpoints)
        self.env = env
        self.current = WorkerProcess(*self.args, **env)
        self.restarts = 0

    def check(self) -> None:
        if not self.current.alive():
            self.current.stop()
            self.current = WorkerProcess(*self.args, **self.env)
            self.restarts += 1

    def stop(self) -> None:
        self.current.stop()


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    """Poll ``predicate()`` until it returns something truthy; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def metric_total(metrics_url: str, name: str) -> float:
    """The sum of a Prometheus counter's labelled series (``name``: e.g. ``facegen_worker_redis_errors_total``)."""
    text = httpx.get(metrics_url, timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def job_state(url: str, job_id: str) -> dict:
    response = httpx.get(f"{url}/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_ended(url: str, job_ids: list[str], timeout: float) -> dict[str, dict]:
    """Every job's final state (fails the test if any is still pending after ``timeout`` seconds)."""
    states: dict[str, dict] = {}

    def all_ended() -> bool:
        for job_id in job_ids:
            if job_id not in states:
                state = job_state(url, job_id)
                if state["status"] in ENDED:
                    states[job_id] = state
        return len(states) == len(job_ids)

    wait_for(all_ended, timeout, f"{len(job_ids) - len(states)} of {len(job_ids)} jobs to end", poll=0.5)
    return states


@pytest.fixture()
def conn(request: pytest.FixtureRequest):
    """A client on the test module's own database (its ``REDIS_URL``), emptied before and after the test."""
    connection = redis.Redis.from_url(request.module.REDIS_URL)
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()
