"""Redis keys owned by the API (the worker never reads them).

- ``facegen:tombstone:<job_id>`` -> ``{"animation": bool, "owner": key id or null}``, kept ``tombstone_ttl``
  (longer than the job), so an expired job answers 410 (to its owner) rather than 404;
- ``facegen:idempotency:<sha256(api key, Idempotency-Key)>`` -> ``{"job_id", "fingerprint", "seed"}``;
- ``facegen:rate:<key id>``: the key's submission rate (admission's token bucket);
- ``facegen:observed:<job_id>``: set the first time any API replica sees the job ended (metrics count it once);
- ``facegen:event-streams:<group>``: the leases of a key's open event streams (service/event_leases.py);
- ``facegen:replication-mark``: a counter admission bumps after a job's writes, so that ``WAIT`` on any pooled
  connection covers them (WAIT counts the writes of its own connection).
"""

from __future__ import annotations

import hashlib

from facegen.contract import spec


def tombstone_key(job_id: str) -> str:
    return f"{spec.KEY_PREFIX}:tombstone:{job_id}"


REPLICATION_MARK_KEY = f"{spec.KEY_PREFIX}:replication-mark"


def observed_key(job_id: str) -> str:
    return f"{spec.KEY_PREFIX}:observed:{job_id}"


def rate_key(key_id: str) -> str:
    """The key's submission-rate state (GCRA: when its bucket is next full, as Redis TIME seconds)."""
    return f"{spec.KEY_PREFIX}:rate:{key_id}"


def idempotency_key(client: str, key: str) -> str:
    digest = hashlib.sha256(f"{client}\0{key}".encode()).hexdigest()
    return f"{spec.KEY_PREFIX}:idempotency:{digest}"




def leases_key(group: str) -> str:
    """The sorted set of ``group``'s event-stream leases (a group: an API key's id, or ``addr:<ip>`` on an open
    API)."""
    return f"{spec.KEY_PREFIX}:event-streams:{group}"
