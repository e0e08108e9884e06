"""Standard Webhooks signatures (https://www.standardwebhooks.com): HMAC-SHA256 over ``"{id}.{timestamp}.{body}"``
with the key of a ``whsec_<base64>`` secret, sent as ``webhook-signature: v1,<base64 digest>``."""

from __future__ import annotations

import base64
import hashlib
import hmac


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """``"v1,<base64 HMAC-SHA256>"`` of ``body`` sent as message ``message_id`` at ``timestamp`` (Unix seconds)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(key: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers of a signed delivery (``message_id`` stays the same across retries of one delivery)."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, message_id, timestamp, body),
    }
