"""Fair queueing across API keys, on top of RQ (torch-free: the API and the test's fake worker import it).

Each API key's jobs wait in the key's own Redis list (``spec.key_queue_key``); the RQ queue itself holds only
jobs handed out to be run next (and jobs of an open API, which has a single tenant). A sorted set, the *ring*
(``spec.key_ring_key``), holds the keys with waiting jobs, scored by the turn at which a worker last served
them. To take its next job a worker *dispatches*: it moves the first job of the key served longest ago to the
RQ queue and dequeues it as RQ does (``LMOVE`` into the queue's intermediate list, so a crash loses nothing).
Keys thus take turns, whatever their backlog: a key that floods the service delays another key's job by at most
the batch being run. A key whose first job arrives joins just ahead of the key served last.

An idle worker blocks on the RQ queue itself; admission wakes it by dispatching the job it accepts when the RQ
queue is empty (see ``DISPATCH_LUA``), so the queue never holds more than that one job ahead of the turns.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import zip_longest
from typing import Any

import redis
from rq import Queue
from rq.job import Job

from .spec import key_queue_key, key_ring_key, key_turn_key

# dispatch(queue, ring, turn, prefix): move the first job of the key served longest ago (lowest ring score) to the
# tail of the RQ queue and score that key with the next turn; keys found with no job waiting leave the ring.
# ``prefix`` .. key id is that key's list. Returns the job id, or false when no key has a job waiting.
DISPATCH_LUA = """
local function dispatch(queue, ring, turn, prefix)
  for _, key_id in ipairs(redis.call('ZRANGE', ring, 0, -1)) do
    local id = redis.call('LPOP', prefix .. key_id)
    if id then
      redis.call('RPUSH', queue, id)
      redis.call('ZADD', ring, redis.call('INCR', turn), key_id)
      return id
    end
    redis.call('ZREM', ring, key_id)
  end
  return false
end
"""
_DISPATCH_SCRIPT = DISPATCH_LUA + "return dispatch(KEYS[1], KEYS[2], KEYS[3], ARGV[1])"


def fair_keys(queue_name: str, queue_key: str) -> tuple[list[str], list[str]]:
    """KEYS and ARGV that ``dispatch`` takes for one RQ queue."""
    return [queue_key, key_ring_key(queue_name), key_turn_key(queue_name)], [key_queue_key(queue_name, "")]


def dispatch(connection: redis.Redis, queue: Queue) -> str | None:
    """Hand the next key's first waiting job to ``queue``; its id, or ``None`` when no key has one waiting."""
    keys, args = fair_keys(queue.name, queue.key)
    job_id = connection.eval(_DISPATCH_SCRIPT, len(keys), *keys, *args)
    return job_id.decode() if isinstance(job_id, bytes) else job_id


class FairQueue(Queue):
    """The queue class of fair workers: ``dequeue_any`` takes a job already in the RQ queues, else dispatches
    the next key's job and takes that, and blocks on the RQ queues (as RQ does) only when no key has work."""

    @classmethod
    def dequeue_any(cls, queues: Iterable[Queue], timeout: int | None, connection: redis.Redis,
                    **options: Any) -> tuple[Job, Queue] | None:
        queues = list(queues)
        while True:
            result = super().dequeue_any(queues, None, connection=connection, **options)
            if result is not None:
                return result
            if not any(dispatch(connection, queue) for queue in queues):
                break
        if timeout is None:
            return None
        return super().dequeue_any(queues, timeout, connection=connection, **options)


def waiting_jobs(connection: redis.Redis, queue: Queue, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` waiting jobs as ``(list key, job id)``: those in the RQ queue first, then the keys' lists
    in turn (each key's first job in ring order, then each key's second, …): batch companions come fairly."""
    key_ids = [k.decode() for k in connection.zrange(key_ring_key(queue.name), 0, -1)]
    lists = [key_queue_key(queue.name, key_id) for key_id in key_ids]
    per_list = max(1, limit // max(1, len(lists)))
    with connection.pipeline(transaction=False) as pipe:
        pipe.lrange(queue.key, 0, limit - 1)
        for key in lists:
            pipe.lrange(key, 0, per_list - 1)
        own, *others = pipe.execute()
    found = [(queue.key, job_id.decode()) for job_id in own]
    for row in zip_longest(*others):
        found += [(key, job_id.decode()) for key, job_id in zip(lists, row, strict=True) if job_id is not None]
    return found[:limit]


def waiting_by_key(connection: redis.Redis, queue_name: str) -> dict[str, int]:
    """Key id -> jobs waiting in that key's list (keys in the ring only: those with work or just drained)."""
    key_ids = [k.decode() for k in connection.zrange(key_ring_key(queue_name), 0, -1)]
    with connection.pipeline(transaction=False) as pipe:
        for key_id in key_ids:
            pipe.llen(key_queue_key(queue_name, key_id))
        return dict(zip(key_ids, pipe.execute(), strict=True))
