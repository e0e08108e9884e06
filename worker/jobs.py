"""The worker's one contact with RQ: the job function the service enqueues by name, the RQ worker process, and
:class:`RqAdapter`, through which a batch (worker/batch.py) claims, heartbeats and ends its jobs.

Only RQ's public API is used: ``Job`` (fetch, ``prepare_for_execution``, ``perform``, meta, status, cancel),
``Execution`` (create, heartbeat, delete: a job's entry in the queue's ``StartedJobRegistry``), the queue's keys
and registries, and the worker's own hooks (``execute_job``, ``heartbeat``, ``handle_execution_ended``,
``handle_job_success``, ``handle_exception``, ``handle_job_failure``). No other module of the worker imports rq.

Jobs are stored as JSON, never pickle (facegen/contract/job_serializer.py): every queue, fetch and the worker
itself pass ``JOB_SERIALIZER``. A job whose stored data or meta is not JSON (a pickle planted by someone with
access to Redis) is never interpreted: its :class:`QueuedJob` carries the ``refusal`` a batch fails it with.

A batch's jobs live in RQ as any job does. Claimed, each becomes ``started`` with an RQ execution, in the same
transaction that takes it off its list, so a crash leaves each job either waiting or started: RQ's maintenance
retries the started jobs of a worker that stopped heartbeating. Ended, RQ records each as it records a job it
performed itself: result, registries, retries, dependents (a job's webhook delivery).
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import redis
from rq import SimpleWorker, get_current_job
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.timeouts import JobTimeoutException
from rq.worker import WorkerStatus

from facegen.contract.connection import RECONNECT_WAIT_MAX_S, read_timeout_s
from facegen.contract.fair_queue import FairQueue, waiting_jobs
from facegen.contract.job_serializer import JOB_SERIALIZER, refusal, unreadable_part
from facegen.contract.spec import META_ARTIFACTS, META_RESOLVED, parse_job_spec

from .settings import WorkerSettings

log = logging.getLogger(__name__)
# Claims tried again when a companion's list changed between reading it and taking the jobs; then the leader
# is claimed alone.
CLAIM_ATTEMPTS = 20


def generate(spec: dict[str, Any]) -> dict[str, Any]:
    """The job function the service enqueues by name (``worker.jobs.generate``).

    ``python -m worker`` computes and stores a job's images in a batch, then RQ performs the job: this returns what
    RQ keeps as its result, ``{"images", "artifacts", **resolved parameters}``, from what the batch wrote to the
    job's meta. Anywhere else (a plain ``rq worker`` has no model loaded) it raises.
    """
    job = get_current_job()
    if job is None or META_ARTIFACTS not in job.meta:
        raise RuntimeError("worker.jobs.generate runs inside `python -m worker`, which loads the model")
    return {"images": parse_job_spec(spec).count, "artifacts": job.meta[META_ARTIFACTS], **job.meta[META_RESOLVED]}


def dequeue_wait_s(settings: WorkerSettings) -> int:
    """How long an idle worker blocks on the queue per dequeue. RQ runs its maintenance between dequeues, so this
    is the maintenance interval (RQ's default block, 405 s, would let a dead worker's job wait 7 minutes)."""
    return settings.maintenance_interval


class QueuedJob:
    """An RQ job as a batch sees it: its argument, bounds and meta, and the list it waits in; or, for a job whose
    stored data or meta is not JSON, the ``refusal`` it is failed with (its meta then starts empty: the bytes
    stored there are never read, and the failure's reason replaces them)."""

    def __init__(self, job: Job, source: str):
        self._job = job
        self.id: str = job.id
        self.source = source  # its list: the RQ queue, an API key's list, or RQ's intermediate list (the leader)
        unreadable = unreadable_part(job)
        self.refusal: str | None = refusal(unreadable) if unreadable else None
        if unreadable == "meta":
            job.meta = {}
        # the job's RQ timeout in seconds (RQ's queue default when unset), None when unbounded (-1)
        timeout = job.timeout or Queue.DEFAULT_TIMEOUT
        self.timeout_s = None if timeout < 0 else float(timeout)
        self.result_ttl: int | None = job.result_ttl

    @property
    def func_name(self) -> str | None:
        """The dotted name of the function it was enqueued with; None for a refused job."""
        return None if self.refusal else self._job.func_name

    @property
    def argument(self) -> dict[str, Any] | None:
        """The job's one argument (a job spec's fields); None when it was enqueued with anything else, or refused."""
        if self.refusal:
            return None
        args, kwargs = self._job.args, self._job.kwargs
        return args[0] if len(args) == 1 and not kwargs and isinstance(args[0], dict) else None

    @property
    def meta(self) -> dict[str, Any]:
        return self._job.meta

    def save_meta(self) -> None:
        self._job.save_meta()

    @property
    def started_at(self) -> datetime | None:
        """When it was claimed (RQ's ``started_at``, aware UTC)."""
        return self._job.started_at

    @property
    def queue_wait_s(self) -> float | None:
        job = self._job
        return (job.started_at - job.enqueued_at).total_seconds() if job.started_at and job.enqueued_at else None


class RqAdapter:
    """RQ's side of one batch: the job RQ dequeued (``leader``), the jobs waiting behind it, and the calls that
    start, heartbeat and end the jobs claimed, each in a single job's RQ execution."""

    def __init__(self, worker: FacegenWorker, leader: Job, queue: Queue):
        self.worker, self.queue = worker, queue
        self.connection: redis.Redis = worker.connection
        self.heartbeat_ttl = worker.settings.heartbeat_ttl
        self.leader = QueuedJob(leader, queue.intermediate_queue_key)  # RQ's dequeue moved it there
        self.executions: dict[str, Execution] = {}  # the claimed jobs not yet ended, by job id

    def waiting(self, limit: int) -> list[QueuedJob]:
        """Up to ``limit`` jobs waiting behind the leader: the RQ queue's first, then the API keys' in turn."""
        waiting = waiting_jobs(self.connection, self.queue, limit)
        jobs = Job.fetch_many([job_id for _, job_id in waiting], connection=self.connection,
                              serializer=JOB_SERIALIZER)
        return [QueuedJob(job, source) for (source, _), job in zip(waiting, jobs, strict=True) if job is not None]

    def waiting_count(self, limit: int) -> int:
        """How many jobs wait behind the leader, counting at most ``limit``."""
        return len(waiting_jobs(self.connection, self.queue, limit))

    def claim(self, companions: list[QueuedJob]) -> list[QueuedJob]:
        """Start the leader and those of ``companions`` still waiting, atomically (see the module's docstring);
        returns them, leader first."""
        for _ in range(CLAIM_ATTEMPTS):
            try:
                return self.start([self.leader, *companions])
            except redis.WatchError:
                continue
        log.warning("job %s runs alone: the lists of its batch companions kept changing", self.leader.id)
        return self.start([self.leader])

    def start(self, jobs: list[QueuedJob]) -> list[QueuedJob]:
        """One claim transaction: each of ``jobs`` still in its list leaves it and is marked started, with an RQ
        execution. Raises ``redis.WatchError`` when another client changed one of the lists meanwhile."""
        with self.connection.pipeline() as pipe:
            sources = sorted({job.source for job in jobs[1:]})  # the leader is ours already
            if sources:
                pipe.watch(*sources)
                with self.connection.pipeline(transaction=False) as reads:  # after WATCH: no change goes unseen
                    for job in jobs[1:]:
                        reads.lpos(job.source, job.id)
                    found = reads.execute()
                jobs = [jobs[0], *(job for job, at in zip(jobs[1:], found, strict=True) if at is not None)]
            pipe.multi()
            executions = {}
            for job in jobs:
                executions[job.id] = Execution.create(job._job, self.heartbeat_ttl, pipeline=pipe,
                                                      worker_name=self.worker.name)
                job._job.prepare_for_execution(self.worker.name, pipeline=pipe)
                pipe.persist(job._job.key)
                pipe.lrem(job.source, 1, job.id)
            self.worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
            self.worker.heartbeat(self.heartbeat_ttl + 60, pipeline=pipe)
            pipe.execute()
        self.executions.update(executions)
        return jobs

    def heartbeat(self) -> None:
        """Extend the worker's and every claimed job's heartbeat in one round trip (a batch calls this while it
        samples, from its progress thread, and while it stores its jobs)."""
        with self.connection.pipeline() as pipe:
            self.worker.heartbeat(self.heartbeat_ttl + 60, pipeline=pipe)
            for execution in list(self.executions.values()):
                execution.heartbeat(self.queue.started_job_registry, self.heartbeat_ttl, pipeline=pipe)
            pipe.execute()

    @contextmanager
    def time_limit(self, job: QueuedJob) -> Iterator[None]:
        """The job's RQ timeout over the block, enforced as RQ enforces it on a job function (its death penalty
        raises ``JobTimeoutException``)."""
        with self.worker.death_penalty_class(job._job.timeout or Queue.DEFAULT_TIMEOUT, JobTimeoutException,
                                             job_id=job.id):
            yield

    def finish(self, job: QueuedJob) -> None:
        """RQ performs the job (:func:`generate` returns its result) and records it finished."""
        rq_job = job._job
        rq_job.perform()
        self.worker.handle_execution_ended(rq_job, self.queue, self.heartbeat_ttl)
        self.worker.handle_job_success(rq_job, self.queue, self.queue.started_job_registry, self.executions[job.id])
        del self.executions[job.id]
        rq_job.send_webhooks(JobStatus.FINISHED)

    def fail(self, job: QueuedJob, error: Exception, retry: bool) -> None:
        """RQ records the job failed with ``error``'s traceback, or queues it again while ``retry`` and it has
        retries left."""
        rq_job = job._job
        if not retry:
            rq_job.retries_left = 0
        self.worker.handle_execution_ended(rq_job, self.queue, self.heartbeat_ttl)
        self.worker.handle_exception(rq_job, type(error), error, error.__traceback__)
        self.worker.handle_job_failure(rq_job, self.queue, exc_string="".join(traceback.format_exception(error)),
                                       execution=self.executions.pop(job.id))

    def cancel(self, job: QueuedJob, ttl: int) -> None:
        """End the job's execution and mark it canceled (RQ's cancel, which also queues its dependents: its webhook
        delivery); it expires after its ``failure_ttl``, else ``ttl`` seconds."""
        rq_job = job._job
        with self.connection.pipeline() as pipe:
            self.executions.pop(job.id).delete(rq_job, pipe)
            pipe.execute()
        if rq_job.get_status(refresh=True) != JobStatus.CANCELED:
            rq_job.cancel(enqueue_dependents=True)
        self.connection.expire(rq_job.key, rq_job.failure_ttl or ttl)

    def status(self, job: QueuedJob) -> JobStatus:
        """The job's status as RQ recorded it."""
        return job._job.get_status(refresh=True)


class FacegenWorker(SimpleWorker):
    """RQ's ``SimpleWorker`` (no fork: the model stays loaded), for what RQ's tooling knows of a worker:
    registration (``rq info``), heartbeats, maintenance, suspension, warm shutdown on SIGTERM. It serves API keys in
    turn (facegen/contract/fair_queue.py) and hands each job it dequeues to ``perform_batch`` as a batch's leader."""

    queue_class = FairQueue

    # Between reconnect attempts RQ waits 1, 2, 4 s… up to this (its own cap is a minute, and a job arriving
    # during such a wait waited with it).
    max_connection_wait_time = RECONNECT_WAIT_MAX_S

    def __init__(self, *args: Any, settings: WorkerSettings, perform_batch: Callable[[RqAdapter], None],
                 tick: Callable[[], None], **kwargs: Any):
        self.settings, self.perform_batch, self.tick = settings, perform_batch, tick  # RQ's __init__ reads them
        interval = settings.maintenance_interval
        super().__init__(*args, maintenance_interval=interval, worker_ttl=interval + 15, **kwargs)

    @property
    def dequeue_timeout(self) -> int:
        return dequeue_wait_s(self.settings)

    @property
    def connection_timeout(self) -> float:
        """The read timeout RQ makes sure its client has: the connection policy's, over the dequeue wait."""
        return read_timeout_s(self.settings, self.dequeue_timeout)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's heartbeat, which its loop calls before each dequeue attempt: a liveness tick when called there
        (the main thread), not when a batch's progress thread heartbeats."""
        if threading.current_thread() is threading.main_thread():
            self.tick()
        super().heartbeat(timeout, pipeline=pipeline)

    def execute_job(self, job: Job, queue: Queue) -> None:
        """RQ's hook for running a dequeued job: here, the batch it leads."""
        self.perform_batch(RqAdapter(self, job, queue))
        self.set_state(WorkerStatus.IDLE)


def work(connection: redis.Redis, settings: WorkerSettings, name: str, perform_batch: Callable[[RqAdapter], None],
         tick: Callable[[], None], burst: bool) -> None:
    """Work the settings' queues as RQ worker ``name``, ``perform_batch`` running the batch of each job dequeued,
    until stopped (SIGTERM: once the current batch ends) or, with ``burst``, until the queues are empty."""
    queues = [FairQueue(queue_name, connection=connection, serializer=JOB_SERIALIZER)
              for queue_name in settings.queue_names()]
    worker = FacegenWorker(queues, connection=connection, name=name, serializer=JOB_SERIALIZER, settings=settings,
                           perform_batch=perform_batch, tick=tick)
    worker.work(burst=burst, with_scheduler=False)
