"""The model registry as the API reads it: what the live workers serve, and requests resolved against it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

import redis
import redis.asyncio
from pydantic import ValidationError

from facegen.contract import fields, spec

# Without any worker in the registry, requests may still name these (they wait in the queue for one).
FALLBACK_ATTRIBUTES = ["Smiling"]
Checked = TypeVar("Checked")


class FieldError(Exception):
    """A request field names something the workers don't offer (unknown label, attribute, model)."""

    def __init__(self, field: str | tuple[str, ...], message: str, value: object = None):
        super().__init__(message)
        self.loc = (field,) if isinstance(field, str) else field
        self.message = message
        self.value = value


def read_models(conn: redis.Redis) -> list[spec.ModelInfo]:
    """Model descriptions live workers publish (entries that don't parse are skipped), sorted by version."""
    versions = conn.smembers(spec.MODEL_INDEX_KEY)
    return _parse_models(conn.mget(_registry_keys(versions)) if versions else [])


class LiveModels:
    """The model registry as ``POST /generate`` checks requests against it, read from Redis at most every
    ``max_age_s`` seconds.

    Workers rewrite their entries on every heartbeat and the entries expire with the heartbeat, so the registry is
    itself a view some seconds old: another second costs nothing in correctness and saves each request two Redis
    round trips and the parsing. A request that names something the cached view lacks is checked once more
    against a fresh read, so a model is usable as soon as its worker has published it.
    """

    def __init__(self, conn: redis.asyncio.Redis, max_age_s: float) -> None:
        self.conn = conn
        self.max_age_s = max_age_s
        self._models: list[spec.ModelInfo] = []
        self._read_at = -math.inf

    async def _read(self) -> list[spec.ModelInfo]:
        versions = await self.conn.smembers(spec.MODEL_INDEX_KEY)
        self._models = _parse_models(await self.conn.mget(_registry_keys(versions)) if versions else [])
        self._read_at = time.monotonic()
        return self._models

    async def resolve(self, version: str, label: str | None, attributes: dict[str, bool] | None) -> dict[str, bool]:
        """:func:`resolve_attributes` against the live models. Raises ``FieldError``."""
        return await self._checked(lambda models: resolve_attributes(models, version, label, attributes))

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


def _registry_keys(versions: set[bytes]) -> list[str]:
    return [spec.model_registry_key(v.decode()) for v in sorted(versions)]


def _parse_models(raws: list[bytes | None]) -> list[spec.ModelInfo]:
    models = []
    for raw in raws:
        if raw is None:  # no live worker serves that version any more (its entry expired)
            continue
        try:
            models.append(spec.ModelInfo.model_validate_json(raw))
        except ValidationError:
            continue
    return sorted(models, key=lambda m: m.version)


def find_model(models: list[spec.ModelInfo], version: str) -> spec.ModelInfo | None:
    """The entry serving ``version``; for ``"latest"`` the one flagged ``is_latest`` (the newest if several)."""
    if version == fields.LATEST:
        latest = [m for m in models if m.is_latest]
        return latest[-1] if latest else None
    return next((m for m in models if m.version == version), None)


def resolve_attributes(
    models: list[spec.ModelInfo], version: str, label: str | None, attributes: dict[str, bool] | None
) -> dict[str, bool]:
    """The request's condition as ``{attribute name: wanted}``, checked against the model that will serve it.

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
