"""HTTP schemas: what clients send and receive. The job spec itself (what the worker gets) lives in facegen.contract.spec."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer
from rq.job import JobStatus

from facegen.contract import fields, spec
from facegen.contract.model_store import AliasMove, VersionRecord
from service.webhooks.targets import check_url

GENERATE_EXAMPLES = [
    {"label": "smiling", "count": 4, "seed": 1234},
    {"label": "not_smiling", "count": 16, "sampler": "ddim", "steps": 50, "guidance_scale": 3.5},
    {"attributes": {"Smiling": True, "Eyeglasses": False}, "count": 8, "animation": True},
    {"label": "smiling", "count": 4, "seed": 7, "transition": True, "transition_frames": 8},
]


class WebhookEvent(StrEnum):
    """How a job ended, as a webhook subscribes to it (the payload's ``type`` is ``job.<event>``)."""

    completed = "completed"
    failed = "failed"
    canceled = "canceled"


class WebhookCreate(BaseModel):
    """Where to report the job's end: a signed POST (Standard Webhooks) to ``url`` for each of ``events``."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[
        str,
        Field(max_length=2048, description="http(s) URL receiving the signed POST; its host must resolve to public "
                                           "addresses (unless the server sets WEBHOOK_ALLOW_PRIVATE).",
              examples=["https://example.com/hooks/facegen"]),
    ]
    events: Annotated[
        list[WebhookEvent],
        Field(min_length=1, max_length=3, description="Which endings to report."),
    ] = [WebhookEvent.completed, WebhookEvent.failed, WebhookEvent.canceled]

    @field_validator("url")
    @classmethod
    def _url_is_well_formed(cls, value: str) -> str:
        return check_url(value)


# The request field both job kinds (POST /generate, POST /edit) declare as `webhook: WebhookField = None`.
WebhookField = Annotated[
    WebhookCreate | None,
    Field(description="Report the job's end to this URL (a signed POST, retried with backoff until it answers 2xx)."),
]


class JobCreate(BaseModel):
    """A generation request. Give exactly one of ``label`` and ``attributes``."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": GENERATE_EXAMPLES,
            "oneOf": [{"required": ["label"]}, {"required": ["attributes"]}],
        },
    )

    label: Annotated[
        fields.Label | None,
        Field(
            description='Condition as one label, case-insensitive: "smiling" or "not_smiling" (any attribute '
            "the model knows, with or without the not_ prefix; see GET /models).",
            examples=["smiling"],
        ),
    ] = None
    attributes: Annotated[
        fields.AttributeMap | None,
        Field(
            description="Condition on several attributes at once (multi-attribute models): attribute name -> wanted. "
            "Names as listed by GET /models, case-insensitive.",
            examples=[{"Smiling": True, "Eyeglasses": False}],
        ),
    ] = None
    count: Annotated[fields.Count, Field(description="Images in the grid.")] = fields.DEFAULT_COUNT
    seed: Annotated[
        fields.Seed | None,
        Field(
            description="Random seed; the same seed gives the same images whatever the count. "
            "Drawn at random (below 2^53) when absent, and echoed back.",
        ),
    ] = None
    steps: Annotated[
        fields.Steps | None,
        Field(
            description="Denoising steps; default: the sampler's ("
            + ", ".join(f"{k.value} {v}" for k, v in spec.DEFAULT_STEPS.items())
            + f"; student: its own, see GET /models). The student takes 1 to {fields.MAX_STUDENT_STEPS} "
            "(or its model's student.max_steps).",
        ),
    ] = None
    sampler: Annotated[spec.Sampler, Field(strict=False, description=(
        'Reverse-diffusion sampler; "student": the served model\'s distilled student (one network evaluation per '
        "step), where GET /models lists one."))] = spec.DEFAULT_SAMPLER
    guidance_scale: Annotated[
        fields.GuidanceScale | None,
        Field(
            description="Classifier-free guidance scale (0 = unconditional); default: the model's.",
        ),
    ] = None
    animation: Annotated[bool, Field(description="Also render the denoising trajectory as a GIF.")] = False
    animation_frames: Annotated[
        fields.AnimationFrames | None,
        Field(
            description=f"GIF frames (used when animation is true); default {fields.DEFAULT_ANIMATION_FRAMES}.",
        ),
    ] = None
    animation_fps: Annotated[
        fields.AnimationFps | None,
        Field(
            description=f"GIF frame rate (used when animation or transition is true); default "
            f"{fields.DEFAULT_ANIMATION_FPS}.",
        ),
    ] = None
    transition: Annotated[
        bool,
        Field(description="Render each image as an attribute transition GIF (links.animation): the noise stays fixed "
                          "and the condition moves from the opposite of each requested attribute value to it "
                          "(not smiling -> smiling for label smiling); the last frame is the image itself. "
                          "Exclusive with animation."),
    ] = False
    transition_frames: Annotated[
        fields.TransitionFrames | None,
        Field(
            description=f"Transition frames per image (each a full denoising chain; count x transition_frames at "
            f"most {fields.MAX_TRANSITION_CHAINS}); default {fields.DEFAULT_TRANSITION_FRAMES}.",
        ),
    ] = None
    first_index: Annotated[
        fields.FirstIndex,
        Field(
            description="Index of the first image in the seed's sequence: the job's images are images first_index "
            "… first_index+count-1 of the seed, as in a grid of first_index+count (reproduces one image of a grid).",
        ),
    ] = 0
    model: Annotated[
        fields.ModelVersion,
        Field(description='Model version (see GET /models): one a live worker serves, or one the model store holds, '
                          'or an alias of the store (the job is pinned to the version it points at now); "latest" '
                          "is the version the workers serve by default."),
    ] = fields.LATEST
    webhook: WebhookField = None

    def field_errors(self) -> list[tuple[str, str]]:
        """Cross-field problems as ``(field, message)``; empty when the request is consistent."""
        problem = condition_problem(self.label, self.attributes)
        if problem is not None:
            return [problem]
        frames = self.transition_frames or fields.DEFAULT_TRANSITION_FRAMES
        problems = (spec.transition_problem(self.animation, self.transition, self.count, frames),
                    spec.steps_problem(self.sampler, self.steps))
        return [problem for problem in problems if problem is not None]

    def fingerprint(self) -> str:
        """A text that identifies the request's content (what an Idempotency-Key is held to)."""
        return self.model_dump_json()


