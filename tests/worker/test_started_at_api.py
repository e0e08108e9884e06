"""``GET /jobs/{id}`` through ``python -m service`` and a real worker: ``started_at`` is when the job's sampling
began, so the time it sampled is not shown as queue wait."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime

import httpx

from scripts.processes import stop_process
from tests.conftest import ROOT
from tests.service.conftest import LiveServer
from tests.worker.test_worker_process import REDIS_URL, connection, worker_env  # noqa: F401 - the fixture


def test_started_at_falls_before_the_sampling_ends(tiny_checkpoints, connection) -> None:  # noqa: F811
    server = LiveServer(REDIS_URL)
    worker = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=worker_env(tiny_checkpoints),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while httpx.get(f"{server.url}/readyz").status_code != 200:
            assert worker.poll() is None and time.monotonic() < deadline, "worker never became ready"
            time.sleep(0.3)
        answer = httpx.post(f"{server.url}/generate", json={"label": "Smiling", "count": 2, "seed": 3,
                                                            "sampler": "ddpm", "steps": 80})
        assert answer.status_code == 202, answer.text
        url = f"{server.url}/jobs/{answer.json()['job_id']}"
        while ((job := httpx.get(url).json())["progress"] or {}).get("step", 0) < 1:
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        sampling_seen = datetime.now(UTC)  # the job is sampling now, so its sampling ends after this
        while (job := httpx.get(url).json())["status"] != "finished":
            assert job["status"] == "started" and time.monotonic() < deadline, job
            time.sleep(0.2)
    finally:
        stop_process(worker, grace_s=30)
        server.stop()
    started, ended = datetime.fromisoformat(job["started_at"]), datetime.fromisoformat(job["ended_at"])
    assert datetime.fromisoformat(job["enqueued_at"]) <= started < sampling_seen < ended
