"""The model registry as the API reads it: what the live workers serve (their ``ModelInfo`` entries, one per
loaded version, and their ``WorkerServing`` entries), and requests resolved against it and, for a model name no
live worker serves, against the model store (service/store_catalog.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import redis.asyncio
from pydantic import BaseModel, ValidationError

from facegen.contract import fields, spec
from facegen.contract.model_store import VersionRecord
from service.store_catalog import StoreCatalog

# Without any worker in the registry, requests may still name these (they wait in the queue for one).
FALLBACK_ATTRIBUTES = ["Smiling"]
Checked = TypeVar("Checked")
Entry = TypeVar("Entry", bound=BaseModel)


class FieldError(Exception):
    """A request field names something the workers don't offer (unknown label, attribute, model)."""

    def __init__(self, field: str | tuple[str, ...], message: str, value: object = None):
        super().__init__(message)
        self.loc = (field,) if isinstance(field, str) else field
        self.message = message
        self.value = value


@dataclass(frozen=True)
class LiveRegistry:
    """What the live workers published: each loaded version's entry (sorted by version, completed by
    :func:`with_workers`) and each worker's."""

    models: list[spec.ModelInfo]
    workers: list[spec.WorkerServing]


@dataclass(frozen=True)
class Resolved:
    """A request's model and condition as its job carries them: ``model`` the version the job is pinned to (or
    ``"latest"``, which the worker resolves), ``attributes`` ``{attribute name: wanted}``."""

    model: str
    attributes: dict[str, bool]


def read_registry(conn: redis.Redis) -> LiveRegistry:
    """The live workers' entries (two round trips; entries that have expired or don't parse are skipped)."""
    with conn.pipeline(transaction=False) as pipe:
        pipe.smembers(spec.MODEL_INDEX_KEY)
        pipe.smembers(spec.WORKER_INDEX_KEY)
        versions, workers = pipe.execute()
    keys = _entry_keys(versions, workers)
    return _parse_registry(conn.mget(keys) if keys else [], len(versions))


async def read_registry_async(conn: redis.asyncio.Redis) -> LiveRegistry:
    """:func:`read_registry` with the asyncio client."""
    async with conn.pipeline(transaction=False) as pipe:
        pipe.smembers(spec.MODEL_INDEX_KEY)
        pipe.smembers(spec.WORKER_INDEX_KEY)
        versions, workers = await pipe.execute()
    keys = _entry_keys(versions, workers)
    return _parse_registry(await conn.mget(keys) if keys else [], len(versions))


def read_models(conn: redis.Redis) -> list[spec.ModelInfo]:
    """Model descriptions live workers publish, sorted by version (completed by :func:`with_workers`)."""
    return read_registry(conn).models


class LiveModels:
    """The models ``POST /generate`` checks requests against: the model registry, read from Redis at most every
    ``max_age_s`` seconds, and, for a name no live worker serves, the model store's ``catalog`` (``None``: no
    store).

    Workers rewrite their entries on every heartbeat and the entries expire with the heartbeat, so the registry is
    itself a view some seconds old: another second costs nothing in correctness and saves each request two Redis
    round trips and the parsing. A request that names something the cached view lacks is checked once more
    against a fresh read, so a model is usable as soon as its worker has published it.
    """

    def __init__(self, conn: redis.asyncio.Redis, max_age_s: float, catalog: StoreCatalog | None = None) -> None:
        self.conn = conn
        self.max_age_s = max_age_s
        self.catalog = catalog
        self._models: list[spec.ModelInfo] = []
        self._read_at = -math.inf

    async def _read(self) -> list[spec.ModelInfo]:
        self._models = (await read_registry_async(self.conn)).models
        self._read_at = time.monotonic()
        return self._models

    async def resolve(self, version: str, label: str | None, attributes: dict[str, bool] | None) -> Resolved:
        """The job's model and condition: ``version`` as the live workers serve it, else (with a store) the
        store's version it names, a version or an alias resolved to the version it points at now. Raises
        ``FieldError``, and ``ModelStoreUnavailable`` when the store had to be asked and did not answer."""
        try:
            return await self._checked(
                lambda models: Resolved(version, resolve_attributes(models, version, label, attributes)))
        except FieldError as exc:
            if exc.loc != ("model",) or self.catalog is None or version == fields.LATEST:
                raise
            return await self._resolve_stored(self.catalog, version, label, attributes, exc.message)

    @staticmethod
    async def _resolve_stored(catalog: StoreCatalog, name: str, label: str | None,
                              attributes: dict[str, bool] | None, unknown_live: str) -> Resolved:
        record = await catalog.find_async(name)
        if record is None:
            raise FieldError("model", f"{unknown_live}; the model store has no version or alias {name!r}", name)
        return Resolved(record.version, resolve_condition(stored_attributes(record), label, attributes))

    async def check_student(self, version: str, steps: int | None, guidance_scale: float | None) -> None:
        """:func:`check_student` against the live models. Raises ``FieldError``."""
        await self._checked(lambda models: check_student(models, version, steps, guidance_scale))

    async def _checked(self, check: Callable[[list[spec.ModelInfo]], Checked]) -> Checked:
        """``check(models)`` on the cached view, or on a fresh read when the view is old or ``check`` raises
        ``FieldError`` on it."""
        if time.monotonic() - self._read_at > self.max_age_s:
            return check(await self._read())
        try:
            return check(self._models)
        except FieldError:
            return check(await self._read())


