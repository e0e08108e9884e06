"""RQ glue: the job function the service enqueues by name, and the worker that batches compatible jobs.

:class:`FacegenWorker` is an RQ ``SimpleWorker`` (no fork: the model stays loaded) that serves API keys in turn
(facegen/contract/fair_queue.py). When it dequeues a job it claims compatible waiting jobs (same model, sampler, steps and
guidance; the keys' jobs taken in turn) up to ``MAX_BATCH`` images, moving them atomically from their lists to
RQ's intermediate list as RQ's own dequeue does, marks them all started,
runs one batched denoising pass for all of them, then lets RQ perform each job, which only encodes and stores
that job's artifacts. Every job keeps its own status, progress, result and failure.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
import torch
from PIL import Image
from pydantic import ValidationError
from rq import SimpleWorker, get_current_job
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.utils import utcformat

from facegen.contract.artifacts import ArtifactStore, ArtifactStoreUnavailable, put_retrying
from facegen.contract.connection import OUTAGE_PATIENCE_S, RECONNECT_WAIT_MAX_S, read_timeout_s
from facegen.contract.fair_queue import FairQueue, waiting_jobs
from facegen.contract.spec import (
    DEFAULT_EDIT_GUIDANCE,
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
    append_event,
    cancel_key,
    parse_job_spec,
    preview_key,
)
from facegen.model.imaging import png_bytes

from .edit import decode_face, edit_request, progress_total
from .encoding import encode_artifacts
from .engine import Engine, ImageRequest, NonFiniteOutput, OutOfMemory, RequestOutput, RunStats
from .metrics import Liveness, WorkerMetrics
from .provenance import ModelIdentity
from .settings import WorkerSettings
from .transition import transition_output, transition_requests

log = logging.getLogger(__name__)
LOOKAHEAD = 256  # queued jobs inspected for batch companions


class JobCanceled(Exception):
    """Every job of a batch was canceled; the chain stops between steps."""


class PermanentJobError(Exception):
    """A job that can never succeed (bad spec, unknown attribute, too large): failed without retries."""

    reason = "invalid"  # the failures metric's label


class JobTimeout(PermanentJobError):
    """The batch's sampling ran past the smallest job timeout of its jobs (RQ's ``job.timeout``); a retry with the
    same parameters would run as long, so it is not retried."""

    reason = "timeout"

    def __init__(self, timeout_s: float):
        super().__init__(f"timeout: sampling ran past the job timeout ({timeout_s:g} s) and was stopped")


@dataclass
class Prepared:
    """A job's computed share of a batch, or why it failed."""

    spec: JobSpec | None
    output: RequestOutput | None = None
    error: Exception | None = None
    resolved: dict[str, Any] = field(default_factory=dict)
    sampling_s: float = 0.0
    decoding_s: float = 0.0
    started_at: datetime | None = None  # when its batch began sampling: the job's ``started_at``
    face: torch.Tensor | None = None  # an edit's input, uint8 [3, S, S] cropped like training


@dataclass
class WorkerRuntime:
    """What the worker process keeps loaded between jobs."""

    engine: Engine
    settings: WorkerSettings
    metrics: WorkerMetrics
    liveness: Liveness | None = None  # ticked by the main loop (worker/metrics.py)
    artifacts: ArtifactStore | None = None  # where results go; `python -m worker` opens it from the settings
    prepared: dict[str, Prepared] = field(default_factory=dict)

    def tick(self) -> None:
        if self.liveness is not None:
            self.liveness.tick()


# The runtime of the FacegenWorker performing the current job, set by the worker around its batch: RQ calls
# ``generate`` with the job's arguments only, and this is the one way it reaches the worker's runtime (everything
# else takes the runtime as an argument).
_current_runtime: ContextVar[WorkerRuntime | None] = ContextVar("facegen_worker_runtime", default=None)


@dataclass
class Batch:
    """Jobs denoised in one pass: each job's share, the jobs still running, and those canceled on the way."""

    shares: dict[str, Prepared] = field(default_factory=dict)
    key: BatchKey | None = None  # the parameters every running job shares
    running: list[Job] = field(default_factory=list)
    canceled: set[str] = field(default_factory=set)


