"""The delivery process's side of a webhook (imported by ``python -m service.webhooks``, not by the API): the RQ job
that sends one attempt, and the sweep. See :mod:`service.webhooks.delivery` for the life of a delivery.

An attempt is bounded: its exchange with the receiver ends within ``WEBHOOK_TIMEOUT_S`` in all (connect, send, the
answer's status and headers), at most ``MAX_RESPONSE_BYTES`` of the answer's body is read, and one tenant (API key)
has at most ``WEBHOOK_TENANT_CONCURRENCY`` attempts in flight across all delivery processes (a slot in
``facegen:webhook-slots:<key id>``, which expires should its holder die); an attempt over the limit is not made
but scheduled again ``THROTTLED_RETRY_S`` later, without using up a retry, so slow receivers hold only their own
tenant's deliveries back. What an attempt records for the client (``last_error``) is generic: ``HTTP <status>`` or
``TRANSPORT_ERROR``, never what the connection met (which would reveal whether a port is open, or what a host
answered); the delivery process's log has the detail."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import redis
from rq import Queue, Retry, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from facegen.contract import spec
from facegen.contract.job_serializer import JOB_SERIALIZER
from service import job_ops
from service.config import Settings, get_settings
from service.event_leases import LEASE_SCRIPT
from service.schemas import WebhookEvent
from service.tenancy import ANONYMOUS
from service.webhooks import signing, targets
from service.webhooks.delivery import DELIVERY_SUFFIX, state_key
from service.webhooks.metrics import ATTEMPT_SECONDS, DELIVERIES, SWEPT

EVENT_OF_STATUS = {JobStatus.FINISHED: WebhookEvent.completed, JobStatus.FAILED: WebhookEvent.failed,
                   JobStatus.CANCELED: WebhookEvent.canceled, JobStatus.STOPPED: WebhookEvent.canceled}
MAX_ERROR_CHARS = 300
SWEEP_CHUNK = 500
MAX_RESPONSE_BYTES = 64 * 1024  # of a receiver's answer's body, read then dropped
# The last_error of an attempt that got no answer (refused, reset, timed out, TLS failed, ...): one line for all.
TRANSPORT_ERROR = "delivery failed: connection error or timeout"
# A throttled delivery (its tenant's slots all taken) runs again this many seconds later, up to this many times.
THROTTLED_RETRY_S = 2
THROTTLED_RETRIES = 100_000
# A slot outlives its attempt's deadline by this much before it expires (its holder died).
SLOT_MARGIN_S = 30
# The tenant's slots are leases (service/event_leases.py's script): holder -> expiry, Redis TIME seconds.
SLOT_SCRIPT = LEASE_SCRIPT

log = logging.getLogger("service.webhooks")


class DeliveryFailed(Exception):
    """The receiver did not answer 2xx (or could not be reached); RQ retries the delivery."""


def payload(job: Job, event: WebhookEvent) -> bytes:
    """The event's JSON body: ``{"type": "job.<event>", "timestamp", "data": {"job_id", "status", "links"}}``, the
    same bytes on every attempt (``timestamp`` is when the job ended)."""
    status = job_ops.status_of(job)
    job_spec = job_ops.job_spec_of(job)
    links = {"self": f"/jobs/{job.id}"}
    if status == JobStatus.FINISHED:
        links["result"] = f"/jobs/{job.id}/result"
        if job_spec is not None and job_spec.has_animation():  # the denoising trajectory or the transition
            links["animation"] = f"/jobs/{job.id}/animation"
    data: dict[str, Any] = {"job_id": job.id, "status": status.value, "links": links}
    error = job_ops.error_of(job)
    if error is not None:
        data["error"] = error
    ended = job.ended_at.replace(tzinfo=UTC) if job.ended_at else None
    body = {"type": f"job.{event.value}", "timestamp": (ended or datetime.now(UTC)).isoformat(), "data": data}
    return json.dumps(body, separators=(",", ":")).encode()


def _record(connection: redis.Redis, job_id: str, ttl: int, **fields: Any) -> None:
    with connection.pipeline() as pipe:
        pipe.hincrby(state_key(job_id), "attempts", 1)
        pipe.hset(state_key(job_id), mapping={k: "" if v is None else v for k, v in fields.items()})
        pipe.expire(state_key(job_id), ttl)
        pipe.execute()


def slots_key(tenant: str) -> str:
    """Sorted set of the tenant's delivery attempts in flight: delivery id -> when its slot expires."""
    return f"{spec.KEY_PREFIX}:webhook-slots:{tenant}"


