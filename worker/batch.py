"""A batch of compatible jobs as one unit of work, in the steps RQ names a job's: claim → prepare → perform
(denoise) → store → handle success, failure or cancel.

:func:`perform_batch` runs the batch of the job RQ dequeued. It takes the RQ adapter (worker/jobs.py) as an
argument and reaches RQ only through it: jobs are :class:`~worker.jobs.QueuedJob` here. A batch holds the leader
and the waiting jobs compatible with it (same model version, sampler, steps and guidance; the API keys' jobs taken
in turn) up to ``MAX_BATCH`` images, denoised in one engine run; every job keeps its own status, progress, result
and failure, and its progress, events and previews as the engine goes (worker/progress.py).

The leader's model version picks the engine of the whole batch (worker/models.py), before any job is claimed: the
served version switches only between batches, so the jobs of a batch run, and name in their provenance, the one
version they were claimed for. A leader whose version is not loaded yet is claimed alone and runs once its version
is pulled and loaded (its heartbeat kept meanwhile).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import redis
import torch
from pydantic import ValidationError

from facegen.contract.artifacts import ArtifactStore, put_retrying
from facegen.contract.model_store import ModelStoreUnavailable
from facegen.contract.spec import (
    DEFAULT_EDIT_GUIDANCE,
    JOB_FUNCTION,
    LATEST,
    META_ARTIFACTS,
    META_BATCH,
    META_BATCH_RUN,
    META_ERROR,
    META_PROGRESS,
    META_RESOLVED,
    BatchKey,
    EditSpec,
    JobEvent,
    JobSpec,
    Sampler,
    append_event,
    parse_job_spec,
)

from .edit import decode_face, edit_request, progress_total
from .encoding import encode_artifacts
from .engine import Engine, ImageRequest, NonFiniteOutput, OutOfMemory, RequestOutput, RunStats
from .errors import JobCanceled, JobTimeout, PermanentJobError
from .jobs import JobStatus, QueuedJob, RqAdapter
from .metrics import Liveness, WorkerMetrics
from .models import ModelPool
from .progress import ProgressReporter, cancel_flags
from .provenance import ModelIdentity
from .settings import WorkerSettings
from .transition import transition_output, transition_requests

log = logging.getLogger(__name__)
LOOKAHEAD = 256  # queued jobs inspected for batch companions


@dataclass
class Prepared:
    """A job's computed share of a batch, or why it failed."""

    spec: JobSpec | None
    output: RequestOutput | None = None
    error: Exception | None = None
    resolved: dict[str, Any] = field(default_factory=dict)
    sampling_s: float = 0.0
    decoding_s: float = 0.0
    face: torch.Tensor | None = None  # an edit's input, uint8 [3, S, S] cropped like training


@dataclass
class WorkerRuntime:
    """What the worker process keeps loaded between jobs; a batch runs with a copy whose ``engine`` is its own."""

    engine: Engine  # the engine of the batch (the served one outside batches)
    settings: WorkerSettings
    metrics: WorkerMetrics
    liveness: Liveness | None = None  # ticked by the main loop (worker/metrics.py)
    artifacts: ArtifactStore | None = None  # where results go; `python -m worker` opens it from the settings
    models: ModelPool | None = None  # every version loaded; None: ``engine`` alone, the one "latest" runs on

    def tick(self) -> None:
        if self.liveness is not None:
            self.liveness.tick()

    def version_of(self, model: str) -> str:
        """The version a job naming ``model`` (a version or ``"latest"``) runs on."""
        if self.models is not None:
            return self.models.version_for(model)
        return self.engine.version if model == LATEST else model


@dataclass
class Batch:
    """Jobs denoised in one pass: each job's share, the jobs still running, and those canceled on the way."""

    shares: dict[str, Prepared] = field(default_factory=dict)
    key: BatchKey | None = None  # the parameters every running job shares
    running: list[QueuedJob] = field(default_factory=list)
    canceled: set[str] = field(default_factory=set)


