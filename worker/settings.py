"""Worker settings from the environment (pydantic-settings); every default defined here once."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from facegen.contract.artifacts import ArtifactSettings
from facegen.contract.connection import RedisSettings
from facegen.contract.model_store import ModelStoreSettings
from facegen.contract.spec import DEFAULT_QUEUE, LATEST
from facegen.model.checkpoints import BUNDLED_CHECKPOINTS
from facegen.model.config import PRECISIONS


class WorkerSettings(RedisSettings, ArtifactSettings, ModelStoreSettings):
    """The worker's settings; the ``REDIS_*`` connection settings come from :class:`RedisSettings`, the artifact
    store's (``ARTIFACT_*``, ``S3_*``) from :class:`ArtifactSettings` (the API shares both), the model store's
    (``MODEL_STORE``, ``MODEL_STORE_TIMEOUT_S``) from :class:`ModelStoreSettings`."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # where model versions are loaded from; with MODEL_STORE, where they are pulled into (a writable cache)
    checkpoint_dir: Path = BUNDLED_CHECKPOINTS
    # the diffusion version "latest" requests run on: a version, "latest" (the newest plain version of
    # CHECKPOINT_DIR, or of MODEL_STORE), or an alias of MODEL_STORE, followed as it moves
    model_version: str = LATEST
    # least seconds between two looks (one GET) at where an alias MODEL_VERSION points, each before a batch starts;
    # a move is served from the next batch of "latest" jobs on
    model_alias_poll_s: float = Field(10, gt=0, le=3600)
    # MiB of parameters and buffers the versions loaded beside the served one may hold (for jobs naming them);
    # past it the least recently used are unloaded
    loaded_models_max_mib: int = Field(4096, ge=0)
    device: str = Field("auto", pattern="^(auto|cuda|cpu)$")
    precision: str = Field("auto", pattern=f"^({'|'.join(PRECISIONS)})$")
    # torch.compile mode for the UNet: off, default, reduce-overhead (CUDA graphs) or max-autotune
    compile: str = Field("off", pattern="^(off|default|reduce-overhead|max-autotune)$")
    max_batch: int = Field(32, ge=1, le=1024)  # images per denoising batch (guidance doubles the rows)
    # after taking a job with fewer than MAX_BATCH others waiting, wait this long for more to join its batch
    # (dynamic batching's queue delay: trades a lone job's latency for a burst's throughput)
    batch_window_ms: int = Field(0, ge=0, le=10_000)
    queues: str = DEFAULT_QUEUE  # comma-separated
    metrics_port: int = Field(9100, ge=0, le=65535)  # 0 = no metrics server
    heartbeat_ttl: int = Field(90, ge=10)  # a job whose worker stops heartbeating is retried after this
    # seconds between RQ maintenance passes (retrying jobs of dead workers, expiring registries)
    maintenance_interval: int = Field(30, ge=1)
    # /healthz fails once the main loop has not ticked (a dequeue attempt, a denoising step) for this long; keep
    # it above MAINTENANCE_INTERVAL (an idle worker's dequeue blocks that long) and one denoising step
    liveness_timeout: int = Field(120, ge=1)
    progress_interval: float = Field(0.1, gt=0)  # seconds between progress writes (~10/s at most)
    # seconds between previews of a batch's x0 prediction for the event stream, made only while a client asks for
    # them (each costs a VAE decode of one image per job)
    preview_interval: float = Field(1.0, gt=0)
    threads: int | None = Field(None, ge=1)  # torch CPU threads

    def queue_names(self) -> list[str]:
        return [name.strip() for name in self.queues.split(",") if name.strip()]


@lru_cache
def get_settings() -> WorkerSettings:
    return WorkerSettings()
