"""Who is calling, what they may see, how much they may queue, and how their traffic is labelled in metrics.

An API key is never stored, logged or put in a metric: the service works with its *key id*, the first 32 hex
digits of its sha256 (``printf %s "$KEY" | sha256sum | cut -c1-32``). Keys are random bearer tokens, so the id
reveals nothing about them; but anyone can compute the id of a key they hold or guess, so metrics, often scraped
without a key, carry a keyed hash of the id instead (:class:`KeyLabels`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

from service.config import Quota, Settings

KEY_ID_CHARS = 32
# The label of requests made while the API is open (no keys configured).
ANONYMOUS = "anonymous"
# With at most METRICS_KEY_LABELS keys, each key's label is this many hex digits of its keyed hash.
LABEL_CHARS = 12
# What the configured keys are hashed with to make the label secret when METRICS_LABEL_SECRET is unset.
LABEL_SECRET_DERIVATION = b"facegen metrics label secret v1\0"


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


OPEN_CALLER = Caller(key_id=None)


class ApiKeys:
    """The configured bearer keys (``API_KEYS``, ``ADMIN_API_KEYS``) and the one check of a request's key."""

    def __init__(self, settings: Settings) -> None:
        self.keys = settings.api_key_values()
        self.admin_keys = settings.admin_key_values()

    @property
    def configured(self) -> bool:
        """Whether any key is set (else the API is open: every caller is :data:`OPEN_CALLER`)."""
        return bool(self.keys or self.admin_keys)

    def caller(self, authorization: bytes | None) -> Caller | None:
        """The caller of a request whose ``Authorization`` header is ``authorization`` (raw bytes, ``None`` when
        absent); ``None`` when keys are configured and the header is not ``Bearer <one of them>``. The token is
        compared with every key, each in constant time: no early exit tells which one matched."""
        if not self.configured:
            return OPEN_CALLER
        scheme, _, token = (authorization or b"").partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return None
        matched = admin = False
        for key in self.keys:
            matched |= hmac.compare_digest(token, key)
        for key in self.admin_keys:
            admin |= hmac.compare_digest(token, key)
        if not (matched or admin):
            return None
        return Caller(key_id=key_id(token), admin=admin)


def quota_for(settings: Settings, caller: Caller) -> Quota | None:
    """The caller's limits: the defaults with the caller's overrides; ``None`` while the API is open."""
    if caller.key_id is None:
        return None
    override = settings.quota_overrides.get(caller.key_id)
    return settings.default_quota().merged(override)


def label_secret(settings: Settings) -> bytes | None:
    """The HMAC key of metric labels: ``METRICS_LABEL_SECRET``, else a hash of every configured key (API and admin,
    in any order: the same on every replica, which must share them anyway, and unknown to whoever lacks one of
    them); ``None`` while no key is configured (the API is open)."""
    if settings.metrics_label_secret is not None:
        return settings.metrics_label_secret.get_secret_value().encode()
    keys = sorted(set(settings.api_key_values()) | set(settings.admin_key_values()))
    if not keys:
        return None
    return hashlib.sha256(LABEL_SECRET_DERIVATION + b",".join(keys)).digest()


class KeyLabels:
    """Metric labels for key ids that reveal nothing of the keys, of bounded cardinality.

    A key id's label is HMAC-SHA256 of the id under :func:`label_secret`: its first ``LABEL_CHARS`` hex digits
    while at most ``METRICS_KEY_LABELS`` keys are configured, else one of that many buckets it picks
    (``bucket-7``). So whoever reads /metrics can neither check a guessed key against the labels (as a plain hash
    of the key or its id would let them) nor follow one key's label from one deployment to another. Without a
    secret (an open API, no METRICS_LABEL_SECRET) every label is ``anonymous``. With METRICS_LABEL_SECRET set, an operator finds a key's label with
    ``printf %s "$KEY_ID" | openssl dgst -sha256 -hmac "$METRICS_LABEL_SECRET" | awk '{print substr($NF, 1, 12)}'``.
    """

    def __init__(self, settings: Settings) -> None:
        self.buckets = settings.metrics_key_labels
        self.per_key = len(settings.api_key_values()) + len(settings.admin_key_values()) <= self.buckets
        self.secret = label_secret(settings)

    def __call__(self, key: str | None) -> str:
        if not key or self.secret is None:
            return ANONYMOUS
        digest = hmac.new(self.secret, key.encode(), hashlib.sha256).hexdigest()
        if self.per_key:
            return digest[:LABEL_CHARS]
        return f"bucket-{int(digest[:8], 16) % self.buckets}"


def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` serves this machine alone: ``localhost``, 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: whatever it resolves to


def open_api_problem(host: str, settings: Settings) -> str | None:
    """Why serving on ``host`` would expose an open API (no keys) beyond this machine; ``None`` when it would
    not, or when ``ALLOW_OPEN_API`` says to."""
    if ApiKeys(settings).configured or settings.allow_open_api or is_loopback(host):
        return None
    return (f"refusing to serve on {host} without API keys (anyone reaching it could read and cancel every job): "
            "set API_KEYS, or ALLOW_OPEN_API=true to serve an open API")
