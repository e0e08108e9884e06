"""Admission of a job: enqueue it with RQ, check the queue cap and the key's quota in the same transaction (a Lua
script) and file it under its key, wait for replicas, and replay a request repeated with the same Idempotency-Key."""

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

from facegen.contract import spec
from facegen.contract.fair_queue import DISPATCH_LUA
from service.config import Settings
from service.keys import REPLICATION_MARK_KEY, rate_key, tombstone_key
from service.redis_clients import replica_wait_s
from service.schemas import WebhookCreate
from service.tenancy import Caller, quota_for
from service.webhooks import delivery as webhook_delivery

# Jobs at the head of the RQ queue that admission reads for the key's jobs already dispatched (at most one per
# worker is, in keyed use; anonymous or retried jobs may stand beside them).
DISPATCHED_SCAN = 64


class Refused(Exception):
    """Admission refused the job: ``limit`` names the limit reached (``max_queued`` for the whole queue, or the
    key's ``queued_jobs``, ``queued_images``, ``submissions_per_minute``), ``allowed`` its value; ``retry_after_s``
    is when a retry can succeed, if known (the submission rate)."""

    def __init__(self, limit: str, allowed: int, retry_after_s: int | None = None):
        super().__init__(f"{limit} limit ({allowed}) reached")
        self.limit, self.allowed, self.retry_after_s = limit, allowed, retry_after_s


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


