"""RQ glue: the job function the service enqueues by name, and the worker that batches compatible jobs.

:class:`FacegenWorker` is an RQ ``SimpleWorker`` (no fork: the model stays loaded). When it dequeues a job it
claims compatible queued jobs (same model, sampler, steps and guidance) up to ``MAX_BATCH`` images, moving
them atomically from the queue to RQ's intermediate list as RQ's own dequeue does, marks them all started,
runs one batched denoising pass for all of them, then lets RQ perform each job, which only encodes and stores
that job's artifacts. Every job keeps its own status, progress, result and failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis
import torch
from pydantic import ValidationError
from rq import SimpleWorker, get_current_job
from rq.job import Job, JobStatus
from rq.queue import Queue

from training.imaging import gif_bytes, grid_image, png_bytes

from .connection import OUTAGE_PATIENCE_S, RECONNECT_WAIT_MAX_S, read_timeout_s
from .engine import Engine, ImageRequest, OutOfMemory, RequestOutput
from .metrics import WorkerMetrics
from .settings import WorkerSettings
from .spec import (
    LATEST,
    META_ARTIFACTS,
    META_BATCH,
    META_ERROR,
    META_PROGRESS,
    META_RESOLVED,
    BatchKey,
    JobSpec,
    artifact_key,
    cancel_key,
)

log = logging.getLogger(__name__)
LOOKAHEAD = 256  # queued jobs inspected for batch companions


class JobCanceled(Exception):
    """Every job of a batch was canceled; the chain stops between steps."""


class PermanentJobError(Exception):
    """A job that can never succeed (bad spec, unknown attribute, too large): failed without retries."""


@dataclass
class Prepared:
    """A job's computed share of a batch, or why it failed."""

    spec: JobSpec | None
    output: RequestOutput | None = None
    error: Exception | None = None
    resolved: dict[str, Any] = field(default_factory=dict)
    sampling_s: float = 0.0
    decoding_s: float = 0.0


@dataclass
class WorkerRuntime:
    """What the worker process keeps loaded between jobs."""

    engine: Engine
    settings: WorkerSettings
    metrics: WorkerMetrics
    prepared: dict[str, Prepared] = field(default_factory=dict)


RUNTIME: WorkerRuntime | None = None  # set once by ``python -m worker`` before it starts working


