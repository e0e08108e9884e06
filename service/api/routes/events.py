"""GET /jobs/{id}/events: the job's progress as Server-Sent Events, relayed from the job's Redis stream.

The worker writes the stream (``started``, a ``progress`` per step, the final ``finished``/``failed``/``canceled``;
see :class:`facegen.contract.spec.JobEvent`); this route relays its entries with their stream ids as SSE ids, so a client
that reconnects with ``Last-Event-ID`` continues after the last entry it got. While the job waits in the queue the
route sends ``queued`` events with the queue position (ids ``0-1``, ``0-2``, … sort before every stream id), read
once per ``PENDING_POLL_S`` per job in each API process whatever the number of its streams
(service/event_polls.py). A job that ended without a final entry (a worker killed for good, an expired stream) gets
its final event from its RQ status; a job whose stored data or meta is not JSON gets one ``failed`` event with the
reason. Quiet streams get a keep-alive comment every ``EVENTS_KEEPALIVE_S``.

Open streams are bounded twice: ``EVENTS_MAX_STREAMS`` per API process (503; each holds a Redis connection) and
``EVENTS_MAX_STREAMS_PER_KEY`` per API key across all replicas (429; leases in Redis, service/event_leases.py), so
one key cannot take every stream. An open API counts each client address as a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from functools import partial
from typing import Annotated

import redis
import redis.asyncio
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from facegen.contract import connection, spec
from facegen.contract.job_serializer import JOB_SERIALIZER
from facegen.contract.spec import FINAL_EVENTS, JobEvent
from service import job_ops
from service.api.deps import (
    GONE,
    NOT_FOUND,
    UNAUTHORIZED,
    UNAVAILABLE,
    ApiError,
    ServicesDep,
    caller_of,
    fetch_job,
    require_api_key,
)
from service.config import Settings
from service.event_leases import StreamLeases
from service.event_polls import SharedPolls, Subscription
from service.schemas import QuotaError
from service.tenancy import Caller

router = APIRouter(tags=["jobs"], dependencies=[Depends(require_api_key)], responses=UNAUTHORIZED)

PENDING_POLL_S = 1.0  # until the job's first entry, its state (status, queue position) is read this often
READ_BATCH = 256  # stream entries relayed per read
LEASE_MARGIN_S = 5.0  # a stream's lease outlives the longest wait between its renewals by this much
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
FINAL_OF_STATUS = {JobStatus.FINISHED: JobEvent.finished, JobStatus.FAILED: JobEvent.failed,
                   JobStatus.CANCELED: JobEvent.canceled, JobStatus.STOPPED: JobEvent.canceled}
_STREAM_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")


@dataclass
class Cursor:
    """The last event sent, as a stream id ``ms-seq``; ``ms == 0``: only ``queued`` events so far (``seq`` of
    them)."""

    ms: int = 0
    seq: int = 0

    @classmethod
    def parse(cls, last_event_id: str | None) -> Cursor:
        match = _STREAM_ID.match((last_event_id or "").strip())
        return cls(int(match[1]), int(match[2])) if match else cls()

    def stream_id(self) -> str:
        return f"{self.ms}-{self.seq}"

    def advance(self) -> str:
        """The id of an event the route makes itself: right after the last one."""
        self.seq += 1
        return self.stream_id()


def sse(event_id: str, event: str, data: str) -> bytes:
    return f"id: {event_id}\nevent: {event}\ndata: {data}\n\n".encode()


def _relayed(data: bytes, preview: bool) -> str:
    """An entry's data for this client: without the preview PNG unless it asked for previews."""
    text = data.decode()
    if preview or '"preview"' not in text:
        return text
    value = json.loads(text)
    value.pop("preview", None)
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class JobState:
    """A job as its streams see it between entries: RQ's status (``None``: the job expired; ``failed`` for a job
    whose stored data or meta is not JSON) and, while queued, its queue position (0: next)."""

    status: JobStatus | None
    position: int | None = None