@dataclass(frozen=True)
class EditCreate:
    """An edit request: POST /edit's form, its fields parsed and bounded by the route. Give exactly one of ``label``
    and ``attributes``."""

    image: bytes  # the uploaded file as sent (not checked yet: service/uploads.py)
    label: str | None
    attributes: dict[str, bool] | None
    strength: float
    seed: int | None
    steps: int | None
    guidance_scale: float | None
    animation: bool
    model: str
    webhook: WebhookCreate | None
    webhook_json: str | None  # the webhook as sent, part of the fingerprint
    sampler: spec.Sampler | None = None  # edits take DDIM only; the field exists to refuse any other by name

    def field_errors(self) -> list[tuple[str, str]]:
        """Cross-field problems as ``(field, message)``; empty when the request is consistent."""
        problems = [condition_problem(self.label, self.attributes)]
        if self.sampler not in (None, spec.Sampler.ddim):
            problems.append(("sampler", f"edits invert and regenerate with the {spec.Sampler.ddim.value} sampler, "
                                        f"not {self.sampler.value} (the student is not measured to edit)"))
        return [problem for problem in problems if problem is not None]

    def fingerprint(self) -> str:
        """A text that identifies the request's content (what an Idempotency-Key is held to)."""
        return json.dumps({"image": hashlib.sha256(self.image).hexdigest(), "label": self.label,
                           "attributes": self.attributes, "strength": self.strength, "seed": self.seed,
                           "steps": self.steps, "guidance_scale": self.guidance_scale, "animation": self.animation,
                           "model": self.model, "webhook": self.webhook_json})


def condition_problem(label: str | None, attributes: dict[str, bool] | None) -> tuple[str, str] | None:
    """``(field, message)`` unless the request gives exactly one of ``label`` and ``attributes``."""
    if (label is None) != (attributes is None):
        return None
    which = "both were given" if label is not None else "neither was given"
    return ("label", f"give exactly one of 'label' and 'attributes' ({which})")


class JobLinks(BaseModel):
    self: Annotated[str, Field(description="This job (GET for status, DELETE to cancel).")]
    result: Annotated[str, Field(description="The PNG grid, once the job has finished.")]
    animation: Annotated[
        str | None, Field(description="The GIF, once finished; present only when the request asked for it "
                                      "(animation or transition).")
    ] = None

    @classmethod
    def of(cls, root_path: str, job_id: str, animation: bool) -> JobLinks:
        """The links of job ``job_id`` under the API's ``root_path``; ``animation``: the job stores a GIF."""
        base = f"{root_path}/jobs/{job_id}"
        return cls(self=base, result=f"{base}/result", animation=f"{base}/animation" if animation else None)

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("animation") is None:
            data.pop("animation", None)
        return data