def parse_spec(job: Job) -> JobSpec:
    if len(job.args) != 1 or job.kwargs or not isinstance(job.args[0], dict):
        raise PermanentJobError("malformed job: expected one JobSpec object as its only argument")
    try:
        return parse_job_spec(job.args[0])
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first["loc"][1:] if first["loc"][:1] in (("generate",), ("edit",)) else first["loc"]  # the kind's tag
        raise PermanentJobError(f"invalid job spec: {'.'.join(map(str, loc))}: {first['msg']}") from None


def batch_key(spec: JobSpec, engine: Engine) -> BatchKey:
    """The resolved parameters that decide which jobs may share a batch; raises for another model version."""
    if spec.model not in (LATEST, engine.version):
        raise PermanentJobError(f"model {spec.model!r} is not served by this worker (it serves {engine.version})")
    edit = {"kind": spec.kind, "strength": spec.strength} if isinstance(spec, EditSpec) else {}
    default_guidance = DEFAULT_EDIT_GUIDANCE if edit else engine.model.sampling.guidance_scale
    guidance = spec.guidance_scale if spec.guidance_scale is not None else default_guidance
    return BatchKey(model=engine.version, sampler=spec.sampler, steps=spec.resolved_steps(), guidance_scale=guidance,
                    **edit)


# Atomically move each still-waiting id from its list (the RQ queue or its API key's list) to the queue's
# intermediate list (what RQ's own dequeue does with LMOVE), so a crash leaves claimed jobs where RQ's maintenance
# finds and retries them. KEYS: the intermediate list; ARGV: list key, job id, list key, job id, …
CLAIM_SCRIPT = """
local claimed = {}
for i = 1, #ARGV, 2 do
  if redis.call('LREM', ARGV[i], 1, ARGV[i + 1]) == 1 then
    redis.call('RPUSH', KEYS[1], ARGV[i + 1])
    table.insert(claimed, ARGV[i + 1])
  end
end
return claimed
"""


def timeout_s(job: Job) -> float | None:
    """The job's RQ timeout in seconds (RQ's queue default when unset), None when unbounded (-1)."""
    timeout = job.timeout or Queue.DEFAULT_TIMEOUT
    return None if timeout < 0 else float(timeout)


def dequeue_wait_s(settings: WorkerSettings) -> int:
    """How long an idle worker blocks on the queue per dequeue. RQ runs its maintenance between dequeues, so this
    is the maintenance interval (RQ's default block, 405 s, would let a dead worker's job wait 7 minutes)."""
    return settings.maintenance_interval