def _entry_keys(versions: set[bytes], workers: set[bytes]) -> list[str]:
    return ([spec.model_registry_key(v.decode()) for v in sorted(versions)]
            + [spec.worker_registry_key(w.decode()) for w in sorted(workers)])


def _parse_registry(raws: list[bytes | None], model_count: int) -> LiveRegistry:
    workers = _parse(spec.WorkerServing, raws[model_count:])
    models = with_workers(_parse(spec.ModelInfo, raws[:model_count]), workers)
    return LiveRegistry(sorted(models, key=lambda m: m.version), workers)


def _parse(entry: type[Entry], raws: list[Any]) -> list[Entry]:
    parsed = []
    for raw in raws:
        if raw is None:  # its worker is gone (the entry expired)
            continue
        try:
            parsed.append(entry.model_validate_json(raw))
        except ValidationError:
            continue
    return parsed


def with_workers(models: list[spec.ModelInfo], workers: list[spec.WorkerServing]) -> list[spec.ModelInfo]:
    """The version entries completed by the workers' own. Workers that have loaded a version share its entry (the
    last to write it wins), so a version is ``is_latest`` when its entry says so or some live worker serves it
    for ``"latest"`` (two workers on either side of a roll-out), and its ``workers`` are every live worker that
    has it loaded, besides those its entry names."""
    serving = {worker.serves for worker in workers}
    completed = []
    for model in models:
        holders = {worker.worker for worker in workers if model.version in (worker.serves, *worker.loaded)}
        completed.append(model.model_copy(update={"is_latest": model.is_latest or model.version in serving,
                                                  "workers": sorted(set(model.workers) | holders)}))
    return completed


def stored_attributes(record: VersionRecord) -> list[str]:
    """The attribute names of a published version (its manifest's); ``FieldError`` naming ``model`` for a
    distilled student, which is served beside its teacher, never as a model."""
    teacher = record.teacher
    if teacher is not None:
        raise FieldError("model", f"{record.version} is a distilled student of {teacher}: name {teacher} with "
                                  '"sampler": "student"', record.version)
    return list(record.manifest.get("attributes") or ())


def find_model(models: list[spec.ModelInfo], version: str) -> spec.ModelInfo | None:
    """The entry serving ``version``; for ``"latest"`` the one flagged ``is_latest`` (the newest if several)."""
    if version == fields.LATEST:
        latest = [m for m in models if m.is_latest]
        return latest[-1] if latest else None
    return next((m for m in models if m.version == version), None)


def resolve_attributes(
    models: list[spec.ModelInfo], version: str, label: str | None, attributes: dict[str, bool] | None
) -> dict[str, bool]:
    """The request's condition as ``{attribute name: wanted}``, checked against the live model that will serve it.

    Raises ``FieldError`` for an unknown model, label or attribute.
    """
    if models:
        model = find_model(models, version)
        if model is None:
            known = ", ".join([fields.LATEST] + [m.version for m in models])
            raise FieldError("model", f"unknown model {version!r}; live workers serve: {known}", version)
        names = model.attributes
    elif version == fields.LATEST:
        names = FALLBACK_ATTRIBUTES
    else:
        raise FieldError("model", f"unknown model {version!r}: no worker has published a model yet; use 'latest'",
                         version)
    return resolve_condition(names, label, attributes)


def resolve_condition(names: list[str], label: str | None, attributes: dict[str, bool] | None) -> dict[str, bool]:
    """``label`` or ``attributes`` as ``{attribute name: wanted}`` over a model's attribute ``names``. Raises
    ``FieldError`` for an unknown label or attribute."""
    if label is not None:
        try:
            return spec.label_to_attributes(label, names)
        except ValueError as exc:
            raise FieldError("label", str(exc), label) from None
    by_lower = {name.lower(): name for name in names}
    resolved = {}
    for name, wanted in (attributes or {}).items():
        canonical = by_lower.get(name.lower())
        if canonical is None:
            raise FieldError(("attributes", name), f"unknown attribute {name!r}; valid: {', '.join(names)}", name)
        resolved[canonical] = wanted
    return resolved


def check_student(models: list[spec.ModelInfo], version: str, steps: int | None, guidance_scale: float | None) -> None:
    """Checks a request for the student sampler against the model that will serve it: it has a distilled student
    (``FieldError`` naming ``sampler``) that takes ``steps`` (``steps``) and ``guidance_scale`` (``guidance_scale``;
    ``None``: the model's default). Nothing to check while no worker has published a model: the job waits for one,
    which fails it with the reason."""
    model = find_model(models, version)
    if model is None:
        return
    student = model.student
    if student is None:
        raise FieldError("sampler", f"model {model.version} has no distilled student: the student sampler is not "
                                    "served (GET /models lists each model's student)", spec.Sampler.student.value)
    if steps is not None and (problem := student.steps_problem(steps)) is not None:
        raise FieldError("steps", problem, steps)
    guidance = guidance_scale if guidance_scale is not None else model.default_guidance_scale
    if (problem := student.guidance_problem(guidance)) is not None:
        raise FieldError("guidance_scale", problem, guidance_scale)