class JobAccepted(BaseModel):
    """Answer to POST /generate."""

    job_id: Annotated[str, Field(description="Unguessable job id (uuid4).")]
    status: Annotated[JobStatus, Field(description="RQ job status.")]
    seed: Annotated[int, Field(description="The seed used: yours, or the one drawn for you.")]
    links: JobLinks


class Progress(BaseModel):
    step: Annotated[int, Field(ge=0, description="Denoising steps done.")]
    total: Annotated[int, Field(ge=0, description="Denoising steps in all.")]


class WebhookState(BaseModel):
    """The job's webhook delivery so far."""

    attempts: Annotated[int, Field(ge=0, description="Delivery attempts made (each retry counts).")]
    delivered: Annotated[bool, Field(description="The receiver answered 2xx.")]
    last_status: Annotated[int | None, Field(description="HTTP status of the last attempt (null: none, or no "
                                                         "answer).")] = None
    last_error: Annotated[str | None, Field(description="Why the last attempt failed.")] = None


class JobPublic(BaseModel):
    """A job as GET /jobs/{id} shows it."""

    id: str
    status: Annotated[JobStatus, Field(description="RQ job status (queued, started, finished, failed, canceled, …).")]
    queue_position: Annotated[
        int | None,
        Field(description="While queued: jobs ahead of this one (0 = next); for a job waiting its API key's "
                          "turn, that key's own jobs ahead of it."),
    ] = None
    progress: Annotated[Progress | None, Field(description="While running or finished: denoising progress.")] = None
    cancel_requested: Annotated[
        bool, Field(description="DELETE was called while the job ran; the worker stops at its next step.")
    ] = False
    submitted_at: datetime | None = None
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    parameters: Annotated[
        spec.EditParameters | spec.JobSpec | None,
        Field(description="The job spec as queued (steps and guidance_scale null = model/sampler default); an "
                          "edit's without its image."),
    ]
    resolved: Annotated[
        dict[str, Any] | None,
        Field(description="Parameters the worker actually used (steps, guidance_scale, sampler, model version)."),
    ] = None
    cost_units: Annotated[
        int | None,
        Field(ge=1, description="What the job costs in work units, as the quotas count it (a default POST "
                                "/generate costs 100); null when its parameters cannot be read."),
    ] = None
    error: Annotated[str | None, Field(description="One-line reason when the job failed.")] = None
    webhook: Annotated[WebhookState | None, Field(description="Present when the request asked for a webhook.")] = None
    links: JobLinks


class ModelPublic(BaseModel):
    """A model version that a live worker serves."""

    version: str
    vae_version: str
    attributes: Annotated[list[str], Field(description="Attribute names the model is conditioned on.")]
    labels: Annotated[list[str], Field(description='Values accepted for "label".')]
    resolution: Annotated[int, Field(description="Image side in pixels.")]
    default_guidance_scale: float
    default_steps: Annotated[dict[str, int], Field(description="Default steps per sampler it serves.")]
    is_latest: Annotated[bool, Field(description='Serves model "latest".')]
    device: str
    dtype: str
    workers: list[str] = []
    student: Annotated[spec.StudentInfo | None, Field(
        description='The distilled student served beside it ("sampler": "student"); null when it has none.')] = None

    @classmethod
    def from_info(cls, info: spec.ModelInfo) -> ModelPublic:
        return cls(**info.model_dump(), labels=info.labels())


class StoreVersionPublic(BaseModel):
    """A version published to the model store (a diffusion model; the VAE it needs travels with it)."""

    version: str
    vae_version: Annotated[str | None, Field(description="The VAE it decodes with.")]
    attributes: Annotated[list[str], Field(description="Attribute names the model is conditioned on.")]
    card: Annotated[dict[str, Any], Field(description=(
        "Its model-card numbers, from its evaluation record: split, vae_psnr_db, vae_attribute_agreement and, per "
        "sampler setting, accuracy_<label>, kid, fid, seconds_per_image (those measured)."))]
    published_by: str
    published_at: datetime
    student_of: Annotated[str | None, Field(description=(
        'The version it was distilled from: a student, served beside that version ("sampler": "student"), '
        "never as a model of its own; null for a model."))] = None

    @classmethod
    def from_record(cls, record: VersionRecord) -> StoreVersionPublic:
        return cls(version=record.version, vae_version=record.manifest.get("vae_version"),
                   attributes=list(record.manifest.get("attributes") or ()), card=record.card,
                   published_by=record.published_by, published_at=record.published_at,
                   student_of=record.teacher)


