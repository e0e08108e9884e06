"""Reading and canceling generation jobs: status, progress, error line, artifacts.

Knows nothing of HTTP: problems are raised as the exceptions below and the routes map them onto status codes.
Jobs are read as JSON (facegen/contract/job_serializer.py); one whose stored data or meta is not JSON is never
interpreted and reads as ``failed`` with the reason a worker fails it with (:func:`refusal_of`).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import redis
from pydantic import ValidationError
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job, JobStatus

from facegen.contract import spec
from facegen.contract.artifacts import ArtifactStore, OpenedArtifact
from facegen.contract.job_serializer import JOB_SERIALIZER, refusal, unreadable_part
from service.config import Settings
from service.keys import observed_key, tombstone_key
from service.tenancy import Caller

PENDING = frozenset({JobStatus.CREATED, JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED,
                     JobStatus.READY_TO_ENQUEUE, JobStatus.RATE_LIMITED})
ENDED = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})
GENERIC_ERROR = "generation failed"
# RQ's maintenance found the job started by a worker that stopped heartbeating, with no retries left.
ABANDONED_ERROR = "the worker running this job stopped unexpectedly, and its retries are used up"


class JobNotFound(Exception):
    """No such job (never submitted, or not a generation job)."""


class JobGone(Exception):
    """The job, or the artifact asked for, existed but has expired."""


class NoSuchImage(JobNotFound):
    """The job exists but has no image of that index."""

    def __init__(self, index: int, count: int):
        super().__init__(f"no image {index}: the job has {count} image{'s' if count != 1 else ''} "
                         f"(indices 0-{count - 1})")


class NotReady(Exception):
    """The artifact does not exist in the job's current state."""

    def __init__(self, status: JobStatus, error: str | None = None):
        super().__init__(status.value)
        self.status = status
        self.error = error


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower() and len(value) == 36
    except ValueError:
        return False


def fetch(conn: redis.Redis, job_id: str, caller: Caller) -> Job:
    """The generation job ``job_id`` as ``caller`` may see it; raises ``JobGone`` when it expired,
    ``JobNotFound`` when it never existed or belongs to another key (the two are indistinguishable). A job whose
    stored data or meta is not JSON counts as a generation job (one of ours may have been overwritten): it reads
    as failed (:func:`status_of`)."""
    if not _is_uuid(job_id):
        raise JobNotFound(job_id)
    try:
        job = Job.fetch(job_id, connection=conn, serializer=JOB_SERIALIZER)
        if refusal_of(job) is not None or job.func_name == spec.JOB_FUNCTION:
            if not caller.may_see(owner_of(conn, job)):
                raise JobNotFound(job_id)
            return job
    except NoSuchJobError:
        pass
    except (redis.RedisError, JobNotFound):
        raise
    except Exception:  # a job hash we cannot decode is not one of ours
        pass
    tombstone = _tombstone(conn, job_id)
    if tombstone is not None and caller.may_see(tombstone.get("owner")):
        raise JobGone(job_id)
    raise JobNotFound(job_id)


def owner_of(conn: redis.Redis, job: Job) -> str | None:
    """The key id that submitted ``job``; ``None`` when it was submitted while the API was open."""
    owner = conn.hget(job.key, spec.OWNER_FIELD)
    return owner.decode() if owner else None


def _tombstone(conn: redis.Redis, job_id: str) -> dict | None:
    raw = conn.get(tombstone_key(job_id))
    return json.loads(raw) if raw else None


def job_spec_of(job: Job) -> spec.JobSpec | None:
    """The job's spec (an ``EditSpec`` for an edit); ``None`` when its arguments don't parse (e.g. queued by an
    incompatible API version, or not stored as JSON)."""
    try:
        return spec.parse_job_spec(job.args[0])
    except (ValidationError, IndexError, TypeError, DeserializationError):
        return None


def refusal_of(job: Job) -> str | None:
    """The reason a job whose stored data or meta is not JSON is refused; ``None`` for a job stored as JSON."""
    part = unreadable_part(job)
    return refusal(part) if part else None


def status_of(job: Job) -> JobStatus:
    """RQ's status, except ``failed`` for a job a worker refuses to run (:func:`refusal_of`), whatever its stage."""
    return JobStatus.FAILED if refusal_of(job) is not None else job.get_status(refresh=False)


def progress_of(job: Job) -> dict[str, int] | None:
    value = job.meta.get(spec.META_PROGRESS)
    if isinstance(value, dict) and isinstance(value.get("step"), int) and isinstance(value.get("total"), int):
        return {"step": value["step"], "total": value["total"]}
    return None


