"""POST /edit: upload a face and queue an edit job (the same admission, quotas and answer as POST /generate)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from pydantic import TypeAdapter, ValidationError

from facegen.contract import fields, spec
from service import submission
from service.api.deps import (
    UNAUTHORIZED,
    ApiError,
    IdempotencyKey,
    ServicesDep,
    accepted,
    caller_of,
    require_api_key,
    root_path,
)
from service.api.errors import invalid_fields
from service.schemas import EditCreate, ErrorPublic, JobAccepted, QuotaError, WebhookCreate

EDIT_PATH = "/edit"
_ATTRIBUTES: TypeAdapter[dict[str, bool]] = TypeAdapter(fields.AttributeMap)
_COUNT_ERRORS = {"too_short", "too_long"}

router = APIRouter(tags=["jobs"], dependencies=[Depends(require_api_key)], responses=UNAUTHORIZED)


def _parse_attributes(text: str | None) -> dict[str, bool] | None:
    """The ``attributes`` form field, a JSON object ``{"Smiling": true}``; 422 naming the field otherwise."""
    if text is None:
        return None
    try:
        return _ATTRIBUTES.validate_json(text)
    except ValidationError as exc:
        if {e["type"] for e in exc.errors()} <= _COUNT_ERRORS:
            message = f"must name 1 to {fields.MAX_ATTRIBUTES} attributes"
        else:
            message = 'must be a JSON object of attribute name -> true/false, e.g. {"Smiling": true}'
        raise invalid_fields([(("attributes",), message, text)]) from None


def _parse_webhook(text: str | None) -> WebhookCreate | None:
    """The ``webhook`` form field, JSON as POST /generate's ``webhook``; 422 naming the field otherwise."""
    if text is None:
        return None
    try:
        return WebhookCreate.model_validate_json(text)
    except ValidationError as exc:
        raise invalid_fields([(("webhook", *e["loc"]), e["msg"], text) for e in exc.errors()]) from None


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
        413: {"model": ErrorPublic, "description": "The image is over MAX_UPLOAD_BYTES or MAX_UPLOAD_PIXELS, its "
                                                   "decode would hold more than UPLOAD_DECODE_MAX_MIB, or it is a "
                                                   "decompression bomb."},
        415: {"model": ErrorPublic, "description": "The file is not a PNG, JPEG or WebP image."},
        422: {"description": "A field is invalid (`detail[].loc` or `detail` names it): e.g. the image is empty, "
                             "0 pixels, animated, truncated or corrupt; or steps and strength make the edit cost "
                             "more work units than one request may."},
        429: {"model": QuotaError, "description": "As POST /generate: queue full or the API key's quota reached, "
                                                  "decided before the image is decoded."},
        503: {"description": "Redis is unreachable, or UPLOAD_DECODE_CONCURRENCY uploads were being decoded and "
                             "none ended within UPLOAD_DECODE_WAIT_S; retry after `Retry-After` seconds."},
    },
)
async def create_edit(
    request: Request,
    response: Response,
    services: ServicesDep,
    image: Annotated[UploadFile, File(description="The face: a PNG, JPEG or WebP file.")],
    label: Annotated[fields.Label | None, Form(description='Target, e.g. "smiling" or "not_smiling".')] = None,
    attributes: Annotated[str | None, Form(max_length=4096, description='Target as a JSON object, e.g. '
                                                                        '{"Smiling": true}.')] = None,
    strength: Annotated[fields.Strength, Form(description="How deep into the noise the edit goes: 0 keeps the image "
                                                          "(its VAE round trip), 1 regenerates it from noise.")] = (
        fields.DEFAULT_EDIT_STRENGTH
    ),
    seed: Annotated[fields.Seed | None, Form(description="Echoed back; edits are deterministic.")] = None,
    steps: Annotated[fields.Steps | None, Form(description="DDIM steps of the whole schedule (default "
                                               f"{spec.DEFAULT_STEPS[spec.Sampler.ddim]}); the edit runs `strength` "
                                               "of them twice (inversion, regeneration).")] = None,
    guidance_scale: Annotated[fields.GuidanceScale | None, Form(
        description=f"Guidance from the source's label toward the target; default {spec.DEFAULT_EDIT_GUIDANCE:g}.",
    )] = None,
    animation: Annotated[bool, Form(description="Also render the change as a GIF.")] = False,
    model: Annotated[fields.ModelVersion, Form()] = fields.LATEST,
    sampler: Annotated[spec.Sampler | None, Form(description="Edits invert and regenerate with ddim (the default); "
                                                             "any other sampler is refused.")] = None,
    webhook: Annotated[str | None, Form(max_length=4096, description='As POST /generate\'s `webhook`, as JSON: '
                                                                   '{"url": "https://…", "events": ["completed"]}.')] = None,
    idempotency_key: IdempotencyKey = None,
) -> JobAccepted:
    edit = EditCreate(
        image=await _read_upload(image, services.settings.max_upload_bytes),
        label=label,
        attributes=_parse_attributes(attributes),
        strength=strength,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        animation=animation,
        model=model,
        webhook=_parse_webhook(webhook),
        webhook_json=webhook,
        sampler=sampler,
    )
    submitted = await submission.submit_edit(services, caller_of(request), edit, idempotency_key, root_path(request))
    return accepted(response, submitted)
