"""A batch's progress while it denoises: the engine's progress callback, and the helper thread that does its Redis
I/O (progress in each job's meta and event stream, previews, cancels, heartbeats)."""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
import torch
from PIL import Image

from facegen.contract.connection import OUTAGE_PATIENCE_S
from facegen.contract.spec import META_PROGRESS, JobEvent, append_event, cancel_key, preview_key
from facegen.model.imaging import png_bytes

from .errors import JobCanceled, JobTimeout

if TYPE_CHECKING:
    from .batch import Batch, WorkerRuntime
    from .jobs import QueuedJob

log = logging.getLogger(__name__)


def cancel_flags(connection: redis.Redis, jobs: list[QueuedJob]) -> list[bool]:
    """Whether the service asked to cancel each job (one round trip)."""
    with connection.pipeline() as pipe:
        for job in jobs:
            pipe.exists(cancel_key(job.id))
        return [bool(flag) for flag in pipe.execute()]


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
        bounds = [job.timeout_s for job in batch.running if job.timeout_s is not None]
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

    def write_events(self, jobs: list[QueuedJob]) -> None:
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