def acquire_slot(connection: redis.Redis, tenant: str, holder: str, settings: Settings) -> bool:
    """Take one of ``tenant``'s ``WEBHOOK_TENANT_CONCURRENCY`` slots for ``holder`` (a delivery id; one it already
    holds is renewed); ``False`` when all are taken."""
    ttl = settings.webhook_timeout_s + SLOT_MARGIN_S
    script = connection.register_script(SLOT_SCRIPT)
    return script(keys=[slots_key(tenant)], args=[holder, settings.webhook_tenant_concurrency, ttl]) == 1


def release_slot(connection: redis.Redis, tenant: str, holder: str) -> None:
    connection.zrem(slots_key(tenant), holder)


@dataclass(frozen=True)
class Answer:
    """What a receiver answered: its status, and at most ``MAX_RESPONSE_BYTES`` of its body."""

    status_code: int
    body: bytes = b""

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300


def post(url: str, address: targets.IPAddress, body: bytes, headers: dict[str, str], timeout_s: float) -> Answer:
    """POST ``body`` to ``url`` through the already checked ``address`` (the Host header and the TLS server
    name stay the URL's host); redirects are not followed. The exchange has one deadline, ``timeout_s`` in all:
    connecting, sending and the answer's status line and headers must be done by then, else ``TimeoutError``
    (per-read timeouts would let a receiver that drips its answer stretch the attempt forever); the body is read
    in what is left of it, at most ``MAX_RESPONSE_BYTES``. Raises ``httpx.HTTPError`` or ``OSError`` when the
    exchange fails."""
    return asyncio.run(_post(url, address, body, headers, timeout_s))


async def _post(url: str, address: targets.IPAddress, body: bytes, headers: dict[str, str], timeout_s: float
                ) -> Answer:
    target = httpx.URL(url)
    request_headers = {**headers, "Host": target.netloc.decode(), "Content-Type": "application/json",
                       "User-Agent": "facegen-webhooks"}
    status: int | None = None
    received = bytearray()
    try:
        async with asyncio.timeout(timeout_s), httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
            async with client.stream("POST", target.copy_with(host=str(address)), content=body, headers=request_headers,
                                     extensions={"sni_hostname": target.host} if target.scheme == "https" else None
                                     ) as response:
                status = response.status_code
                async for chunk in response.aiter_raw():
                    received += chunk[:MAX_RESPONSE_BYTES - len(received)]
                    if len(received) >= MAX_RESPONSE_BYTES:
                        break
    except TimeoutError:
        if status is None:  # the deadline came before the answer's status and headers
            raise
    return Answer(status, bytes(received))


def _checked_address(delivery: Job, job_id: str, url: str, settings: Settings) -> targets.IPAddress:
    """The address to send ``url``'s attempt to, checked again (its port, what its host resolves to now); a refusal
    is recorded and not retried (``TargetRefused``)."""
    try:
        return targets.resolve(url, settings.webhook_allow_private, settings.webhook_allowed_ports)[0]
    except targets.TargetRefused as exc:
        delivery.retries_left = 0  # the address is forbidden: a retry would be refused too
        _record(delivery.connection, job_id, settings.tombstone_ttl, last_status=None,
                last_error=f"refused: {exc}"[:MAX_ERROR_CHARS])
        DELIVERIES.labels("refused").inc()
        raise


def _send(delivery_id: str, url: str, address: targets.IPAddress, body: bytes, headers: dict[str, str],
          timeout_s: float) -> tuple[int | None, str | None]:
    """One POST: ``(status, None)`` on 2xx, else ``(status or None, the generic error the client sees)``."""
    started = time.perf_counter()
    try:
        answer = post(url, address, body, headers, timeout_s)
    except (httpx.HTTPError, OSError) as exc:  # TimeoutError is an OSError
        log.info("webhook %s to %s: %s: %s", delivery_id, address, type(exc).__name__, exc)
        return None, TRANSPORT_ERROR
    finally:
        ATTEMPT_SECONDS.observe(time.perf_counter() - started)
    return answer.status_code, None if answer.is_success else f"HTTP {answer.status_code}"


