"""Jobs: POST /generate queues one, /jobs/{id} reads or cancels it, /jobs/{id}/result|animation|images/{i} fetch
its images."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, StreamingResponse
from pydantic import ValidationError
from rq.job import Job, JobStatus

from facegen.contract import spec
from facegen.contract.artifacts import OpenedArtifact
from service import admission, images, job_ops, keys, registry
from service.api.deps import (
    UNAUTHORIZED,
    UNAVAILABLE,
    ApiError,
    Services,
    ServicesDep,
    caller_of,
    require_api_key,
    require_json,
)
from service.config import Settings
from service.metrics import Metrics
from service.schemas import (
    MAX_RANDOM_SEED,
    ErrorPublic,
    JobAccepted,
    JobCreate,
    JobLinks,
    JobPublic,
    JobStateError,
    Progress,
    QuotaError,
    WebhookCreate,
)
from service.tenancy import ANONYMOUS, Caller
from service.webhooks import delivery as webhook_delivery
from service.webhooks import targets

# Retry-After on a 409 for images not ready yet: a poll interval, shorter than the overload back-off
# (Settings.retry_after_s) since the job is already being worked on.
NOT_READY_RETRY_S = 1

router = APIRouter(tags=["jobs"], dependencies=[Depends(require_api_key)], responses=UNAUTHORIZED)

NOT_FOUND = {404: {"model": ErrorPublic, "description": "No such job (or another API key's: each key sees only "
                                                       "its own jobs; an admin key sees all)."}}
GONE = {410: {"model": ErrorPublic, "description": "The job (or its images) existed but has expired."}}
ARTIFACT_TTL_NOTE = (
    "Artifacts live as long as the finished job (ARTIFACT_TTL, default 24 h); after that the answer is 410."
)
STATE_NOTE = (
    "409 when the job has no images in its current state: `status` in the body says why. While it is queued or "
    "running (`queued`, `started`, …) the 409 carries `Retry-After`; a `failed`, `canceled` or `stopped` job never "
    "gets images (the body's `error` says why) — resubmit instead."
)


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Any unique string (e.g. a UUID) chosen by the client; remembered for IDEMPOTENCY_TTL.",
    ),
]


def _links(request: Request, job_id: str, animation: bool) -> JobLinks:
    base = request.scope.get("root_path", "").rstrip("/") + f"/jobs/{job_id}"
    return JobLinks(self=base, result=f"{base}/result", animation=f"{base}/animation" if animation else None)


def _validation_error(errors: list[tuple[tuple[str | int, ...], str, Any]]) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": value} for loc, msg, value in errors]
    )


def _build_spec(body: JobCreate, attributes: dict[str, bool], seed: int) -> spec.JobSpec:
    # frames and fps only matter with their GIF; otherwise the spec's defaults stand
    wanted = {"animation_frames": body.animation, "animation_fps": body.animation or body.transition,
              "transition_frames": body.transition}
    extra = {name: getattr(body, name) for name, used in wanted.items() if used and getattr(body, name)}
    try:
        return spec.JobSpec(
            attributes=attributes,
            count=body.count,
            seed=seed,
            steps=body.steps,
            sampler=body.sampler,
            guidance_scale=body.guidance_scale,
            animation=body.animation,
            transition=body.transition,
            first_index=body.first_index,
            model=body.model,
            **extra,
        )
    except ValidationError as exc:  # e.g. an attribute name a worker published that the spec refuses
        raise _validation_error([(tuple(e["loc"]), e["msg"], e.get("input")) for e in exc.errors()]) from None


@router.post(
    "/generate",
    status_code=202,
    response_model=JobAccepted,
    dependencies=[Depends(require_json)],
    summary="Queue a generation job",
    description=(
        "Validates the request against the models live workers serve (see GET /models; before any worker has "
        'published, only the labels "smiling"/"not_smiling" and model "latest" are accepted), queues it and '
        "answers at once with the job id. Poll `links.self`, then fetch `links.result` (PNG grid) and, when "
        "`animation` was asked for, `links.animation` (GIF).\n\n"
        "Send an `Idempotency-Key` header to make retries safe: the same key with the same body returns the same "
        "job (header `Idempotent-Replayed: true`); the same key with another body is refused with 422."
    ),
    responses={
        202: {"description": "Queued.", "headers": {"Location": {"description": "The job's URL."}}},
        413: {"model": ErrorPublic, "description": "Body larger than MAX_BODY_BYTES."},
        415: {"model": ErrorPublic, "description": "Body not sent as `application/json`."},
        422: {"description": "A field is invalid (`detail[].loc` names it) or the Idempotency-Key was reused "
                             "with another body."},
        429: {"model": QuotaError, "description": "Queue full (`limit` `max_queued`), or the API key is at a limit "
                                                  "of its quota (`queued_jobs`, `queued_images`, "
                                                  "`submissions_per_minute`); retry after `Retry-After` seconds."},
        **UNAVAILABLE,
    },
)
async def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    services: ServicesDep,
    idempotency_key: IdempotencyKey = None,
) -> JobAccepted:
    problems = [((name,), message, getattr(body, name)) for name, message in body.field_errors()]
    if problems:
        raise _validation_error(problems)
    attributes = await resolve_attributes(services, body.model, body.label, body.attributes)
    await check_webhook(body.webhook, services.settings)
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_RANDOM_SEED + 1)
    job_spec = _build_spec(body, attributes, seed)
    return await queue_job(request, response, services, job_spec, idempotency_key, body.model_dump_json(),
                           body.webhook)


async def resolve_attributes(services: ServicesDep, model: str, label: str | None,
                             attributes: dict[str, bool] | None) -> dict[str, bool]:
    """The request's condition checked against the live models; 422 naming the field, else the attributes."""
    try:
        return await services.live_models.resolve(model, label, attributes)
    except registry.FieldError as exc:
        raise _validation_error([(exc.loc, exc.message, exc.value)]) from None
    except redis.RedisError:
        services.metrics.jobs_rejected.labels("redis_unavailable").inc()
        raise