class StoreAliasPublic(BaseModel):
    """Where an alias of the model store points, and its last move."""

    version: str
    previous: Annotated[str | None, Field(description="Where it pointed before that move; null for its first.")]
    moved_by: str
    moved_at: datetime

    @classmethod
    def from_move(cls, move: AliasMove) -> StoreAliasPublic:
        return cls(version=move.version, previous=move.previous, moved_by=move.by, moved_at=move.at)


class StorePublic(BaseModel):
    """The model store as the API last listed it (at most MODEL_STORE_CACHE_S ago)."""

    location: Annotated[str, Field(description="s3://bucket/prefix/ of the store (MODEL_STORE).")]
    reachable: Annotated[bool, Field(description="The store answered the listing.")]
    error: Annotated[str | None, Field(description="Why it is not reachable; null when it is.")] = None
    versions: Annotated[list[StoreVersionPublic] | None, Field(description=(
        "Published versions, oldest first; null when the store is unreachable."))] = None
    aliases: Annotated[dict[str, StoreAliasPublic] | None, Field(description=(
        "Alias name -> where it points; null when the store is unreachable."))] = None


class ModelList(BaseModel):
    models: list[ModelPublic]
    latest: Annotated[str | None, Field(description='Version that "latest" means now; null when no worker is live.')]
    workers: Annotated[list[spec.WorkerServing], Field(description=(
        "Each live worker: its MODEL_VERSION setting (a version, an alias of the model store, or latest), the "
        'version it serves for "latest" now, and the versions it holds loaded, least recently used first.'))] = []
    store: Annotated[StorePublic | None, Field(description="The model store (MODEL_STORE); null when the API has "
                                                           "none.")] = None


class Health(BaseModel):
    status: Annotated[str, Field(examples=["ok"])]


class Readiness(BaseModel):
    status: Annotated[str, Field(description='"ready" or "unavailable".', examples=["ready"])]
    redis: Annotated[bool, Field(description="Redis answered.")]
    latest_model: Annotated[str | None, Field(description='Version a live worker serves as "latest".')] = None
    workers: Annotated[list[spec.WorkerServing] | None, Field(description=(
        'Each live worker and the version it serves for "latest" (as in GET /models); null while Redis is '
        "unreachable."))] = None
    artifact_store: Annotated[bool | None, Field(
        description="The artifact store answered (not asked while Redis is down). Only the artifact routes need "
                    "it, so it does not change `status`.")] = None
    reason: Annotated[str | None, Field(description="Why the API is not ready.")] = None


class ErrorPublic(BaseModel):
    """Every error answer except 422 (which lists the failing fields in FastAPI's format)."""

    detail: Annotated[str, Field(examples=["job not found"])]


class QuotaError(ErrorPublic):
    """429: a limit was reached; ``limit`` names it."""

    limit: Annotated[str, Field(description="max_queued (the whole queue), or the API key's queued_jobs, "
                                            "queued_units or units_per_minute (work units: see GET /jobs/{id}'s "
                                            "cost_units), or events_max_streams_per_key (open event streams).")]
    allowed: Annotated[int, Field(description="The limit's value.")]


class JobStateError(ErrorPublic):
    """409 on an artifact: the job is not finished (yet); ``status`` says which case."""

    status: JobStatus
    error: str | None = None


class WebhookSecret(BaseModel):
    """GET /webhooks/secret: the secret the caller's webhook deliveries are signed with (Standard Webhooks)."""

    key_id: Annotated[str | None, Field(
        description="The API key's id (first 32 hex digits of its sha256) the secret belongs to; null while the "
                    "API has no keys (one secret for every job).")]
    secret: Annotated[str, Field(
        description='Verify each delivery\'s "webhook-signature" with it, e.g. with a Standard Webhooks library.',
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])]
    previous_secret: Annotated[str | None, Field(
        description="While the server rotates its signing secret, the secret deliveries are also signed with "
                    "(each carries both signatures): the one receivers verified with until now. Switch to "
                    "`secret` before the rotation ends; null outside a rotation.")] = None