def _state_before_entries(conn: redis.Redis, job_id: str) -> JobState:
    """The state of a job that has sent no stream entry yet, from RQ's synchronous reads (run in the thread pool,
    once per ``PENDING_POLL_S`` per job and process: :class:`service.event_polls.SharedPolls`)."""
    try:
        job = Job.fetch(job_id, connection=conn, serializer=JOB_SERIALIZER)
    except NoSuchJobError:
        return JobState(None)
    return JobState(job_ops.status_of(job), job_ops.queue_position(conn, job))


async def _state_after_entries(conn: redis.asyncio.Redis, job_id: str) -> JobState:
    """The status of a job that has sent stream entries: one field, read by each stream (no position to read)."""
    raw = await conn.hget(Job.key_for(job_id), "status")
    return JobState(JobStatus(raw.decode()) if raw else None)


@dataclass
class Slot:
    """An open stream's place: one of its process's ``EVENTS_MAX_STREAMS`` and one of its group's
    ``EVENTS_MAX_STREAMS_PER_KEY`` leases (service/event_leases.py)."""

    group: str  # an API key's id, or ``addr:<client address>`` on an open API (:func:`stream_group`)
    holder: str  # the lease's random id
    renewed_at: float  # time.monotonic() of the latest take or renewal of the lease


def stream_group(request: Request, caller: Caller) -> str:
    """Whose streams a request counts among: its API key's id, or on an open API its client address (behind a
    proxy, the address uvicorn reads from X-Forwarded-For when the proxy is in ``FORWARDED_ALLOW_IPS``)."""
    if caller.key_id is not None:
        return caller.key_id
    return f"addr:{request.client.host if request.client else 'unknown'}"


class Streams:
    """The event streams one API process serves: their Redis client (each open stream may hold a connection in a
    blocking read), their count (at most ``EVENTS_MAX_STREAMS``), each key's leases across the replicas (at most
    ``EVENTS_MAX_STREAMS_PER_KEY``) and the shared pollers of jobs that have sent no entry yet."""

    def __init__(self, client: redis.asyncio.Redis, limit: int, leases: StreamLeases, renew_every_s: float):
        self.client, self.limit, self.open = client, limit, 0
        self.leases, self.renew_every_s = leases, renew_every_s
        self.polls: SharedPolls[JobState] = SharedPolls(PENDING_POLL_S)
        self._giving_back: set[asyncio.Task[None]] = set()

    @classmethod
    def connect(cls, settings: Settings, on_error: connection.OnError | None = None) -> Streams:
        """Its own pool, apart from POST /generate's: one connection per open stream, whose reads block up to
        ``max(EVENTS_KEEPALIVE_S, PENDING_POLL_S)``, the longest a stream's loop waits between turns; a lease
        lapses after two such waits and ``LEASE_MARGIN_S``."""
        turn_s = max(settings.events_keepalive_s, PENDING_POLL_S)
        client = connection.connect_async(settings, settings.events_max_streams, blocking_s=turn_s,
                                          on_error=on_error)
        leases = StreamLeases(client, settings.events_max_streams_per_key, 2 * turn_s + LEASE_MARGIN_S)
        return cls(client, settings.events_max_streams, leases, renew_every_s=turn_s)

    async def take(self, group: str, retry_after_s: int) -> Slot:
        """A slot for one more stream of ``group``: 503 when this process serves ``EVENTS_MAX_STREAMS``, 429
        (``limit``: ``events_max_streams_per_key``) when ``group`` holds all its leases."""
        retry = {"Retry-After": str(retry_after_s)}
        if self.open >= self.limit:
            raise ApiError(503, "too many open event streams; poll GET /jobs/{id} or retry later", headers=retry)
        self.open += 1  # before the first await: a burst of requests cannot overshoot the limit
        slot, taken = Slot(group, uuid.uuid4().hex, time.monotonic()), False
        try:
            taken = await self.leases.take(group, slot.holder)
        finally:
            if not taken:
                self.open -= 1
        if not taken:
            raise ApiError(429, f"this API key (on an open API: this client address) already has "
                                f"{self.leases.limit} open event streams; close one, poll GET /jobs/{{id}} or "
                                "retry later", headers=retry, limit="events_max_streams_per_key",
                           allowed=self.leases.limit)
        return slot

    async def renew(self, slot: Slot) -> bool:
        """Renews ``slot``'s lease when ``renew_every_s`` has passed since it was last renewed; ``False`` when the
        lease lapsed (the stream stalled) and its group has used its place meanwhile: the stream must end."""
        now = time.monotonic()
        if now - slot.renewed_at < self.renew_every_s:
            return True
        slot.renewed_at = now
        return await self.leases.take(slot.group, slot.holder)

    def give_back(self, slot: Slot) -> None:
        """Frees ``slot``: its place in this process at once, its lease in a task of its own, so that a stream
        ending by cancellation (the client gone) gives it back too; a lease Redis cannot take back now lapses by
        itself."""
        self.open -= 1
        task = asyncio.get_running_loop().create_task(self._give_back_lease(slot))
        self._giving_back.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._giving_back.discard)

    async def _give_back_lease(self, slot: Slot) -> None:
        with contextlib.suppress(redis.RedisError):
            await self.leases.give_back(slot.group, slot.holder)