async def queue_job(request: Request, response: Response, services: ServicesDep, job_spec: spec.JobSpec,
                    idempotency_key: str | None, request_digest: str, webhook: WebhookCreate | None) -> JobAccepted:
    """Admit and enqueue ``job_spec`` for the caller (queue cap, quota, fair queue, replicas, idempotency keyed by
    ``request_digest``, a text that identifies the request's content; its ``webhook`` delivery queued with it) and
    answer as POST /generate does."""
    settings, metrics, caller = services.settings, services.metrics, caller_of(request)
    key_label = services.key_labels(caller.key_id)
    try:
        idempotency = None
        if idempotency_key is not None:
            idempotency = (keys.idempotency_key(caller.key_id or ANONYMOUS, idempotency_key),
                           admission.fingerprint(request_digest))
        submission = await admission.submit(services.async_redis, services.queue, job_spec, settings, caller,
                                            idempotency, webhook)
    except admission.Refused as exc:
        raise _refusal(exc, settings.retry_after_s, metrics, key_label) from None
    except admission.IdempotencyMismatch as exc:
        metrics.jobs_rejected.labels("idempotency_conflict").inc()
        request.state.rejection_counted = True
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("header", "Idempotency-Key"), "msg": str(exc), "input": idempotency_key}]
        ) from None
    except admission.NotReplicated:
        metrics.jobs_rejected.labels("not_replicated").inc()
        raise
    except redis.RedisError:
        metrics.jobs_rejected.labels("redis_unavailable").inc()
        raise
    if submission.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        metrics.jobs_submitted.labels(job_spec.sampler.value).inc()
        metrics.key_jobs_submitted.labels(key_label).inc()
        metrics.key_images_submitted.labels(key_label).inc(job_spec.count)
    links = _links(request, submission.job_id, job_spec.has_animation())
    response.headers["Location"] = links.self
    return JobAccepted(job_id=submission.job_id, status=submission.status, seed=submission.seed, links=links)


async def check_webhook(webhook: WebhookCreate | None, settings: Settings) -> None:
    """422 naming ``webhook`` when the server has no ``WEBHOOK_SECRET`` (webhooks are off), ``webhook.url`` when
    its host resolves to an address webhooks may not reach (SSRF)."""
    if webhook is None:
        return
    if settings.webhook_secret is None:
        raise _validation_error([(("webhook",), "webhooks are off on this server (it has no WEBHOOK_SECRET)",
                                  webhook.model_dump(mode="json"))])
    try:
        await targets.resolve_async(webhook.url, settings.webhook_allow_private)
    except targets.TargetRefused as exc:
        raise _validation_error([(("webhook", "url"), str(exc), webhook.url)]) from None


def _refusal(exc: admission.Refused, retry_after_s: int, metrics: Metrics, key_label: str) -> ApiError:
    """The 429 for a refused job, counted by reason and by key."""
    reason = "queue_full" if exc.limit == "max_queued" else exc.limit
    metrics.jobs_rejected.labels(reason).inc()
    metrics.key_jobs_rejected.labels(key_label, reason).inc()
    if exc.limit == "max_queued":
        detail = f"queue full (MAX_QUEUED={exc.allowed} jobs waiting); retry later"
    else:
        detail = f"quota reached: {exc.limit} (at most {exc.allowed} for this API key); retry later"
    return ApiError(429, detail, headers={"Retry-After": str(exc.retry_after_s or retry_after_s)},
                    limit=exc.limit, allowed=exc.allowed)


