"""Health: /healthz (the process answers) and /readyz (Redis answers and a worker serves the default model; it
reports the artifact store too)."""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from facegen.contract import fields
from facegen.contract.artifacts import ArtifactStore, ArtifactStoreUnavailable
from service import registry
from service.api.deps import ServicesDep
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness",
            description="200 while the process serves requests; touches no backend. Never needs an API key.")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness",
    description='200 when Redis answers and at least one live worker has published the default model ("latest"); '
    "503 with the reason otherwise. `artifact_store` says whether the artifact store answers (only the artifact "
    "routes need it, so it leaves the status alone). Never needs an API key.",
    responses={503: {"model": Readiness, "description": "Not ready; `reason` says why."}},
)
def readyz(services: ServicesDep) -> Readiness | JSONResponse:
    try:
        services.redis.ping()
        latest = registry.find_model(registry.read_models(services.redis), fields.LATEST)
    except redis.RedisError:
        return _unready(Readiness(status="unavailable", redis=False, reason="Redis is unreachable"),
                        services.settings.retry_after_s)
    if latest is None:
        return _unready(Readiness(status="unavailable", redis=True,
                                  reason="no live worker has published the default model"),
                        services.settings.retry_after_s)
    return Readiness(status="ready", redis=True, latest_model=latest.version,
                     artifact_store=artifact_store_answers(services.artifacts))


def artifact_store_answers(store: ArtifactStore) -> bool:
    try:
        store.ping()
    except (ArtifactStoreUnavailable, redis.RedisError):
        return False
    return True


def _unready(body: Readiness, retry_after_s: int) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), status_code=503, headers={"Retry-After": str(retry_after_s)})
