"""TLS and ACLs, as managed Redis services require them: a redis-server that speaks only TLS (a CA made by the
test), verifies client certificates and knows one ACL user. The API and the worker reach it through their
settings alone; a wrong password or a wrong CA stops them at start-up with one clear line, not a retry loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from scripts.redisctl import AclUser, RedisServer, make_tls_files
from tests.conftest import ROOT
from tests.reliability.conftest import WorkerProcess, wait_ended, wait_for
from tests.service.conftest import LiveServer

PASSWORD = "tls-acl-s3cret"
USER = AclUser("facegen", PASSWORD)
START_UP_LIMIT_S = 120  # a process that retried instead of exiting would still be running then


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory):
    files = make_tls_files(tmp_path_factory.mktemp("tls"))
    server = RedisServer(tls=files, verify_clients=True, user=USER).start()
    yield server
    server.stop()


def settings_env(server: RedisServer, password: str = PASSWORD, ca: Path | None = None) -> dict[str, str]:
    """The settings a deployment would set: no secrets in the URL."""
    return {"REDIS_URL": f"rediss://127.0.0.1:{server.port}/0", "REDIS_USERNAME": USER.name,
            "REDIS_PASSWORD": password, "REDIS_CA_CERT": str(ca or server.tls.ca),
            "REDIS_CLIENT_CERT": str(server.tls.client_cert), "REDIS_CLIENT_KEY": str(server.tls.client_key)}


@pytest.mark.timeout(300)
def test_api_and_worker_run_a_job_over_tls_with_an_acl_user(tls_redis, tiny_checkpoints) -> None:
    env = settings_env(tls_redis)
    api = LiveServer(env["REDIS_URL"], env=env)
    worker = WorkerProcess(env["REDIS_URL"], tiny_checkpoints, **env)
    try:
        wait_for(lambda: httpx.get(f"{api.url}/readyz", timeout=5).status_code == 200, 120, "a live worker")
        response = httpx.post(f"{api.url}/generate", json={"label": "smiling", "count": 1, "steps": 4}, timeout=10)
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        assert wait_ended(api.url, [job_id], timeout=60)[job_id]["status"] == "finished"
        grid = httpx.get(f"{api.url}/jobs/{job_id}/result", timeout=10)
        assert grid.status_code == 200 and grid.content.startswith(b"\x89PNG")
        log = worker.log_path.read_text(errors="replace")
        assert f"from Redis at rediss://127.0.0.1:{tls_redis.port}/0 as user 'facegen'" in log
        assert PASSWORD not in log
    finally:
        worker.stop()
        api.stop()


def start_up(module: str, env: dict[str, str], checkpoints: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=START_UP_LIMIT_S,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CHECKPOINT_DIR": str(checkpoints), "METRICS_PORT": "0",
             "PORT": "0", "API_KEYS": "", **env})


@pytest.mark.parametrize("module", ["worker", "service"])
def test_a_wrong_password_stops_the_process_at_start_up_with_one_line(tls_redis, tiny_checkpoints, module) -> None:
    result = start_up(module, settings_env(tls_redis, password="not-the-password"), tiny_checkpoints)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"{module}: Redis at rediss://127.0.0.1:{tls_redis.port}/0 as user 'facegen' "
                               "refused the credentials"), lines[0]
    assert "not-the-password" not in result.stderr + result.stdout


def test_a_server_certificate_from_another_ca_stops_the_api_at_start_up(tls_redis, tiny_checkpoints,
                                                                       tmp_path) -> None:
    other_ca = make_tls_files(tmp_path / "other").ca
    result = start_up("service", settings_env(tls_redis, ca=other_ca), tiny_checkpoints)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "TLS to Redis" in result.stderr and "certificate verify failed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
