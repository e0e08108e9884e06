"""The API's Redis clients: a synchronous one for RQ (the ``def`` routes) and an asyncio one for POST /generate.

Timeouts, keep-alive, health checks, retries, TLS and Sentinel come from the policy both processes share
(facegen.contract.connection); both clients fail fast: a couple of short retries, then the routes answer 503.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis
import redis.asyncio
from rq import Queue

from facegen.contract import connection
from facegen.contract.job_serializer import JOB_SERIALIZER
from service.config import Settings


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
    connections already do. The asyncio ones pack in Python, a sizeable share of POST /generate's CPU time
    (bench/api_cpu.py)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):  # a name like "CONFIG GET" goes out as separate words, as redis-py sends it
            args = (*args[0].encode().split(), *args[1:])
        args = tuple(bytes(arg) if isinstance(arg, bytearray | memoryview) else arg for arg in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # e.g. a bool, which redis-py refuses too
            raise redis.DataError(str(exc)) from None


def make_queue(conn: redis.Redis, settings: Settings) -> Queue:
    """The API's RQ queue; its jobs are stored as JSON (facegen/contract/job_serializer.py)."""
    return Queue(settings.queue_name, connection=conn, serializer=JOB_SERIALIZER)


def replica_wait_s(settings: Settings) -> float:
    """The longest admission waits for replicas to acknowledge a job (a blocking command of the asyncio client)."""
    return settings.redis_timeout_s if settings.redis_min_replicas_ack else 0.0
