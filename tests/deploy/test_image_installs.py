"""Each image's install set, tested: clean virtualenvs built from exactly what docker/api.Dockerfile and
docker/worker.Dockerfile install, then ``python -m service``, ``python -m service.webhooks`` and ``python -m worker``
run from them (working directory outside the checkout) on a real Redis, and a job goes through over HTTP.

What each image installs is read from its Dockerfile: the hashed lock (``pip install --require-hashes --no-deps
-r …``), torch by its exact pin in pyproject.toml (the worker; as the Makefile does, from the index configured for
pip: the CPU wheel here, the CUDA index in the image), and the package itself, non-editable and ``--no-deps``,
built from a copy of only the paths the build stage COPYs. A module that imports something outside its image's
set (the worker once needed tqdm, a training-only package) fails here, not in production.

The dependency layer of each virtualenv is cached in ``.cache/image-venvs/`` (override: ``FACEGEN_IMAGE_VENVS``),
keyed by the lock, the torch pin and the Python version; the package layer is reinstalled on every run.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from scripts.processes import free_port, stop_process
from tests.conftest import ROOT, flushed_database, redis_url_for_db
from tests.reliability.conftest import wait_for
from tests.webhooks.conftest import SECRET, Receiver

REDIS_URL = redis_url_for_db(4)
CACHE = Path(os.environ.get("FACEGEN_IMAGE_VENVS", ROOT / ".cache" / "image-venvs")).resolve()
RECIPE = "1"  # part of the cache key: bump it when the way a dependency layer is built changes
TORCH_PIN = re.compile(r'^ *"(torch==[^"]*)",*$', re.MULTILINE)  # the Makefile's and the worker image's sed
# The checkout's environment minus what would let a process import from the checkout or another virtualenv.
LEAKY = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")  # .dockerignore keeps these out of COPY


@dataclass(frozen=True)
class ImageSpec:
    """What one Dockerfile's build stage installs."""

    name: str
    lock: str  # requirements/<name>.lock
    extra: str  # the package is installed as ".[extra]" --no-deps
    sources: tuple[str, ...]  # paths the build stage COPYs for the package (pyproject.toml, README.md, packages)
    torch: str | None  # torch's pin, when the image installs it

    def key(self) -> str:
        digest = hashlib.sha256()
        for part in (RECIPE, self.name, sys.version, sys.base_prefix, self.torch or ""):
            digest.update(part.encode() + b"\0")
        digest.update((ROOT / self.lock).read_bytes())
        return digest.hexdigest()[:16]


def read_image(name: str) -> ImageSpec:
    text = (ROOT / "docker" / f"{name}.Dockerfile").read_text().replace("\\\n", " ")
    build = re.search(r"^FROM \S+ AS build$(.*?)^FROM ", text, re.MULTILINE | re.DOTALL)
    assert build, f"docker/{name}.Dockerfile has no build stage"
    copied = []
    for line in build[1].splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(word.startswith("--from") for word in words):
            copied += [word for word in words[1:-1] if not word.startswith("--")]
    lock = re.search(r"pip install --require-hashes --no-deps -r (\S+)", build[1])
    extra = re.search(r'pip install --no-deps "\.\[(\w+)\]"', build[1])
    assert lock and extra, f"docker/{name}.Dockerfile no longer installs a hashed lock and the package"
    assert lock[1] in copied, copied
    torch = None
    if "torch==" in build[1]:
        (torch,) = TORCH_PIN.findall((ROOT / "pyproject.toml").read_text())
    return ImageSpec(name, lock[1], extra[1], tuple(p for p in copied if p != lock[1]), torch)


def clean_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LEAKY}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **settings}


