"""GET /jobs/{id}/events: the job's progress as Server-Sent Events, relayed from the job's Redis stream.

The worker writes the stream (``started``, a ``progress`` per step, the final ``finished``/``failed``/``canceled``;
see :class:`facegen.contract.spec.JobEvent`); this route relays its entries with their stream ids as SSE ids, so a client
that reconnects with ``Last-Event-ID`` continues after the last entry it got. While the job waits in the queue the
route sends ``queued`` events with the queue position (ids ``0-1``, ``0-2``, … sort before every stream id). A job
that ended without a final entry (a worker killed for good, an expired stream) gets its final event from its RQ
status. Quiet streams get a keep-alive comment every ``EVENTS_KEEPALIVE_S``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import redis
import redis.asyncio
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from starlette.concurrency import run_in_threadpool

from facegen.contract import connection, spec
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

router = APIRouter(tags=["jobs"], dependencies=[Depends(require_api_key)], responses=UNAUTHORIZED)

PENDING_POLL_S = 1.0  # while queued, the position is read this often
READ_BATCH = 256  # stream entries relayed per read
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


class Streams:
    """The event streams one API process serves: their Redis client (each open stream may hold a connection in a
    blocking read) and their count, bounded by ``EVENTS_MAX_STREAMS``."""

    def __init__(self, client: redis.asyncio.Redis, limit: int):
        self.client, self.limit, self.open = client, limit, 0

    @classmethod
    def connect(cls, settings: Settings, on_error: connection.OnError | None = None) -> Streams:
        """Its own pool, apart from POST /generate's: one connection per open stream, whose reads block up to
        ``EVENTS_KEEPALIVE_S``."""
        client = connection.connect_async(settings, settings.events_max_streams,
                                          blocking_s=max(settings.events_keepalive_s, PENDING_POLL_S),
                                          on_error=on_error)
        return cls(client, settings.events_max_streams)


def _position(conn: redis.Redis, job_id: str) -> int | None:
    try:
        return job_ops.queue_position(conn, Job.fetch(job_id, connection=conn))
    except NoSuchJobError:  # expired meanwhile: the next pass ends the stream
        return None


def _final_event(conn: redis.Redis, job_id: str, status: JobStatus | None) -> tuple[str, str]:
    """``(event, data)`` for a job that ended without a final stream entry (``status`` None: it expired)."""
    try:
        job = Job.fetch(job_id, connection=conn) if status is not None else None
    except NoSuchJobError:
        job = None
    if job is None:
        return JobEvent.failed.value, json.dumps({"status": "expired"})
    data = {"status": status.value, "error": job_ops.error_of(job)}
    return FINAL_OF_STATUS[status].value, json.dumps({k: v for k, v in data.items() if v is not None})


async def relay(streams: Streams, request: Request, job_id: str, cursor: Cursor, preview: bool,
                settings: Settings, sync: redis.Redis) -> AsyncIterator[bytes]:
    """The SSE body: stream entries after ``cursor``, ``queued`` events while the job waits, keep-alives, until
    the final event, the client leaves or ``EVENTS_MAX_S`` has passed. ``sync``: the synchronous client, for RQ's
    reads (in the thread pool)."""
    conn, key = streams.client, spec.events_key(job_id)
    keepalive_s, ends_at = settings.events_keepalive_s, time.monotonic() + settings.events_max_s
    last_position, last_sent, first = None, time.monotonic(), True
    streams.open += 1
    try:
        while time.monotonic() < ends_at and not await request.is_disconnected():
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
                continue
            raw = await conn.hget(Job.key_for(job_id), "status")
            status = JobStatus(raw.decode()) if raw else None
            if status is None or status in job_ops.ENDED:  # ended without a final entry, or expired meanwhile
                yield sse(cursor.advance(), *await run_in_threadpool(_final_event, sync, job_id, status))
                return
            if cursor.ms == 0 and status in job_ops.PENDING:
                current = await run_in_threadpool(_position, sync, job_id)
                if current != last_position:
                    last_position, last_sent = current, time.monotonic()
                    yield sse(cursor.advance(), JobEvent.queued.value, json.dumps({"status": status.value,
                                                                                   "queue_position": current}))
                    continue
            if time.monotonic() - last_sent >= keepalive_s:
                last_sent = time.monotonic()
                yield b": keep-alive\n\n"
    finally:
        streams.open -= 1


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
        "quiet streams open."
    ),
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The event stream."},
        204: {"description": "Resumed after the final event: nothing more will come."},
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
    if streams.open >= streams.limit:
        raise ApiError(503, "too many open event streams; poll GET /jobs/{id} or retry later",
                       headers={"Retry-After": str(services.settings.retry_after_s)})
    caller = caller_of(request)
    job = await run_in_threadpool(fetch_job, services.redis, job_id, caller)
    cursor = Cursor.parse(last_event_id)
    if last_event_id and job_ops.status_of(job) in job_ops.ENDED:
        if not await streams.client.xread({spec.events_key(job_id): cursor.stream_id()}, count=1):
            return Response(status_code=204)
    body = relay(streams, request, job_id, cursor, preview, services.settings, services.redis)
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
