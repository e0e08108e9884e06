"""``python -m worker``: load the model once (pulled from ``MODEL_STORE`` when one is set), publish what it
serves in Redis, serve metrics, and work the queue.

Refuses to start (exit code 2, one clear line) when Redis refuses its credentials or TLS set-up or may evict keys
(``REDIS_ALLOW_EVICTION``), when the checkpoint is missing, corrupt or tampered with (in ``CHECKPOINT_DIR`` or in
the model store), when the model store has no such version or alias, or when ``COMPILE`` cannot work here (or its
warm-up fails). Exits with code 1 (one line) when the model store cannot be reached: a restart tries again.
With ``COMPILE`` on, every compile bucket is warmed up before the worker registers with RQ and takes jobs.

While it runs, it refreshes a :class:`~facegen.contract.spec.ModelInfo` entry for each version it holds loaded
(``is_latest`` for the one its ``"latest"`` requests run on) and its own
:class:`~facegen.contract.spec.WorkerServing` entry, from the state of its model pool (worker/models.py).
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
from facegen.contract.model_store import ModelStoreError, ModelStoreUnavailable, open_model_store
from facegen.contract.spec import (
    DEFAULT_STEPS,
    ModelInfo,
    Sampler,
    WorkerServing,
    publish_model_entry,
    publish_worker_entry,
)
from facegen.model.checkpoints import CheckpointError

from . import batch, jobs
from .engine import CompileUnsupported, Engine
from .metrics import Liveness, WorkerMetrics
from .models import ModelPool
from .settings import WorkerSettings

log = logging.getLogger("worker")
REGISTRY_TTL_S = 30  # a model or worker entry disappears this long after its worker stops refreshing it


def model_info(engine: Engine, is_latest: bool, worker_name: str) -> ModelInfo:
    """The registry entry of a loaded version: ``is_latest`` when the worker runs its ``"latest"`` requests on it;
    the student sampler's default steps and the ``student`` entry when it has one."""
    student = engine.student_info()
    default_steps = {sampler.value: steps for sampler, steps in DEFAULT_STEPS.items() if sampler != Sampler.student}
    if student is not None:
        default_steps[Sampler.student.value] = student.default_steps
    return ModelInfo(
        version=engine.version, vae_version=engine.model.manifest.vae_version, attributes=engine.model.attributes,
        resolution=engine.model.image_size, default_guidance_scale=engine.model.sampling.guidance_scale,
        default_steps=default_steps, is_latest=is_latest, device=engine.device.type,
        dtype=str(engine.dtype).removeprefix("torch."), workers=[worker_name], student=student)


def publish_entries(connection: redis.Redis, pool: ModelPool, model_version: str, worker_name: str) -> None:
    """Write this worker's entries as its pool stands now: one per loaded version, and what it serves."""
    served, engines = pool.snapshot()
    for engine in engines:
        publish_model_entry(connection, model_info(engine, engine is served, worker_name), REGISTRY_TTL_S)
    publish_worker_entry(connection, WorkerServing(worker=worker_name, model_version=model_version,
                                                   serves=served.version, loaded=[e.version for e in engines]),
                         REGISTRY_TTL_S)


def publish_models(connection: redis.Redis, pool: ModelPool, model_version: str, worker_name: str,
                   stop: threading.Event) -> None:
    """Keep this worker's entries alive in Redis until ``stop`` is set (a dead worker's entries expire; an
    unloaded version's too), each refresh from the pool's current state, and one as soon as that changes."""
    while not stop.is_set():
        pool.changed.clear()
        try:
            publish_entries(connection, pool, model_version, worker_name)
        except redis.RedisError as exc:
            log.warning("could not refresh the model registry: %s", exc)
        pool.changed.wait(REGISTRY_TTL_S / 3)


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


def load_served(pool: ModelPool, settings: WorkerSettings, liveness: Liveness) -> tuple[Engine | None, int]:
    """The served version's engine (pulled from the model store first when one is set), or ``None`` and the exit
    code after one line on stderr: 1 when the store cannot be reached (a restart tries again), else 2."""
    source = pool.store.location if pool.store is not None else settings.checkpoint_dir
    liveness.phase = "loading"
    try:
        return pool.start(), 0
    except CompileUnsupported as exc:
        print(f"worker: COMPILE={settings.compile} cannot run here: {exc}", file=sys.stderr)
        return None, 2
    except ModelStoreUnavailable as exc:
        print(f"worker: cannot reach the model store to load model {settings.model_version!r}: {exc}",
              file=sys.stderr)
        return None, 1
    except (ModelStoreError, CheckpointError, KeyError, ValueError, RuntimeError) as exc:
        print(f"worker: cannot load model {settings.model_version!r} from {source}: {exc}", file=sys.stderr)
        return None, 2


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
    pool = ModelPool(settings, metrics, open_model_store(settings))
    engine, code = load_served(pool, settings, liveness)
    if engine is None:
        return code
    if engine.buckets and not warm_up(engine, settings, metrics, liveness):
        return 2
    name = args.name or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    runtime = batch.WorkerRuntime(engine, settings, metrics, liveness, open_store(settings, connection), pool)
    stop = threading.Event()
    threading.Thread(target=publish_models, args=(connection, pool, settings.model_version, name, stop),
                     daemon=True).start()
    student = engine.student_info()
    log.info("serving model %s (%s) from Redis at %s", engine.version,
             json.dumps({"device": engine.device.type, "dtype": str(engine.dtype).removeprefix("torch."),
                         "max_batch": settings.max_batch, "student": student.version if student else None}),
             describe(settings))
    try:
        jobs.work(connection, settings, name, lambda queue: batch.perform_batch(queue, runtime), runtime.tick,
                  burst=args.burst)
    finally:
        stop.set()
        pool.changed.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
