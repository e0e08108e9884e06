"""Redis locked down as docker-compose.yml and k8s/base run it: k8s/base/redis/start.sh starts a real redis-server
with the ACL k8s/base/redis/users.acl and the arguments of k8s/base/redis.yaml (maxmemory, noeviction, AOF); the
real API (``python -m service``), worker (bundled demo model) and webhook sender run a job through it as the user
facegen, and nothing they do is denied; the ACL refuses what the project never does. The processes refuse a Redis
that evicts keys (``REDIS_ALLOW_EVICTION``).

The test server's ACL is a copy of users.acl with one line added at its end: a user ``observer`` that may read the
ACL log (the log of denied commands), which no user of the file may."""

from __future__ import annotations

import io
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from PIL import Image

from scripts.processes import free_port, stop_process
from scripts.redisctl import reachable, redis_binary
from tests.conftest import ROOT
from tests.reliability.conftest import WorkerProcess, wait_for
from tests.service.conftest import LiveServer
from tests.service.fakeworker import publish_model
from tests.webhooks.conftest import SECRET, DeliveryProcess, Receiver

ACL_DIR = ROOT / "k8s" / "base" / "redis"  # users.acl and start.sh, mounted by compose and k8s
REDIS_MANIFEST = ROOT / "k8s" / "base" / "redis.yaml"
USER = "facegen"
PASSWORD = secrets.token_hex(16)
OBSERVER = ("observer", secrets.token_hex(16))
API_KEY = "acl-test-key"
START_UP_LIMIT_S = 120


def manifest_args() -> list[str]:
    """redis-server's arguments as k8s/base/redis.yaml passes them to start.sh, without ``--dir`` (a test folder)."""
    (statefulset,) = [d for d in yaml.safe_load_all(REDIS_MANIFEST.read_text()) if d["kind"] == "StatefulSet"]
    args = list(statefulset["spec"]["template"]["spec"]["containers"][0]["args"])
    at = args.index("--dir")
    return args[:at] + args[at + 2:]


def start_script(folder: Path, observer: bool = True) -> Path:
    """A copy of k8s/base/redis (with the observer user added to its ACL); the path of its start.sh."""
    shutil.copytree(ACL_DIR, folder)
    if observer:
        with open(folder / "users.acl", "a") as acl:
            acl.write(f"user {OBSERVER[0]} on >{OBSERVER[1]} ~* &* +@all\n")
    return folder / "start.sh"


def binary_path() -> str:
    """PATH with the folder of the redis-server to use first (start.sh runs ``redis-server``)."""
    return f"{Path(redis_binary()).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def run_start(script: Path, run_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(script), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "REDIS_RUN_DIR": str(run_dir), **env})


class LockedRedis:
    """``sh start.sh`` (a copy of k8s/base/redis) with the manifest's arguments on a free port of 127.0.0.1."""

    def __init__(self, *extra_args: str, observer: bool = True, **env: str):
        self.folder = Path(tempfile.mkdtemp(prefix="facegen-redis-acl-"))
        script = start_script(self.folder / "redis", observer)
        run_dir = self.folder / "run"
        run_dir.mkdir()
        self.port = free_port()
        self.process = subprocess.Popen(
            ["sh", str(script), *manifest_args(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.folder), "--save", "", "--logfile", "redis.log", *extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "REDIS_RUN_DIR": str(run_dir), "PATH": binary_path(), "REDIS_PASSWORD": PASSWORD,
                 **env})
        deadline = time.monotonic() + 10
        while not reachable(self.url(), timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"start.sh did not start redis-server (see {self.folder}/redis.log)")
            time.sleep(0.05)

    def url(self, user: str = USER, password: str = PASSWORD) -> str:
        return f"redis://{user}:{password}@127.0.0.1:{self.port}/0"

    def client(self, user: str = USER, password: str = PASSWORD) -> redis.Redis:
        return redis.Redis.from_url(self.url(user, password))

    def settings_env(self) -> dict[str, str]:
        """What compose and k8s give the processes: the URL without secrets, the user and password apart."""
        return {"REDIS_URL": f"redis://127.0.0.1:{self.port}/0", "REDIS_USERNAME": USER, "REDIS_PASSWORD": PASSWORD}

    def denials(self) -> list[dict]:
        """The ACL log: every command, key or channel refused since the last reset."""
        with self.client(*OBSERVER) as observer:
            return observer.acl_log()

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def private_redis() -> Iterator[LockedRedis]:
    server = LockedRedis()
    yield server
    server.stop()