def run(args: list[str], cwd: Path, what: str, timeout: float = 900) -> str:
    result = subprocess.run(args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    output = "\n".join(line for line in (result.stdout + result.stderr).splitlines() if "is ignored" not in line)
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{output[-4000:]}"
    return result.stdout


def dependency_layer(image: ImageSpec) -> Path:
    """The cached virtualenv with the image's dependencies (the Dockerfile's steps before the package's)."""
    venv = CACHE / f"{image.name}-{image.key()}"
    complete = venv / ".complete"
    if complete.exists():
        return venv
    for stale in CACHE.glob(f"{image.name}-*"):  # an older lock's venv, or one a killed run left half built
        if stale.is_dir():
            shutil.rmtree(stale)
    run([sys.executable, "-m", "venv", str(venv)], CACHE, "python -m venv")
    python = str(venv / "bin" / "python")
    if image.torch:
        run([python, "-m", "pip", "install", "--quiet", image.torch], CACHE, f"pip install {image.torch}")
    run([python, "-m", "pip", "install", "--quiet", "--require-hashes", "--no-deps", "-r", str(ROOT / image.lock)],
        CACHE, f"pip install -r {image.lock}")
    complete.write_text(json.dumps({"lock": image.lock, "torch": image.torch}))
    return venv


@dataclass(frozen=True)
class Installed:
    image: ImageSpec
    venv: Path

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")


def install(image: ImageSpec, tmp: Path) -> Iterator[Installed]:
    """The image's virtualenv with the package installed from a copy of only what the Dockerfile COPYs; held
    under a file lock (another run would reinstall the package under the running processes)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{image.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        venv = dependency_layer(image)
        src = tmp / "src"
        src.mkdir()
        for path in image.sources:
            if (ROOT / path).is_dir():
                shutil.copytree(ROOT / path, src / path, ignore=IGNORED)
            else:
                shutil.copy2(ROOT / path, src / path)
        python = str(venv / "bin" / "python")
        run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", f".[{image.extra}]"],
            src, f"pip install --no-deps .[{image.extra}]")
        yield Installed(image, venv)


@pytest.fixture(scope="module")
def api_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    yield from install(read_image("api"), tmp_path_factory.mktemp("api-image"))


@pytest.fixture(scope="module")
def worker_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    yield from install(read_image("worker"), tmp_path_factory.mktemp("worker-image"))


def where(installed: Installed, modules: list[str], cwd: Path) -> dict[str, str | None]:
    """Where each module would be imported from by the venv's interpreter (``None``: not importable)."""
    code = ("import importlib.util, json, sys\n"
            "found = {n: importlib.util.find_spec(n) for n in sys.argv[1:]}\n"
            "print(json.dumps({n: s and s.origin for n, s in found.items()}))")
    return json.loads(run([installed.python, "-c", code, *modules], cwd, "find_spec"))


def assert_installed_set(installed: Installed, entry_points: list[str], present: list[str], absent: list[str],
                         cwd: Path) -> None:
    """pip check passes, the image's entry points import (without running), ``present`` comes from the venv's
    site-packages (not the checkout) and ``absent`` is not importable at all."""
    run([installed.python, "-m", "pip", "check"], cwd, f"pip check ({installed.image.name})")
    run([installed.python, "-c", f"import {', '.join(entry_points)}"], cwd, f"import {', '.join(entry_points)}")
    origins = where(installed, present + absent, cwd)
    for module in present:
        origin = origins[module]
        assert origin and Path(origin).resolve().is_relative_to(installed.venv), (module, origin)
    assert {m: origins[m] for m in absent} == dict.fromkeys(absent), f"{installed.image.name} image carries them"


def test_api_install_set_is_the_lock_and_the_package(api_venv: Installed, tmp_path: Path) -> None:
    assert api_venv.image.torch is None and "worker" not in api_venv.image.sources
    assert_installed_set(api_venv, ["service.__main__", "service.app", "service.webhooks.__main__"],
                         ["facegen", "service", "fastapi", "uvicorn"], ["torch", "worker", "training"], tmp_path)


def test_worker_install_set_is_torch_the_lock_and_the_package(worker_venv: Installed, tmp_path: Path) -> None:
    assert worker_venv.image.torch and "service" not in worker_venv.image.sources
    assert_installed_set(worker_venv, ["worker.__main__", "worker.publish"], ["facegen", "worker", "torch", "safetensors"],
                         ["service", "training", "tqdm", "fastapi"], tmp_path)
    version = run([worker_venv.python, "-c", "import torch; print(torch.__version__)"], tmp_path, "import torch")
    assert version.strip().split("+")[0] == worker_venv.image.torch.removeprefix("torch==")


class Process:
    """``python -m <module>`` from an image's virtualenv, in ``cwd`` (outside the checkout); output in a log."""

    def __init__(self, installed: Installed, module: str, cwd: Path, args: tuple[str, ...] = (), **env: str):
        self.name = module
        self.log_path = cwd / f"{module}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        path = f"{installed.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        self.process = subprocess.Popen([installed.python, "-m", module, *args], cwd=cwd, stdout=self.log,
                                        stderr=subprocess.STDOUT, env=clean_env(PATH=path, **env))

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return f"--- {self.name} (exit {self.process.poll()}):\n{self.log_path.read_text(errors='replace')[-3000:]}"

    def stop(self) -> None:
        stop_process(self.process, grace_s=30)
        self.log.close()


@dataclass
class Stack:
    api: str
    worker_metrics: str
    webhook_metrics: str
    receiver: Receiver
    processes: list[Process]

    def outputs(self) -> str:
        return "\n".join(process.output() for process in self.processes)


@pytest.fixture(scope="module")
def conn() -> Iterator[redis.Redis]:
    yield from flushed_database(REDIS_URL)


@pytest.fixture(scope="module")
def stack(conn: redis.Redis, api_venv: Installed, worker_venv: Installed,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API, the webhook sender and the worker as the images run them, each from its own virtualenv."""
    cwd = tmp_path_factory.mktemp("image-run")
    assert ROOT not in cwd.resolve().parents, f"{cwd} is inside the checkout (TMPDIR)"
    receiver = Receiver(fail_first=0)
    server, hook_url = receiver.serve()
    receiver.url = hook_url
    api_port, worker_port, hook_port = free_port(), free_port(), free_port()
    webhooks = {"WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOW_PRIVATE": "true", "REDIS_URL": REDIS_URL,
                "WEBHOOK_ALLOWED_PORTS": hook_url.split(":")[2].split("/")[0]}
    processes = [
        Process(api_venv, "service", cwd, ("--host", "127.0.0.1", "--port", str(api_port), "--log-level", "warning"),
                API_KEYS="", ADMIN_API_KEYS="", **webhooks),
        Process(api_venv, "service.webhooks", cwd, WEBHOOK_METRICS_PORT=str(hook_port),
                WEBHOOK_SWEEP_INTERVAL_S="1", **webhooks),
        # the worker image's settings (CHECKPOINT_DIR: the bundled checkpoints), one thread on a shared CPU
        Process(worker_venv, "worker", cwd, REDIS_URL=REDIS_URL, CHECKPOINT_DIR=str(ROOT / "checkpoints"),
                MODEL_VERSION="latest", DEVICE="auto", PRECISION="auto", QUEUES="facegen",
                METRICS_PORT=str(worker_port), THREADS="1"),
    ]
    stack = Stack(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{worker_port}/metrics",
                  f"http://127.0.0.1:{hook_port}/metrics", receiver, processes)

    def ready() -> bool:
        assert all(process.alive() for process in processes), stack.outputs()
        try:
            return httpx.get(f"{stack.api}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 180, "the API to answer /readyz 200 (a worker published the model)", poll=0.3)
        yield stack
    finally:
        for process in processes:
            process.stop()
        server.shutdown()


def test_a_job_runs_on_the_image_install_sets(stack: Stack) -> None:
    body = {"label": "smiling", "count": 2, "seed": 11, "steps": 4, "webhook": {"url": stack.receiver.url}}
    answer = httpx.post(f"{stack.api}/generate", json=body, timeout=10)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]

    def ended() -> dict | None:
        job = httpx.get(f"{stack.api}/jobs/{job_id}", timeout=10).json()
        return job if job["status"] in ("finished", "failed", "canceled", "stopped") else None

    job = wait_for(ended, 180, "the job to end", poll=0.3)
    assert job["status"] == "finished", f"{job}\n{stack.outputs()}"
    result = httpx.get(f"{stack.api}/jobs/{job_id}/result", timeout=10)
    assert result.status_code == 200 and result.headers["content-type"] == "image/png", result.text[:500]
    image = Image.open(io.BytesIO(result.content))
    image.load()
    assert image.format == "PNG" and min(image.size) >= 64, (image.format, image.size)

    # the webhook sender (API image) signed and delivered the completion; the receiver verified the signature
    wait_for(lambda: stack.receiver.delivered.get(job_id), 60, f"the webhook delivery\n{stack.outputs()}")
    (payload,) = stack.receiver.delivered[job_id]
    assert payload["type"] == "job.completed" and stack.receiver.forged == 0, payload
    for metrics in (stack.worker_metrics, stack.webhook_metrics):
        assert httpx.get(metrics, timeout=5).status_code == 200, metrics
    assert all(process.alive() for process in stack.processes), stack.outputs()
