"""Who is calling, what they may see, how much they may queue, and how their traffic is labelled in metrics.

An API key is never stored, logged or put in a metric: the service works with its *key id*, the first 32 hex
digits of its sha256 (``printf %s "$KEY" | sha256sum | cut -c1-32``). Keys are random bearer tokens, so the id
reveals nothing about them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from service.config import Quota, Settings

KEY_ID_CHARS = 32
# The label of requests made while the API is open (no keys configured).
ANONYMOUS = "anonymous"
# With this many key ids or fewer, metrics carry each key's id (its first LABEL_CHARS hex digits).
LABEL_CHARS = 12


def key_id(token: bytes) -> str:
    """The stable, non-secret id of an API key."""
    return hashlib.sha256(token).hexdigest()[:KEY_ID_CHARS]


@dataclass(frozen=True)
class Caller:
    """The client of one request. ``key_id`` is ``None`` while the API is open (no keys configured): then every
    job is everyone's, as before keys existed. An admin (``ADMIN_API_KEYS``) sees and cancels every job."""

    key_id: str | None
    admin: bool = False

    def may_see(self, owner: str | None) -> bool:
        """Whether a job created by key id ``owner`` (``None``: created while the API was open) is visible."""
        return self.key_id is None or self.admin or owner == self.key_id

    @property
    def tenant(self) -> str:
        """The id admission files the job under: the key id, or ``""`` (the shared queue) while open."""
        return self.key_id or ""


def quota_for(settings: Settings, caller: Caller) -> Quota | None:
    """The caller's limits: the defaults with the caller's overrides; ``None`` while the API is open."""
    if caller.key_id is None:
        return None
    override = settings.quota_overrides.get(caller.key_id)
    return settings.default_quota().merged(override)


class KeyLabels:
    """Metric labels for key ids, of bounded cardinality: each key's id while at most ``METRICS_KEY_LABELS``
    keys are configured, else one of that many hashed buckets (``bucket-7``)."""

    def __init__(self, settings: Settings) -> None:
        self.buckets = settings.metrics_key_labels
        self.per_key = len(settings.api_key_values()) + len(settings.admin_key_values()) <= self.buckets

    def __call__(self, key: str | None) -> str:
        if not key:
            return ANONYMOUS
        if self.per_key:
            return key[:LABEL_CHARS]
        return f"bucket-{int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % self.buckets}"
