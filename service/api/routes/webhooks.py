"""Webhooks: the signing secret of the caller's deliveries (one per API key, derived from WEBHOOK_SECRET)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from service.api.deps import UNAUTHORIZED, UNAVAILABLE, ApiError, ServicesDep, caller_of, require_api_key
from service.schemas import ErrorPublic, WebhookSecret
from service.webhooks import signing

router = APIRouter(prefix="/webhooks", tags=["webhooks"], dependencies=[Depends(require_api_key)],
                   responses={**UNAUTHORIZED, **UNAVAILABLE})


@router.get(
    "/secret",
    response_model=WebhookSecret,
    summary="This API key's webhook signing secret",
    description="The Standard Webhooks secret (whsec_…) that the deliveries of this key's jobs are signed with; "
    "no other key's deliveries verify with it. During a rotation of the server's secret, `previous_secret` is the "
    "one deliveries were signed with before (they carry both signatures until the rotation ends).",
    responses={404: {"model": ErrorPublic, "description": "Webhooks are off on this server (no WEBHOOK_SECRET)."}},
)
async def read_secret(request: Request, response: Response, services: ServicesDep) -> WebhookSecret:
    key_id = caller_of(request).key_id
    keys = signing.tenant_keys(services.settings, key_id)
    if not keys:
        raise ApiError(404, "webhooks are off on this server (it has no WEBHOOK_SECRET)")
    response.headers["Cache-Control"] = "no-store"
    return WebhookSecret(key_id=key_id, secret=signing.as_secret(keys[0]),
                         previous_secret=signing.as_secret(keys[1]) if len(keys) > 1 else None)
