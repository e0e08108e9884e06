"""The delivery process's Prometheus metrics (served on ``WEBHOOK_METRICS_PORT`` by ``python -m service.webhooks``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
# Outcome of each delivery attempt: delivered (2xx), retrying (failed, RQ retries it), exhausted (the last attempt
# failed), refused (the URL's port is not allowed or it now resolves to a forbidden address: not retried), skipped
# (the job's ending is not one the webhook subscribed to, the job is gone, or an earlier attempt already delivered
# it), throttled (not sent: its API key had WEBHOOK_TENANT_CONCURRENCY attempts in flight; it runs again shortly).
DELIVERIES = Counter("facegen_webhook_deliveries", "Webhook delivery attempts by outcome.", ["outcome"],
                     registry=REGISTRY)
ATTEMPT_SECONDS = Histogram("facegen_webhook_attempt_duration_seconds", "Duration of delivery attempts (POSTs).",
                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=REGISTRY)
SWEPT = Counter("facegen_webhook_swept", "Deliveries the sweep released (their job ended without releasing them) or "
                "deleted (their job is gone).", ["action"], registry=REGISTRY)
