"""Submitting a job, the use case behind POST /generate and POST /edit: validate the request (its fields together,
an edit's image, its model and condition against the live models or the model store, its webhook), build the job
spec, then admit and enqueue it in one Redis transaction (queue cap, the caller's quota and rate in work units,
replicas, idempotency: service/admission.py) and answer with the public job. A job whose cost
(facegen/contract/cost.py) is over what one request may cost is refused first; an edit's admission is decided
before its upload is decoded, so an edit refused by the queue cap, a quota or the rate never costs a decode. The
routes only parse HTTP input and turn what this raises into answers (service/api/errors.py):

- :class:`InvalidRequest`: a field refused (422 naming it), or the fields that make the request cost too much;
- ``service.uploads.UploadError``: an edit's image refused (413/415/422 naming ``image``), or no decode slot
  free in time (503), counted in the rejection metrics here;
- ``admission.Refused`` (429), ``admission.IdempotencyMismatch`` (422 naming the Idempotency-Key header),
  ``redis.RedisError`` (503), each counted in the rejection metrics here;
- ``ModelStoreUnavailable`` (503): the request names a model no live worker serves, and the model store, which
  may hold it, did not answer (counted here too).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from pydantic import ValidationError

from facegen.contract import cost, fields, spec
from facegen.contract.model_store import ModelStoreUnavailable
from service import admission, keys, registry, uploads
from service.config import Settings
from service.schemas import EditCreate, JobAccepted, JobCreate, JobLinks, WebhookCreate
from service.tenancy import ANONYMOUS, Caller, quota_for
from service.webhooks import targets

if TYPE_CHECKING:  # the routes' container of clients and settings; the use case needs no HTTP layer at run time
    from service.api.deps import Services

Problem = tuple[tuple[str | int, ...], str, Any]  # (loc within the request, message, the input refused)


class InvalidRequest(Exception):
    """Request fields the submission refuses, each a :data:`Problem`."""

    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {message}" for loc, message, _ in problems))
        self.problems = problems


@dataclass(frozen=True)
class Submitted:
    """A queued job as the caller sees it."""

    job: JobAccepted
    replayed: bool  # an earlier request with the same Idempotency-Key created the job


@dataclass(frozen=True)
class _Order:
    """What a submission of either kind holds once its own checks passed: the condition to resolve, the seed asked
    for (``None``: draw one), the spec's other fields, the webhook, the request's fingerprint, and an edit's
    upload as sent (decoded only once the job is admitted)."""

    kind: type[spec.JobSpec]
    model: str
    label: str | None
    attributes: dict[str, bool] | None
    seed: int | None
    spec_fields: dict[str, Any]
    webhook: WebhookCreate | None
    fingerprint: str
    upload: bytes | None = None


async def submit_generate(services: Services, caller: Caller, body: JobCreate, idempotency_key: str | None,
                          root_path: str) -> Submitted:
    """Queue POST /generate's ``body`` for ``caller``; links under ``root_path``."""
    _check_fields(body)
    # frames and fps only matter with their GIF; otherwise the spec's defaults stand
    wanted = {"animation_frames": body.animation, "animation_fps": body.animation or body.transition,
              "transition_frames": body.transition}
    extra = {name: getattr(body, name) for name, used in wanted.items() if used and getattr(body, name)}
    spec_fields = {"count": body.count, "steps": body.steps, "sampler": body.sampler,
                   "guidance_scale": body.guidance_scale, "animation": body.animation, "transition": body.transition,
                   "first_index": body.first_index, **extra}
    order = _Order(spec.JobSpec, body.model, body.label, body.attributes, body.seed, spec_fields, body.webhook,
                   body.fingerprint())
    return await _submit(services, caller, order, idempotency_key, root_path)