# ----- the server as configured ---------------------------------------------------------------------------------


def test_the_server_runs_the_manifest_memory_policy(private_redis: LockedRedis) -> None:
    args = manifest_args()
    with private_redis.client() as conn:
        memory = conn.info("memory")  # INFO is the facegen user's; CONFIG is not
    assert memory["maxmemory_policy"] == args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = args[args.index("--maxmemory") + 1]
    assert maxmemory.endswith("mb") and memory["maxmemory"] == int(maxmemory[:-2]) * 2**20


def test_only_the_facegen_user_logs_in(private_redis: LockedRedis) -> None:
    with redis.Redis(port=private_redis.port) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()  # the default user is off: no command without AUTH
    for user, password in (("default", ""), ("default", PASSWORD), (USER, "not-the-password"),
                           ("replication", PASSWORD), ("admin", PASSWORD)):  # off without their passwords
        with private_redis.client(user, password) as conn, pytest.raises(redis.AuthenticationError):
            conn.ping()
    with private_redis.client() as conn:
        assert conn.ping() is True


@pytest.mark.parametrize("command", [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "dir", "/tmp"), ("CONFIG", "GET", "requirepass"),
    ("KEYS", "*"), ("SCAN", "0"), ("SWAPDB", "0", "1"), ("SHUTDOWN", "NOSAVE"), ("ACL", "LIST"),
    ("MODULE", "LIST"), ("REPLICAOF", "127.0.0.1", "1"), ("SAVE",), ("CLIENT", "LIST"), ("CLIENT", "KILL", "ID", "1"),
    ("MONITOR",), ("SCRIPT", "FLUSH"), ("PUBLISH", "rq:pubsub:w", "x"),
])
def test_the_facegen_user_cannot_run_admin_commands(private_redis: LockedRedis, command: tuple[str, ...]) -> None:
    with private_redis.client() as conn, pytest.raises(redis.exceptions.NoPermissionError):
        conn.execute_command(*command)


