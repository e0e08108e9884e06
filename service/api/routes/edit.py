"""POST /edit: upload a face and queue an edit job (the same admission, quotas and answer as POST /generate)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from facegen.contract import spec
from service.api.deps import UNAUTHORIZED, UNAVAILABLE, ApiError, ServicesDep, require_api_key
from service.api.routes.jobs import (
    IdempotencyKey,
    _validation_error,
    check_webhook,
    queue_job,
    resolve_attributes,
)
from service.schemas import MAX_RANDOM_SEED, ErrorPublic, JobAccepted, QuotaError, WebhookCreate
from service.uploads import UploadError, prepare_upload

EDIT_PATH = "/edit"
_ATTRIBUTES = TypeAdapter(dict[str, bool])

router = APIRouter(tags=["jobs"], dependencies=[Depends(require_api_key)], responses=UNAUTHORIZED)


def _parse_attributes(text: str | None) -> dict[str, bool] | None:
    """The ``attributes`` form field, a JSON object ``{"Smiling": true}``; 422 naming the field otherwise."""
    if text is None:
        return None
    try:
        value = _ATTRIBUTES.validate_json(text)
    except ValidationError:
        raise _validation_error([(("attributes",), 'must be a JSON object of attribute name -> true/false, e.g. '
                                                  '{"Smiling": true}', text)]) from None
    if not 1 <= len(value) <= 40:
        raise _validation_error([(("attributes",), "must name 1 to 40 attributes", text)])
    return value


def _parse_webhook(text: str | None) -> WebhookCreate | None:
    """The ``webhook`` form field, JSON as POST /generate's ``webhook``; 422 naming the field otherwise."""
    if text is None:
        return None
    try:
        return WebhookCreate.model_validate_json(text)
    except ValidationError as exc:
        raise _validation_error([(("webhook", *e["loc"]), e["msg"], text) for e in exc.errors()]) from None


async def _read_upload(image: UploadFile, max_bytes: int) -> bytes:
    """The uploaded file's bytes; 413 naming the field past ``max_bytes``."""
    data = await image.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, f"image: the file is larger than {max_bytes} bytes (MAX_UPLOAD_BYTES)")
    return data


@router.post(
    EDIT_PATH,
    status_code=202,
    response_model=JobAccepted,
    summary="Queue an edit of an uploaded face",
    description=(
        "Upload a face (`multipart/form-data`) and change one attribute while keeping the person: the worker crops "
        "and resizes it like the training images, encodes it with the VAE, inverts it by DDIM through `strength` "
        "of the noise schedule and regenerates it under the target with classifier-free guidance. Answers like "
        "POST /generate (poll `links.self`); `links.result` is the PNG pair [input | edited], `links.animation` "
        "(with `animation`) a GIF from the input to the edit.\n\n"
        "The image is checked here: PNG, JPEG or WebP, at most MAX_UPLOAD_BYTES and MAX_UPLOAD_PIXELS, one frame. "
        "Transparency is composited on white; CMYK, greyscale, palette and 16-bit images are converted to 8-bit "
        f"RGB; the worker gets it as a PNG at most {spec.EDIT_MAX_SIDE} px a side."
    ),
    responses={
        202: {"description": "Queued.", "headers": {"Location": {"description": "The job's URL."}}},
        413: {"model": ErrorPublic, "description": "The image is over MAX_UPLOAD_BYTES or MAX_UPLOAD_PIXELS, or a "
                                                   "decompression bomb."},
        415: {"model": ErrorPublic, "description": "The file is not a PNG, JPEG or WebP image."},
        422: {"description": "A field is invalid (`detail[].loc` or `detail` names it): e.g. the image is empty, "
                             "0 pixels, animated, truncated or corrupt."},
        429: {"model": QuotaError, "description": "As POST /generate: queue full or the API key's quota reached."},
        **UNAVAILABLE,
    },
)
async def create_edit(
    request: Request,
    response: Response,
    services: ServicesDep,
    image: Annotated[UploadFile, File(description="The face: a PNG, JPEG or WebP file.")],
    label: Annotated[str | None, Form(min_length=1, max_length=64,
                                      description='Target, e.g. "smiling" or "not_smiling".')] = None,
    attributes: Annotated[str | None, Form(max_length=4096, description='Target as a JSON object, e.g. '
                                                                        '{"Smiling": true}.')] = None,
    strength: Annotated[float, Form(ge=0.0, le=1.0, allow_inf_nan=False,
                                    description="How deep into the noise the edit goes: 0 keeps the image (its VAE "
                                                "round trip), 1 regenerates it from noise.")] = spec.DEFAULT_EDIT_STRENGTH,
    seed: Annotated[int | None, Form(ge=0, le=spec.MAX_SEED, description="Echoed back; edits are "
                                                                         "deterministic.")] = None,
    steps: Annotated[int | None, Form(ge=1, le=spec.MAX_STEPS, description="DDIM steps of the whole schedule "
                                      f"(default {spec.DEFAULT_STEPS[spec.Sampler.ddim]}); the edit runs "
                                      "`strength` of them twice (inversion, regeneration).")] = None,
    guidance_scale: Annotated[float | None, Form(ge=0.0, le=spec.MAX_GUIDANCE, allow_inf_nan=False,
                                                 description="Guidance from the source's label toward the target; "
                                                             f"default {spec.DEFAULT_EDIT_GUIDANCE:g}.")] = None,
    animation: Annotated[bool, Form(description="Also render the change as a GIF.")] = False,
    model: Annotated[str, Form(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] = spec.LATEST,
    webhook: Annotated[str | None, Form(max_length=4096, description='As POST /generate\'s `webhook`, as JSON: '
                                                                   '{"url": "https://…", "events": ["completed"]}.')] = None,
    idempotency_key: IdempotencyKey = None,
) -> JobAccepted:
    settings, given_seed = services.settings, seed
    parsed = _parse_attributes(attributes)
    label = label.strip().lower() if label is not None else None
    if (label is None) == (parsed is None):
        raise _validation_error([(("label",), "give exactly one of 'label' and 'attributes'", label)])
    data = await _read_upload(image, settings.max_upload_bytes)
    try:
        png = await run_in_threadpool(prepare_upload, data, settings.max_upload_pixels)
    except UploadError as exc:
        raise ApiError(exc.status, f"image: {exc}") from None
    target = await resolve_attributes(services, model, label, parsed)
    hook = _parse_webhook(webhook)
    await check_webhook(hook, settings)
    seed = seed if seed is not None else secrets.randbelow(MAX_RANDOM_SEED + 1)
    try:
        job_spec = spec.EditSpec(attributes=target, seed=seed, steps=steps, guidance_scale=guidance_scale,
                                 strength=strength, animation=animation, model=model,
                                 image=base64.b64encode(png).decode())
    except ValidationError as exc:
        raise _validation_error([(tuple(e["loc"]), e["msg"], e.get("input")) for e in exc.errors()]) from None
    digest = json.dumps({"image": hashlib.sha256(data).hexdigest(), "label": label, "attributes": parsed,
                         "strength": strength, "seed": given_seed, "steps": steps,
                         "guidance_scale": guidance_scale, "animation": animation, "model": model,
                         "webhook": webhook})
    return await queue_job(request, response, services, job_spec, idempotency_key, digest, hook)