def perform_batch(adapter: RqAdapter, runtime: WorkerRuntime) -> None:
    """One batch, led by ``adapter.leader``: claim, prepare, denoise, then store and handle each job."""
    jobs, runtime, batch = claim_on_its_model(adapter, runtime)
    if batch is None:
        batch = prepare(jobs, runtime, adapter.connection)
    if batch.running:
        denoise(batch, runtime, adapter.connection, adapter.heartbeat)
    beaten = time.monotonic()
    for job in jobs:
        try:
            # storing a job may wait on an unreachable artifact store (ARTIFACT_PUT_ATTEMPTS): once that took a
            # while, the jobs not yet stored get a new heartbeat deadline first
            if time.monotonic() - beaten > runtime.settings.heartbeat_ttl / 6:
                adapter.heartbeat()
                beaten = time.monotonic()
            handle(job, batch, adapter, runtime)
        except redis.RedisError as exc:  # the job stays started: once its heartbeat expires, RQ retries it
            log.warning("job %s not recorded: %s", job.id, exc)


# ----- claim -------------------------------------------------------------------------------------------------


def parse_spec(job: QueuedJob) -> JobSpec:
    """The job's spec; raises ``PermanentJobError`` for a job stored as anything but JSON, one enqueued with another
    function than ``JOB_FUNCTION`` (RQ would call that function with its arguments) or with an invalid spec."""
    if job.refusal is not None:
        raise PermanentJobError(job.refusal)
    if job.func_name != JOB_FUNCTION:
        raise PermanentJobError(f"malformed job: its function is not {JOB_FUNCTION}: refused")
    if job.argument is None:
        raise PermanentJobError("malformed job: expected one JobSpec object as its only argument")
    try:
        return parse_job_spec(job.argument)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first["loc"][1:] if first["loc"][:1] in (("generate",), ("edit",)) else first["loc"]  # the kind's tag
        raise PermanentJobError(f"invalid job spec: {'.'.join(map(str, loc))}: {first['msg']}") from None


def leader_model(adapter: RqAdapter) -> str:
    """The model the leader names; ``"latest"`` for a leader whose spec is invalid (its batch fails it)."""
    try:
        return parse_spec(adapter.leader).model
    except PermanentJobError:
        return LATEST


def claim_on_its_model(adapter: RqAdapter, runtime: WorkerRuntime
                       ) -> tuple[list[QueuedJob], WorkerRuntime, Batch | None]:
    """Between batches (an alias followed, worker/models.py), the engine of the leader's model version: the batch's
    jobs claimed and the runtime of the batch, with its engine. A version not loaded yet is pulled and loaded with
    the leader claimed alone; when it cannot be had, the third item is the batch that fails the leader."""
    models = runtime.models
    if models is None:
        return claim(adapter, runtime), runtime, None
    models.follow_alias()
    model = leader_model(adapter)
    engine = models.ready(model)
    if engine is not None:
        scoped = replace(runtime, engine=engine)
        return claim(adapter, scoped), scoped, None
    jobs = adapter.claim([])

    def keep_alive() -> None:
        runtime.tick()
        try:
            adapter.heartbeat()
        except redis.RedisError as exc:  # the next one may pass; RQ retries the job if none does in time
            log.warning("heartbeat while loading model %s failed: %s", models.version_for(model), exc)

    try:
        engine = models.engine(model, keep_alive)
    except (PermanentJobError, ModelStoreUnavailable) as exc:  # the latter is transient: RQ retries the job
        return jobs, runtime, Batch(shares={job.id: Prepared(None, error=exc) for job in jobs})
    return jobs, replace(runtime, engine=engine), None


def batch_key(spec: JobSpec, runtime: WorkerRuntime) -> BatchKey:
    """The resolved parameters that decide which jobs may share a batch, on the batch's engine; raises for another
    model version, and for the student sampler without a student or with steps or a guidance scale the student
    does not take."""
    engine = runtime.engine
    if runtime.version_of(spec.model) != engine.version:
        raise PermanentJobError(f"model {spec.model!r} is not served by this worker (it serves {engine.version})")
    edit = {"kind": spec.kind, "strength": spec.strength} if isinstance(spec, EditSpec) else {}
    default_guidance = DEFAULT_EDIT_GUIDANCE if edit else engine.model.sampling.guidance_scale
    guidance = spec.guidance_scale if spec.guidance_scale is not None else default_guidance
    steps = spec.resolved_steps()
    if spec.sampler == Sampler.student:
        student = engine.student_info()
        if student is None:
            raise PermanentJobError(f"model {engine.version} has no distilled student on this worker: the student "
                                    "sampler is not served (GET /models: student)")
        steps = spec.steps if spec.steps is not None else student.default_steps
        problem = student.steps_problem(steps) or student.guidance_problem(guidance)
        if problem is not None:
            raise PermanentJobError(problem)
    return BatchKey(model=engine.version, sampler=spec.sampler, steps=steps, guidance_scale=guidance, **edit)


