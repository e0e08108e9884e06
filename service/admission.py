"""Admission of a job: enqueue it with RQ, check the queue cap and the key's quota and rate (in work units,
facegen/contract/cost.py) in the same transaction (a Lua script) and file it under its key, wait for replicas, and
replay a request repeated with the same Idempotency-Key. An edit's decision is taken before its upload is decoded
(:func:`decide`), by the same limits."""

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

from facegen.contract import cost, spec
from facegen.contract.fair_queue import DISPATCH_LUA
from facegen.contract.job_serializer import JOB_SERIALIZER
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
    key's ``queued_jobs``, ``queued_units``, ``units_per_minute``), ``allowed`` its value; ``units`` is what the job
    costs (facegen/contract/cost.py); ``retry_after_s`` is when a retry can succeed, if known (the rate)."""

    def __init__(self, limit: str, allowed: int, units: int, retry_after_s: int | None = None):
        super().__init__(f"{limit} limit ({allowed}) reached")
        self.limit, self.allowed, self.units, self.retry_after_s = limit, allowed, units, retry_after_s


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


# The limits of one submission, shared by the two scripts below. ``limits(queue, ring, rate, depth, args)`` counts
# the queue's depth (``depth`` jobs in the RQ queue, plus every key's list) against MAX_QUEUED and, for an API key,
# the key's waiting jobs (in its list, or already dispatched to the RQ queue) and their work units (the job hashes'
# UNITS_FIELD) against its quota, and, when ``charge`` is '1', its rate in units (GCRA: a bucket of `units per
# minute` tokens refilled evenly, the time from Redis), taking the job's units from the bucket when it admits.
# ``args`` (strings, from ARGV): max queued, prefix of the keys' lists, key id ('' for an open API), the job's units,
# max queued jobs, max queued units, units per minute, prefix of job hashes, charge. Returns the refusal {limit,
# allowed, retry after (s, 0 = unknown)} or nil, and the depth counted.
LIMITS_LUA = f"""
local function limits(queue, ring, rate, depth, args)
  local max_queued, prefix, key_id, units = tonumber(args[1]), args[2], args[3], tonumber(args[4])
  for _, other in ipairs(redis.call('ZRANGE', ring, 0, -1)) do
    depth = depth + redis.call('LLEN', prefix .. other)
  end
  if depth >= max_queued then return {{'max_queued', max_queued, 0}}, depth end
  if key_id == '' then return nil, depth end
  local max_jobs, max_units, per_minute, jobs_prefix = tonumber(args[5]), tonumber(args[6]), tonumber(args[7]), args[8]
  local list, queued = prefix .. key_id, units
  local jobs = redis.call('LLEN', list)
  for _, other in ipairs(redis.call('LRANGE', list, 0, -1)) do
    queued = queued + (tonumber(redis.call('HGET', jobs_prefix .. other, '{spec.UNITS_FIELD}')) or 0)
  end
  for _, other in ipairs(redis.call('LRANGE', queue, 0, {DISPATCHED_SCAN - 1})) do
    local fields = redis.call('HMGET', jobs_prefix .. other, '{spec.OWNER_FIELD}', '{spec.UNITS_FIELD}')
    if fields[1] == key_id then jobs, queued = jobs + 1, queued + (tonumber(fields[2]) or 0) end
  end
  if jobs >= max_jobs then return {{'queued_jobs', max_jobs, 0}}, depth end
  if queued > max_units then return {{'queued_units', max_units, 0}}, depth end
  if args[9] == '1' then
    local time = redis.call('TIME')
    local now = tonumber(time[1]) + tonumber(time[2]) / 1e6
    local due = math.max(tonumber(redis.call('GET', rate) or 0), now) + units * 60 / per_minute
    if due - now > 60 then return {{'units_per_minute', per_minute, math.ceil(due - now - 60)}}, depth end
    redis.call('SET', rate, string.format('%.6f', due), 'PX', math.ceil((due - now) * 1000))
  end
  return nil, depth
end
"""
# Runs last inside the enqueue transaction, so no other client's command falls between RQ's push and this check
# (the limits hold under any burst). Refused: the job just pushed (the queue's tail) and its hash are removed again.
# Admitted: an API key's job moves from the queue to the key's list (dispatched at once when the RQ queue is empty,
# which wakes an idle worker; see facegen/contract/fair_queue.py) and its hash gets its owner and units; the job
# gets its tombstone.
# KEYS: queue, job hash, tombstone, ring, turn, rate. ARGV: job id, tombstone value, tombstone TTL (s), then the
# args of ``limits``. Returns {'ok', depth} or the refusal.
ADMISSION_SCRIPT = DISPATCH_LUA + LIMITS_LUA + f"""
local id, args = ARGV[1], {{unpack(ARGV, 4)}}
local refusal, depth = limits(KEYS[1], KEYS[4], KEYS[6], redis.call('LLEN', KEYS[1]) - 1, args)
if refusal then
  redis.call('LREM', KEYS[1], -1, id)
  redis.call('DEL', KEYS[2])
  return refusal
end
local prefix, key_id = args[2], args[3]
if key_id ~= '' then
  redis.call('LREM', KEYS[1], -1, id)
  redis.call('RPUSH', prefix .. key_id, id)
  redis.call('HSET', KEYS[2], '{spec.OWNER_FIELD}', key_id, '{spec.UNITS_FIELD}', args[4])
  redis.call('ZADD', KEYS[4], 'NX', (tonumber(redis.call('GET', KEYS[5])) or 0) - 0.5, key_id)
  if redis.call('LLEN', KEYS[1]) == 0 then dispatch(KEYS[1], KEYS[4], KEYS[5], prefix) end
