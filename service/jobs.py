"""Redis and RQ access for the API: submit, read, cancel jobs; read artifacts and the workers' model registry.

Knows nothing of HTTP: problems are raised as the exceptions below and the routes map them onto status codes.
Keys owned by the API (the worker never reads them):

- ``facegen:tombstone:<job_id>`` -> ``{"animation": bool}``, kept ``tombstone_ttl`` (longer than the job), so an
  expired job answers 410 rather than 404;
- ``facegen:idempotency:<sha256(api key, Idempotency-Key)>`` -> ``{"job_id", "fingerprint", "seed"}``;
- ``facegen:observed:<job_id>``: set the first time any API replica sees the job ended (metrics count it once);
- ``facegen:replication-mark``: a counter admission bumps after a job's writes, so that ``WAIT`` on any pooled
  connection covers them (WAIT counts the writes of its own connection).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import hiredis
import redis
import redis.asyncio
from pydantic import ValidationError
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from starlette.concurrency import run_in_threadpool

from service.config import Settings
from worker import connection, spec

PENDING = frozenset({JobStatus.CREATED, JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED,
                     JobStatus.READY_TO_ENQUEUE, JobStatus.RATE_LIMITED})
ENDED = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})
GENERIC_ERROR = "generation failed"
# RQ's maintenance found the job started by a worker that stopped heartbeating, with no retries left.
ABANDONED_ERROR = "the worker running this job stopped unexpectedly, and its retries are used up"
# Without any worker in the registry, requests may still name these (they wait in the queue for one).
FALLBACK_ATTRIBUTES = ["Smiling"]


class JobNotFound(Exception):
    """No such job (never submitted, or not a generation job)."""


class JobGone(Exception):
    """The job, or the artifact asked for, existed but has expired."""


class QueueFull(Exception):
    def __init__(self, depth: int):
        super().__init__(f"queue holds {depth} jobs")
        self.depth = depth


class NotReplicated(redis.RedisError):
    """The primary has replicas but none acknowledged the job within ``REDIS_TIMEOUT_S``: it was withdrawn."""

    def __init__(self, acked: int, wanted: int):
        super().__init__(f"{acked} of {wanted} replicas acknowledged the job")


class IdempotencyMismatch(Exception):
    """The Idempotency-Key was used before with another request body."""


class NotReady(Exception):
    """The artifact does not exist in the job's current state."""

    def __init__(self, status: JobStatus, error: str | None = None):
        super().__init__(status.value)
        self.status = status
        self.error = error


class FieldError(Exception):
    """A request field names something the workers don't offer (unknown label, attribute, model)."""

    def __init__(self, field: str | tuple[str, ...], message: str, value: object = None):
        super().__init__(message)
        self.loc = (field,) if isinstance(field, str) else field
        self.message = message
        self.value = value


# ----- connections --------------------------------------------------------------------------------------------
# Timeouts, keep-alive, health checks, retries, TLS and Sentinel come from the policy both processes share
# (worker.connection); both clients fail fast: a couple of short retries, then the routes answer 503.
def connect(settings: Settings, on_error: connection.OnError | None = None) -> redis.Redis:
    """The synchronous client, for RQ's API (the ``def`` routes)."""
    return connection.connect(settings, on_error=on_error)


def connect_async(settings: Settings, on_error: connection.OnError | None = None) -> redis.asyncio.Redis:
    """The asyncio client, for the routes that must not leave the event loop (POST /generate).

    At most ``redis_max_connections`` connections; a request beyond them waits for a free one (up to the Redis
    timeout) instead of failing, so a burst of clients queues here rather than answering 503. Its reads may
    also wait out admission's ``WAIT`` for a replica."""
    client = connection.connect_async(settings, settings.redis_max_connections,
                                      blocking_s=replica_wait_s(settings), on_error=on_error)
    pool = client.connection_pool
    base = pool.connection_class  # chosen by the URL's scheme (TCP, TLS, Unix socket) or the Sentinel pool
    pool.connection_class = type(f"CPacked{base.__name__}", (_CPackedCommands, base), {})
    return client


