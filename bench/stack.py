"""Start the pieces of the product as separate processes, as deployed: a private Redis, ``python -m service``
under uvicorn and ``python -m worker``; used by the end-to-end and API benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis
from rq import Worker

from scripts.processes import stop_process
from scripts.redisctl import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent


class Process:
    """A child process with its output in a log file under ``bench/results/logs``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]):
        logs = ROOT / "bench" / "results" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{name}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.log_path.stem} exited with {self.process.returncode}; see {self.log_path}")

    def stop(self) -> None:
        stop_process(self.process, grace_s=30)
        self.log.close()


def start_redis() -> RedisServer:
    return RedisServer().start()


def start_api(redis_url: str, workers: int = 1, **env: str) -> tuple[Process, str]:
    """``python -m service`` on a free port; returns the process and its base URL once /healthz answers."""
    port = free_port()
    api = Process(f"api-{port}", [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                                  "--workers", str(workers), "--log-level", "warning"],
                  {"REDIS_URL": redis_url, **env})
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(f"{url}/healthz"), api, 60, "the API to start")
    return api, url


def start_worker(redis_url: str, **env: str) -> tuple[Process, float]:
    """``python -m worker`` (bundled model unless ``CHECKPOINT_DIR`` is given), the only worker on ``redis_url``;
    returns it and its start-up seconds (process start to listening on the queue, model loaded)."""
    connection = redis.Redis.from_url(redis_url)
    worker = Process(f"worker-{time.time_ns()}", [sys.executable, "-m", "worker"],
                     {"REDIS_URL": redis_url, "METRICS_PORT": "0", **env})
    wait_until(lambda: Worker.count(connection=connection) == 1, worker, 300, "the worker to start listening")
    return worker, time.perf_counter() - worker.started


def wait_until(predicate, process: Process, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        process.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