def error_of(job: Job) -> str | None:
    """The worker's one-line reason for a failed job, else a generic line: never a traceback."""
    status = status_of(job)
    if status not in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
        return None
    refused = refusal_of(job)
    if refused is not None:
        return refused
    reason = job.meta.get(spec.META_ERROR)
    if isinstance(reason, str) and reason.strip():
        return reason.strip().splitlines()[0][:500]
    if status == JobStatus.CANCELED:
        return "canceled"
    if status == JobStatus.STOPPED:
        return "stopped"
    latest = job.latest_result()
    if latest is not None and "AbandonedJobError" in (latest.exc_string or ""):
        return ABANDONED_ERROR
    return GENERIC_ERROR


def submitted_at_of(job: Job) -> datetime | None:
    raw = job.meta.get("submitted_at")
    try:
        return datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        return None


def started_at_of(job: Job) -> datetime | None:
    """When the job was claimed for its batch (``META_BATCH_RUN``), else RQ's ``started_at``."""
    run = job.meta.get(spec.META_BATCH_RUN)
    raw = run.get("started_at") if isinstance(run, dict) else None
    try:
        return datetime.fromisoformat(raw) if isinstance(raw, str) else job.started_at
    except ValueError:
        return job.started_at


def queue_position(conn: redis.Redis, job: Job) -> int | None:
    """While queued: the jobs ahead of it in the RQ queue, or, for a job still waiting in its key's list, the
    key's own jobs ahead of it (keys take turns, so other keys' jobs do not queue ahead of it)."""
    if status_of(job) != JobStatus.QUEUED:
        return None
    position = job.get_position()
    if position is None:
        owner = owner_of(conn, job)
        position = conn.lpos(spec.key_queue_key(job.origin, owner), job.id) if owner else None
    return position


def cancel_requested(conn: redis.Redis, job: Job) -> bool:
    return status_of(job) not in ENDED and bool(conn.exists(spec.cancel_key(job.id)))


def first_sighting(conn: redis.Redis, job: Job, ttl: int) -> bool:
    """True exactly once per ended job across all API replicas (for the finished/failed metrics)."""
    if status_of(job) not in ENDED:
        return False
    return bool(conn.set(observed_key(job.id), b"1", nx=True, ex=ttl))


def animation_requested(conn: redis.Redis, job_id: str) -> bool:
    tombstone = _tombstone(conn, job_id)
    return bool(tombstone and tombstone.get("animation"))


def check_artifact(conn: redis.Redis, job_id: str, kind: str, caller: Caller) -> None:
    """Checks, from the job in Redis, that its artifact ``kind`` exists: raises ``JobNotFound`` (also for an
    animation nobody asked for, or another key's job), ``JobGone`` (expired) or ``NotReady`` (not finished)."""
    try:
        job = fetch(conn, job_id, caller)
    except JobGone:
        if kind == "animation" and not animation_requested(conn, job_id):
            raise JobNotFound(job_id) from None
        raise
    job_spec = job_spec_of(job)
    wants_animation = job_spec.has_animation() if job_spec is not None else animation_requested(conn, job_id)
    if kind == "animation" and not wants_animation:
        raise JobNotFound(job_id)
    status = status_of(job)
    if status != JobStatus.FINISHED:
        raise NotReady(status, error_of(job))


def open_artifact(store: ArtifactStore, job_id: str, kind: str) -> OpenedArtifact:
    """An artifact ``check_artifact`` found listed, opened for streaming; raises ``JobGone`` when the store no
    longer has it, ``ArtifactStoreUnavailable`` when the store cannot be reached."""
    opened = store.open(job_id, kind)
    if opened is None:
        raise JobGone(job_id)
    return opened


def check_image_index(conn: redis.Redis, job_id: str, index: int, caller: Caller) -> None:
    """Raises ``NoSuchImage`` when the job has no image ``index`` (0-based), and as :func:`fetch`."""
    job_spec = job_spec_of(fetch(conn, job_id, caller))
    if job_spec is not None and index >= job_spec.count:
        raise NoSuchImage(index, job_spec.count)


def cancel(conn: redis.Redis, job: Job, settings: Settings) -> JobStatus:
    """Cancel a pending job now, or ask the worker to stop a running one; returns the status after the call.

    The cancel flag is set in both cases (a worker may have just dequeued the job). Raises ``NotReady`` with the
    job's status when it has already ended.
    """
    status = status_of(job)
    if status in ENDED:
        raise NotReady(status, error_of(job))
    conn.set(spec.cancel_key(job.id), b"1", ex=settings.job_timeout + 60)
    if status in PENDING:
        owner = owner_of(conn, job)
        if owner:  # still waiting for its key's turn: out of the key's list too (RQ removes it from the queue)
            conn.lrem(spec.key_queue_key(job.origin, owner), 0, job.id)
        job.cancel(enqueue_dependents=True)  # its webhook delivery, if any
        conn.expire(job.key, settings.failure_ttl)
        spec.append_event(conn, job.id, spec.JobEvent.canceled, {"status": JobStatus.CANCELED.value},
                          settings.failure_ttl)
        return JobStatus.CANCELED
    return status
