"""``EVENTS_MAX_STREAMS_PER_KEY``: the event streams one API key holds open, counted across every API replica.

Each open stream holds a lease in Redis, a member of the sorted set ``facegen:event-streams:<group>`` (holder id ->
when the lease lapses, Redis ``TIME`` seconds). One Lua script drops the lapsed members, then takes or renews the
holder's lease if the group holds fewer than the limit: the count never trusts a clock of ours, and the leases of a
process that died lapse by themselves ``ttl_s`` after their last renewal. A stream renews its lease while it lives
and gives it back when it ends (service/api/routes/events.py).

Counted in Redis rather than per process because the API runs as replicas (and each may run ``WORKERS``
processes) behind a load balancer: a count per process would let one key hold the limit times the number of
processes, wherever its streams happen to land.
"""

from __future__ import annotations

import redis.asyncio

from service.keys import leases_key

# KEYS[1]: the group's leases; ARGV: holder, limit, ttl (s). 1 if the holder now holds a lease, else 0.
LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
return 1
"""


class StreamLeases:
    """At most ``limit`` leases per group, each lapsing ``ttl_s`` seconds after it was last taken or renewed."""

    def __init__(self, client: redis.asyncio.Redis, limit: int, ttl_s: float):
        self.limit, self.ttl_s = limit, ttl_s
        self._script = client.register_script(LEASE_SCRIPT)
        self._client = client

    async def take(self, group: str, holder: str) -> bool:
        """Take a lease for ``holder`` (a stream's random id), or renew the one it holds; ``False`` when ``group``
        already holds ``limit`` others."""
        return await self._script(keys=[leases_key(group)], args=[holder, self.limit, self.ttl_s]) == 1

    async def give_back(self, group: str, holder: str) -> None:
        await self._client.zrem(leases_key(group), holder)