class EventStream(StreamingResponse):
    """The SSE answer. However it ends (the final event, ``EVENTS_MAX_S``, the client gone, an error), its body is
    closed and its slot given back: here, not in the body, which never starts if the client leaves first."""

    def __init__(self, body: AsyncGenerator[bytes, None], streams: Streams, slot: Slot):
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self._body, self._streams, self._slot = body, streams, slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._streams.give_back(self._slot)
            # a body left at a yield runs its cleanup (no await in it) and ends without suspending: even a
            # cancelled task gets through this await
            await self._body.aclose()


def _final_event(conn: redis.Redis, job_id: str, status: JobStatus | None) -> tuple[str, str]:
    """``(event, data)`` for a job that ended without a final stream entry (``status`` None: it expired)."""
    try:
        job = Job.fetch(job_id, connection=conn, serializer=JOB_SERIALIZER) if status is not None else None
    except NoSuchJobError:
        job = None
    if job is None:
        return JobEvent.failed.value, json.dumps({"status": "expired"})
    data = {"status": status.value, "error": job_ops.error_of(job)}
    return FINAL_OF_STATUS[status].value, json.dumps({k: v for k, v in data.items() if v is not None})


async def relay(streams: Streams, slot: Slot, request: Request, job_id: str, cursor: Cursor, preview: bool,
                settings: Settings, sync: redis.Redis) -> AsyncGenerator[bytes, None]:
    """The SSE body: stream entries after ``cursor``, ``queued`` events while the job waits, keep-alives, until
    the final event, the client leaves, ``EVENTS_MAX_S`` has passed or the stream's lease is lost. ``sync``: the
    synchronous client, for RQ's reads (in the thread pool)."""
    conn, key = streams.client, spec.events_key(job_id)
    keepalive_s, ends_at = settings.events_keepalive_s, time.monotonic() + settings.events_max_s
    last_position, last_sent, first = None, time.monotonic(), True
    waiting: Subscription[JobState] | None = None  # to the job's shared poller, until its first entry
    try:
        while time.monotonic() < ends_at and not await request.is_disconnected() and await streams.renew(slot):
            if preview:
                await conn.set(spec.preview_key(job_id), b"1", ex=spec.PREVIEW_FLAG_TTL_S)
            block_s = PENDING_POLL_S if cursor.ms == 0 else keepalive_s
            reply = await conn.xread({key: cursor.stream_id()}, count=READ_BATCH,
                                     block=None if first else int(block_s * 1000))  # the first read answers at once
            first = False
            for entry_id, fields in reply[0][1] if reply else []:
                cursor.ms, cursor.seq = map(int, entry_id.decode().split("-"))
                event = fields[b"event"].decode()
                yield sse(entry_id.decode(), event, _relayed(fields[b"data"], preview))
                last_sent = time.monotonic()
                if event in FINAL_EVENTS:
                    return
            if reply:
                if waiting is not None:  # the job has begun: this stream no longer needs its poller
                    waiting.close()
                continue
            if cursor.ms == 0:
                waiting = waiting or streams.polls.subscribe(
                    job_id, partial(run_in_threadpool, _state_before_entries, sync, job_id))
                state = await waiting.latest()
            else:
                state = await _state_after_entries(conn, job_id)
            if state.status is None or state.status in job_ops.ENDED:  # ended without a final entry, or expired
                yield sse(cursor.advance(), *await run_in_threadpool(_final_event, sync, job_id, state.status))
                return
            if cursor.ms == 0 and state.status in job_ops.PENDING and state.position != last_position:
                last_position, last_sent = state.position, time.monotonic()
                yield sse(cursor.advance(), JobEvent.queued.value, json.dumps({"status": state.status.value,
                                                                               "queue_position": state.position}))
                continue
            if time.monotonic() - last_sent >= keepalive_s:
                last_sent = time.monotonic()
                yield b": keep-alive\n\n"
    finally:
        if waiting is not None:
            waiting.close()


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    summary="Live progress (Server-Sent Events)",
    description=(
        "A `text/event-stream` of the job's events: `queued` (`data`: `queue_position`), `started`, `progress` "
        '(`data`: `{"progress": {"step", "total"}}`; with `preview=true` also `"preview"`, a base64 PNG of the '
        "current x0 prediction, about once a second), and a final `finished`, `failed` (with `error`) or "
        "`canceled`, after which the stream ends (it also ends after EVENTS_MAX_S). Every event has an `id`: reconnect "
        "with `Last-Event-ID` to go on after it (204 when the job has ended and nothing follows). Comment lines keep "
        "quiet streams open. An API key holds at most EVENTS_MAX_STREAMS_PER_KEY open streams (429)."
    ),
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The event stream."},
        204: {"description": "Resumed after the final event: nothing more will come."},
        429: {"model": QuotaError, "description": "The API key (on an open API: the client address) already holds "
                                                  "EVENTS_MAX_STREAMS_PER_KEY open streams, across all API "
                                                  "replicas (`limit`: `events_max_streams_per_key`); retry after "
                                                  "`Retry-After` seconds or poll GET /jobs/{id}."},
        **NOT_FOUND, **GONE, **UNAVAILABLE,
    },
)
async def job_events(
    job_id: str,
    request: Request,
    services: ServicesDep,
    preview: Annotated[bool, Query(description="Also send previews of the x0 prediction with progress events.")]
    = False,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64,
                                                description="The id of the last event received.")] = None,
) -> Response:
    streams: Streams = request.app.state.event_streams
    caller = caller_of(request)
    job = await run_in_threadpool(fetch_job, services.redis, job_id, caller)
    cursor = Cursor.parse(last_event_id)
    if last_event_id and job_ops.status_of(job) in job_ops.ENDED:
        if not await streams.client.xread({spec.events_key(job_id): cursor.stream_id()}, count=1):
            return Response(status_code=204)
    refused = job_ops.refusal_of(job)
    if refused is not None:  # never run: its one event, no stream to hold open
        event = sse(cursor.advance(), JobEvent.failed.value,
                    json.dumps({"status": JobStatus.FAILED.value, "error": refused}))
        return Response(event, media_type="text/event-stream", headers=SSE_HEADERS)
    slot = await streams.take(stream_group(request, caller), services.settings.retry_after_s)
    body = relay(streams, slot, request, job_id, cursor, preview, services.settings, services.redis)
    return EventStream(body, streams, slot)