def parse_spec(job: Job) -> JobSpec:
    if len(job.args) != 1 or job.kwargs or not isinstance(job.args[0], dict):
        raise PermanentJobError("malformed job: expected one JobSpec object as its only argument")
    try:
        return JobSpec.model_validate(job.args[0])
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PermanentJobError(f"invalid job spec: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def batch_key(spec: JobSpec, engine: Engine) -> BatchKey:
    """The resolved parameters that decide which jobs may share a batch; raises for another model version."""
    if spec.model not in (LATEST, engine.version):
        raise PermanentJobError(f"model {spec.model!r} is not served by this worker (it serves {engine.version})")
    guidance = spec.guidance_scale if spec.guidance_scale is not None else engine.model.sampling.guidance_scale
    return BatchKey(model=engine.version, sampler=spec.sampler, steps=spec.resolved_steps(), guidance_scale=guidance)


# Atomically move each still-queued id from the queue list to RQ's intermediate list (what RQ's own dequeue
# does with LMOVE), so a crash leaves claimed jobs where RQ's maintenance finds and retries them.
CLAIM_SCRIPT = """
local claimed = {}
for _, id in ipairs(ARGV) do
  if redis.call('LREM', KEYS[1], 1, id) == 1 then
    redis.call('RPUSH', KEYS[2], id)
    table.insert(claimed, id)
  end
end
return claimed
"""


def dequeue_wait_s(settings: WorkerSettings) -> int:
    """How long an idle worker blocks on the queue per dequeue. RQ runs its maintenance between dequeues, so this
    is the maintenance interval (RQ's default block, 405 s, would let a dead worker's job wait 7 minutes)."""
    return settings.maintenance_interval


class FacegenWorker(SimpleWorker):
    """SimpleWorker that batches compatible jobs and heartbeats while it samples."""

    # Between reconnect attempts RQ waits 1, 2, 4 s… up to this (its own cap is a minute, and a job arriving
    # during such a wait waited with it).
    max_connection_wait_time = RECONNECT_WAIT_MAX_S

    def __init__(self, *args: Any, runtime: WorkerRuntime, **kwargs: Any):
        self.runtime = runtime  # before RQ's __init__, which reads the timeouts below
        interval = runtime.settings.maintenance_interval
        super().__init__(*args, maintenance_interval=interval, worker_ttl=interval + 15, **kwargs)
        self._claim = self.connection.register_script(CLAIM_SCRIPT)

    @property
    def dequeue_timeout(self) -> int:
        return dequeue_wait_s(self.runtime.settings)

    @property
    def connection_timeout(self) -> float:
        """The read timeout RQ makes sure its client has: the connection policy's, over the dequeue wait."""
        return read_timeout_s(self.runtime.settings, self.dequeue_timeout)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.runtime.settings.heartbeat_ttl

    def claim_companions(self, leader: Job, queue: Queue) -> list[Job]:
        """Queued jobs compatible with ``leader``, oldest first, within ``MAX_BATCH`` images in total."""
        engine = self.runtime.engine
        try:
            spec = parse_spec(leader)
            key = batch_key(spec, engine)
        except PermanentJobError:
            return []
        budget = engine.max_batch - spec.count
        candidates: list[str] = []
        for job in Job.fetch_many(queue.get_job_ids(0, LOOKAHEAD), connection=self.connection):
            if budget <= 0:
                break
            if job is None or job.func_name != leader.func_name:
                continue
            try:
                other = parse_spec(job)
                if batch_key(other, engine) != key or other.count > budget:
                    continue
            except PermanentJobError:
                continue
            candidates.append(job.id)
            budget -= other.count
        if not candidates:
            return []
        claimed = [c.decode() if isinstance(c, bytes) else c
                   for c in self._claim(keys=[queue.key, queue.intermediate_queue_key], args=candidates)]
        jobs = Job.fetch_many(claimed, connection=self.connection)
        return [job for job in jobs if job is not None]

    def execute_job(self, job: Job, queue: Queue) -> None:
        window = self.runtime.settings.batch_window_ms / 1000
        if window > 0 and queue.count < self.runtime.engine.max_batch:
            time.sleep(window)  # let a burst that is still arriving join this batch
        group = [job, *self.claim_companions(job, queue)]
        executions = {}
        for member in group:
            executions[member.id] = self.prepare_execution(member)
            self.prepare_job_execution(member, remove_from_intermediate_queue=True)
        canceled: set[str] = set()

        def heartbeat() -> None:
            with self.connection.pipeline() as pipe:
                self.heartbeat(self.runtime.settings.heartbeat_ttl + 60, pipeline=pipe)
                for member in group:
                    executions[member.id].heartbeat(queue.started_job_registry, self.runtime.settings.heartbeat_ttl,
                                                    pipeline=pipe)
                pipe.execute()

        self.runtime.prepared.update(prepare_batch(self.runtime, group, self.connection, canceled, heartbeat))
        for member in group:
            if member.id in canceled:
                self.runtime.prepared.pop(member.id, None)
                self.finish_canceled(member, executions[member.id])
            else:
                self.perform_job(member, queue, executions[member.id])
        self.set_state("idle")

    def finish_canceled(self, job: Job, execution: Any) -> None:
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            pipe.execute()
        if job.get_status(refresh=True) != JobStatus.CANCELED:
            job.cancel()
        self.connection.expire(job.key, job.failure_ttl or self.runtime.settings.artifact_ttl)
        self.runtime.metrics.jobs.labels("canceled").inc()
        log.info("job %s canceled", job.id)


def cancel_flags(connection: redis.Redis, jobs: list[Job]) -> list[bool]:
    """Whether the service asked to cancel each job (one round trip)."""
    with connection.pipeline() as pipe:
        for job in jobs:
            pipe.exists(cancel_key(job.id))
        return [bool(flag) for flag in pipe.execute()]


def prepare_batch(runtime: WorkerRuntime, jobs: list[Job], connection: redis.Redis, canceled: set[str],
                  heartbeat: Any = None) -> dict[str, Prepared]:
    """Run the engine once for all valid jobs; returns each job's :class:`Prepared` (output or error)."""
    engine, settings, metrics = runtime.engine, runtime.settings, runtime.metrics
    prepared: dict[str, Prepared] = {}
    valid: list[Job] = []
    key = None
    for job in jobs:
        try:
            spec = parse_spec(job)
            job_key = batch_key(spec, engine)
            if key is not None and job_key != key:
                raise PermanentJobError("internal: incompatible job in batch")  # claim_companions prevents this
            key = job_key
            engine.model.labels_for(spec.attributes)
        except (PermanentJobError, ValueError) as exc:
            prepared[job.id] = Prepared(None, error=PermanentJobError(str(exc)))
            continue
        prepared[job.id] = Prepared(spec, resolved={"steps": job_key.steps, "guidance_scale": job_key.guidance_scale,
                                                    "sampler": job_key.sampler.value, "model": engine.version})
        valid.append(job)
    canceled.update(job.id for job, flag in zip(valid, cancel_flags(connection, valid), strict=True) if flag)
    valid = [job for job in valid if job.id not in canceled]
    if not valid:
        return prepared
    for job in valid:
        if job.enqueued_at is not None and job.started_at is not None:
            metrics.phase_seconds.labels("queue_wait").observe((job.started_at - job.enqueued_at).total_seconds())
        job.meta[META_RESOLVED] = prepared[job.id].resolved
        job.meta[META_BATCH] = {"jobs": len(valid), "images": sum(prepared[j.id].spec.count for j in valid)}
        job.meta[META_PROGRESS] = {"step": 0, "total": key.steps}
        job.save_meta()

    last_write = last_beat = 0.0

    def progress(step: int, total: int) -> None:
        nonlocal last_write, last_beat
        now = time.monotonic()
        if now - last_write < settings.progress_interval and step < total:
            return
        last_write = now
        try:
            for job, flag in zip(valid, cancel_flags(connection, valid), strict=True):
                if flag:
                    canceled.add(job.id)
                else:
                    job.meta[META_PROGRESS] = {"step": step, "total": total}
                    job.save_meta()
            if heartbeat is not None and now - last_beat > settings.heartbeat_ttl / 6:
                last_beat = now
                heartbeat()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Progress is advisory: the client already waited OUTAGE_PATIENCE_S for Redis, so keep denoising and
            # try again that much later (the results are stored at the end; an outage longer than HEARTBEAT_TTL
            # lets another worker retry the jobs).
            last_write = time.monotonic() + OUTAGE_PATIENCE_S
            log.warning("progress not recorded at step %d/%d: %s", step, total, exc)
        if all(job.id in canceled for job in valid):
            raise JobCanceled()

    requests = [ImageRequest(job.id, prepared[job.id].spec.attributes, prepared[job.id].spec.seed,
                             prepared[job.id].spec.count,
                             prepared[job.id].spec.animation_frames if prepared[job.id].spec.animation else 0)
                for job in valid]
    started = time.perf_counter()
    try:
        outputs, stats = engine.run(requests, key.sampler.value, key.steps, key.guidance_scale, progress)
    except JobCanceled:
        return prepared
    except OutOfMemory as exc:
        for job in valid:
            prepared[job.id].error = PermanentJobError(str(exc))
        return prepared
    except Exception as exc:  # noqa: BLE001 - reported per job; RQ retries transient failures
        log.exception("batch of %d jobs failed", len(valid))
        for job in valid:
            prepared[job.id].error = exc
        return prepared
    metrics.batch_seconds.observe(time.perf_counter() - started)
    metrics.batch_images.observe(stats.images)
    metrics.batch_jobs.observe(len(valid))
    metrics.denoiser_steps.inc(stats.denoiser_steps)
    metrics.precision_fallbacks.inc(stats.precision_fallbacks)
    if engine.device.type == "cuda":
        metrics.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated(engine.device))
        metrics.gpu_memory.labels("peak").set(torch.cuda.max_memory_allocated(engine.device))
    for job in valid:
        entry = prepared[job.id]
        entry.output = outputs[job.id]
        entry.sampling_s, entry.decoding_s = stats.sampling_s, stats.decoding_s
    return prepared