def _attempt(delivery: Job, job: Job, url: str, body: bytes, settings: Settings, tenant: str) -> bool:
    """One signed POST; records it; raises ``DeliveryFailed`` (or ``TargetRefused``, not retried) on failure.
    ``False`` (nothing sent nor recorded) when ``tenant`` already has all its attempts in flight."""
    connection = delivery.connection
    address = _checked_address(delivery, job.id, url, settings)
    if not acquire_slot(connection, tenant, delivery.id, settings):
        return False
    try:
        headers = signing.headers(signing.tenant_keys(settings, tenant), delivery.id, int(time.time()), body)
        status, error = _send(delivery.id, url, address, body, headers, settings.webhook_timeout_s)
    finally:
        release_slot(connection, tenant, delivery.id)
    fields: dict[str, Any] = {"last_status": status, "last_error": error and error[:MAX_ERROR_CHARS]}
    if error is None:
        fields["delivered"] = 1
    _record(connection, job.id, settings.tombstone_ttl, **fields)
    if error is None:
        DELIVERIES.labels("delivered").inc()
        return True
    DELIVERIES.labels("retrying" if delivery.retries_left else "exhausted").inc()
    raise DeliveryFailed(f"webhook for job {job.id}: {error}")


def deliver(job_id: str, url: str, events: list[str]) -> str | Retry:
    """RQ entry point (``service.webhooks.sender.deliver``): report how ``job_id`` ended to ``url`` if ``events``
    includes it, signed with the secrets of the job's owner (its API key id). Returns what happened, or a
    ``Retry`` (RQ schedules it again, without using up a retry) when the owner's attempts in flight are at their
    limit; raises to have RQ retry."""
    delivery = get_current_job()
    if delivery is None:
        raise RuntimeError("service.webhooks.sender.deliver runs inside `python -m service.webhooks`")
    connection, settings = delivery.connection, get_settings()
    try:
        job = Job.fetch(job_id, connection=connection, serializer=JOB_SERIALIZER)
    except NoSuchJobError:
        DELIVERIES.labels("skipped").inc()
        return "skipped: the job no longer exists"
    event = EVENT_OF_STATUS.get(job_ops.status_of(job))
    if event is None or event.value not in events:
        DELIVERIES.labels("skipped").inc()
        return f"skipped: the job is {job_ops.status_of(job).value}, not one of {', '.join(events)}"
    if connection.hget(state_key(job_id), "delivered") == b"1":  # an earlier run sent it but died before RQ knew
        DELIVERIES.labels("skipped").inc()
        return "skipped: already delivered"
    tenant = job_ops.owner_of(connection, job) or ANONYMOUS
    if not _attempt(delivery, job, url, payload(job, event), settings, tenant):
        DELIVERIES.labels("throttled").inc()
        return Retry(max=THROTTLED_RETRIES, interval=THROTTLED_RETRY_S)
    return f"delivered job.{event.value}"


def sweep(queue: Queue) -> dict[str, int]:
    """Release the deferred deliveries whose job has ended (RQ writes a failure or a cancel before it releases
    dependents, and a process may die in between), delete those whose job is gone. Returns the counts."""
    connection = queue.connection
    ids = queue.deferred_job_registry.get_job_ids(cleanup=False)
    counts = {"released": 0, "deleted": 0}
    for start in range(0, len(ids), SWEEP_CHUNK):
        chunk = [i for i in ids[start:start + SWEEP_CHUNK] if i.endswith(DELIVERY_SUFFIX)]
        with connection.pipeline(transaction=False) as pipe:
            for delivery in chunk:
                pipe.hget(Job.key_for(delivery.removesuffix(DELIVERY_SUFFIX)), "status")
            statuses = pipe.execute()
        for delivery, raw in zip(chunk, statuses, strict=True):
            job_id = delivery.removesuffix(DELIVERY_SUFFIX)
            if raw is None:
                try:
                    Job.fetch(delivery, connection=connection, serializer=JOB_SERIALIZER).delete()
                except NoSuchJobError:
                    queue.deferred_job_registry.remove(delivery)
                counts["deleted"] += 1
            elif JobStatus(raw.decode()) in job_ops.ENDED:
                queue.enqueue_dependents(Job.fetch(job_id, connection=connection, serializer=JOB_SERIALIZER),
                                         exclude_job_id=job_id)
                counts["released"] += 1
    for action, count in counts.items():
        SWEPT.labels(action).inc(count)
    return counts