class FacegenWorker(SimpleWorker):
    """SimpleWorker that batches compatible jobs, serves API keys in turn (facegen/contract/fair_queue.py) and heartbeats
    while it samples."""

    queue_class = FairQueue

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

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's heartbeat, which its loop calls before each dequeue attempt: a liveness tick when called there
        (the main thread), not when the sampling's helper thread heartbeats."""
        if threading.current_thread() is threading.main_thread():
            self.runtime.tick()
        super().heartbeat(timeout, pipeline=pipeline)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.runtime.settings.heartbeat_ttl

    def claim_companions(self, leader: Job, queue: Queue) -> list[Job]:
        """Waiting jobs compatible with ``leader`` within ``MAX_BATCH`` images in total: those in the RQ queue,
        then the API keys' waiting jobs taken in turn (each key's first, then each key's second, …)."""
        engine = self.runtime.engine
        try:
            spec = parse_spec(leader)
            key = batch_key(spec, engine)
        except PermanentJobError:
            return []
        budget = engine.max_batch - spec.chains()
        waiting = waiting_jobs(self.connection, queue, LOOKAHEAD)
        jobs = Job.fetch_many([job_id for _, job_id in waiting], connection=self.connection)
        candidates: list[str] = []
        for (source, _), job in zip(waiting, jobs, strict=True):
            if budget <= 0:
                break
            # the batch is bounded by its jobs' timeout: only jobs with the leader's share it
            if job is None or job.func_name != leader.func_name or timeout_s(job) != timeout_s(leader):
                continue
            try:
                other = parse_spec(job)
                if batch_key(other, engine) != key or other.chains() > budget:
                    continue
            except PermanentJobError:
                continue
            candidates += [source, job.id]
            budget -= other.chains()
        if not candidates:
            return []
        claimed = [c.decode() if isinstance(c, bytes) else c
                   for c in self._claim(keys=[queue.intermediate_queue_key], args=candidates)]
        jobs = Job.fetch_many(claimed, connection=self.connection)
        return [job for job in jobs if job is not None]

    def execute_job(self, job: Job, queue: Queue) -> None:
        """A batch in rq's phases: claim companions, prepare their executions, run them as one batch, then
        perform (store and record) or finish as canceled each job."""
        self.wait_for_burst(queue)
        group = [job, *self.claim_companions(job, queue)]
        executions = {}
        for member in group:
            executions[member.id] = self.prepare_execution(member)
            self.prepare_job_execution(member, remove_from_intermediate_queue=True)
        batch = run_batch(self.runtime, group, self.connection, self.batch_heartbeat(group, executions, queue))
        self.runtime.prepared.update(batch.shares)
        token = _current_runtime.set(self.runtime)
        beaten = time.monotonic()
        try:
            for index, member in enumerate(group):
                if member.id in batch.canceled:
                    self.runtime.prepared.pop(member.id, None)
                    self.finish_canceled(member, executions[member.id])
                    continue
                # storing a job may wait on an unreachable artifact store (ARTIFACT_PUT_ATTEMPTS): once that took
                # a while, the jobs not yet stored get a new heartbeat deadline first
                if time.monotonic() - beaten > self.runtime.settings.heartbeat_ttl / 6:
                    self.batch_heartbeat(group[index:], executions, queue)()
                    beaten = time.monotonic()
                self.perform_job(member, queue, executions[member.id])
                record_final_event(member, self.runtime.settings.artifact_ttl)
        finally:
            _current_runtime.reset(token)
        self.set_state("idle")

    def wait_for_burst(self, queue: Queue) -> None:
        """Let a burst that is still arriving join this batch (``BATCH_WINDOW_MS``, unless a full batch is already
        waiting, in the queue or the API keys' lists)."""
        window = self.runtime.settings.batch_window_ms / 1000
        max_batch = self.runtime.engine.max_batch
        if window > 0 and len(waiting_jobs(self.connection, queue, max_batch)) < max_batch:
            time.sleep(window)

    def batch_heartbeat(self, group: list[Job], executions: dict[str, Any], queue: Queue) -> Callable[[], None]:
        """Extends this worker's and every batch job's heartbeat in one round trip (called while sampling)."""
        ttl = self.runtime.settings.heartbeat_ttl

        def heartbeat() -> None:
            with self.connection.pipeline() as pipe:
                self.heartbeat(ttl + 60, pipeline=pipe)
                for member in group:
                    executions[member.id].heartbeat(queue.started_job_registry, ttl, pipeline=pipe)
                pipe.execute()

        return heartbeat

    def finish_canceled(self, job: Job, execution: Any) -> None:
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            pipe.execute()
        if job.get_status(refresh=True) != JobStatus.CANCELED:
            job.cancel(enqueue_dependents=True)  # its webhook delivery, if any
        self.connection.expire(job.key, job.failure_ttl or self.runtime.settings.artifact_ttl)
        append_event(self.connection, job.id, JobEvent.canceled, {"status": JobStatus.CANCELED.value},
                     self.runtime.settings.artifact_ttl)
        self.runtime.metrics.jobs.labels("canceled").inc()
        log.info("job %s canceled", job.id)


def record_final_event(job: Job, ttl: int) -> None:
    """Append ``finished`` or ``failed`` to the job's event stream once RQ has recorded it (nothing for a job RQ
    queued again for a retry: its stream goes on with the next run)."""
    try:
        status = job.get_status(refresh=True)
        if status == JobStatus.FINISHED:
            append_event(job.connection, job.id, JobEvent.finished, {"status": status.value}, ttl)
        elif status == JobStatus.FAILED:
            reason = job.get_meta(refresh=True).get(META_ERROR)
            append_event(job.connection, job.id, JobEvent.failed, {"status": status.value, "error": reason}, ttl)
    except redis.RedisError as exc:  # advisory: the API tells the ending from the job's status too
        log.warning("final event of job %s not recorded: %s", job.id, exc)


def cancel_flags(connection: redis.Redis, jobs: list[Job]) -> list[bool]:
    """Whether the service asked to cancel each job (one round trip)."""
    with connection.pipeline() as pipe:
        for job in jobs:
            pipe.exists(cancel_key(job.id))
        return [bool(flag) for flag in pipe.execute()]