def _fail(job: Job, runtime: WorkerRuntime | None, exc: Exception) -> None:
    """Record a one-line reason in the job meta; permanent errors are not retried."""
    permanent = isinstance(exc, PermanentJobError)
    if permanent:
        job.retries_left = 0
    job.meta[META_ERROR] = str(exc) if permanent else f"{type(exc).__name__}: {exc}"
    job.save_meta()
    if runtime is not None:
        reason = "invalid" if permanent else type(exc).__name__
        runtime.metrics.failures.labels(reason).inc()
        runtime.metrics.jobs.labels("failed").inc()


def generate(spec: dict[str, Any]) -> dict[str, Any]:
    """RQ entry point (enqueued as ``worker.jobs.generate``): store this job's PNG grid (and GIF) in Redis.

    The images were normally computed already, batched with compatible jobs; a job run without that (e.g. by a
    plain RQ worker of this process) is computed here alone.
    """
    job = get_current_job()
    runtime = RUNTIME
    if job is None or runtime is None:
        raise RuntimeError("worker.jobs.generate runs inside `python -m worker`, which loads the model")
    prepared = runtime.prepared.pop(job.id, None)
    if prepared is None:
        prepared = prepare_batch(runtime, [job], job.connection, set())[job.id]
    if prepared.error is not None or prepared.output is None:
        error = prepared.error or PermanentJobError("job was canceled")
        _fail(job, runtime, error)
        raise error
    started = time.perf_counter()
    spec_model = prepared.spec
    ttl = job.result_ttl if job.result_ttl and job.result_ttl > 0 else runtime.settings.artifact_ttl
    artifacts = {"grid": artifact_key(job.id, "grid")}
    with job.connection.pipeline() as pipe:
        pipe.set(artifacts["grid"], png_bytes(grid_image(prepared.output.images)), ex=ttl)
        if spec_model.animation:
            artifacts["animation"] = artifact_key(job.id, "animation")
            pipe.set(artifacts["animation"], gif_bytes(prepared.output.frames, spec_model.animation_fps), ex=ttl)
        pipe.execute()
    metrics = runtime.metrics
    metrics.phase_seconds.labels("encoding").observe(time.perf_counter() - started)
    metrics.phase_seconds.labels("sampling").observe(prepared.sampling_s)
    metrics.phase_seconds.labels("decoding").observe(prepared.decoding_s)
    metrics.images.labels(spec_model.label()).inc(spec_model.count)
    metrics.jobs.labels("finished").inc()
    job.meta[META_ARTIFACTS] = artifacts
    job.meta[META_PROGRESS] = {"step": prepared.resolved["steps"], "total": prepared.resolved["steps"]}
    job.save_meta()
    return {"images": spec_model.count, "artifacts": artifacts, **prepared.resolved}
