"""``python -m worker``: load the model once, publish it in Redis, serve metrics, and work the queue.

Refuses to start (exit code 2, one clear line) when Redis refuses its credentials or TLS set-up or may evict keys
(``REDIS_ALLOW_EVICTION``), when the checkpoint is missing, corrupt or tampered with, or when ``COMPILE`` cannot
work here (or its warm-up fails).
With ``COMPILE`` on, every compile bucket is warmed up before the worker registers with RQ and takes jobs.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import threading
import uuid

import redis
import torch

from facegen.contract.artifacts import open_store
from facegen.contract.connection import (
    OUTAGE_PATIENCE_S,
    connect,
    credentials_problem,
    describe,
    eviction_problem,
)
from facegen.contract.spec import DEFAULT_STEPS, ModelInfo, Sampler, publish_model_entry
from facegen.model.checkpoints import LATEST, CheckpointError, served_versions

from . import batch, jobs
from .engine import CompileUnsupported, Engine
from .metrics import Liveness, WorkerMetrics
from .settings import WorkerSettings

log = logging.getLogger("worker")
REGISTRY_TTL_S = 30  # a model entry disappears this long after its last worker stops refreshing it


def model_info(engine: Engine, settings: WorkerSettings, worker_name: str) -> ModelInfo:
    """The registry entry of the engine's model: ``is_latest`` when it is the newest plain version of the
    checkpoints (students aside); the student sampler's default steps and the ``student`` entry when it has one."""
    student = engine.student_info()
    default_steps = {sampler.value: steps for sampler, steps in DEFAULT_STEPS.items() if sampler != Sampler.student}
    if student is not None:
        default_steps[Sampler.student.value] = student.default_steps
    return ModelInfo(
        version=engine.version, vae_version=engine.model.manifest.vae_version, attributes=engine.model.attributes,
        resolution=engine.model.image_size, default_guidance_scale=engine.model.sampling.guidance_scale,
        default_steps=default_steps, is_latest=served_versions(settings.checkpoint_dir, LATEST)[0] == engine.version,
        device=engine.device.type, dtype=str(engine.dtype).removeprefix("torch."), workers=[worker_name],
        student=student)


def publish_model(connection: redis.Redis, info: ModelInfo, stop: threading.Event) -> None:
    """Keep this worker's model entry alive in Redis until ``stop`` is set (a dead worker's entry expires)."""
    while not stop.is_set():
        try:
            publish_model_entry(connection, info, REGISTRY_TTL_S)
        except redis.RedisError as exc:
            log.warning("could not refresh the model registry: %s", exc)
        stop.wait(REGISTRY_TTL_S / 3)


def warm_up(engine: Engine, settings: WorkerSettings, metrics: WorkerMetrics, liveness: Liveness) -> bool:
    """Compile every bucket before the worker registers with RQ or publishes its model, so no job waits on a
    compile and no compile runs without a heartbeat; /healthz reports the progress meanwhile. False (after one
    line on stderr) when compiling fails."""
    liveness.phase = "warming_up"
    log.info("compiling the UNet (COMPILE=%s) for %d bucket sizes: %s rows", settings.compile, len(engine.buckets),
             engine.buckets)

    done = 0

    def on_bucket(rows: int, seconds: float) -> None:
        nonlocal done
        done += 1
        liveness.phase = f"warming_up: {done}/{len(engine.buckets)} buckets compiled"
        metrics.compile_seconds.labels(str(rows)).set(seconds)
        log.info("compiled bucket %d rows in %.1f s", rows, seconds)

    try:
        seconds = engine.warm_up(on_bucket)
    except Exception as exc:  # noqa: BLE001 - inductor/Triton failures have many types; one line, no traceback
        log.debug("warm-up failed", exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"worker: COMPILE={settings.compile} warm-up failed: {type(exc).__name__}: {first}", file=sys.stderr)
        return False
    log.info("warm-up done: %.1f s for %d buckets", sum(seconds.values()), len(seconds))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--name", default=None, help="worker name (default: host + random suffix)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = WorkerSettings()
    metrics = WorkerMetrics()
    liveness = Liveness(settings.liveness_timeout)
    if settings.liveness_timeout <= jobs.dequeue_wait_s(settings):
        log.warning("LIVENESS_TIMEOUT (%d s) is not above MAINTENANCE_INTERVAL (%d s): an idle worker blocked on "
                    "the queue will look stalled", settings.liveness_timeout, jobs.dequeue_wait_s(settings))
    connection = connect(settings, blocking_s=jobs.dequeue_wait_s(settings), on_error=metrics.count_redis_error,
                         patience_s=OUTAGE_PATIENCE_S)
    problem = credentials_problem(connection, settings) or eviction_problem(connection, settings)
    if problem is not None:  # a configuration error: retrying would only loop
        print(f"worker: {problem}", file=sys.stderr)
        return 2
    if settings.metrics_port:  # /healthz answers 503 (loading, warming_up) until the loop starts
        metrics.serve(settings.metrics_port, liveness)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    liveness.phase = "loading"
    try:
        engine = Engine(settings.checkpoint_dir, settings.model_version, settings.device, settings.precision,
                        settings.max_batch, settings.compile)
    except CompileUnsupported as exc:
        print(f"worker: COMPILE={settings.compile} cannot run here: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, KeyError, ValueError, RuntimeError) as exc:
        print(f"worker: cannot load model {settings.model_version!r} from {settings.checkpoint_dir}: {exc}",
              file=sys.stderr)
        return 2
    if engine.buckets and not warm_up(engine, settings, metrics, liveness):
        return 2
    name = args.name or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    info = model_info(engine, settings, name)
    metrics.model.info({"version": info.version, "vae_version": info.vae_version, "device": info.device,
                        "dtype": info.dtype})
    runtime = batch.WorkerRuntime(engine, settings, metrics, liveness, open_store(settings, connection))
    stop = threading.Event()
    threading.Thread(target=publish_model, args=(connection, info, stop), daemon=True).start()
    log.info("serving model %s (%s) from Redis at %s", info.version,
             json.dumps({"device": info.device, "dtype": info.dtype, "max_batch": settings.max_batch,
                         "student": info.student.version if info.student else None}),
             describe(settings))
    try:
        jobs.work(connection, settings, name, lambda queue: batch.perform_batch(queue, runtime), runtime.tick,
                  burst=args.burst)
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