def run_batch(runtime: WorkerRuntime, jobs: list[Job], connection: redis.Redis,
              heartbeat: Callable[[], None] | None = None) -> Batch:
    """Run the engine once for all valid jobs of ``jobs``: check them, drop the canceled, mark the rest started,
    denoise. The returned batch holds each job's :class:`Prepared` (output or error) and the canceled ids."""
    batch = check_jobs(runtime.engine, jobs)
    drop_canceled(batch, connection)
    if batch.running:
        mark_started(batch, runtime)
        denoise(batch, runtime, connection, heartbeat)
    return batch


def check_jobs(engine: Engine, jobs: list[Job]) -> Batch:
    """Parse each job's spec against the served model; a job that can never run gets a permanent error."""
    batch = Batch()
    for job in jobs:
        try:
            spec = parse_spec(job)
            key = batch_key(spec, engine)
            if batch.key is not None and key != batch.key:
                raise PermanentJobError("internal: incompatible job in batch")  # claim_companions prevents this
            batch.key = key
            engine.model.labels_for(spec.attributes)
            face = decode_face(spec.image, engine.model.manifest.data) if isinstance(spec, EditSpec) else None
        except (PermanentJobError, ValueError) as exc:
            batch.shares[job.id] = Prepared(None, error=PermanentJobError(str(exc)))
            continue
        resolved = {"steps": key.steps, "guidance_scale": key.guidance_scale, "sampler": key.sampler.value,
                    "model": engine.version} | ({"strength": key.strength} if face is not None else {})
        batch.shares[job.id] = Prepared(spec, resolved=resolved, face=face)
        batch.running.append(job)
    return batch


def drop_canceled(batch: Batch, connection: redis.Redis) -> None:
    """Move the running jobs the service asked to cancel to ``batch.canceled``."""
    flags = cancel_flags(connection, batch.running)
    batch.canceled.update(job.id for job, flag in zip(batch.running, flags, strict=True) if flag)
    batch.running = [job for job in batch.running if job.id not in batch.canceled]


def mark_started(batch: Batch, runtime: WorkerRuntime) -> None:
    """Record each running job's queue wait and write its resolved parameters, batch size and progress 0."""
    images = sum(batch.shares[job.id].spec.chains() for job in batch.running)
    started_at = datetime.now(UTC)
    run = {"id": batch.running[0].id, "started_at": started_at.isoformat()}
    for job in batch.running:
        batch.shares[job.id].started_at = started_at
        if job.enqueued_at is not None and job.started_at is not None:
            wait = (job.started_at - job.enqueued_at).total_seconds()
            runtime.metrics.phase_seconds.labels("queue_wait").observe(wait)
        job.meta[META_RESOLVED] = batch.shares[job.id].resolved
        job.meta[META_BATCH] = {"jobs": len(batch.running), "images": images}
        job.meta[META_BATCH_RUN] = run
        job.meta[META_PROGRESS] = {"step": 0, "total": progress_total(batch.shares[job.id].spec, batch.key.steps)}
        job.save_meta()
    with batch.running[0].connection.pipeline(transaction=False) as pipe:
        for job in batch.running:
            append_event(pipe, job.id, JobEvent.started, {"started_at": started_at.isoformat(),
                                                          "batch": job.meta[META_BATCH]}, runtime.settings.artifact_ttl)
        pipe.execute()


