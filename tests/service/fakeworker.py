"""A fake GPU worker: plays the worker's side of the wire contract (facegen/contract/spec.py) without torch.

It is a real RQ ``SimpleWorker`` (so job statuses, timestamps and registries move exactly as RQ moves them),
reading and writing jobs as JSON like every facegen process (facegen/contract/job_serializer.py), whose job class
resolves ``spec.JOB_FUNCTION`` to ``FakeBehaviour.run`` instead of importing the real worker.
``run`` does what the contract asks of the worker:

- records the resolved parameters in ``job.meta[META_RESOLVED]`` and progress in ``job.meta[META_PROGRESS]``;
- checks ``spec.cancel_key(job_id)`` between steps and ends the job as ``canceled`` when it is set;
- writes a real PNG grid, each tile alone as a PNG (``spec.image_kind``), and a GIF when asked (trajectory or
  transition) under ``spec.artifact_key`` with the job's result TTL;
- on failure leaves a one-line reason in ``job.meta[META_ERROR]``.

It also publishes a ``spec.ModelInfo`` registry entry, as a live worker does (:func:`publish_model`; a worker's own
``spec.WorkerServing`` entry: :func:`publish_worker`).
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import redis
from PIL import Image
from rq import SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry
from rq.timeouts import TimerDeathPenalty
from rq.utils import utcformat

from facegen.contract import spec
from facegen.contract.fair_queue import FairQueue
from facegen.contract.job_serializer import JOB_SERIALIZER

FAKE_VERSION = "fake-v1"
FAKE_GUIDANCE = 3.0


class FakeCanceled(Exception):
    """Raised inside the job when the service asked to cancel it."""


def model_info(
    version: str = FAKE_VERSION, attributes: list[str] | None = None, is_latest: bool = True, resolution: int = 8
) -> spec.ModelInfo:
    return spec.ModelInfo(
        version=version,
        vae_version="fake-vae-v1",
        attributes=attributes or ["Smiling"],
        resolution=resolution,
        default_guidance_scale=FAKE_GUIDANCE,
        default_steps={s.value: n for s, n in spec.DEFAULT_STEPS.items() if s != spec.Sampler.student},  # no student
        is_latest=is_latest,
        device="cpu",
        dtype="float32",
        workers=["fake-worker"],
    )


def publish_model(conn: redis.Redis, info: spec.ModelInfo | None = None, ttl: int = 60) -> spec.ModelInfo:
    info = info or model_info()
    spec.publish_model_entry(conn, info, ttl)
    return info


def publish_worker(conn: redis.Redis, worker: str, serves: str, model_version: str = "latest",
                   loaded: list[str] | None = None, ttl: int = 60) -> spec.WorkerServing:
    """The ``WorkerServing`` entry a live worker refreshes: it serves ``serves`` for "latest" (its
    ``MODEL_VERSION`` ``model_version``) and holds ``loaded`` (default: ``serves`` alone)."""
    entry = spec.WorkerServing(worker=worker, model_version=model_version, serves=serves, loaded=loaded or [serves])
    spec.publish_worker_entry(conn, entry, ttl)
    return entry


def render_png(job_spec: spec.JobSpec, side: int = 8) -> bytes:
    """A grid of ``count`` flat tiles whose colours depend on (seed, index): [rows*side, cols*side, 3] uint8."""
    cols = min(job_spec.count, 8)
    rows = -(-job_spec.count // cols)
    grid = Image.new("RGB", (cols * side, rows * side), (255, 255, 255))
    for i in range(job_spec.count):
        colour = tuple((job_spec.seed * 31 + i * 67 + c * 101) % 256 for c in range(3))
        grid.paste(Image.new("RGB", (side, side), colour), ((i % cols) * side, (i // cols) * side))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()


def render_single(png: bytes, index: int, count: int, side: int = 8) -> bytes:
    """Tile ``index`` of a :func:`render_png` grid alone."""
    cols = min(count, 8)
    left, top = (index % cols) * side, (index // cols) * side
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).crop((left, top, left + side, top + side)).save(buffer, format="PNG")
    return buffer.getvalue()


def render_gif(job_spec: spec.JobSpec, png: bytes) -> bytes:
    final = Image.open(io.BytesIO(png)).convert("RGB")
    count = job_spec.transition_frames if job_spec.transition else job_spec.animation_frames
    frames = [Image.blend(Image.effect_noise(final.size, 64).convert("RGB"), final, t / (count - 1))
              for t in range(count)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:],
                   duration=int(1000 / job_spec.animation_fps), loop=0)
    return buffer.getvalue()


@dataclass
class FakeBehaviour:
    """What the fake job does. ``pause_at``: after reporting that step, set ``paused`` and wait for ``resume``."""

    progress_updates: int = 4
    pause_at: int | None = None
    fail_with: str | None = None
    paused: threading.Event = field(default_factory=threading.Event)
    resume: threading.Event = field(default_factory=threading.Event)
    runs: list[str] = field(default_factory=list)

    def run(self, job: Job, spec_json: dict) -> dict[str, str]:
        conn = job.connection
        job_spec = spec.JobSpec.model_validate(spec_json)
        self.runs.append(job.id)
        total = job_spec.resolved_steps()
        job.meta[spec.META_RESOLVED] = {
            "steps": total,
            "guidance_scale": job_spec.guidance_scale if job_spec.guidance_scale is not None else FAKE_GUIDANCE,
            "sampler": job_spec.sampler.value,
            "model": FAKE_VERSION,
        }
        checkpoints = sorted({max(1, total * k // self.progress_updates) for k in range(1, self.progress_updates + 1)})
        for step in [0, *checkpoints]:
            if conn.exists(spec.cancel_key(job.id)):
                job.meta[spec.META_ERROR] = "canceled by request"
                job.save_meta()
                raise FakeCanceled(job.id)
            job.meta[spec.META_PROGRESS] = {"step": step, "total": total}
            job.save_meta()
            if self.pause_at is not None and step >= self.pause_at:
                self.pause_at = None
                self.paused.set()
                if not self.resume.wait(timeout=60):
                    raise RuntimeError("fake worker: nobody resumed the paused job")
        if self.fail_with:
            job.meta[spec.META_ERROR] = self.fail_with
            job.save_meta()
            raise RuntimeError(f"{self.fail_with}\n  (a multi-line internal traceback the API must never show)")
        ttl = job.result_ttl or spec.DEFAULT_ARTIFACT_TTL_S
        png = render_png(job_spec)
        artifacts = {"grid": spec.artifact_key(job.id, "grid")}
        conn.set(artifacts["grid"], png, ex=ttl)
        for index in range(job_spec.count):
            conn.set(spec.artifact_key(job.id, spec.image_kind(index)), render_single(png, index, job_spec.count), ex=ttl)
        if job_spec.has_animation():
            artifacts["animation"] = spec.artifact_key(job.id, "animation")
            conn.set(artifacts["animation"], render_gif(job_spec, png), ex=ttl)
        job.meta[spec.META_ARTIFACTS] = artifacts
        job.save_meta()
        return artifacts


def _job_class(behaviour: FakeBehaviour) -> type[Job]:
    class FakeJob(Job):
        @property
        def func(self):  # the real worker would import spec.JOB_FUNCTION; we answer with the fake
            if self.func_name == spec.JOB_FUNCTION:
                return partial(behaviour.run, self)
            return super().func

    return FakeJob


class FakeWorker(SimpleWorker):
    """Runs in any thread (no signal handlers, timer-based job timeouts); serves API keys in turn, as the real
    worker does (facegen/contract/fair_queue.py)."""

    death_penalty_class = TimerDeathPenalty
    queue_class = FairQueue

    def __init__(self, conn: redis.Redis, queue_name: str = spec.DEFAULT_QUEUE,
                 behaviour: FakeBehaviour | None = None):
        self.behaviour = behaviour or FakeBehaviour()
        job_class = _job_class(self.behaviour)
        super().__init__([FairQueue(queue_name, connection=conn, job_class=job_class, serializer=JOB_SERIALIZER)],
                         connection=conn, job_class=job_class, serializer=JOB_SERIALIZER)

    def _install_signal_handlers(self) -> None:
        pass

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="", execution=None):
        if "FakeCanceled" not in exc_string:
            return super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        # Canceled between steps: end as RQ's CANCELED (not FAILED, never retried).
        with self.connection.pipeline() as pipe:
            job.set_status(JobStatus.CANCELED, pipeline=pipe)
            if job.ended_at:
                pipe.hset(job.key, "ended_at", utcformat(job.ended_at))
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            CanceledJobRegistry(job.origin, self.connection, job_class=self.job_class,
                                serializer=JOB_SERIALIZER).add(job, pipeline=pipe)
            pipe.expire(job.key, job.failure_ttl or spec.DEFAULT_ARTIFACT_TTL_S)
            pipe.execute()

    def drain(self) -> bool:
        """Run every queued job, then return (True when any ran)."""
        return self.work(burst=True, logging_level="WARNING")


class BackgroundWorker:
    """A fake worker thread that keeps serving the queue and its model entry until stopped."""

    def __init__(self, redis_url: str, queue_name: str = spec.DEFAULT_QUEUE,
                 behaviour: FakeBehaviour | None = None):
        self.conn = redis.Redis.from_url(redis_url)
        self.worker = FakeWorker(self.conn, queue_name, behaviour)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fake-worker", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            publish_model(self.conn, ttl=30)
            self.worker.drain()
            self._stop.wait(0.05)

    def __enter__(self) -> BackgroundWorker:
        publish_model(self.conn, ttl=30)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.conn.close()


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
