"""Models: what the live workers serve (their registry entries in Redis) and, with a model store, what it holds
(service/store_catalog.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from facegen.contract import fields
from facegen.contract.model_store import ModelStoreUnavailable
from service import registry
from service.api.deps import UNAUTHORIZED, ApiError, ServicesDep, require_api_key
from service.schemas import (
    ErrorPublic,
    ModelList,
    ModelPublic,
    StoreAliasPublic,
    StorePublic,
    StoreVersionPublic,
)
from service.store_catalog import StoreCatalog

UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"description": "Redis is unreachable, or (`GET /models/{version}` of a version no live worker serves) "
                         "the model store is; retry after `Retry-After` seconds (body: `{detail}`)."}
}

router = APIRouter(prefix="/models", tags=["models"], dependencies=[Depends(require_api_key)],
                   responses={**UNAUTHORIZED, **UNAVAILABLE})


@router.get(
    "",
    response_model=ModelList,
    summary="Models the live workers serve, and the model store's versions and aliases",
    description="Versions with their attributes, accepted labels, resolution, default guidance scale and steps, "
    "device and dtype, as published by live workers (entries vanish shortly after their worker stops; empty when "
    "no worker is live), and each live worker's served version. With a model store (MODEL_STORE), `store` lists "
    "its published versions with their model-card numbers and its aliases, as listed at most "
    "MODEL_STORE_CACHE_S ago; an unreachable store leaves the rest of the answer as it is "
    "(`store.reachable` false).",
)
def list_models(services: ServicesDep) -> ModelList:
    live = registry.read_registry(services.redis)
    latest = registry.find_model(live.models, fields.LATEST)
    catalog = services.model_store
    return ModelList(models=[ModelPublic.from_info(m) for m in live.models], latest=latest.version if latest else None,
                     workers=live.workers, store=None if catalog is None else store_listing(catalog))


def store_listing(catalog: StoreCatalog) -> StorePublic:
    """The catalog's listing, or why there is none."""
    try:
        listing = catalog.listing()
    except ModelStoreUnavailable as exc:
        return StorePublic(location=catalog.location, reachable=False, error=str(exc))
    return StorePublic(location=catalog.location, reachable=True,
                       versions=[StoreVersionPublic.from_record(r) for r in listing.versions.values()],
                       aliases={name: StoreAliasPublic.from_move(m) for name, m in listing.aliases.items()})


@router.get(
    "/{version}",
    response_model=ModelPublic | StoreVersionPublic,
    summary="One model version",
    description='A version as listed by GET /models: one a live worker serves ("latest": the one served by '
    "default), or else, with a model store, one the store holds or the version an alias of the store points at "
    "(its published description).",
    responses={404: {"model": ErrorPublic, "description": "No live worker serves this version, and the model "
                                                          "store (if any) holds no such version or alias."}},
)
def read_model(version: str, services: ServicesDep) -> ModelPublic | StoreVersionPublic:
    model = registry.find_model(registry.read_models(services.redis), version)
    if model is not None:
        return ModelPublic.from_info(model)
    catalog = services.model_store
    if catalog is None or version == fields.LATEST:
        raise ApiError(404, f"no live worker serves model {version!r}")
    record = catalog.find(version)
    if record is None:
        raise ApiError(404, f"no live worker serves model {version!r}, and the model store holds no such version "
                            "or alias")
    return StoreVersionPublic.from_record(record)