async def submit_edit(services: Services, caller: Caller, edit: EditCreate, idempotency_key: str | None,
                      root_path: str) -> Submitted:
    """Queue POST /edit's ``edit`` for ``caller``: once admitted, its image checked and bounded for the worker
    (raises ``UploadError``); links under ``root_path``."""
    _check_fields(edit)
    spec_fields = {"steps": edit.steps, "guidance_scale": edit.guidance_scale, "strength": edit.strength,
                   "animation": edit.animation}
    order = _Order(spec.EditParameters, edit.model, edit.label, edit.attributes, edit.seed, spec_fields,
                   edit.webhook, edit.fingerprint(), upload=edit.image)
    return await _submit(services, caller, order, idempotency_key, root_path)


def _check_fields(request: JobCreate | EditCreate) -> None:
    problems = [((name,), message, getattr(request, name)) for name, message in request.field_errors()]
    if problems:
        raise InvalidRequest(problems)


async def _submit(services: Services, caller: Caller, order: _Order, idempotency_key: str | None,
                  root_path: str) -> Submitted:
    with _counted_refusals(services, caller):
        resolved = await _resolve(services, order)
    await _check_webhook(order.webhook, services)
    seed = order.seed if order.seed is not None else fields.draw_seed()
    job_spec = _spec(order.kind, attributes=resolved.attributes, seed=seed, model=resolved.model,
                     **order.spec_fields)
    units = cost.job_units(job_spec)
    _check_cost(job_spec, units, services.settings, caller)
    idempotency = None
    if idempotency_key is not None:
        idempotency = (keys.idempotency_key(caller.key_id or ANONYMOUS, idempotency_key),
                       admission.fingerprint(order.fingerprint))
    if order.upload is None:
        submission = await _admit(services, caller, job_spec, idempotency, order.webhook)
    else:
        submission = await _admit_edit(services, caller, job_spec, units, order, idempotency)
    links = JobLinks.of(root_path, submission.job_id, job_spec.has_animation())
    job = JobAccepted(job_id=submission.job_id, status=submission.status, seed=submission.seed, links=links)
    return Submitted(job=job, replayed=submission.replayed)


def _spec(spec_class: type[spec.JobSpec], /, **values: Any) -> spec.JobSpec:
    try:
        return spec_class(**values)
    except ValidationError as exc:  # e.g. an attribute name a worker published that the spec refuses
        raise InvalidRequest([(tuple(e["loc"]), e["msg"], e.get("input")) for e in exc.errors()]) from None


def _check_cost(job_spec: spec.JobSpec, units: int, settings: Settings, caller: Caller) -> None:
    """Refuses a job of ``units`` work units over what one request may cost: ``MAX_REQUEST_UNITS``, or less where
    the caller's queued-units quota or rate could never admit it; the refusal names the fields that set the cost."""
    cap, source = settings.max_request_units, "MAX_REQUEST_UNITS"
    quota = quota_for(settings, caller)
    if quota is not None:
        for limit in ("queued_units", "units_per_minute"):
            allowed = getattr(quota, limit)
            if allowed is not None and allowed < cap:
                cap, source = allowed, f"this API key's {limit}"
    if units > cap:
        names = cost.cost_fields(job_spec)
        message = (f"this request costs {units} work units, over the {cap} one request may cost ({source}; a "
                   f"default POST /generate costs {cost.DEFAULT_REQUEST_UNITS}); lower {' or '.join(names)}")
        raise InvalidRequest([((name,), message, getattr(job_spec, name)) for name in names])


async def _admit_edit(services: Services, caller: Caller, parameters: spec.JobSpec, units: int, order: _Order,
                      idempotency: tuple[str, str] | None) -> admission.Submission:
    """An edit: a replay of its Idempotency-Key answers at once; otherwise admission decides (and charges the
    caller's rate) before the upload is decoded and bounded (raises ``UploadError``), then the job is queued."""
    with _counted_refusals(services, caller):
        if idempotency is not None:
            earlier = await admission.replayed(services.async_redis, services.queue, idempotency)
            if earlier is not None:
                return earlier
        await admission.decide(services.async_redis, services.queue, units, services.settings, caller)
        png = await uploads.decode_upload(order.upload, services.settings)
    job_spec = _spec(spec.EditSpec, **parameters.model_dump(), image=base64.b64encode(png).decode())
    return await _admit(services, caller, job_spec, idempotency, order.webhook, rate_charged=True)