end
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
return {{'ok', depth + 1}}
"""
# The same limits, decided before a job exists (an edit's, before its upload is decoded): charges the key's rate
# when they admit. KEYS: queue, ring, rate. ARGV: the args of ``limits``. Returns {'ok'} or the refusal.
DECISION_SCRIPT = LIMITS_LUA + """
local refusal = limits(KEYS[1], KEYS[2], KEYS[3], redis.call('LLEN', KEYS[1]), ARGV)
return refusal or {'ok'}
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
    rate_charged: bool = False,
) -> Submission:
    """Enqueue ``job_spec`` (by the worker function's dotted name) for ``caller`` and remember its id.

    RQ builds the job and its writes (on ``queue``'s synchronous client, into a pipeline that is never run there);
    the same commands then run as one MULTI/EXEC on the asyncio client, followed by the admission check, so the
    event loop never waits on a thread.

    ``idempotency`` is ``(redis key, request fingerprint)``: the first request with that key creates the job, later
    ones with the same fingerprint get the same job back, with another fingerprint ``IdempotencyMismatch``.
    Raises ``Refused`` when the queue holds ``settings.max_queued`` jobs or the caller is at a limit of its quota
    (counted in the job's work units, ``cost.job_units``), ``NotReplicated`` when the primary's replicas did not
    acknowledge the job in time (see ``Settings.redis_min_replicas_ack``).

    ``webhook``: the job's webhook, whose delivery (service/webhooks/delivery.py) is written in the same transaction.
    ``rate_charged``: :func:`decide` took the job's units from the caller's rate already.
    """
    job_id = str(uuid.uuid4())
    units = cost.job_units(job_spec)
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
                tombstone = json.dumps({"animation": job_spec.has_animation(), "owner": caller.key_id})
                pipe.eval(ADMISSION_SCRIPT, 6, *_admission_keys(queue, job_id, caller), job_id, tombstone,
                          settings.tombstone_ttl, *_limit_args(queue, units, settings, caller, not rate_charged))
                if settings.redis_min_replicas_ack:
                    pipe.execute_command("ROLE")  # the replicas the primary had when it ran the transaction
                replies = (await pipe.execute())[len(recorder.command_stack):]
        verdict = replies[0]
        if verdict[0] != b"ok":
            raise Refused(verdict[0].decode(), verdict[1], units, verdict[2] or None)
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


def _limit_args(queue: Queue, units: int, settings: Settings, caller: Caller, charge: bool) -> list[Any]:
    """The ``args`` of ``LIMITS_LUA``'s ``limits``."""
    quota = quota_for(settings, caller) or settings.default_quota()  # an open API: not read by the script
    return [settings.max_queued, spec.key_queue_key(queue.name, ""), caller.tenant, units, quota.queued_jobs,
            quota.queued_units, quota.units_per_minute, Job.redis_job_namespace_prefix, "1" if charge else "0"]


async def decide(conn: redis.asyncio.Redis, queue: Queue, units: int, settings: Settings, caller: Caller) -> None:
    """Take the admission decision for a job of ``units`` work units before the job exists (an edit's, before its
    upload is decoded): raises ``Refused`` as :func:`submit` would now; when the limits admit it, the units are
    taken from the caller's rate (pass ``rate_charged=True`` to :func:`submit`), so a burst of such requests decodes
    no more than the rate allows, whatever becomes of them."""
    verdict = await conn.eval(DECISION_SCRIPT, 3, queue.key, spec.key_ring_key(queue.name), rate_key(caller.tenant),
                              *_limit_args(queue, units, settings, caller, True))
    if verdict[0] != b"ok":
        raise Refused(verdict[0].decode(), verdict[1], units, verdict[2] or None)


async def replayed(conn: redis.asyncio.Redis, queue: Queue, idempotency: tuple[str, str]) -> Submission | None:
    """The job an earlier request with this ``idempotency`` (as for :func:`submit`) created, or ``None`` when the
    key is unused; raises ``IdempotencyMismatch`` when it was used with another request body."""
    raw = await conn.get(idempotency[0])
    return None if raw is None else await _replay_record(queue, raw, idempotency[1])


async def _replay(conn: redis.asyncio.Redis, queue: Queue, key: str, print_: str) -> Submission:
    raw = await conn.get(key)
    if raw is None:  # expired in between: extremely rare; let the client retry
        raise IdempotencyMismatch("the Idempotency-Key expired while this request ran; retry")
    return await _replay_record(queue, raw, print_)


async def _replay_record(queue: Queue, raw: bytes, print_: str) -> Submission:
    """The submission an idempotency record ``raw`` remembers, if the request's fingerprint ``print_`` matches."""
    record = json.loads(raw)
    if record["fingerprint"] != print_:
        raise IdempotencyMismatch("this Idempotency-Key was already used with a different request body")
    try:
        job = await run_in_threadpool(Job.fetch, record["job_id"], connection=queue.connection,
                                      serializer=JOB_SERIALIZER)
        status = job.get_status(refresh=False)
    except NoSuchJobError:
        # Being enqueued by a concurrent request with the same key, or expired (GET /jobs/{id} tells which).
        status = JobStatus.QUEUED
    return Submission(job_id=record["job_id"], seed=record["seed"], status=status, replayed=True)


