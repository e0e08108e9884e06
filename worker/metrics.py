"""Prometheus metrics of one worker process, served on its own port (``METRICS_PORT``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

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
        self.model = Info("facegen_worker_model", "Model served by this worker", registry=r)
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

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
