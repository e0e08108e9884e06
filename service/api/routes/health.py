"""Health: /healthz (the process answers) and /readyz (Redis answers and a worker serves the default model; it
reports each live worker's served version and the artifact store too).

Readiness is probed often (each kubelet every few seconds, load balancers, monitors), and each check costs a Redis
round trip and a request to the artifact store, so a process answers /readyz from a check at most
``READYZ_CACHE_S`` old (:class:`ReadinessCache`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from facegen.contract import fields
from facegen.contract.artifacts import ArtifactStore, ArtifactStoreUnavailable
from service import registry
from service.api.deps import Services, ServicesDep
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


class ReadinessCache:
    """The process's last readiness check, reused for ``max_age_s`` seconds (``READYZ_CACHE_S``; 0: never).

    Thread-safe (``/readyz`` runs in the thread pool): one check at a time, and a call that arrives while one runs
    waits for it and answers with its result, so a burst of probes makes one check."""

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self.clock = clock  # seconds, monotonic
        self._lock = threading.Lock()
        self._last: Readiness | None = None
        self._checked_at = 0.0  # clock() when _last was checked

    def get(self, check: Callable[[], Readiness]) -> Readiness:
        """The last check's result while it is younger than ``max_age_s``, else ``check()``'s."""
        if self.max_age_s == 0:
            return check()
        with self._lock:
            if self._last is None or self.clock() - self._checked_at >= self.max_age_s:
                self._last = check()
                self._checked_at = self.clock()
            return self._last


@router.get("/healthz", response_model=Health, summary="Liveness",
            description="200 while the process serves requests; touches no backend. Never needs an API key.")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness",
    description='200 when Redis answers and at least one live worker has published the default model ("latest"); '
    '503 with the reason otherwise. `workers` lists each live worker and the version it serves for "latest". '
    "`artifact_store` says whether the artifact store answers (only the artifact "
    "routes need it, so it leaves the status alone). The answer comes from a check at most READYZ_CACHE_S "
    "seconds old. Never needs an API key.",
    responses={503: {"model": Readiness, "description": "Not ready; `reason` says why."}},
)
def readyz(request: Request, services: ServicesDep) -> Readiness | JSONResponse:
    readiness = request.app.state.readiness.get(lambda: check_readiness(services))
    if readiness.status != "ready":
        return JSONResponse(readiness.model_dump(mode="json"), status_code=503,
                            headers={"Retry-After": str(services.settings.retry_after_s)})
    return readiness


def check_readiness(services: Services) -> Readiness:
    """Asks Redis (a ping and the model registry) and, once it answers, the artifact store."""
    try:
        services.redis.ping()
        live = registry.read_registry(services.redis)
    except redis.RedisError:
        return Readiness(status="unavailable", redis=False, reason="Redis is unreachable")
    latest = registry.find_model(live.models, fields.LATEST)
    if latest is None:
        return Readiness(status="unavailable", redis=True, workers=live.workers,
                         reason="no live worker has published the default model")
    return Readiness(status="ready", redis=True, latest_model=latest.version, workers=live.workers,
                     artifact_store=artifact_store_answers(services.artifacts))


def artifact_store_answers(store: ArtifactStore) -> bool:
    try:
        store.ping()
    except (ArtifactStoreUnavailable, redis.RedisError):
        return False
    return True
