"""Models: what the live workers serve (their registry entries in Redis)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from facegen.contract import fields
from service import registry
from service.api.deps import UNAUTHORIZED, UNAVAILABLE, ApiError, ServicesDep, require_api_key
from service.schemas import ErrorPublic, ModelList, ModelPublic

router = APIRouter(prefix="/models", tags=["models"], dependencies=[Depends(require_api_key)],
                   responses={**UNAUTHORIZED, **UNAVAILABLE})


@router.get(
    "",
    response_model=ModelList,
    summary="Models the live workers serve",
    description="Versions with their attributes, accepted labels, resolution, default guidance scale and steps, "
    "device and dtype, as published by live workers (entries vanish shortly after their worker stops). "
    "Empty when no worker is live.",
)
def list_models(services: ServicesDep) -> ModelList:
    models = registry.read_models(services.redis)
    latest = registry.find_model(models, fields.LATEST)
    return ModelList(models=[ModelPublic.from_info(m) for m in models], latest=latest.version if latest else None)


@router.get(
    "/{version}",
    response_model=ModelPublic,
    summary="One model version",
    description='A version as listed by GET /models; "latest" names the newest one served.',
    responses={404: {"model": ErrorPublic, "description": "No live worker serves this version."}},
)
def read_model(version: str, services: ServicesDep) -> ModelPublic:
    model = registry.find_model(registry.read_models(services.redis), version)
    if model is None:
        raise ApiError(404, f"no live worker serves model {version!r}")
    return ModelPublic.from_info(model)