# Runs last inside the enqueue transaction, so no other client's command falls between RQ's push and this check
# (the limits hold under any burst). It counts the queue's depth (the RQ queue and every key's list) against
# MAX_QUEUED and, for an API key, the key's waiting jobs (in its list, or already dispatched to the RQ queue) and
# their images against its quota, and its submission rate (GCRA: a bucket of `per minute` tokens refilled evenly,
# the time from Redis). Refused: the job just pushed (the queue's tail) and its hash are removed again. Admitted:
# an API key's job moves from the queue to the key's list (dispatched at once when the RQ queue is empty, which
# wakes an idle worker; see facegen/contract/fair_queue.py), and the job gets its tombstone.
# KEYS: queue, job hash, tombstone, ring, turn, rate. ARGV: job id, max queued, tombstone value, tombstone TTL (s),
# prefix of the keys' lists, key id ('' for an open API), images, max queued jobs, max queued images, submissions
# per minute, prefix of job hashes. Returns {'ok', depth} or {limit, allowed, retry after (s, 0 = unknown)}.
ADMISSION_SCRIPT = DISPATCH_LUA + f"""
local id, prefix, key_id, jobs_prefix = ARGV[1], ARGV[5], ARGV[6], ARGV[11]
local function refuse(limit, allowed, retry)
  redis.call('LREM', KEYS[1], -1, id)
  redis.call('DEL', KEYS[2])
  return {{limit, allowed, retry}}
end
local depth = redis.call('LLEN', KEYS[1]) - 1
for _, other in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  depth = depth + redis.call('LLEN', prefix .. other)
end
if depth >= tonumber(ARGV[2]) then return refuse('max_queued', tonumber(ARGV[2]), 0) end
if key_id ~= '' then
  local list, images = prefix .. key_id, tonumber(ARGV[7])
  local jobs = redis.call('LLEN', list)
  for _, other in ipairs(redis.call('LRANGE', list, 0, -1)) do
    images = images + (tonumber(redis.call('HGET', jobs_prefix .. other, '{spec.IMAGES_FIELD}')) or 0)
  end
  for _, other in ipairs(redis.call('LRANGE', KEYS[1], 0, {DISPATCHED_SCAN - 1})) do
    local fields = redis.call('HMGET', jobs_prefix .. other, '{spec.OWNER_FIELD}', '{spec.IMAGES_FIELD}')
    if fields[1] == key_id then jobs, images = jobs + 1, images + (tonumber(fields[2]) or 0) end
  end
  if jobs >= tonumber(ARGV[8]) then return refuse('queued_jobs', tonumber(ARGV[8]), 0) end
  if images > tonumber(ARGV[9]) then return refuse('queued_images', tonumber(ARGV[9]), 0) end
  local time = redis.call('TIME')
  local now, interval = tonumber(time[1]) + tonumber(time[2]) / 1e6, 60 / tonumber(ARGV[10])
  local due = math.max(tonumber(redis.call('GET', KEYS[6]) or 0), now) + interval
  if due - now > 60 then return refuse('submissions_per_minute', tonumber(ARGV[10]), math.ceil(due - now - 60)) end
  redis.call('SET', KEYS[6], string.format('%.6f', due), 'PX', math.ceil((due - now) * 1000))
  redis.call('LREM', KEYS[1], -1, id)
  redis.call('RPUSH', list, id)
  redis.call('HSET', KEYS[2], '{spec.OWNER_FIELD}', key_id, '{spec.IMAGES_FIELD}', ARGV[7])
  redis.call('ZADD', KEYS[4], 'NX', (tonumber(redis.call('GET', KEYS[5])) or 0) - 0.5, key_id)
  if redis.call('LLEN', KEYS[1]) == 0 then dispatch(KEYS[1], KEYS[4], KEYS[5], prefix) end
end
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
return {{'ok', depth + 1}}
"""
# Takes back a job that admission pushed but could not get replicated, unless a worker has taken it already.
# KEYS: queue, job hash, tombstone, the key's list; ARGV: job id. Returns 1 when the job was withdrawn.
WITHDRAW_SCRIPT = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) + redis.call('LREM', KEYS[4], -1, ARGV[1]) == 1 then
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
    caller: Caller,
    idempotency: tuple[str, str] | None = None,
    webhook: WebhookCreate | None = None,
) -> Submission:
    """Enqueue ``job_spec`` (by the worker function's dotted name) for ``caller`` and remember its id.

    RQ builds the job and its writes (on ``queue``'s synchronous client, into a pipeline that is never run there);
    the same commands then run as one MULTI/EXEC on the asyncio client, followed by the admission check, so the
    event loop never waits on a thread.

    ``idempotency`` is ``(redis key, request fingerprint)``: the first request with that key creates the job, later
    ones with the same fingerprint get the same job back, with another fingerprint ``IdempotencyMismatch``.
    Raises ``Refused`` when the queue holds ``settings.max_queued`` jobs or the caller is at a limit of its quota,
    ``NotReplicated`` when the primary's replicas did not acknowledge the job in time (see
    ``Settings.redis_min_replicas_ack``).

    ``webhook``: the job's webhook, whose delivery (service/webhooks/delivery.py) is written in the same transaction.
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
                description=f"{job_spec.kind} {job_spec.label()} x{job_spec.count}",
                pipeline=recorder,
            )
            if webhook is not None:
                webhook_delivery.defer(recorder, queue.connection, job_id, webhook, settings)
            async with conn.pipeline(transaction=True) as pipe:
                for args, options in recorder.command_stack:
                    pipe.execute_command(*args, **options)
                pipe.eval(ADMISSION_SCRIPT, 6, *_admission_keys(queue, job_id, caller),
                          *_admission_args(queue, job_id, job_spec, settings, caller))
                if settings.redis_min_replicas_ack:
                    pipe.execute_command("ROLE")  # the replicas the primary had when it ran the transaction
                replies = (await pipe.execute())[len(recorder.command_stack):]
        verdict = replies[0]
        if verdict[0] != b"ok":
            raise Refused(verdict[0].decode(), verdict[1], verdict[2] or None)
        if settings.redis_min_replicas_ack:
            try:
                await _await_replicas(conn, replies[1], settings)
            except NotReplicated:
                await conn.eval(WITHDRAW_SCRIPT, 4, queue.key, Job.key_for(job_id), tombstone_key(job_id),
                                spec.key_queue_key(queue.name, caller.tenant), job_id)
                raise
    except BaseException:
        if idempotency is not None:
            await conn.delete(idempotency[0])
        raise
    return Submission(job_id=job_id, seed=job_spec.seed, status=JobStatus.QUEUED, replayed=False)


def _admission_keys(queue: Queue, job_id: str, caller: Caller) -> list[str]:
    return [queue.key, Job.key_for(job_id), tombstone_key(job_id), spec.key_ring_key(queue.name),
            spec.key_turn_key(queue.name), rate_key(caller.tenant)]


def _admission_args(queue: Queue, job_id: str, job_spec: spec.JobSpec, settings: Settings,
                    caller: Caller) -> list[Any]:
    quota = quota_for(settings, caller) or settings.default_quota()  # an open API: not read by the script
    tombstone = json.dumps({"animation": job_spec.has_animation(), "owner": caller.key_id})
    return [job_id, settings.max_queued, tombstone, settings.tombstone_ttl, spec.key_queue_key(queue.name, ""),
            caller.tenant, job_spec.chains(), quota.queued_jobs, quota.queued_images, quota.submissions_per_minute,
            Job.redis_job_namespace_prefix]


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