def claim(adapter: RqAdapter, runtime: WorkerRuntime) -> list[QueuedJob]:
    """The batch's jobs, leader first, started together: the leader and its companions still waiting, once a burst
    still arriving had ``BATCH_WINDOW_MS`` to join (unless a full batch is already waiting)."""
    window = runtime.settings.batch_window_ms / 1000
    max_batch = runtime.engine.max_batch
    if window > 0 and adapter.waiting_count(max_batch) < max_batch:
        time.sleep(window)
    return adapter.claim(companions(adapter, runtime))


def companions(adapter: RqAdapter, runtime: WorkerRuntime) -> list[QueuedJob]:
    """Waiting jobs compatible with the leader on the batch's engine within ``MAX_BATCH`` images in total: those
    in the RQ queue, then the API keys' waiting jobs taken in turn (each key's first, then each key's second, …)."""
    leader = adapter.leader
    try:
        spec = parse_spec(leader)
        key = batch_key(spec, runtime)
    except PermanentJobError:
        return []
    budget = runtime.engine.max_batch - spec.chains()
    found: list[QueuedJob] = []
    for job in adapter.waiting(LOOKAHEAD):
        if budget <= 0:
            break
        # the batch is bounded by its jobs' timeout: only jobs with the leader's share it
        if job.func_name != leader.func_name or job.timeout_s != leader.timeout_s:
            continue
        try:
            other = parse_spec(job)
            if batch_key(other, runtime) != key or other.chains() > budget:
                continue
        except PermanentJobError:
            continue
        found.append(job)
        budget -= other.chains()
    return found


# ----- prepare -----------------------------------------------------------------------------------------------


def prepare(jobs: list[QueuedJob], runtime: WorkerRuntime, connection: redis.Redis) -> Batch:
    """Check the jobs, set the canceled aside, mark the rest started: the batch ready to denoise."""
    batch = check_jobs(runtime, jobs)
    drop_canceled(batch, connection)
    if batch.running:
        mark_started(batch, runtime, connection)
    return batch


def check_jobs(runtime: WorkerRuntime, jobs: list[QueuedJob]) -> Batch:
    """Parse each job's spec against the batch's engine; a job that can never run gets a permanent error."""
    engine = runtime.engine
    batch = Batch()
    for job in jobs:
        try:
            spec = parse_spec(job)
            key = batch_key(spec, runtime)
            if batch.key is not None and key != batch.key:
                raise PermanentJobError("internal: incompatible job in batch")  # companions() prevents this
            batch.key = key
            engine.model.labels_for(spec.attributes)
            face = decode_face(spec.image, engine.model.manifest.data) if isinstance(spec, EditSpec) else None
        except (PermanentJobError, ValueError) as exc:
            if job.refusal is not None:
                log.warning("job %s: %s (written by a process that does not store jobs as JSON)", job.id, job.refusal)
            batch.shares[job.id] = Prepared(None, error=PermanentJobError(str(exc)))
            continue
        resolved = ({"steps": key.steps, "guidance_scale": key.guidance_scale, "sampler": key.sampler.value,
                     "model": engine.version} | ({"strength": key.strength} if face is not None else {})
                    | ({"student": engine.student.version} if key.sampler == Sampler.student else {}))
        batch.shares[job.id] = Prepared(spec, resolved=resolved, face=face)
        batch.running.append(job)
    return batch


def drop_canceled(batch: Batch, connection: redis.Redis) -> None:
    """Move the running jobs the service asked to cancel to ``batch.canceled``."""
    flags = cancel_flags(connection, batch.running)
    batch.canceled.update(job.id for job, flag in zip(batch.running, flags, strict=True) if flag)
    batch.running = [job for job in batch.running if job.id not in batch.canceled]


