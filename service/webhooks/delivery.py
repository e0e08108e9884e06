"""Webhook deliveries as RQ jobs.

At admission, a job with a webhook gets a *delivery*: an RQ job on ``WEBHOOK_QUEUE`` (id ``<job id>-webhook``)
that depends on it with ``allow_failure``, written in the same transaction as the job, deferred until the job
ends. RQ releases it when the job ends: on success in the very transaction that marks the job finished (through
its ready registry, which RQ's maintenance drains should the process die before enqueueing it); on failure, on
abandonment and on cancel (``job.cancel(enqueue_dependents=True)``, by the API or the worker) right after the
status is written. The delivery process's sweep (:func:`service.webhooks.sender.sweep`) covers the gap left by
those last cases: a deferred delivery whose job has ended is released, one whose job no longer exists is
deleted.

The delivery job (:func:`service.webhooks.sender.deliver`, run by the delivery process; this module is what the
API needs) posts the signed event and raises on any failure, so RQ's ``Retry`` (``WEBHOOK_RETRY_INTERVALS``)
schedules the next attempt. Its RQ id is the ``webhook-id`` of every attempt; its arguments (job id, URL, event
names) are stored as JSON like every job's (facegen/contract/job_serializer.py). Attempts are recorded in
``facegen:webhook:<job id>`` (read by ``GET /jobs/{id}``).
"""

from __future__ import annotations

import redis
from rq import Queue, Retry
from rq.job import Dependency, JobStatus

from facegen.contract import spec
from facegen.contract.job_serializer import JOB_SERIALIZER
from service.config import Settings
from service.schemas import WebhookCreate, WebhookState

DELIVER_FUNCTION = "service.webhooks.sender.deliver"  # enqueued by dotted name, like the generation job
DELIVERY_SUFFIX = "-webhook"


def delivery_id(job_id: str) -> str:
    """The delivery job's RQ id, also the ``webhook-id`` header of each of its attempts."""
    return job_id + DELIVERY_SUFFIX


def state_key(job_id: str) -> str:
    """Hash of the job's delivery state: attempts, delivered (0/1), last_status, last_error."""
    return f"{spec.KEY_PREFIX}:webhook:{job_id}"


def defer(pipe: redis.client.Pipeline, connection: redis.Redis, job_id: str, webhook: WebhookCreate,
          settings: Settings) -> None:
    """Add the writes of ``job_id``'s deferred delivery to ``pipe`` (the job's admission transaction): RQ keeps it
    in the webhook queue's deferred registry until the job ends, then enqueues it."""
    queue = Queue(settings.webhook_queue, connection=connection, serializer=JOB_SERIALIZER)
    intervals = list(settings.webhook_retry_intervals)
    delivery = queue.create_job(
        DELIVER_FUNCTION,
        args=(job_id, webhook.url, [event.value for event in webhook.events]),
        job_id=delivery_id(job_id),
        depends_on=Dependency(jobs=[job_id], allow_failure=True),
        status=JobStatus.DEFERRED,
        retry=Retry(max=len(intervals), interval=intervals) if intervals else None,
        timeout=int(settings.webhook_timeout_s) + 30,  # RQ's bound; the attempt's own timeout is shorter
        result_ttl=settings.artifact_ttl,
        failure_ttl=settings.failure_ttl,
        description=f"webhook of job {job_id}",
    )
    delivery.register_dependency(pipeline=pipe)
    delivery.save(pipeline=pipe)
    pipe.hset(state_key(job_id), mapping={"attempts": 0, "delivered": 0})
    pipe.expire(state_key(job_id), settings.tombstone_ttl)


def public_state(connection: redis.Redis, job_id: str) -> WebhookState | None:
    """The delivery state of ``job_id``'s webhook; ``None`` when the job has none."""
    raw = {k.decode(): v.decode() for k, v in connection.hgetall(state_key(job_id)).items()}
    if not raw:
        return None
    return WebhookState(attempts=int(raw.get("attempts", 0)), delivered=raw.get("delivered") == "1",
                        last_status=int(raw["last_status"]) if raw.get("last_status") else None,
                        last_error=raw.get("last_error") or None)
