"""The model registry as the API reads it: what the live workers serve, and requests resolved against it."""

from __future__ import annotations

import math
import time

import redis
import redis.asyncio
from pydantic import ValidationError

from facegen.contract import fields, spec

# Without any worker in the registry, requests may still name these (they wait in the queue for one).
FALLBACK_ATTRIBUTES = ["Smiling"]


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
        if time.monotonic() - self._read_at > self.max_age_s:
            return resolve_attributes(await self._read(), version, label, attributes)
        try:
            return resolve_attributes(self._models, version, label, attributes)
        except FieldError:
            return resolve_attributes(await self._read(), version, label, attributes)


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