class ProgressReporter:
    """The engine's progress callback and the helper thread that does its Redis I/O.

    On the sampling thread a call only ticks the liveness, checks the batch's deadline (raising
    :class:`JobTimeout` once the batch has sampled longer than its smallest job timeout), posts the step and
    raises :class:`JobCanceled` once every running job is canceled: it never waits on Redis. The helper thread,
    every ``PROGRESS_INTERVAL`` while steps arrive, writes the latest step posted (older ones are skipped) to each
    running job, picks up cancels and heartbeats. Every step also goes to each job's event stream (none skipped),
    with a preview of the x0 prediction while a client of the stream asks for one: as the engine's
    :class:`PreviewSink` it asks the engine for one at most every ``PREVIEW_INTERVAL`` and encodes it on the
    helper thread. Use as a context manager around the engine run."""

    def __init__(self, batch: Batch, runtime: WorkerRuntime, connection: redis.Redis,
                 heartbeat: Callable[[], None] | None):
        self.batch, self.runtime, self.connection, self.heartbeat = batch, runtime, connection, heartbeat
        self.settings = runtime.settings
        bounds = [t for t in map(timeout_s, batch.running) if t is not None]
        self.timeout_s = min(bounds, default=None)  # the batch's bound: its smallest job timeout
        self.deadline = time.monotonic() + self.timeout_s if self.timeout_s is not None else None
        self.latest: tuple[int, int] | None = None  # (step, total) posted by the sampling thread
        self.steps: deque[tuple[int, int]] = deque()  # every step posted and not yet written to the event streams
        self.previews: dict[tuple[int, str], torch.Tensor] = {}  # (step, job id) -> uint8 [3, h, w]
        self.preview_wanted: frozenset[str] = frozenset()  # jobs some client wants previews of (the helper reads it)
        self.next_preview = 0.0  # no preview before this time.monotonic()
        self.posted = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def __enter__(self) -> ProgressReporter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.posted.set()
        self.thread.join()  # its last write lands before the job's own meta writes

    def __call__(self, step: int, total: int) -> None:
        self.runtime.tick()
        if self.deadline is not None and time.monotonic() > self.deadline and step < total:
            raise JobTimeout(self.timeout_s)
        self.steps.append((step, total))  # before `latest`: a write that sees this latest also drains this step
        self.latest = (step, total)  # one reference store: the helper reads whichever is the latest
        self.posted.set()
        if all(job.id in self.batch.canceled for job in self.batch.running):
            raise JobCanceled()

    def due(self) -> frozenset[str]:
        """The jobs that want a preview now: those a client asked for, once per ``PREVIEW_INTERVAL``."""
        now = time.monotonic()
        if not self.preview_wanted or now < self.next_preview:
            return frozenset()
        self.next_preview = now + self.settings.preview_interval
        return self.preview_wanted

    def put(self, step: int, key: str, image: torch.Tensor) -> None:
        self.previews[(step, key)] = image

    def _loop(self) -> None:
        written: tuple[int, int] | None = None
        last_beat = 0.0
        while not self.stop.is_set():
            self.posted.wait()
            self.posted.clear()
            latest = self.latest
            if latest is None or latest == written:
                continue
            try:
                self.write(*latest)
                written = latest
                now = time.monotonic()
                if self.heartbeat is not None and now - last_beat > self.settings.heartbeat_ttl / 6:
                    last_beat = now
                    self.heartbeat()  # only while steps arrive: a stuck chain stops heartbeating
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Progress is advisory: the client already waited OUTAGE_PATIENCE_S for Redis, so sampling goes
                # on and the helper tries again that much later (the results are stored at the end; an outage
                # longer than HEARTBEAT_TTL lets another worker retry the jobs).
                log.warning("progress not recorded at step %d/%d: %s", *latest, exc)
                self.stop.wait(OUTAGE_PATIENCE_S)
                continue
            except Exception:  # noqa: BLE001 - keep reporting; the sampling must not lose its helper
                log.exception("progress not recorded at step %d/%d", *latest)
            self.stop.wait(self.settings.progress_interval)
        if self.latest is not None and (self.latest != written or self.steps):  # where the chain stopped or ended
            try:
                self.write(*self.latest)
            except redis.RedisError as exc:
                log.warning("final progress not recorded: %s", exc)

    def write(self, step: int, total: int) -> None:
        running = self.batch.running
        for job, flag in zip(running, cancel_flags(self.connection, running), strict=True):
            if flag:
                self.batch.canceled.add(job.id)
            else:
                job.meta[META_PROGRESS] = {"step": step, "total": total}
                job.save_meta()
        self.write_events([job for job in running if job.id not in self.batch.canceled])

    def write_events(self, jobs: list[Job]) -> None:
        """Append the steps posted since the last write (with their previews) to each job's event stream, and
        read which jobs a client wants previews of (one round trip)."""
        steps = [self.steps.popleft() for _ in range(len(self.steps))]
        with self.connection.pipeline(transaction=False) as pipe:
            for job in jobs:
                for step, total in steps:
                    data: dict[str, Any] = {"progress": {"step": step, "total": total}}
                    image = self.previews.pop((step, job.id), None)
                    if image is not None:
                        data["preview"] = preview_png(image)
                    append_event(pipe, job.id, JobEvent.progress, data, self.settings.artifact_ttl)
            for job in jobs:
                pipe.exists(preview_key(job.id))
            replies = pipe.execute()
        wanted = replies[len(replies) - len(jobs):]  # the EXISTS replies
        self.preview_wanted = frozenset(job.id for job, flag in zip(jobs, wanted, strict=True) if flag)