def mark_started(batch: Batch, runtime: WorkerRuntime, connection: redis.Redis) -> None:
    """Record each running job's queue wait and write its resolved parameters, batch, batch run (which batch, and
    its RQ ``started_at``: when the batch claimed it) and progress 0; append its ``started`` event."""
    images = sum(batch.shares[job.id].spec.chains() for job in batch.running)
    for job in batch.running:
        if job.queue_wait_s is not None:
            runtime.metrics.phase_seconds.labels("queue_wait").observe(job.queue_wait_s)
        job.meta[META_RESOLVED] = batch.shares[job.id].resolved
        job.meta[META_BATCH] = {"jobs": len(batch.running), "images": images}
        job.meta[META_BATCH_RUN] = {"id": batch.running[0].id, "started_at": job.started_at.isoformat()}
        job.meta[META_PROGRESS] = {"step": 0, "total": progress_total(batch.shares[job.id].spec, batch.key.steps)}
        job.save_meta()
    with connection.pipeline(transaction=False) as pipe:
        for job in batch.running:
            append_event(pipe, job.id, JobEvent.started, {"started_at": job.meta[META_BATCH_RUN]["started_at"],
                                                          "batch": job.meta[META_BATCH]}, runtime.settings.artifact_ttl)
        pipe.execute()


# ----- perform -----------------------------------------------------------------------------------------------


def image_requests(job_id: str, spec: JobSpec) -> list[ImageRequest]:
    """The engine requests of one job: its images, or each frame of its transition (worker/transition.py)."""
    if spec.transition:
        return transition_requests(job_id, spec)
    return [ImageRequest(job_id, spec.attributes, spec.seed, spec.count,
                         spec.animation_frames if spec.animation else 0, spec.first_index)]


def denoise(batch: Batch, runtime: WorkerRuntime, connection: redis.Redis,
            heartbeat: Callable[[], None] | None) -> None:
    """One engine run for the running jobs; each gets its output, or the run's error (a canceled run: neither)."""
    engine, key = runtime.engine, batch.key
    shares = [batch.shares[job.id] for job in batch.running]
    started = time.perf_counter()
    try:
        with ProgressReporter(batch, runtime, connection, heartbeat) as progress:
            pairs = list(zip(batch.running, shares, strict=True))
            if key.kind == "edit":  # edits batch only with edits of the same strength (see batch_key)
                edits = [edit_request(job.id, share.spec, share.face) for job, share in pairs]
                outputs, stats = engine.edit(edits, key.steps, key.guidance_scale, key.strength, progress)
            else:
                requests = [request for job, share in pairs for request in image_requests(job.id, share.spec)]
                outputs, stats = engine.run(requests, key.sampler.value, key.steps, key.guidance_scale, progress,
                                            progress)
    except JobCanceled:
        return
    except JobTimeout as exc:
        log.warning("batch of %d jobs stopped: %s", len(batch.running), exc)
        fail_running(batch, exc)
        return
    except (OutOfMemory, NonFiniteOutput) as exc:  # a retry would meet the same limit or the same overflow
        fail_running(batch, PermanentJobError(str(exc)))
        return
    except Exception as exc:  # noqa: BLE001 - reported per job; RQ retries transient failures
        log.exception("batch of %d jobs failed", len(batch.running))
        fail_running(batch, exc)
        return
    record_batch(runtime.metrics, engine, stats, len(batch.running), time.perf_counter() - started)
    for job in batch.running:
        share = batch.shares[job.id]
        share.output = transition_output(outputs, job.id, share.spec) if share.spec.transition else outputs[job.id]
        share.sampling_s, share.decoding_s = stats.sampling_s, stats.decoding_s


def fail_running(batch: Batch, error: Exception) -> None:
    for job in batch.running:
        batch.shares[job.id].error = error


def record_batch(metrics: WorkerMetrics, engine: Engine, stats: RunStats, jobs: int, seconds: float) -> None:
    metrics.batch_seconds.observe(seconds)
    metrics.batch_images.observe(stats.images)
    metrics.batch_jobs.observe(jobs)
    metrics.denoiser_steps.inc(stats.denoiser_steps)
    metrics.count_precision_fallbacks(stats.precision_fallbacks)
    if engine.device.type == "cuda":
        metrics.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated(engine.device))
        metrics.gpu_memory.labels("peak").set(torch.cuda.max_memory_allocated(engine.device))


# ----- store, then handle success, failure or cancel --------------------------------------------------------


