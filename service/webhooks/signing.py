"""Standard Webhooks signatures (https://www.standardwebhooks.com): HMAC-SHA256 over ``"{id}.{timestamp}.{body}"``
with the key of a ``whsec_<base64>`` secret, sent as ``webhook-signature: v1,<base64 digest>``.

Each tenant signs with its own key, so that no API key can forge another's events: the key is HMAC-SHA256 of the
master secret's key (``WEBHOOK_SECRET``) and the tenant (the API key id; ``anonymous`` while the API is open),
shown to its owner as a ``whsec_`` secret by ``GET /webhooks/secret``. While ``WEBHOOK_SECRET_PREVIOUS`` is set (a
rotation of the master secret), each delivery carries one signature per master secret, space-separated as the
standard allows, so a receiver verifying with either tenant secret accepts it."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from service.config import Settings, signing_key
from service.tenancy import ANONYMOUS

# What the master key signs to make a tenant's key: a fixed label (the derivation's version), then the tenant.
DERIVATION_LABEL = b"facegen webhook signing key v1\0"


def tenant_key(master: bytes, tenant: str | None) -> bytes:
    """The signing key of ``tenant`` (an API key id; ``None``: the open API's jobs) under the master key."""
    return hmac.new(master, DERIVATION_LABEL + (tenant or ANONYMOUS).encode(), hashlib.sha256).digest()


def as_secret(key: bytes) -> str:
    """``key`` as a Standard Webhooks secret, ``whsec_<base64>`` (what receivers' libraries take)."""
    return "whsec_" + base64.b64encode(key).decode()


def tenant_keys(settings: Settings, tenant: str | None) -> list[bytes]:
    """The keys ``tenant``'s deliveries are signed with: the current master secret's, then, during a rotation,
    the previous one's. Empty when webhooks are off (no ``WEBHOOK_SECRET``)."""
    if settings.webhook_secret is None:
        return []
    masters = (settings.webhook_secret, settings.webhook_secret_previous)
    return [tenant_key(signing_key(master), tenant) for master in masters if master is not None]


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """``"v1,<base64 HMAC-SHA256>"`` of ``body`` sent as message ``message_id`` at ``timestamp`` (Unix seconds)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(keys: bytes | Sequence[bytes], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers of a delivery signed with each of ``keys`` (``message_id`` stays the same across retries
    of one delivery)."""
    keys = [keys] if isinstance(keys, bytes) else list(keys)
    if not keys:
        raise ValueError("a delivery needs at least one signing key")
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(key, message_id, timestamp, body) for key in keys),
    }
