"""Admission of a job: enqueue it with RQ, check the queue cap in the same transaction (a Lua script), wait for
replicas, and replay a request repeated with the same Idempotency-Key."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from starlette.concurrency import run_in_threadpool

from service.config import Settings
from service.keys import REPLICATION_MARK_KEY, tombstone_key
from service.redis_clients import replica_wait_s
from worker import spec


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


