"""The wire contract between the service and the worker.

Everything that crosses Redis is defined here once: the job spec (built from the field types of fields.py), the
queue and function names, the Redis key layout for artifacts, progress, cancel flags and the worker's model
registry. This module imports neither torch nor FastAPI, so the API process can use it.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from facegen.contract.fields import (
    DEFAULT_ANIMATION_FPS,
    DEFAULT_ANIMATION_FRAMES,
    DEFAULT_COUNT,
    DEFAULT_EDIT_STRENGTH,
    DEFAULT_TRANSITION_FRAMES,
    LATEST,
    MAX_STUDENT_STEPS,
    MAX_TRANSITION_CHAINS,
    AnimationFps,
    AnimationFrames,
    Count,
    FirstIndex,
    GuidanceScale,
    ModelVersion,
    ResolvedAttributeMap,
    Seed,
    Steps,
    Strength,
    TransitionFrames,
    normalise_label,
)

# ----- limits (one definition each; the request fields' own are in fields.py) ---------------------------------
# Edits (POST /edit): the uploaded image reaches the worker as a PNG whose longest side is at most EDIT_MAX_SIDE
# pixels (the API downscales it), so its bytes are bounded by EDIT_MAX_IMAGE_BYTES.
EDIT_MAX_SIDE = 256
EDIT_MAX_IMAGE_BYTES = 256 * 1024
# An edit's guidance when the request leaves it out: with the source label as the guidance reference, the pair
# (fields.DEFAULT_EDIT_STRENGTH, this) of the `python -m training evaluate-edit` sweeps at which the judge reads the
# target on at least 90% of edits in both directions while changing the least of the rest of the face.
# It repeats facegen.model.config.EDIT_GUIDANCE_SCALE (tests/worker/test_contract.py).
DEFAULT_EDIT_GUIDANCE = 3.0

# ----- queue contract -----------------------------------------------------------------------------------------
DEFAULT_QUEUE = "facegen"
JOB_FUNCTION = "worker.jobs.generate"  # enqueued by dotted name: the API never imports torch
KEY_PREFIX = "facegen"


class Sampler(StrEnum):
    """Reverse-diffusion samplers the worker offers: the names of ``facegen.model.diffusion.samplers.SAMPLERS``, which
    this torch-free module cannot import (tests/worker/test_contract.py checks they agree)."""

    dpmpp = "dpmpp"  # DPM-Solver++(2M), deterministic
    ddim = "ddim"  # DDIM, eta from the model's sampling config
    ddpm = "ddpm"  # ancestral DDPM, the original 1000-step method
    # the served model's distilled student (multistep consistency sampling): 1..MAX_STUDENT_STEPS steps of one
    # network row each, the guidance scale an input of its network
    student = "student"


DEFAULT_SAMPLER = Sampler.dpmpp
# Steps used when a request leaves `steps` out; one value per sampler. The student's is its manifest's
# (ModelInfo.student.default_steps); this one, the distillation's default (facegen.model.config.ConsistencyConfig,
# tests/worker/test_contract.py), is what the API counts before a worker resolves it.
DEFAULT_STEPS: dict[Sampler, int] = {Sampler.dpmpp: 20, Sampler.ddim: 50, Sampler.ddpm: 1000, Sampler.student: 4}

_LABEL_RE = re.compile(r"^(not_)?([a-z0-9_]+)$")


def attribute_label(name: str) -> str:
    """CelebA attribute name -> positive label: ``"Smiling"`` -> ``"smiling"``, ``"Wearing_Hat"`` -> ``"wearing_hat"``."""
    return name.lower()


def label_to_attributes(label: str, attribute_names: list[str]) -> dict[str, bool]:
    """Map ``"smiling"`` / ``"not_smiling"`` (case-insensitive) onto one of the model's attributes.

    Raises ``ValueError`` naming the valid labels when the label matches none of ``attribute_names``.
    """
    match = _LABEL_RE.match(normalise_label(label))
    if match:
        by_label = {attribute_label(name): name for name in attribute_names}
        name = by_label.get(match.group(2))
        if name is not None:
            return {name: match.group(1) is None}
    valid = sorted(v for n in attribute_names for v in (attribute_label(n), "not_" + attribute_label(n)))
    raise ValueError(f"unknown label {label!r}; valid labels: {', '.join(valid)}")


def describe_attributes(attributes: dict[str, bool]) -> str:
    """Human and metric label for a condition: ``{"Smiling": False}`` -> ``"not_smiling"``."""
    return "+".join(("" if v else "not_") + attribute_label(k) for k, v in sorted(attributes.items())) or "unconditional"


class JobSpec(BaseModel):
    """One generation request as the worker receives it (JSON inside the RQ job's args).

    ``steps`` and ``guidance_scale`` may be ``None``: the worker resolves them from the sampler's default and the
    model's manifest and records the resolved values in the job's meta.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["generate"] = "generate"
    attributes: ResolvedAttributeMap
    count: Count = DEFAULT_COUNT
    seed: Seed
    steps: Steps | None = None
    sampler: Sampler = DEFAULT_SAMPLER
    guidance_scale: GuidanceScale | None = None
    animation: bool = False
    animation_frames: AnimationFrames = DEFAULT_ANIMATION_FRAMES
    animation_fps: AnimationFps = DEFAULT_ANIMATION_FPS
    model: ModelVersion = LATEST
    first_index: FirstIndex = 0
    transition: bool = False
    transition_frames: TransitionFrames = DEFAULT_TRANSITION_FRAMES

    @model_validator(mode="after")
    def _fields_are_consistent(self) -> JobSpec:
        problem = (transition_problem(self.animation, self.transition, self.count, self.transition_frames)
                   or steps_problem(self.sampler, self.steps))
        if problem is not None:
            raise ValueError(f"{problem[0]}: {problem[1]}")
        return self

    def resolved_steps(self) -> int:
        return self.steps if self.steps is not None else DEFAULT_STEPS[self.sampler]

    def label(self) -> str:
        return describe_attributes(self.attributes)

    def chains(self) -> int:
        """Denoising chains the job costs: one per image, times the frames of a transition."""
        return self.count * (self.transition_frames if self.transition else 1)

    def has_animation(self) -> bool:
        """The job stores a GIF: the denoising trajectory (``animation``) or the attribute transition."""
        return self.animation or self.transition


def transition_problem(animation: bool, transition: bool, count: int, frames: int) -> tuple[str, str] | None:
    """``(field, message)`` when a transition request is inconsistent, else ``None``: a job's GIF is either the
    denoising trajectory or the attribute transition, and a transition costs ``count * frames`` chains."""
    if not transition:
        return None
    if animation:
        return ("transition", "transition and animation are exclusive: a job's GIF is either the attribute "
                              "transition or the denoising trajectory")
    if count * frames > MAX_TRANSITION_CHAINS:
        return ("transition_frames", f"count x transition_frames must be at most {MAX_TRANSITION_CHAINS} "
                                     f"(got {count} x {frames})")
    return None


def steps_problem(sampler: Sampler, steps: int | None) -> tuple[str, str] | None:
    """``("steps", message)`` when ``steps`` is more than ``sampler`` takes (the student: ``MAX_STUDENT_STEPS``),
    else ``None``."""
    if sampler == Sampler.student and steps is not None and steps > MAX_STUDENT_STEPS:
        return ("steps", f"the student sampler takes 1 to {MAX_STUDENT_STEPS} steps (got {steps})")
    return None


class EditParameters(JobSpec):
    """An edit as GET /jobs/{id} shows it: one image, regenerated by DDIM under ``attributes`` after inverting the
    upload through ``strength`` of the schedule (0 = the VAE round trip of the input, 1 = from pure noise). Edits
    keep DDIM: the student is not measured to invert or edit."""

    kind: Literal["edit"] = "edit"  # type: ignore[assignment]
    count: Literal[1] = 1  # type: ignore[assignment]
    sampler: Literal[Sampler.ddim] = Sampler.ddim  # type: ignore[assignment]
    strength: Strength = DEFAULT_EDIT_STRENGTH


class EditSpec(EditParameters):
    """An edit as the worker receives it: the parameters and the upload, an RGB PNG (longest side at most
    ``EDIT_MAX_SIDE``), base64 in JSON."""

    image: Annotated[Base64Bytes, Field(min_length=8, max_length=EDIT_MAX_IMAGE_BYTES, repr=False)]

    def parameters(self) -> EditParameters:
        return EditParameters.model_validate(self.model_dump(exclude={"image"}))


AnySpec = Annotated[JobSpec | EditSpec, Field(discriminator="kind")]
_ANY_SPEC: TypeAdapter[JobSpec | EditSpec] = TypeAdapter(AnySpec)


def parse_job_spec(data: Any) -> JobSpec | EditSpec:
    """A job's argument -> its spec, by ``kind`` (absent: ``generate``, as queued before edits existed); raises
    pydantic's ``ValidationError``."""
    if isinstance(data, dict) and "kind" not in data:
        data = {**data, "kind": "generate"}
    return _ANY_SPEC.validate_python(data)


class BatchKey(BaseModel):
    """Jobs with equal keys can share one denoising batch (same network, schedule, steps and guidance: student jobs
    only with student jobs; edits only with edits of the same strength)."""

    model_config = ConfigDict(frozen=True)

    model: str
    sampler: Sampler
    steps: int
    guidance_scale: float
    kind: str = "generate"
    strength: float | None = None


# ----- Redis keys ---------------------------------------------------------------------------------------------
def artifact_key(job_id: str, kind: str) -> str:
    """Redis key of a job's artifact in the Redis artifact store (facegen/contract/artifacts.py); ``kind`` names it:
    ``"grid"`` (PNG), ``"animation"`` (GIF) or an :func:`image_kind` (one image's PNG)."""
    return f"{KEY_PREFIX}:artifact:{job_id}:{kind}"


def image_kind(index: int) -> str:
    """The artifact kind of image ``index`` (0-based, within the job) alone, as a PNG."""
    return f"image-{index}"


def cancel_key(job_id: str) -> str:
    """Set by the service to ask the worker to stop a running job between denoising steps."""
    return f"{KEY_PREFIX}:cancel:{job_id}"


def model_registry_key(version: str) -> str:
    """JSON model description a live worker refreshes (with a TTL) for each model version it serves."""
    return f"{KEY_PREFIX}:model:{version}"


# Set of every version ever published, so readers find the entries without scanning the keyspace.
MODEL_INDEX_KEY = f"{KEY_PREFIX}:models"


# ----- fair queueing across API keys (facegen/contract/fair_queue.py) --------------------------------------------------
# A job submitted with an API key waits in its key's own list until a worker serves the keys in turn; its RQ origin
# stays the queue, so RQ's registries, retries and maintenance work as for any job.
OWNER_FIELD = "facegen_owner"  # field of the RQ job hash: the key id that submitted the job (absent: open API)
UNITS_FIELD = "facegen_units"  # field of the RQ job hash: the job's work units (facegen/contract/cost.py), for quotas


def key_queue_key(queue_name: str, key_id: str) -> str:
    """The list of ``key_id``'s jobs waiting for their turn on queue ``queue_name``."""
    return f"{KEY_PREFIX}:fair:{queue_name}:key:{key_id}"


def key_ring_key(queue_name: str) -> str:
    """Sorted set: key ids with jobs waiting -> the turn (a counter value) when a worker last served them."""
    return f"{KEY_PREFIX}:fair:{queue_name}:ring"


def key_turn_key(queue_name: str) -> str:
    """The turn counter of ``key_ring_key``."""
    return f"{KEY_PREFIX}:fair:{queue_name}:turn"


class StudentInfo(BaseModel):
    """The distilled student a worker serves beside its model (``"sampler": "student"``): the newest version under
    its checkpoints whose manifest names the model as its teacher."""

    version: str
    max_steps: int  # it samples in 1..max_steps steps
    default_steps: int  # steps when a request leaves them out
    # the guidance scales it was distilled on, (low, high); it also takes 0 (its unconditional output)
    guidance_range: tuple[float, float]

    def guidance_problem(self, guidance_scale: float) -> str | None:
        """Why the student cannot sample at ``guidance_scale``, or ``None``."""
        low, high = self.guidance_range
        if guidance_scale == 0.0 or low <= guidance_scale <= high:
            return None
        return (f"the student {self.version} was distilled for guidance_scale {low:g} to {high:g} (or 0, "
                f"unconditional), not {guidance_scale:g}")

    def steps_problem(self, steps: int) -> str | None:
        """Why the student cannot sample in ``steps`` steps, or ``None``."""
        if 1 <= steps <= self.max_steps:
            return None
        return f"the student {self.version} samples in 1 to {self.max_steps} steps, not {steps}"


class ModelInfo(BaseModel):
    """What a worker publishes about each model version it has loaded (read by ``GET /models`` and ``/readyz``);
    ``is_latest``: the worker runs requests for ``"latest"`` on it (its ``MODEL_VERSION``, an alias followed)."""

    version: str
    vae_version: str
    attributes: list[str]
    resolution: int
    default_guidance_scale: float
    default_steps: dict[str, int]
    is_latest: bool
    device: str
    dtype: str
    workers: list[str] = []
    student: StudentInfo | None = None  # the distilled student served beside it, when it has one

    def labels(self) -> list[str]:
        return [label for name in self.attributes for label in (attribute_label(name), "not_" + attribute_label(name))]


class WorkerServing(BaseModel):
    """What one live worker serves now (read by ``/readyz`` and ``GET /models``)."""

    worker: str
    model_version: str  # its MODEL_VERSION setting: a version, an alias of the model store, or "latest"
    serves: str  # the version its requests for "latest" run on now
    loaded: list[str]  # the versions it holds loaded, least recently used first


def worker_registry_key(worker: str) -> str:
    """JSON :class:`WorkerServing` a live worker refreshes (with a TTL)."""
    return f"{KEY_PREFIX}:worker:{worker}"


# Set of every worker name that ever published a WorkerServing entry (entries expire; names stay).
WORKER_INDEX_KEY = f"{KEY_PREFIX}:workers"


def publish_worker_entry(connection: Any, entry: WorkerServing, ttl_s: int) -> None:
    """Write (or refresh) ``entry`` for ``ttl_s`` seconds; ``connection`` is a redis client."""
    with connection.pipeline() as pipe:
        pipe.set(worker_registry_key(entry.worker), entry.model_dump_json(), ex=ttl_s)
        pipe.sadd(WORKER_INDEX_KEY, entry.worker)
        pipe.execute()


# ----- job events (GET /jobs/{id}/events relays them) ---------------------------------------------------------
class JobEvent(StrEnum):
    """Entries of a job's event stream: a Redis stream of ``{"event": name, "data": JSON}`` entries. The worker
    writes ``started``, one ``progress`` per denoising step (``{"progress": {"step", "total"}}``, with ``"preview"``,
    a base64 PNG of the current x0 prediction, while a client asks for previews) and the final ``finished`` /
    ``failed`` / ``canceled`` once RQ has recorded it; the API writes ``canceled`` for a job canceled while queued.
    ``queued`` is the API's own (the queue position, computed when asked)."""

    queued = "queued"
    started = "started"
    progress = "progress"
    finished = "finished"
    failed = "failed"
    canceled = "canceled"


FINAL_EVENTS = frozenset({JobEvent.finished, JobEvent.failed, JobEvent.canceled})
EVENTS_MAX_ENTRIES = 4096  # a stream keeps about this many entries (MAXLEN ~): every step of 4 ddpm runs
PREVIEW_SIDE = 64  # previews are at most this many pixels on a side
PREVIEW_FLAG_TTL_S = 60  # a client's wish for previews lapses unless renewed within this long


def events_key(job_id: str) -> str:
    """The job's event stream (expires with the job)."""
    return f"{KEY_PREFIX}:events:{job_id}"


def preview_key(job_id: str) -> str:
    """Set (with ``PREVIEW_FLAG_TTL_S``) while some client of the job's event stream wants previews."""
    return f"{KEY_PREFIX}:preview:{job_id}"


def append_event(pipe: Any, job_id: str, event: JobEvent, data: dict[str, Any], ttl_s: int) -> None:
    """Add ``event`` to the job's stream on ``pipe`` (a redis pipeline or client) and renew the stream's TTL."""
    key = events_key(job_id)
    pipe.xadd(key, {"event": event.value, "data": json.dumps(data, separators=(",", ":"))},
              maxlen=EVENTS_MAX_ENTRIES, approximate=True)
    pipe.expire(key, ttl_s)


# ----- job meta and artifacts ----------------------------------------------------------------------------------
# The worker keeps these entries in ``job.meta`` (RQ); the service reads them:
META_PROGRESS = "progress"  # {"step": s, "total": T}: denoising steps done, updated ~10 times/s at most
META_RESOLVED = "resolved"  # the parameters actually used: steps, guidance_scale, sampler, model version
META_ARTIFACTS = "artifacts"  # {"grid": where, "animation": where} (a Redis key, an s3:// URL), set when it finishes
META_ERROR = "error"  # a one-line reason when the job failed (no traceback)
META_BATCH = "batch"  # {"jobs": n, "images": m}: the denoising batch this job shared
# {"id": the batch's first job's id, "started_at": ISO time}: which batch, and when the job was claimed for it (RQ's
# own started_at, written once at the claim; the API reads it from here first)
META_BATCH_RUN = "batch_run"
DEFAULT_ARTIFACT_TTL_S = 24 * 3600  # artifacts and finished jobs live this long in Redis
ARTIFACT_MEDIA_TYPES = {"grid": "image/png", "animation": "image/gif"}
# PNG text chunk (tEXt) of every PNG the worker stores: JSON with the parameters that reproduce it (worker/provenance.py)
PROVENANCE_KEY = "parameters"


def publish_model_entry(connection: Any, info: ModelInfo, ttl_s: int) -> None:
    """Write (or refresh) ``info`` in the registry for ``ttl_s`` seconds; ``connection`` is a redis client."""
    with connection.pipeline() as pipe:
        pipe.set(model_registry_key(info.version), info.model_dump_json(), ex=ttl_s)
        pipe.sadd(MODEL_INDEX_KEY, info.version)
        pipe.execute()