async def _resolve(services: Services, order: _Order) -> registry.Resolved:
    """The order's model and condition checked against the live models, or the model store for a name no live
    worker serves (an alias of the store resolved to its version, which the job is pinned to); with the student
    sampler, that the model serves a student that takes the order's steps and guidance."""
    try:
        resolved = await services.live_models.resolve(order.model, order.label, order.attributes)
        if order.spec_fields.get("sampler") == spec.Sampler.student:
            await services.live_models.check_student(resolved.model, order.spec_fields["steps"],
                                                     order.spec_fields["guidance_scale"])
        return resolved
    except registry.FieldError as exc:
        raise InvalidRequest([(exc.loc, exc.message, exc.value)]) from None


async def _check_webhook(webhook: WebhookCreate | None, services: Services) -> None:
    """Refuses ``webhook`` when the server has no ``WEBHOOK_SECRET`` (webhooks are off), ``webhook.url`` when its host
    resolves to an address webhooks may not reach (SSRF)."""
    if webhook is None:
        return
    settings = services.settings
    if settings.webhook_secret is None:
        raise InvalidRequest([(("webhook",), "webhooks are off on this server (it has no WEBHOOK_SECRET)",
                               webhook.model_dump(mode="json"))])
    try:
        await targets.resolve_async(webhook.url, settings.webhook_allow_private, settings.webhook_allowed_ports)
    except targets.TargetRefused as exc:
        raise InvalidRequest([(("webhook", "url"), str(exc), webhook.url)]) from None


@contextmanager
def _counted_refusals(services: Services, caller: Caller) -> Iterator[None]:
    """Counts what resolving the model, admission and an edit's decode raise in the rejection metrics, by
    reason."""
    metrics = services.metrics
    try:
        yield
    except admission.Refused as exc:
        reason = "queue_full" if exc.limit == "max_queued" else exc.limit
        metrics.jobs_rejected.labels(reason).inc()
        metrics.key_jobs_rejected.labels(services.key_labels(caller.key_id), reason).inc()
        raise
    except admission.IdempotencyMismatch:
        metrics.jobs_rejected.labels("idempotency_conflict").inc()
        raise
    except admission.NotReplicated:
        metrics.jobs_rejected.labels("not_replicated").inc()
        raise
    except redis.RedisError:
        metrics.jobs_rejected.labels("redis_unavailable").inc()
        raise
    except ModelStoreUnavailable:
        metrics.jobs_rejected.labels("model_store_unavailable").inc()
        raise
    except uploads.UploadError as exc:  # the file refused, or no decode slot free in time
        metrics.jobs_rejected.labels("decode_busy" if exc.status == 503 else "invalid").inc()
        raise


async def _admit(services: Services, caller: Caller, job_spec: spec.JobSpec, idempotency: tuple[str, str] | None,
                 webhook: WebhookCreate | None, rate_charged: bool = False) -> admission.Submission:
    """Admit and enqueue ``job_spec`` (service/admission.py), with idempotency held to ``(key, fingerprint)``;
    counts the outcome."""
    metrics, key_label = services.metrics, services.key_labels(caller.key_id)
    with _counted_refusals(services, caller):
        submission = await admission.submit(services.async_redis, services.queue, job_spec, services.settings,
                                            caller, idempotency, webhook, rate_charged)
    if not submission.replayed:
        metrics.jobs_submitted.labels(job_spec.sampler.value).inc()
        metrics.key_jobs_submitted.labels(key_label).inc()
        metrics.key_images_submitted.labels(key_label).inc(job_spec.count)
    return submission