def preview_png(image: torch.Tensor) -> str:
    """``uint8 [3, h, w]`` -> base64 of its PNG."""
    return base64.b64encode(png_bytes(Image.fromarray(image.permute(1, 2, 0).numpy()))).decode()


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


def fail(job: Job, runtime: WorkerRuntime, exc: Exception) -> None:
    """Record a one-line reason in the job meta; permanent errors are not retried."""
    permanent = isinstance(exc, PermanentJobError)
    if permanent:
        job.retries_left = 0
    job.meta[META_ERROR] = str(exc) if permanent else f"{type(exc).__name__}: {exc}"
    job.save_meta()
    reason = exc.reason if permanent else type(exc).__name__
    runtime.metrics.failures.labels(reason).inc()
    runtime.metrics.jobs.labels("failed").inc()


def store_artifacts(job: Job, share: Prepared, runtime: WorkerRuntime, ttl: int) -> dict[str, str]:
    """Encode the job's PNG grid, its single PNGs (and GIF) and store them (retrying an unreachable store);
    returns ``{kind: where it is stored}`` for the grid and GIF (the single images lie beside them)."""
    files = encode_artifacts(job.id, share.spec, share.output, share.resolved, ModelIdentity.of(runtime.engine))
    stored = put_retrying(runtime.artifacts, job.id, files, ttl, runtime.settings)
    return {kind: stored[kind] for kind in ("grid", "animation") if kind in stored}


def record_finished(metrics: WorkerMetrics, share: Prepared, encoding_s: float) -> None:
    metrics.phase_seconds.labels("encoding").observe(encoding_s)
    metrics.phase_seconds.labels("sampling").observe(share.sampling_s)
    metrics.phase_seconds.labels("decoding").observe(share.decoding_s)
    metrics.images.labels(share.spec.label()).inc(share.spec.count)
    metrics.jobs.labels("finished").inc()


def restore_started_at(job: Job, share: Prepared) -> None:
    """Set the job's ``started_at`` back to when its sampling began: RQ's ``perform_job``, which runs after the
    batch, rewrites it to now (the job would show its sampling as queue wait). RQ saves the job's fields when it
    records the outcome; the field is written here too, so the job's status is right meanwhile."""
    if share.started_at is not None:
        job.started_at = share.started_at
        job.connection.hset(job.key, "started_at", utcformat(share.started_at))


def generate(spec: dict[str, Any]) -> dict[str, Any]:
    """RQ entry point (enqueued as ``worker.jobs.generate``): store this job's PNG grid (and GIF) in the
    artifact store.

    The images were normally computed already, batched with compatible jobs; a job run without that is computed
    here alone.
    """
    job = get_current_job()
    runtime = _current_runtime.get()
    if job is None or runtime is None:
        raise RuntimeError("worker.jobs.generate runs inside `python -m worker`, which loads the model")
    share = runtime.prepared.pop(job.id, None)
    if share is None:
        share = run_batch(runtime, [job], job.connection).shares[job.id]
    restore_started_at(job, share)
    if share.error is not None or share.output is None:
        error = share.error or PermanentJobError("job was canceled")
        fail(job, runtime, error)
        raise error
    started = time.perf_counter()
    ttl = job.result_ttl if job.result_ttl and job.result_ttl > 0 else runtime.settings.artifact_ttl
    try:
        artifacts = store_artifacts(job, share, runtime, ttl)
    except ArtifactStoreUnavailable as exc:  # transient: RQ retries the job while it has retries left
        fail(job, runtime, exc)
        raise
    record_finished(runtime.metrics, share, time.perf_counter() - started)
    steps = progress_total(share.spec, share.resolved["steps"])
    job.meta[META_ARTIFACTS] = artifacts
    job.meta[META_PROGRESS] = {"step": steps, "total": steps}
    job.save_meta()
    return {"images": share.spec.count, "artifacts": artifacts, **share.resolved}