def _public(request: Request, conn: redis.Redis, job: Job) -> JobPublic:
    job_spec = job_ops.job_spec_of(job)
    progress = job_ops.progress_of(job)
    resolved = job.meta.get(spec.META_RESOLVED)
    return JobPublic(
        id=job.id,
        status=job_ops.status_of(job),
        queue_position=job_ops.queue_position(conn, job),
        progress=Progress(**progress) if progress else None,
        cancel_requested=job_ops.cancel_requested(conn, job),
        submitted_at=job_ops.submitted_at_of(job),
        enqueued_at=job.enqueued_at,
        started_at=job_ops.started_at_of(job),
        ended_at=job.ended_at,
        parameters=job_spec.parameters() if isinstance(job_spec, spec.EditSpec) else job_spec,
        resolved=json.loads(json.dumps(resolved, default=str)) if isinstance(resolved, dict) else None,
        error=job_ops.error_of(job),
        webhook=webhook_delivery.public_state(conn, job.id),
        links=_links(request, job.id,
                     job_spec.has_animation() if job_spec else job_ops.animation_requested(conn, job.id)),
    )


def _fetch(conn: redis.Redis, job_id: str, caller: Caller) -> Job:
    try:
        return job_ops.fetch(conn, job_id, caller)
    except job_ops.JobNotFound:
        raise ApiError(404, "job not found") from None
    except job_ops.JobGone:
        raise ApiError(410, "job expired") from None


@router.get(
    "/jobs/{job_id}",
    response_model=JobPublic,
    summary="Job status and progress",
    description="Status (RQ's job statuses), queue position, progress, timestamps, parameters as queued and as "
    "resolved by the worker, and a one-line error when it failed. Finished jobs are kept for ARTIFACT_TTL; "
    "after that this answers 410 (for TOMBSTONE_TTL, then 404).",
    responses={**NOT_FOUND, **GONE, **UNAVAILABLE},
)
def read_job(job_id: str, request: Request, services: ServicesDep) -> JobPublic:
    job = _fetch(services.redis, job_id, caller_of(request))
    if job_ops.first_sighting(services.redis, job, services.settings.tombstone_ttl):
        services.metrics.observe_ended(job)
    return _public(request, services.redis, job)


@router.delete(
    "/jobs/{job_id}",
    response_model=JobPublic,
    summary="Cancel a job",
    description="A queued job is canceled at once (200, status `canceled`). A running job is asked to stop: the "
    "worker checks between denoising steps and ends it as canceled (202, status still `started`, "
    "`cancel_requested` true). A job that has already ended answers 409.",
    responses={
        200: {"description": "Canceled."},
        202: {"description": "Running: cancellation requested."},
        409: {"model": JobStateError, "description": "The job has already ended."},
        **NOT_FOUND, **GONE, **UNAVAILABLE,
    },
)
def cancel_job(job_id: str, request: Request, response: Response, services: ServicesDep) -> JobPublic:
    conn, caller = services.redis, caller_of(request)
    job = _fetch(conn, job_id, caller)
    try:
        new_status = job_ops.cancel(conn, job, services.settings)
    except job_ops.NotReady as exc:
        raise ApiError(409, f"job already {exc.status.value}", status=exc.status.value, error=exc.error) from None
    if new_status != JobStatus.CANCELED:
        response.status_code = 202
    return _public(request, conn, job_ops.fetch(conn, job_id, caller))


@contextmanager
def _artifact_refusals(kind: str) -> Iterator[None]:
    """Turns job_ops' refusals into API errors; ``kind``: ``grid``, ``animation`` or an image kind."""
    noun = {"grid": "images", "animation": "animation"}.get(kind, "image")
    try:
        yield
    except job_ops.NoSuchImage as exc:
        raise ApiError(404, str(exc)) from None
    except job_ops.JobNotFound:
        raise ApiError(404, "no animation: job not found or not asked for one" if kind == "animation"
                       else "job not found") from None
    except job_ops.JobGone:
        raise ApiError(410, f"{noun} expired") from None
    except job_ops.NotReady as exc:
        pending = exc.status not in job_ops.ENDED
        raise ApiError(
            409,
            "not ready yet" if pending else f"job {exc.status.value}: no {noun}",
            headers={"Retry-After": str(NOT_READY_RETRY_S)} if pending else None,
            status=exc.status.value,
            error=exc.error,
        ) from None


def _stored(services: Services, job_id: str, kind: str, caller: Caller, redirect: bool) -> OpenedArtifact | Response:
    """The artifact opened in the store, or with ``redirect`` (``ARTIFACT_REDIRECT``, on a store that signs URLs)
    a 307 to its signed URL; the job's index in Redis decides 404/409/410 first, an unreachable store raises into a
    503."""
    with _artifact_refusals(kind):
        job_ops.check_artifact(services.redis, job_id, kind, caller)
        url = services.artifacts.url(job_id, kind, services.settings.artifact_url_ttl_s) if redirect else None
        if url is not None:
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
        return job_ops.open_artifact(services.artifacts, job_id, kind)


