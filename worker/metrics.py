"""Prometheus metrics of one worker process and its liveness, served on its own port (``METRICS_PORT``):
``GET /metrics`` and ``GET /healthz``."""

from __future__ import annotations

import json
import threading
import time
from http.server import ThreadingHTTPServer
from urllib.parse import urlparse

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import MetricsHandler

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.images = Counter("facegen_worker_images", "Images generated", ["label"], registry=r)
        self.jobs = Counter("facegen_worker_jobs", "Jobs ended, by outcome", ["outcome"], registry=r)
        self.failures = Counter("facegen_worker_failures", "Failed jobs by reason", ["reason"], registry=r)
        self.phase_seconds = Histogram("facegen_worker_phase_seconds",
                                       "Time per job phase (queue_wait, sampling, decoding, encoding)", ["phase"],
                                       buckets=DURATION_BUCKETS, registry=r)
        self.batch_seconds = Histogram("facegen_worker_batch_seconds", "Wall time of one batch (sampling + decoding)",
                                       buckets=DURATION_BUCKETS, registry=r)
        self.batch_images = Histogram("facegen_worker_batch_images", "Images per batch", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.batch_jobs = Histogram("facegen_worker_batch_jobs", "Jobs per batch", buckets=BATCH_BUCKETS, registry=r)
        self.denoiser_steps = Counter("facegen_worker_denoiser_steps", "Batched denoiser evaluations", registry=r)
        self.precision_fallbacks = Counter(
            "facegen_worker_precision_fallbacks",
            "Redos in a wider dtype after NaN/Inf (one per chunk and dtype), by stage (unet: latents, decoder: pixels)",
            ["stage"], registry=r)
        self.compile_seconds = Gauge("facegen_worker_compile_seconds",
                                     "Start-up warm-up seconds per compile bucket (UNet rows)", ["rows"], registry=r)
        self.model = Info("facegen_worker_model", "Model version this worker runs its \"latest\" requests on",
                          registry=r)
        self.model_pulls = Counter("facegen_worker_model_pulls",
                                   "Versions pulled from the model store (with the student beside each), by outcome",
                                   ["outcome"], registry=r)
        self.loaded_model_bytes = Gauge("facegen_worker_loaded_model_bytes",
                                        "Parameter and buffer bytes of each model version held loaded", ["version"],
                                        registry=r)
        self.gpu_memory = Gauge("facegen_worker_gpu_memory_bytes", "CUDA memory allocated (peak since start)",
                                ["kind"], registry=r)
        self.redis_errors = Counter("facegen_worker_redis_errors",
                                    "Errors on Redis connections (each failed attempt, retried or not), by type",
                                    ["error"], registry=r)

    def count_precision_fallbacks(self, by_stage: dict[str, int]) -> None:
        """Add an engine run's ``RunStats.precision_fallbacks``."""
        for stage, count in by_stage.items():
            self.precision_fallbacks.labels(stage).inc(count)

    def count_redis_error(self, error: Exception) -> None:
        self.redis_errors.labels(type(error).__name__).inc()

    def serve(self, port: int, liveness: Liveness | None = None) -> None:
        """Serve ``/metrics`` (and ``/healthz`` from ``liveness``) on ``port`` from a daemon thread."""
        handler = type("WorkerHandler", (HealthHandler,), {"registry": self.registry, "liveness": liveness})
        server = ThreadingHTTPServer(("", port), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()


class Liveness:
    """When the worker's main loop last showed it moves: each dequeue attempt (at most ``MAINTENANCE_INTERVAL``
    apart while idle) and each denoising step tick it. The HTTP server runs on another thread, so answering
    ``/metrics`` proves nothing about the loop; ``/healthz`` answers from the age of the last tick."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.last: float | None = None  # monotonic time of the last tick; None until the loop starts
        self.phase = "starting"  # what start-up is doing until the first tick (loading, warming up)

    def tick(self) -> None:
        self.last = time.monotonic()  # one float store: atomic under the GIL, no lock needed

    def state(self) -> tuple[bool, dict[str, object]]:
        """(healthy, what /healthz reports)."""
        last = self.last
        if last is None:
            return False, {"status": self.phase}
        age = time.monotonic() - last
        healthy = age <= self.timeout_s
        return healthy, {"status": "ok" if healthy else "stalled", "since_last_tick_s": round(age, 1),
                         "liveness_timeout_s": self.timeout_s}


class HealthHandler(MetricsHandler):
    """``/healthz``: 200 while the main loop ticked within ``LIVENESS_TIMEOUT`` seconds, 503 before it started
    (loading, warming up) or once it stalled; any other path: the metrics."""

    liveness: Liveness | None = None

    def do_GET(self) -> None:
        if urlparse(self.path).path != "/healthz":
            super().do_GET()
            return
        healthy, body = self.liveness.state() if self.liveness is not None else (True, {"status": "ok"})
        payload = json.dumps(body).encode()
        self.send_response(200 if healthy else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
