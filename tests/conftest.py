"""Shared fixtures: a reachable Redis (``make test`` provides ``REDIS_URL``), a tiny synthetic CelebA-layout
folder and tiny checkpoints trained from it by the real training code (a few steps: random-ish weights), and the
same checkpoints with a tiny distilled student of their diffusion version."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY_VAE = {"channels": (16, 32), "blocks_per_level": 1, "groups": 8, "attention_reduction": 4}
TINY_UNET = {"base_channels": 32, "channel_mult": (1, 2), "blocks_per_level": 1, "attention_levels": (1,),
             "heads": 2, "groups": 8}


def redis_base_url() -> str:
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_url_for_db(db: int) -> str:
    """The reachable Redis with another database number (each test module family owns one); the URL's user,
    password and parameters stay (a TLS run passes its CA as ``?ssl_ca_certs=``)."""
    return urlunsplit(urlsplit(redis_base_url())._replace(path=f"/{db}"))


def flushed_database(url: str) -> Iterator[redis.Redis]:
    """A client of ``url``'s database, emptied before and after use (for a fixture to ``yield from``)."""
    connection = redis.Redis.from_url(url)
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth"), 120, seed=3)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory, synth_dir: Path) -> Path:
    """A checkpoints folder with one tiny VAE and one tiny diffusion version (3 training steps each)."""
    from facegen.model.config import (
        DataConfig,
        DiffusionTrainConfig,
        SamplingConfig,
        ScheduleConfig,
        UNetConfig,
        VAEConfig,
        VAETrainConfig,
    )
    from training.train_diffusion import train_diffusion
    from training.train_vae import train_vae
    from training.trainer import RunOptions

    root = tmp_path_factory.mktemp("checkpoints")
    runs = tmp_path_factory.mktemp("runs")
    opts = RunOptions(synth_dir, root, runs / "vae", precision="fp32", threads=1)
    train_vae(DataConfig(), VAEConfig(**TINY_VAE), VAETrainConfig(steps=3, batch_size=8, log_every=1), opts)
    opts = RunOptions(synth_dir, root, runs / "diffusion", precision="fp32", threads=1)
    train_diffusion("latest", UNetConfig(**TINY_UNET), ScheduleConfig(), SamplingConfig(),
                    DiffusionTrainConfig(steps=3, batch_size=16, warmup=1, log_every=1), opts)
    return root


def distill_tiny(root: Path, data: Path, run: Path, teacher: str, steps: int, **kwargs) -> Path:
    """``steps`` iterations of ``python -m training distill`` on ``teacher`` under ``root`` (batch 8, fp32, one
    thread, the latents cached beside ``root``), run folder ``run``; returns the student's version folder.
    ``kwargs``: ``training.distill.distill``'s ``minutes``, ``resume`` and ``init_from``."""
    from facegen.model.config import ConsistencyConfig, DistillConfig
    from training.distill import distill
    from training.trainer import RunOptions

    cfg = DistillConfig(steps=steps, batch_size=8, warmup=1, log_every=1, save_every=2, lr=1e-3)
    opts = RunOptions(data, root, run, precision="fp32", threads=1, latent_cache=root.parent / "latents")
    return distill(teacher, cfg, ConsistencyConfig(), opts, **kwargs)


@pytest.fixture(scope="session")
def tiny_student_checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: Path,
                             synth_dir: Path) -> Path:
    """A copy of ``tiny_checkpoints`` with a student of its diffusion version (2 distillation iterations; the
    default ``ConsistencyConfig``: 1-8 steps, 4 by default), which is the newest diffusion version there."""
    root = tmp_path_factory.mktemp("student") / "checkpoints"
    shutil.copytree(tiny_checkpoints, root)
    distill_tiny(root, synth_dir, root.parent / "run", "latest", 2)
    return root


@pytest.fixture(scope="session", autouse=True)
def artifact_store_switch() -> Iterator[None]:
    """``ARTIFACT_STORE=s3 pytest …`` runs the tests' API and worker processes (which inherit the environment) on
    an S3 store: a SeaweedFS started for the session, unless ``S3_BUCKET`` already names one (e.g. under
    ``python -m scripts.s3ctl run -- pytest …``)."""
    if os.environ.get("ARTIFACT_STORE") != "s3" or os.environ.get("S3_BUCKET"):
        yield
        return
    from scripts.s3ctl import S3Server

    server = S3Server().start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in server.env().items():
                patch.setenv(name, value)
            yield
        stored = server.client().list_objects_v2(Bucket=server.bucket).get("KeyCount", 0)
        print(f"\n[artifact store] the session stored {stored} objects in s3://{server.bucket}", file=sys.stderr)
    finally:
        server.stop()


# ---- markers for `make check`, which runs only the tests with neither ----------------------------------------------
# `services`: the test needs Redis, a server or worker process, SeaweedFS or a browser. Set when it uses one of
# SERVICE_FIXTURES (directly or through another fixture), when its module talks to a Redis database of its own (a
# module-level REDIS_URL), or when its path starts with one of SERVICE_PATHS.
# `slow`: the test trains or compiles for long (tens of seconds to minutes on a CPU); set by SLOW_TESTS, node-id
# prefixes, besides the tests that carry the marker themselves.
# `make test` runs everything; `make check` runs ``-m "not services and not slow"`` with Redis out of reach, so that
# a test which reaches a service without being marked fails there instead of passing by luck.
SERVICE_FIXTURES = frozenset({
    "redis_url",  # tests/service: the Redis of `make test`
    "conn", "connection",  # a client of a test database
    "live_server", "background_worker",  # `python -m service`, a worker thread serving the queue
    "private_redis", "tls_redis",  # redis-server processes of the test's own
    "s3_server",  # SeaweedFS
})
SERVICE_PATHS = (
    "tests/reliability/",  # real processes on a real Redis, broken on purpose
    "tests/service/test_admission_replicas.py",  # a primary and a replica of its own
    "tests/worker/test_warm_up.py",  # `python -m worker` processes
    "tests/deploy/test_redis_acl.py",  # redis-server started by k8s/base/redis/start.sh, the real processes
)
SLOW_TESTS = (
    "tests/training/test_evaluate.py",  # trains a judge, measures KID/FID (minutes)
    "tests/training/test_judge.py::test_augmented_judge_",  # trains judges
    "tests/training/test_judge.py::test_a_cached_judge_",
    "tests/training/test_judge.py::test_a_panel_reads_the_mean_",
    "tests/training/test_training.py::test_diffusion_loss_goes_down",  # trains until the loss falls
    "tests/training/test_training.py::test_ddp_",  # two training processes
    "tests/worker/test_engine.py::test_compiled_unet_",  # inductor compiles the UNet
)


def needs_services(item: pytest.Item) -> bool:
    return (bool(SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())))
            or hasattr(getattr(item, "module", None), "REDIS_URL")
            or item.nodeid.startswith(SERVICE_PATHS))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if needs_services(item):
            item.add_marker(pytest.mark.services)
        if item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
