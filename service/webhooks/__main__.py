"""``python -m service.webhooks``: the delivery process (no torch). An RQ worker on ``WEBHOOK_QUEUE`` with RQ's
scheduler (which enqueues the retries when their interval is up); every ``WEBHOOK_SWEEP_INTERVAL_S`` it runs RQ's
maintenance of the queue and :func:`service.webhooks.sender.sweep`. Run as many as the receivers' latency needs:
each sends one delivery at a time, and one API key's deliveries occupy at most ``WEBHOOK_TENANT_CONCURRENCY`` of
them at once. Deliveries are stored as JSON (facegen/contract/job_serializer.py): a job on the queue stored
otherwise, or naming another function than the delivery's, is failed with a one-line reason and never run.
Exits with status 2 (one line) without a valid ``WEBHOOK_SECRET`` or when Redis refuses its credentials or may
evict keys (``REDIS_ALLOW_EVICTION``)."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import uuid
from typing import Any

from prometheus_client import start_http_server
from pydantic import ValidationError
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job

from facegen.contract.connection import (
    OUTAGE_PATIENCE_S,
    RECONNECT_WAIT_MAX_S,
    connect,
    credentials_problem,
    describe,
    eviction_problem,
)
from facegen.contract.job_serializer import JOB_SERIALIZER
from service.config import Settings, get_settings
from service.job_ops import refusal_of
from service.webhooks.delivery import DELIVER_FUNCTION
from service.webhooks.metrics import REGISTRY
from service.webhooks.sender import sweep

log = logging.getLogger("service.webhooks")


class DeliveryWorker(SimpleWorker):
    """RQ's SimpleWorker (no fork per delivery) whose maintenance also sweeps, and whose idle wait on the queue
    is the sweep interval (RQ's default would run maintenance only every 7 minutes when idle)."""

    max_connection_wait_time = RECONNECT_WAIT_MAX_S

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any):
        self.settings = settings
        interval = settings.webhook_sweep_interval_s
        super().__init__(*args, maintenance_interval=interval, worker_ttl=interval + 15, **kwargs)

    @property
    def dequeue_timeout(self) -> int:
        return self.settings.webhook_sweep_interval_s

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        """RQ's, for a delivery: a job stored as JSON that calls ``DELIVER_FUNCTION``. Any other job is failed at
        once, not retried, with a one-line reason (its RQ failure result's ``exc_string``); nothing in it is
        called."""
        reason = refusal_of(job)
        if reason is None and job.func_name != DELIVER_FUNCTION:
            reason = f"not a webhook delivery: its function is not {DELIVER_FUNCTION}: refused"
        if reason is None:
            return super().perform_job(job, queue, execution)
        log.warning("job %s on the webhook queue: %s", job.id, reason)
        job.retries_left = 0
        with self.connection.pipeline() as pipe:
            job.prepare_for_execution(self.name, pipeline=pipe)
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            pipe.execute()
        self.handle_execution_ended(job, queue, self.get_heartbeat_ttl(job))
        self.handle_job_failure(job, queue, started_job_registry=queue.started_job_registry, exc_string=reason,
                                execution=execution)
        return False

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        for queue in self.queues:
            counts = sweep(queue)
            if any(counts.values()):
                log.info("sweep: %(released)d deliveries released, %(deleted)d deleted (their job is gone)", counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.webhooks", description=__doc__)
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = get_settings()
    except ValidationError as exc:
        print(f"webhooks: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    if settings.webhook_secret is None:
        print("webhooks: set WEBHOOK_SECRET (whsec_ followed by base64) to sign deliveries", file=sys.stderr)
        return 2
    interval = settings.webhook_sweep_interval_s
    connection = connect(settings, blocking_s=interval, patience_s=OUTAGE_PATIENCE_S)
    problem = credentials_problem(connection, settings) or eviction_problem(connection, settings)
    if problem is not None:
        print(f"webhooks: {problem}", file=sys.stderr)
        return 2
    if settings.webhook_metrics_port:
        start_http_server(settings.webhook_metrics_port, registry=REGISTRY)
    queue = Queue(settings.webhook_queue, connection=connection, serializer=JOB_SERIALIZER)
    worker = DeliveryWorker([queue], connection=connection, serializer=JOB_SERIALIZER, settings=settings,
                            name=f"webhooks-{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    log.info("delivering webhooks from queue %s at %s", queue.name, describe(settings))
    worker.work(burst=args.burst, with_scheduler=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
