"""The delivery process's side of a webhook (imported by ``python -m service.webhooks``, not by the API): the RQ job
that sends one attempt, and the sweep. See :mod:`service.webhooks.delivery` for the life of a delivery."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import redis
from rq import Queue, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from service import job_ops
from service.config import Settings, get_settings, signing_key
from service.schemas import WebhookEvent
from service.webhooks import signing, targets
from service.webhooks.delivery import DELIVERY_SUFFIX, state_key
from service.webhooks.metrics import ATTEMPT_SECONDS, DELIVERIES, SWEPT

EVENT_OF_STATUS = {JobStatus.FINISHED: WebhookEvent.completed, JobStatus.FAILED: WebhookEvent.failed,
                   JobStatus.CANCELED: WebhookEvent.canceled, JobStatus.STOPPED: WebhookEvent.canceled}
MAX_ERROR_CHARS = 300
SWEEP_CHUNK = 500


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
        if job_spec is not None and job_spec.animation:
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


def post(url: str, address: targets.IPAddress, body: bytes, headers: dict[str, str], timeout_s: float
         ) -> httpx.Response:
    """POST ``body`` to ``url`` through the already checked ``address`` (the Host header and the TLS server
    name stay the URL's host); redirects are not followed."""
    target = httpx.URL(url)
    with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
        return client.post(target.copy_with(host=str(address)), content=body,
                           headers={**headers, "Host": target.netloc.decode(), "Content-Type": "application/json",
                                    "User-Agent": "facegen-webhooks"},
                           extensions={"sni_hostname": target.host} if target.scheme == "https" else None)


def _attempt(delivery: Job, job: Job, url: str, body: bytes, settings: Settings) -> None:
    """One signed POST; records it; raises ``DeliveryFailed`` (or ``TargetRefused``, not retried) on failure."""
    connection, ttl = delivery.connection, settings.tombstone_ttl
    try:
        addresses = targets.resolve(url, settings.webhook_allow_private)
    except targets.TargetRefused as exc:
        delivery.retries_left = 0  # the address is forbidden: a retry would be refused too
        _record(connection, job.id, ttl, last_status=None, last_error=f"refused: {exc}"[:MAX_ERROR_CHARS])
        DELIVERIES.labels("refused").inc()
        raise
    headers = signing.headers(signing_key(settings.webhook_secret), delivery.id, int(time.time()), body)
    started = time.perf_counter()
    try:
        response = post(url, addresses[0], body, headers, settings.webhook_timeout_s)
        status, error = response.status_code, None if response.is_success else f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        status, error = None, f"{type(exc).__name__}: {exc}"
    ATTEMPT_SECONDS.observe(time.perf_counter() - started)
    fields: dict[str, Any] = {"last_status": status, "last_error": error and error[:MAX_ERROR_CHARS]}
    if error is None:
        fields["delivered"] = 1
    _record(connection, job.id, ttl, **fields)
    if error is None:
        DELIVERIES.labels("delivered").inc()
        return
    DELIVERIES.labels("retrying" if delivery.retries_left else "exhausted").inc()
    raise DeliveryFailed(f"webhook for job {job.id} to {url}: {error}")


def deliver(job_id: str, url: str, events: list[str]) -> str:
    """RQ entry point (``service.webhooks.sender.deliver``): report how ``job_id`` ended to ``url`` if ``events``
    includes it. Returns what happened; raises to have RQ retry."""
    delivery = get_current_job()
    if delivery is None:
        raise RuntimeError("service.webhooks.sender.deliver runs inside `python -m service.webhooks`")
    connection, settings = delivery.connection, get_settings()
    try:
        job = Job.fetch(job_id, connection=connection)
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
    _attempt(delivery, job, url, payload(job, event), settings)
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
                    Job.fetch(delivery, connection=connection).delete()
                except NoSuchJobError:
                    queue.deferred_job_registry.remove(delivery)
                counts["deleted"] += 1
            elif JobStatus(raw.decode()) in job_ops.ENDED:
                queue.enqueue_dependents(Job.fetch(job_id, connection=connection), exclude_job_id=job_id)
                counts["released"] += 1
    for action, count in counts.items():
        SWEPT.labels(action).inc(count)
    return counts