def handle(job: QueuedJob, batch: Batch, adapter: RqAdapter, runtime: WorkerRuntime) -> None:
    """End one job of the batch, as RQ ends a job it performed: success, failure or cancel; then its final event."""
    if job.id in batch.canceled:
        handle_canceled(job, adapter, runtime)
        return
    share = batch.shares[job.id]
    error = share.error or (PermanentJobError("job was canceled") if share.output is None else None)
    if error is None:
        try:
            handle_success(job, share, adapter, runtime)
        except Exception as exc:  # noqa: BLE001 - the job's failure; RQ retries it while it has retries left
            error = exc
    if error is not None:
        handle_failure(job, error, adapter, runtime)
    record_final_event(job, adapter, runtime.settings.artifact_ttl)


def handle_success(job: QueuedJob, share: Prepared, adapter: RqAdapter, runtime: WorkerRuntime) -> None:
    """Store the job's files and write where they are, and its last step, to its meta; then RQ performs the job
    and records it finished."""
    started = time.perf_counter()
    artifacts = store(job, share, adapter, runtime)
    encoding_s = time.perf_counter() - started
    steps = progress_total(share.spec, share.resolved["steps"])
    job.meta[META_ARTIFACTS] = artifacts
    job.meta[META_PROGRESS] = {"step": steps, "total": steps}
    job.save_meta()
    adapter.finish(job)
    record_finished(runtime.metrics, share, encoding_s)


def store(job: QueuedJob, share: Prepared, adapter: RqAdapter, runtime: WorkerRuntime) -> dict[str, str]:
    """Encode the job's PNG grid, its single PNGs (and GIF) and store them (retrying an unreachable store) within
    the job's RQ timeout; returns ``{kind: where it is stored}`` for the grid and GIF (the single images lie
    beside them)."""
    ttl = job.result_ttl if job.result_ttl and job.result_ttl > 0 else runtime.settings.artifact_ttl
    with adapter.time_limit(job):
        files = encode_artifacts(job.id, share.spec, share.output, share.resolved, ModelIdentity.of(runtime.engine))
        stored = put_retrying(runtime.artifacts, job.id, files, ttl, runtime.settings)
    return {kind: stored[kind] for kind in ("grid", "animation") if kind in stored}


def record_finished(metrics: WorkerMetrics, share: Prepared, encoding_s: float) -> None:
    metrics.phase_seconds.labels("encoding").observe(encoding_s)
    metrics.phase_seconds.labels("sampling").observe(share.sampling_s)
    metrics.phase_seconds.labels("decoding").observe(share.decoding_s)
    metrics.images.labels(share.spec.label()).inc(share.spec.count)
    metrics.jobs.labels("finished").inc()


def handle_failure(job: QueuedJob, error: Exception, adapter: RqAdapter, runtime: WorkerRuntime) -> None:
    """Record a one-line reason in the job's meta and have RQ fail it; permanent errors are not retried."""
    permanent = isinstance(error, PermanentJobError)
    job.meta[META_ERROR] = str(error) if permanent else f"{type(error).__name__}: {error}"
    job.save_meta()
    runtime.metrics.failures.labels(error.reason if permanent else type(error).__name__).inc()
    runtime.metrics.jobs.labels("failed").inc()
    adapter.fail(job, error, retry=not permanent)


def handle_canceled(job: QueuedJob, adapter: RqAdapter, runtime: WorkerRuntime) -> None:
    ttl = runtime.settings.artifact_ttl
    adapter.cancel(job, ttl)
    append_event(adapter.connection, job.id, JobEvent.canceled, {"status": JobStatus.CANCELED.value}, ttl)
    runtime.metrics.jobs.labels("canceled").inc()
    log.info("job %s canceled", job.id)


def record_final_event(job: QueuedJob, adapter: RqAdapter, ttl: int) -> None:
    """Append ``finished`` or ``failed`` to the job's event stream once RQ has recorded it (nothing for a job RQ
    queued again for a retry: its stream goes on with the next run)."""
    try:
        status = adapter.status(job)
        if status == JobStatus.FINISHED:
            append_event(adapter.connection, job.id, JobEvent.finished, {"status": status.value}, ttl)
        elif status == JobStatus.FAILED:
            reason = job.meta.get(META_ERROR)
            append_event(adapter.connection, job.id, JobEvent.failed, {"status": status.value, "error": reason}, ttl)
    except redis.RedisError as exc:  # advisory: the API tells the ending from the job's status too
        log.warning("final event of job %s not recorded: %s", job.id, exc)
