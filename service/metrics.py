"""Prometheus metrics of one app, in its own CollectorRegistry (tests build many apps in one process).

Request metrics come from ``MetricsMiddleware`` (labelled by route template, never by raw path); queue metrics
are read from Redis at scrape time by ``QueueCollector``. With ``WORKERS > 1`` each uvicorn process keeps its own
counters: scale with replicas (one process each) instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from rq import Queue
from rq.job import Job, JobStatus
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from facegen.contract.fair_queue import waiting_by_key
from facegen.contract.job_serializer import JOB_SERIALIZER
from service import job_ops, registry
from service.tenancy import KeyLabels

log = logging.getLogger(__name__)

UNMATCHED = "<unmatched>"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "facegen_api_requests", "HTTP requests by route template, method and status code.",
            ["route", "method", "status"], registry=r,
        )
        self.request_latency = Histogram(
            "facegen_api_request_duration_seconds", "HTTP request latency by route template.",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.jobs_submitted = Counter(
            "facegen_api_jobs_submitted", "Jobs enqueued by POST /generate, by sampler.", ["sampler"], registry=r,
        )
        self.jobs_rejected = Counter(
            "facegen_api_jobs_rejected",
            "POST /generate requests refused, by reason (queue_full, queued_jobs, queued_units, "
            "units_per_minute, redis_unavailable, model_store_unavailable, decode_busy, not_replicated, invalid, "
            "idempotency_conflict).",
            ["reason"], registry=r,
        )
        # By API key: 12 hex digits of a keyed hash (HMAC) of the key's id, never the key or its id, or a bucket of
        # them, see service/tenancy.py KeyLabels; "anonymous" while the API is open.
        self.key_jobs_submitted = Counter(
            "facegen_api_key_jobs_submitted", "Jobs accepted by POST /generate, by API key id.", ["key"], registry=r,
        )
        self.key_images_submitted = Counter(
            "facegen_api_key_images_submitted", "Images in the jobs accepted, by API key id.", ["key"], registry=r,
        )
        self.key_jobs_rejected = Counter(
            "facegen_api_key_jobs_rejected",
            "POST /generate requests refused for a full queue or a quota, by API key id and reason (queue_full, "
            "queued_jobs, queued_units, units_per_minute).",
            ["key", "reason"], registry=r,
        )
        self.jobs_ended = Counter(
            "facegen_api_jobs_ended",
            "Ended jobs by final status, counted once when an API replica first sees them ended.",
            ["status"], registry=r,
        )
        self.job_latency = Histogram(
            "facegen_api_job_latency_seconds",
            "End-to-end latency of finished jobs, enqueued_at to ended_at (observed when first seen finished).",
            buckets=JOB_LATENCY_BUCKETS, registry=r,
        )

        self.redis_errors = Counter(
            "facegen_api_redis_errors", "Errors on Redis connections (each failed attempt, retried or not), by type.",
            ["error"], registry=r,
        )

    def count_redis_error(self, error: Exception) -> None:
        self.redis_errors.labels(type(error).__name__).inc()

    def observe_ended(self, job: Job) -> None:
        status = job_ops.status_of(job)
        self.jobs_ended.labels(status.value).inc()
        if status == JobStatus.FINISHED and job.enqueued_at and job.ended_at:
            self.job_latency.observe(max(0.0, (job.ended_at - job.enqueued_at).total_seconds()))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class QueueCollector(Collector):
    """Queue depth (also by API key), RQ registry sizes, live models, the webhook deliveries waiting and Redis's
    memory, read from Redis when Prometheus scrapes."""

    def __init__(self, conn: redis.Redis, queue_name: str, webhook_queue: str, key_labels: KeyLabels) -> None:
        self.conn = conn
        self.queue_name = queue_name
        self.webhook_queue = webhook_queue
        self.key_labels = key_labels

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily; nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("facegen_redis_up", "1 when Redis answered this scrape.")
        try:
            queue = Queue(self.queue_name, connection=self.conn, serializer=JOB_SERIALIZER)
            depth = queue.count
            registries = {
                JobStatus.STARTED.value: queue.started_job_registry,
                JobStatus.FINISHED.value: queue.finished_job_registry,
                JobStatus.FAILED.value: queue.failed_job_registry,
                JobStatus.CANCELED.value: queue.canceled_job_registry,
                JobStatus.DEFERRED.value: queue.deferred_job_registry,
                JobStatus.SCHEDULED.value: queue.scheduled_job_registry,
            }
            counts = {name: reg.get_job_count(cleanup=False) for name, reg in registries.items()}
            models = registry.read_models(self.conn)
            by_key = waiting_by_key(self.conn, self.queue_name)
            deliveries = Queue(self.webhook_queue, connection=self.conn, serializer=JOB_SERIALIZER).count
            memory = self.conn.info("memory")
        except redis.RedisError as exc:
            log.warning("metrics scrape: Redis unavailable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        queued = GaugeMetricFamily("facegen_queue_depth", "Jobs waiting in the RQ queue.", labels=["queue"])
        queued.add_metric([self.queue_name], depth + sum(by_key.values()))
        yield queued
        yield self._by_key(by_key)
        held = GaugeMetricFamily(
            "facegen_queue_registry_jobs", "Jobs in each RQ registry (retained for result/failure TTL).",
            labels=["queue", "registry"],
        )
        for name, count in counts.items():
            held.add_metric([self.queue_name, name], count)
        yield held
        live = GaugeMetricFamily(
            "facegen_models_live", "Model versions published by live workers (1 per version).", labels=["version"]
        )
        for model in models:
            live.add_metric([model.version], 1)
        yield live
        backlog = GaugeMetricFamily("facegen_webhook_queue_depth", "Webhook deliveries waiting to be sent.",
                                    labels=["queue"])
        backlog.add_metric([self.webhook_queue], deliveries)
        yield backlog
        yield GaugeMetricFamily("facegen_redis_memory_used_bytes", "Memory Redis uses (INFO memory used_memory).",
                                value=memory.get("used_memory", 0))
        yield GaugeMetricFamily("facegen_redis_memory_max_bytes",
                                "Redis's maxmemory (INFO memory maxmemory; 0: no limit).", value=memory.get("maxmemory", 0))


    def _by_key(self, by_key: dict[str, int]) -> Metric:
        waiting = GaugeMetricFamily(
            "facegen_queue_key_jobs", "Jobs waiting for their API key's turn, by key id (or hashed bucket).",
            labels=["queue", "key"],
        )
        totals: dict[str, int] = {}
        for key_id, count in by_key.items():
            label = self.key_labels(key_id)
            totals[label] = totals.get(label, 0) + count
        for label, count in sorted(totals.items()):
            waiting.add_metric([self.queue_name, label], count)
        return waiting


class MetricsMiddleware:
    """Counts and times every HTTP request under its route template (``/jobs/{job_id}``)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", None) or UNMATCHED
            self.metrics.requests.labels(template, scope["method"], str(status)).inc()
            self.metrics.request_latency.labels(template, scope["method"]).observe(time.perf_counter() - start)