def _file(content: bytes | OpenedArtifact, media_type: str, filename: str) -> Response:
    """A file response: ``bytes`` whole, an opened artifact streamed chunk by chunk as the store sends them."""
    headers = {
        "Cache-Control": "private, max-age=3600, immutable",
        "Content-Disposition": f'inline; filename="{filename}"',
        "X-Content-Type-Options": "nosniff",
    }
    if isinstance(content, bytes):
        return Response(content=content, media_type=media_type, headers=headers)
    headers["Content-Length"] = str(content.size)
    return StreamingResponse(content.chunks, media_type=media_type, headers=headers)


def _artifact(services: Services, job_id: str, kind: str, caller: Caller) -> Response:
    stored = _stored(services, job_id, kind, caller, services.settings.artifact_redirect)
    if isinstance(stored, Response):
        return stored
    extension = "png" if kind == "grid" else "gif"
    return _file(stored, spec.ARTIFACT_MEDIA_TYPES[kind], f"facegen-{job_id}.{extension}")


ARTIFACT_RESPONSES: dict[int | str, dict[str, Any]] = {
    307: {"description": "With ARTIFACT_REDIRECT on an S3 store: `Location` is a presigned URL of the file, valid "
                         "for ARTIFACT_URL_TTL_S."},
    409: {"model": JobStateError, "description": "No images in the job's current state (see description)."},
    **GONE,
    503: {"description": "Redis or the artifact store is unreachable; retry after `Retry-After` seconds."},
}


@router.get(
    "/jobs/{job_id}/result",
    response_class=Response,
    summary="The image grid (PNG)",
    description=f"The finished job's images as one PNG grid. {STATE_NOTE} {ARTIFACT_TTL_NOTE}",
    responses={200: {"content": {"image/png": {}}, "description": "PNG grid."}, **NOT_FOUND, **ARTIFACT_RESPONSES},
)
def read_result(job_id: str, request: Request, services: ServicesDep) -> Response:
    return _artifact(services, job_id, "grid", caller_of(request))


@router.get(
    "/jobs/{job_id}/animation",
    response_class=Response,
    summary="The denoising animation (GIF)",
    description=f"The reverse-diffusion trajectory as a GIF, noise first. 404 when the request did not ask for "
    f"`animation`. {STATE_NOTE} {ARTIFACT_TTL_NOTE}",
    responses={
        200: {"content": {"image/gif": {}}, "description": "GIF."},
        404: {"model": ErrorPublic, "description": "No such job, or it did not ask for an animation."},
        **ARTIFACT_RESPONSES,
    },
)
def read_animation(job_id: str, request: Request, services: ServicesDep) -> Response:
    return _artifact(services, job_id, "animation", caller_of(request))


@router.get(
    "/jobs/{job_id}/images/{index}",
    response_class=Response,
    summary="One image alone (PNG, WebP or JPEG)",
    description="Image `index` (0-based, as laid out row-major in the grid) of the finished job at the model's "
    "resolution. PNG as the worker stored it, with its provenance in the `parameters` text chunk; "
    "`?format=webp` (lossless) or `?format=jpeg` are converted and carry the same JSON in their EXIF UserComment. "
    f"404 also when the job has no image `index`. {STATE_NOTE} {ARTIFACT_TTL_NOTE}",
    responses={
        200: {"content": {media: {} for media in images.MEDIA_TYPES.values()}, "description": "The image."},
        404: {"model": ErrorPublic, "description": "No such job (or another API key's), or no image `index`."},
        **ARTIFACT_RESPONSES,
    },
)
def read_image(
    job_id: str,
    index: Annotated[int, Path(ge=0, le=spec.MAX_COUNT - 1, description="Image index within the job, from 0.")],
    request: Request,
    services: ServicesDep,
    image_format: Annotated[images.ImageFormat, Query(alias="format", description="File format.")] = (
        images.ImageFormat.png
    ),
) -> Response:
    caller, kind = caller_of(request), spec.image_kind(index)
    with _artifact_refusals(kind):
        job_ops.check_image_index(services.redis, job_id, index, caller)
    as_stored = image_format == images.ImageFormat.png
    stored = _stored(services, job_id, kind, caller, services.settings.artifact_redirect and as_stored)
    if isinstance(stored, Response):
        return stored
    extension = "jpg" if image_format == images.ImageFormat.jpeg else image_format.value
    return _file(stored if as_stored else images.convert(stored.read(), image_format), images.MEDIA_TYPES[image_format],
                 f"facegen-{job_id}-{index}.{extension}")