def test_the_facegen_user_touches_only_its_prefixes(private_redis: LockedRedis) -> None:
    with private_redis.client() as conn:
        conn.set("facegen:acl-test", 1, ex=60)
        conn.set("rq:acl-test", 1, ex=60)
        assert conn.get("facegen:acl-test") == b"1" and conn.delete("facegen:acl-test", "rq:acl-test") == 2
        for command in (("SET", "session:1", "x"), ("GET", "other"), ("DEL", "facegenx")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                conn.execute_command(*command)
        with pytest.raises(redis.ResponseError, match="can't access at least one of the keys"):
            conn.eval("return redis.call('SET', 'other', 1)", 0)  # scripts run under the same ACL
        with pytest.raises(redis.exceptions.NoPermissionError):
            conn.execute_command("SUBSCRIBE", "__sentinel__:hello")  # a channel outside rq:pubsub:*
    reasons = {(entry["reason"], entry["object"]) for entry in private_redis.denials()}
    assert {("key", "session:1"), ("channel", "__sentinel__:hello")} <= reasons  # the ACL log records them


# ----- the processes as the facegen user -------------------------------------------------------------------------


@dataclass
class Stack:
    api: LiveServer
    worker: WorkerProcess
    sender: DeliveryProcess
    receiver: Receiver
    hook_url: str
    api_log: Path

    def alive(self) -> bool:
        return self.worker.alive() and self.api.process.poll() is None and self.sender.process.poll() is None

    def outputs(self) -> str:
        return (f"{self.worker.output()}\n--- webhooks:\n{self.sender.output()}\n--- api:\n"
                f"{self.api_log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def stack(private_redis: LockedRedis, tmp_path: Path) -> Iterator[Stack]:
    """The API (with an API key: fair queueing), the worker with the bundled demo model and the webhook sender, each
    given the Redis user and password as compose and k8s give them."""
    env = private_redis.settings_env()
    receiver = Receiver(fail_first=1)  # the first attempt fails: RQ's scheduler enqueues the retry
    hook_server, hook_url = receiver.serve()
    webhooks = {"WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOW_PRIVATE": "true", "WEBHOOK_RETRY_INTERVALS": "1",
                "WEBHOOK_ALLOWED_PORTS": hook_url.split(":")[2].split("/")[0]}
    api_log = tmp_path / "api.log"
    api = LiveServer(env["REDIS_URL"], env={**env, **webhooks, "API_KEYS": API_KEY}, log_path=api_log)
    worker = WorkerProcess(env["REDIS_URL"], ROOT / "checkpoints", MODEL_VERSION="latest", **env)
    sender = DeliveryProcess(env["REDIS_URL"], tmp_path / "webhooks.log", WEBHOOK_SWEEP_INTERVAL_S="1",
                             **env, **webhooks)
    try:
        yield Stack(api, worker, sender, receiver, hook_url, api_log)
    finally:
        worker.stop()
        sender.stop()
        api.stop()
        hook_server.shutdown()


def read_events(url: str, headers: dict[str, str], timeout_s: float) -> list[str]:
    """The event names of a job's stream, up to its final event (or ``timeout_s``)."""
    events: list[str] = []
    deadline = time.monotonic() + timeout_s
    with httpx.stream("GET", url, headers=headers, timeout=30) as stream:
        for line in stream.iter_lines():  # a keep-alive comment at least every EVENTS_KEEPALIVE_S
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
            if (events and events[-1] in ("finished", "failed", "canceled")) or time.monotonic() > deadline:
                return events
    return events


@pytest.mark.timeout(420)
def test_api_worker_and_webhook_sender_run_a_job_as_the_facegen_user(private_redis: LockedRedis,
                                                                     stack: Stack) -> None:
    with private_redis.client(*OBSERVER) as observer:
        observer.acl_log_reset()
    api, auth = stack.api.url, {"Authorization": f"Bearer {API_KEY}"}
    wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, 180,
             "a live worker (the API's /readyz)")
    body = {"label": "smiling", "count": 1, "steps": 4, "seed": 5, "webhook": {"url": stack.hook_url}}
    headers = {**auth, "Idempotency-Key": "acl-1"}
    answer = httpx.post(f"{api}/generate", json=body, headers=headers, timeout=10)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    replay = httpx.post(f"{api}/generate", json=body, headers=headers, timeout=10)
    assert replay.status_code == 202 and replay.json()["job_id"] == job_id, replay.text

    events = read_events(f"{api}/jobs/{job_id}/events", auth, timeout_s=180)
    assert events and events[-1] == "finished", f"{events}\n{stack.outputs()}\n{private_redis.denials()}"
    job = httpx.get(f"{api}/jobs/{job_id}", headers=auth, timeout=10)
    assert job.status_code == 200 and job.json()["status"] == "finished", job.text
    grid = httpx.get(f"{api}/jobs/{job_id}/result", headers=auth, timeout=10)
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png", grid.text[:300]
    image = Image.open(io.BytesIO(grid.content))
    image.load()
    assert image.format == "PNG" and min(image.size) >= 64, (image.format, image.size)
    assert httpx.get(f"{api}/models", headers=auth, timeout=10).status_code == 200

    second = httpx.post(f"{api}/generate", json={"label": "smiling", "count": 2, "steps": 50}, headers=auth,
                        timeout=10)
    assert second.status_code == 202, second.text
    canceled = httpx.delete(f"{api}/jobs/{second.json()['job_id']}", headers=auth, timeout=10)
    assert canceled.status_code in (200, 202), canceled.text  # canceled while queued, or asked to stop

    wait_for(lambda: stack.receiver.delivered.get(job_id), 60, f"the webhook delivery\n{stack.outputs()}")
    assert max(stack.receiver.attempts.values()) == 2 and stack.receiver.forged == 0  # delivered by RQ's retry
    metrics = httpx.get(f"{api}/metrics", timeout=10)
    assert metrics.status_code == 200 and "facegen_redis_up 1.0" in metrics.text, metrics.text[-2000:]
    assert private_redis.denials() == [], stack.outputs()  # nothing any process sent was refused
    assert stack.alive(), stack.outputs()


def test_a_full_redis_refuses_writes_and_the_api_answers_503(tmp_path: Path) -> None:
    server = LockedRedis("--maxmemory", "3mb", observer=False)  # the manifest's noeviction, a tiny maxmemory
    try:
        with server.client() as conn:
            publish_model(conn)  # a live worker, as far as admission knows
            filled = 0
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                while True:
                    conn.set(f"facegen:fill:{filled}", b"x" * 100_000)
                    filled += 1
            api = LiveServer(server.settings_env()["REDIS_URL"], env={**server.settings_env(), "API_KEYS": API_KEY},
                             log_path=tmp_path / "api.log")
            try:
                answer = httpx.post(f"{api.url}/generate", json={"label": "smiling"}, timeout=10,
                                    headers={"Authorization": f"Bearer {API_KEY}"})
            finally:
                api.stop()
            assert answer.status_code == 503 and "retry-after" in answer.headers, answer.text
            assert conn.exists(*(f"facegen:fill:{i}" for i in range(filled))) == filled  # nothing was evicted
    finally:
        server.stop()


# ----- start.sh ---------------------------------------------------------------------------------------------------


def test_start_script_refuses_a_missing_or_unquotable_password(tmp_path: Path) -> None:
    script = start_script(tmp_path / "redis", observer=False)
    for env, named in (({}, "REDIS_PASSWORD"), ({"REDIS_PASSWORD": "two words"}, "REDIS_PASSWORD"),
                       ({"REDIS_PASSWORD": "ok", "REDIS_REPLICATION_PASSWORD": 'quo"te'}, "REDIS_REPLICATION_PASSWORD")):
        result = run_start(script, tmp_path, "--port", "0", **{"REDIS_PASSWORD": "", **env})
        assert result.returncode == 2, result
        assert result.stderr.startswith("redis start.sh: ") and named in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_rotation_accepts_the_previous_password_and_other_users_turn_on_with_their_own() -> None:
    previous, replication, admin = secrets.token_hex(12), secrets.token_hex(12), secrets.token_hex(12)
    server = LockedRedis(REDIS_PASSWORD_PREVIOUS=previous, REDIS_REPLICATION_PASSWORD=replication,
                         REDIS_ADMIN_PASSWORD=admin)
    try:
        for password in (PASSWORD, previous):
            with server.client(USER, password) as conn:
                assert conn.ping() is True
        with server.client("admin", admin) as conn:
            assert conn.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        with server.client("replication", replication) as conn:
            assert conn.execute_command("ROLE")[0] == b"master"
            with pytest.raises(redis.exceptions.NoPermissionError):
                conn.get("facegen:anything")  # no keys
        config = (server.folder / "run" / "redis.conf").read_text()
        assert "masteruser replication\n" in config and f"masterauth {replication}\n" in config
        assert PASSWORD not in (server.folder / "run" / "users.acl").read_text()  # hashes only
    finally:
        server.stop()


class Sentinel:
    """A Redis Sentinel on 127.0.0.1 watching ``primary`` as the user replication, as the overlay redis-sentinel and
    compose's profile "sentinel" configure theirs (quorum 1: the only Sentinel; down after 1 s)."""

    def __init__(self, primary: LockedRedis, password: str, folder: Path):
        self.port = free_port()
        config = folder / "sentinel.conf"
        config.write_text(f"sentinel monitor facegen 127.0.0.1 {primary.port} 1\n"
                          f"sentinel auth-user facegen replication\nsentinel auth-pass facegen {password}\n"
                          "sentinel down-after-milliseconds facegen 1000\nsentinel failover-timeout facegen 10000\n")
        self.process = subprocess.Popen(
            [redis_binary(), str(config), "--sentinel", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(folder), "--logfile", "sentinel.log"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, decode_responses=True)
        wait_for(lambda: reachable(f"redis://127.0.0.1:{self.port}", timeout=0.2), 10, "the Sentinel")

    def primary_port(self) -> int:
        return int(self.client.sentinel_get_master_addr_by_name("facegen")[1])

    def stop(self) -> None:
        self.client.close()
        stop_process(self.process)


@pytest.mark.timeout(120)
def test_a_replica_and_a_sentinel_fail_over_as_the_replication_user(tmp_path: Path) -> None:
    password = secrets.token_hex(12)
    primary = LockedRedis(REDIS_REPLICATION_PASSWORD=password)
    replica = LockedRedis("--replicaof", "127.0.0.1", str(primary.port), REDIS_REPLICATION_PASSWORD=password)
    sentinel = Sentinel(primary, password, tmp_path)
    try:
        with primary.client() as conn:
            conn.set("facegen:replicated", 1)
        with replica.client() as conn:
            wait_for(lambda: conn.get("facegen:replicated") == b"1", 30, "the replica to copy the primary")
        wait_for(lambda: [r for r in sentinel.client.sentinel_slaves("facegen") if r["master-link-status"] == "ok"],
                 30, "the Sentinel to find the replica (it reads the primary's INFO as the user replication)")
        assert primary.denials() == []
        primary.stop()  # the Sentinel promotes the replica: REPLICAOF NO ONE and CONFIG REWRITE on it
        wait_for(lambda: sentinel.primary_port() == replica.port, 60, "the Sentinel's failover")
        with replica.client() as conn:
            wait_for(lambda: conn.execute_command("ROLE")[0] == b"master", 30, "the replica to become the primary")
            conn.set("facegen:after-failover", 1)
        assert replica.denials() == []
    finally:
        sentinel.stop()
        replica.stop()
        primary.stop()


# ----- a Redis that evicts keys ------------------------------------------------------------------------------------


def start_up(module: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=START_UP_LIMIT_S,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CHECKPOINT_DIR": str(ROOT / "checkpoints"),
             "METRICS_PORT": "0", "WEBHOOK_METRICS_PORT": "0", "PORT": "0", "API_KEYS": API_KEY,
             "WEBHOOK_SECRET": SECRET, **env})


@pytest.fixture(scope="module")
def evicting_redis() -> Iterator[LockedRedis]:
    server = LockedRedis("--maxmemory-policy", "allkeys-lru", observer=False)
    yield server
    server.stop()


@pytest.mark.parametrize("module", ["service", "worker", "service.webhooks"])
def test_a_redis_that_evicts_keys_stops_the_process_at_start_up(evicting_redis: LockedRedis, module: str) -> None:
    result = start_up(module, evicting_redis.settings_env())
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert "maxmemory-policy allkeys-lru" in line and "REDIS_ALLOW_EVICTION=true" in line, line
    assert PASSWORD not in result.stderr + result.stdout


def test_allowed_eviction_starts_the_api_with_a_warning(evicting_redis: LockedRedis, tmp_path: Path) -> None:
    env = {**evicting_redis.settings_env(), "REDIS_ALLOW_EVICTION": "true", "API_KEYS": API_KEY}
    api = LiveServer(env["REDIS_URL"], env=env, log_path=tmp_path / "api.log")
    try:
        assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200
    finally:
        api.stop()
    log = (tmp_path / "api.log").read_text()
    assert "maxmemory-policy allkeys-lru" in log and "running anyway (REDIS_ALLOW_EVICTION)" in log, log
