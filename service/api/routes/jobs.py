"""Jobs: POST /generate queues one, /jobs/{id} reads or cancels it, /jobs/{id}/result|animation|images/{i} fetch
its images."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from rq.job import Job, JobStatus

from facegen.contract import cost, fields, spec
from facegen.contract.artifacts import OpenedArtifact
from service import images, job_ops, submission
from service.api.deps import (
    GONE,
    NOT_FOUND,
    UNAUTHORIZED,
    UNAVAILABLE,
    ApiError,
    IdempotencyKey,
    Services,
    ServicesDep,
    accepted,
    caller_of,
    fetch_job,
    require_api_key,
    require_json,
    root_path,
)
from service.schemas import (
    ErrorPublic,
    JobAccepted,
    JobCreate,
    JobLinks,
    JobPublic,
    JobStateError,
    Progress,
    QuotaError,
)
from service.tenancy import Caller
from service.webhooks import delivery as webhook_delivery

# Retry-After on a 409 for images not ready yet: a poll interval, shorter than the overload back-off
# (Settings.retry_after_s) since the job is already being worked on.
NOT_READY_RETRY_S = 1

router = APIRouter(tags=["jobs"], dependencies=[Depends(require_api_key)], responses=UNAUTHORIZED)

ARTIFACT_TTL_NOTE = (
    "Artifacts live as long as the finished job (ARTIFACT_TTL, default 24 h); after that the answer is 410."
)
STATE_NOTE = (
    "409 when the job has no images in its current state: `status` in the body says why. While it is queued or "
    "running (`queued`, `started`, …) the 409 carries `Retry-After`; a `failed`, `canceled` or `stopped` job never "
    "gets images (the body's `error` says why) — resubmit instead."
)


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
        422: {"description": "A field is invalid (`detail[].loc` names it), the request costs more work units "
                             "than one request may (MAX_REQUEST_UNITS; `detail[].loc` names count, steps and the "
                             "GIF's frames), or the Idempotency-Key was reused with another body."},
        429: {"model": QuotaError, "description": "Queue full (`limit` `max_queued`), or the API key is at a limit "
                                                  "of its quota (`queued_jobs`, `queued_units`, "
                                                  "`units_per_minute`); retry after `Retry-After` seconds."},
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
    submitted = await submission.submit_generate(services, caller_of(request), body, idempotency_key,
                                                 root_path(request))
    return accepted(response, submitted)


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
        cost_units=cost.job_units(job_spec) if job_spec else None,
        error=job_ops.error_of(job),
        webhook=webhook_delivery.public_state(conn, job.id),
        links=JobLinks.of(root_path(request), job.id,
                          job_spec.has_animation() if job_spec else job_ops.animation_requested(conn, job.id)),
    )


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
    job = fetch_job(services.redis, job_id, caller_of(request))
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
    job = fetch_job(conn, job_id, caller)
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
    index: Annotated[int, Path(ge=0, le=fields.MAX_COUNT - 1, description="Image index within the job, from 0.")],
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
