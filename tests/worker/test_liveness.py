"""A real ``python -m worker`` process: ``/healthz`` follows the main loop, not the HTTP thread that serves it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

from rq import Queue
from rq.job import JobStatus

from facegen.contract.job_serializer import JOB_SERIALIZER
from facegen.contract.spec import DEFAULT_QUEUE
from scripts.processes import free_port, stop_process
from tests.conftest import ROOT
from tests.worker.test_worker_process import connection, enqueue, worker_env  # noqa: F401 - the fixture


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""  # not listening yet


def wait_for(url: str, status: int, process: subprocess.Popen, deadline: float) -> dict:
    while True:
        code, body = get(url)
        if code == status:
            return json.loads(body) if url.endswith("/healthz") else {}
        assert process.poll() is None, process.stderr.read() if process.stderr else process.returncode
        assert time.monotonic() < deadline, f"{url} still {code} {body!r}"
        time.sleep(0.2)


def test_healthz_fails_while_the_main_loop_does_not_tick_and_metrics_still_answer(tiny_checkpoints,
                                                                                   connection) -> None:  # noqa: F811
    # An idle worker's loop blocks MAINTENANCE_INTERVAL seconds in each dequeue; with LIVENESS_TIMEOUT below that
    # the loop, blocked in Redis, really does not tick for longer than the timeout, while the HTTP thread serves.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT,
                               env=worker_env(tiny_checkpoints, METRICS_PORT=str(port), LIVENESS_TIMEOUT="4",
                                              MAINTENANCE_INTERVAL="60"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        wait_for(f"{base}/healthz", 200, process, deadline)  # the loop has started and ticked
        stalled = wait_for(f"{base}/healthz", 503, process, deadline)
        assert stalled["status"] == "stalled" and stalled["since_last_tick_s"] >= 4
        assert get(f"{base}/metrics")[0] == 200  # what the probes used to ask: alive whatever the loop does
        # wakes the loop: it ticks again
        job = enqueue(Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER))
        while job.get_status(refresh=True) != JobStatus.FINISHED:
            assert time.monotonic() < deadline, job.get_status()
            time.sleep(0.2)
        assert wait_for(f"{base}/healthz", 200, process, deadline)["status"] == "ok"
    finally:
        stop_process(process, grace_s=30)