class _CPackedCommands:
    """Mixin for redis-py's asyncio connections: pack commands with hiredis's C packer, as redis-py's synchronous
    connections already do. The asyncio ones pack in Python, a tenth of POST /generate's CPU time."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):  # a name like "CONFIG GET" goes out as separate words, as redis-py sends it
            args = (*args[0].encode().split(), *args[1:])
        args = tuple(bytes(arg) if isinstance(arg, bytearray | memoryview) else arg for arg in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # e.g. a bool, which redis-py refuses too
            raise redis.DataError(str(exc)) from None


def make_queue(conn: redis.Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=conn)


# ----- keys ---------------------------------------------------------------------------------------------------
def tombstone_key(job_id: str) -> str:
    return f"{spec.KEY_PREFIX}:tombstone:{job_id}"


REPLICATION_MARK_KEY = f"{spec.KEY_PREFIX}:replication-mark"


def observed_key(job_id: str) -> str:
    return f"{spec.KEY_PREFIX}:observed:{job_id}"


def idempotency_key(client: str, key: str) -> str:
    digest = hashlib.sha256(f"{client}\0{key}".encode()).hexdigest()
    return f"{spec.KEY_PREFIX}:idempotency:{digest}"


# ----- model registry -----------------------------------------------------------------------------------------
def read_models(conn: redis.Redis) -> list[spec.ModelInfo]:
    """Model descriptions live workers publish (entries that don't parse are skipped), sorted by version."""
    versions = conn.smembers(spec.MODEL_INDEX_KEY)
    return _parse_models(conn.mget(_registry_keys(versions)) if versions else [])


class LiveModels:
    """The model registry as ``POST /generate`` checks requests against it, read from Redis at most every
    ``max_age_s`` seconds.

    Workers rewrite their entries on every heartbeat and the entries expire with the heartbeat, so the registry is
    itself a view some seconds old: another second costs nothing in correctness and saves each request two Redis
    round trips and the parsing. A request that names something the cached view lacks is checked once more
    against a fresh read, so a model is usable as soon as its worker has published it.
    """

    def __init__(self, conn: redis.asyncio.Redis, max_age_s: float) -> None:
        self.conn = conn
        self.max_age_s = max_age_s
        self._models: list[spec.ModelInfo] = []
        self._read_at = -math.inf

    async def _read(self) -> list[spec.ModelInfo]:
        versions = await self.conn.smembers(spec.MODEL_INDEX_KEY)
        self._models = _parse_models(await self.conn.mget(_registry_keys(versions)) if versions else [])
        self._read_at = time.monotonic()
        return self._models

    async def resolve(self, version: str, label: str | None, attributes: dict[str, bool] | None) -> dict[str, bool]:
        """:func:`resolve_attributes` against the live models. Raises ``FieldError``."""
        if time.monotonic() - self._read_at > self.max_age_s:
            return resolve_attributes(await self._read(), version, label, attributes)
        try:
            return resolve_attributes(self._models, version, label, attributes)
        except FieldError:
            return resolve_attributes(await self._read(), version, label, attributes)


def _registry_keys(versions: set[bytes]) -> list[str]:
    return [spec.model_registry_key(v.decode()) for v in sorted(versions)]


def _parse_models(raws: list[bytes | None]) -> list[spec.ModelInfo]:
    models = []
    for raw in raws:
        if raw is None:  # no live worker serves that version any more (its entry expired)
            continue
        try:
            models.append(spec.ModelInfo.model_validate_json(raw))
        except ValidationError:
            continue
    return sorted(models, key=lambda m: m.version)


def find_model(models: list[spec.ModelInfo], version: str) -> spec.ModelInfo | None:
    """The entry serving ``version``; for ``"latest"`` the one flagged ``is_latest`` (the newest if several)."""
    if version == spec.LATEST:
        latest = [m for m in models if m.is_latest]
        return latest[-1] if latest else None
    return next((m for m in models if m.version == version), None)


def resolve_attributes(
    models: list[spec.ModelInfo], version: str, label: str | None, attributes: dict[str, bool] | None
) -> dict[str, bool]:
    """The request's condition as ``{attribute name: wanted}``, checked against the model that will serve it.

    Raises ``FieldError`` for an unknown model, label or attribute.
    """
    if models:
        model = find_model(models, version)
        if model is None:
            known = ", ".join([spec.LATEST] + [m.version for m in models])
            raise FieldError("model", f"unknown model {version!r}; live workers serve: {known}", version)
        names = model.attributes
    elif version == spec.LATEST:
        names = FALLBACK_ATTRIBUTES
    else:
        raise FieldError("model", f"unknown model {version!r}: no worker has published a model yet; use 'latest'",
                         version)
    if label is not None:
        try:
            return spec.label_to_attributes(label, names)
        except ValueError as exc:
            raise FieldError("label", str(exc), label) from None
    by_lower = {name.lower(): name for name in names}
    resolved = {}
    for name, wanted in (attributes or {}).items():
        canonical = by_lower.get(name.lower())
        if canonical is None:
            raise FieldError(("attributes", name), f"unknown attribute {name!r}; valid: {', '.join(names)}", name)
        resolved[canonical] = wanted
    return resolved


# ----- submit -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Submission:
    job_id: str
    seed: int
    status: JobStatus
    replayed: bool  # an earlier request with the same Idempotency-Key created this job


def fingerprint(payload: str) -> str:
    return hashlib.sha256(payload.encode()).hexdigest()


# Runs last inside the enqueue transaction, so no other client's command falls between RQ's push and this check:
# over the cap, the job just pushed (the queue's tail) and its hash are removed again; admitted, the job gets its
# tombstone. KEYS: queue, job hash, tombstone; ARGV: job id, cap, tombstone value, tombstone TTL (s). Returns the
# queue depth, or -(depth) when the job was refused.
ADMISSION_SCRIPT = """
local depth = redis.call('LLEN', KEYS[1])
if depth > tonumber(ARGV[2]) then
  redis.call('LREM', KEYS[1], -1, ARGV[1])
  redis.call('DEL', KEYS[2])
  return -depth
end
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
return depth
"""
# Takes back a job that admission pushed but could not get replicated, unless a worker has taken it already.
# KEYS: queue, job hash, tombstone; ARGV: job id. Returns 1 when the job was withdrawn.
WITHDRAW_SCRIPT = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 1 then
  redis.call('DEL', KEYS[2], KEYS[3])
  return 1
end
return 0
"""


def replica_wait_s(settings: Settings) -> float:
    """The longest admission waits for replicas to acknowledge a job (a blocking command of the asyncio client)."""
    return settings.redis_timeout_s if settings.redis_min_replicas_ack else 0.0


def replication_problem(conn: redis.Redis, settings: Settings) -> str | None:
    """A one-line reason when admission could not wait for replicas because the Redis user may not run ROLE or
    WAIT (a narrow ACL, some managed services): every POST /generate would fail. ``None`` when it can, or when
    ``redis_min_replicas_ack`` is 0, or when Redis is unreachable now."""
    if not settings.redis_min_replicas_ack:
        return None
    try:
        conn.execute_command("ROLE")
        conn.wait(0, 0)  # returns at once
    except redis.ResponseError as exc:
        return (f"REDIS_MIN_REPLICAS_ACK={settings.redis_min_replicas_ack} needs the Redis commands ROLE and WAIT "
                f"({exc}); allow them to the user (+role +wait) or set REDIS_MIN_REPLICAS_ACK=0")
    except redis.RedisError:
        pass
    return None


async def _await_replicas(conn: redis.asyncio.Redis, role: list[Any], settings: Settings) -> None:
    """Wait until ``redis_min_replicas_ack`` replicas (or all the primary has, if fewer) hold what this client
    wrote; ``role`` is the primary's ROLE reply, read in the job's transaction. Raises ``NotReplicated``."""
    wanted = min(settings.redis_min_replicas_ack, len(role[2]) if role[0] == b"master" else 0)
    if not wanted:
        return
    async with conn.pipeline(transaction=False) as pipe:  # one connection: the mark is this connection's write
        pipe.incr(REPLICATION_MARK_KEY)
        pipe.wait(wanted, int(replica_wait_s(settings) * 1000))
        acked = (await pipe.execute())[-1]
    if acked < wanted:
        raise NotReplicated(acked, wanted)


async def submit(
    conn: redis.asyncio.Redis,
    queue: Queue,
    job_spec: spec.JobSpec,
    settings: Settings,
    idempotency: tuple[str, str] | None = None,
) -> Submission:
    """Enqueue ``job_spec`` (by the worker function's dotted name) and remember its id.

    RQ builds the job and its writes (on ``queue``'s synchronous client, into a pipeline that is never run there);
    the same commands then run as one MULTI/EXEC on the asyncio client, followed by the admission check, so the
    event loop never waits on a thread.

    ``idempotency`` is ``(redis key, request fingerprint)``: the first request with that key creates the job, later
    ones with the same fingerprint get the same job back, with another fingerprint ``IdempotencyMismatch``.
    Raises ``QueueFull`` when the queue already holds ``settings.max_queued`` jobs, ``NotReplicated`` when the
    primary's replicas did not acknowledge the job in time (see ``Settings.redis_min_replicas_ack``).
    """
    job_id = str(uuid.uuid4())
    if idempotency is not None:
        key, print_ = idempotency
        record = json.dumps({"job_id": job_id, "fingerprint": print_, "seed": job_spec.seed})
        if not await conn.set(key, record, nx=True, ex=settings.idempotency_ttl):
            return await _replay(conn, queue, key, print_)
    try:
        if queue.redis_server_version is None:  # RQ asks the server once per queue object (a blocking INFO)
            await run_in_threadpool(queue.get_redis_server_version)
        with queue.connection.pipeline() as recorder:
            queue.enqueue(
                spec.JOB_FUNCTION,
                job_spec.model_dump(mode="json"),
                job_id=job_id,
                result_ttl=settings.artifact_ttl,
                failure_ttl=settings.failure_ttl,
                job_timeout=settings.job_timeout,
                retry=Retry(max=settings.job_retries) if settings.job_retries else None,
                meta={"submitted_at": datetime.now(UTC).isoformat()},
                description=f"generate {job_spec.label()} x{job_spec.count}",
                pipeline=recorder,
            )
            async with conn.pipeline(transaction=True) as pipe:
                for args, options in recorder.command_stack:
                    pipe.execute_command(*args, **options)
                pipe.eval(ADMISSION_SCRIPT, 3, queue.key, Job.key_for(job_id), tombstone_key(job_id), job_id,
                          settings.max_queued, json.dumps({"animation": job_spec.animation}), settings.tombstone_ttl)
                if settings.redis_min_replicas_ack:
                    pipe.execute_command("ROLE")  # the replicas the primary had when it ran the transaction
                replies = (await pipe.execute())[len(recorder.command_stack):]
        if replies[0] < 0:
            raise QueueFull(-replies[0] - 1)
        if settings.redis_min_replicas_ack:
            try:
                await _await_replicas(conn, replies[1], settings)
            except NotReplicated:
                await conn.eval(WITHDRAW_SCRIPT, 3, queue.key, Job.key_for(job_id), tombstone_key(job_id), job_id)
                raise
    except BaseException:
        if idempotency is not None:
            await conn.delete(idempotency[0])
        raise
    return Submission(job_id=job_id, seed=job_spec.seed, status=JobStatus.QUEUED, replayed=False)


async def _replay(conn: redis.asyncio.Redis, queue: Queue, key: str, print_: str) -> Submission:
    raw = await conn.get(key)
    if raw is None:  # expired in between: extremely rare; let the client retry
        raise IdempotencyMismatch("the Idempotency-Key expired while this request ran; retry")
    record = json.loads(raw)
    if record["fingerprint"] != print_:
        raise IdempotencyMismatch("this Idempotency-Key was already used with a different request body")
    try:
        job = await run_in_threadpool(Job.fetch, record["job_id"], connection=queue.connection)
        status = job.get_status(refresh=False)
    except NoSuchJobError:
        # Being enqueued by a concurrent request with the same key, or expired (GET /jobs/{id} tells which).
        status = JobStatus.QUEUED
    return Submission(job_id=record["job_id"], seed=record["seed"], status=status, replayed=True)


# ----- read ---------------------------------------------------------------------------------------------------
def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower() and len(value) == 36
    except ValueError:
        return False


def fetch(conn: redis.Redis, job_id: str) -> Job:
    """The generation job ``job_id``; raises ``JobGone`` when it expired, ``JobNotFound`` when it never existed."""
    if not _is_uuid(job_id):
        raise JobNotFound(job_id)
    try:
        job = Job.fetch(job_id, connection=conn)
        if job.func_name == spec.JOB_FUNCTION:
            return job
    except NoSuchJobError:
        pass
    except redis.RedisError:
        raise
    except Exception:  # a job hash we cannot decode is not one of ours
        pass
    if conn.exists(tombstone_key(job_id)):
        raise JobGone(job_id)
    raise JobNotFound(job_id)


def job_spec_of(job: Job) -> spec.JobSpec | None:
    """The job's spec; ``None`` when its arguments don't parse (e.g. queued by an incompatible API version)."""
    try:
        return spec.JobSpec.model_validate(job.args[0])
    except (ValidationError, IndexError, TypeError):
        return None


def status_of(job: Job) -> JobStatus:
    return job.get_status(refresh=False)


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


def queue_position(job: Job) -> int | None:
    return job.get_position() if status_of(job) == JobStatus.QUEUED else None


def cancel_requested(conn: redis.Redis, job: Job) -> bool:
    return status_of(job) not in ENDED and bool(conn.exists(spec.cancel_key(job.id)))


def first_sighting(conn: redis.Redis, job: Job, ttl: int) -> bool:
    """True exactly once per ended job across all API replicas (for the finished/failed metrics)."""
    if status_of(job) not in ENDED:
        return False
    return bool(conn.set(observed_key(job.id), b"1", nx=True, ex=ttl))


def animation_requested(conn: redis.Redis, job_id: str) -> bool:
    raw = conn.get(tombstone_key(job_id))
    return bool(raw and json.loads(raw).get("animation"))


def read_artifact(conn: redis.Redis, job_id: str, kind: str) -> bytes:
    """The artifact bytes of a finished job; raises ``JobNotFound`` (also for an animation nobody asked for),
    ``JobGone`` (expired) or ``NotReady`` (not finished)."""
    try:
        job = fetch(conn, job_id)
    except JobGone:
        if kind == "animation" and not animation_requested(conn, job_id):
            raise JobNotFound(job_id) from None
        raise
    job_spec = job_spec_of(job)
    wants_animation = job_spec.animation if job_spec is not None else animation_requested(conn, job_id)
    if kind == "animation" and not wants_animation:
        raise JobNotFound(job_id)
    status = status_of(job)
    if status != JobStatus.FINISHED:
        raise NotReady(status, error_of(job))
    data = conn.get(spec.artifact_key(job_id, kind))
    if data is None:
        raise JobGone(job_id)
    return data


# ----- cancel -------------------------------------------------------------------------------------------------
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
        job.cancel()
        conn.expire(job.key, settings.failure_ttl)
        return JobStatus.CANCELED
    return status
