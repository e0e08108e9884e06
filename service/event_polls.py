"""One read of a job's state per interval in an API process, shared by every event stream that watches the job.

While a job waits in the queue its event streams report its queue position (service/api/routes/events.py), a
read of RQ's synchronous API done in the thread pool. Read by each stream, N streams of one job would cost N reads
and N thread hops per interval. Instead the first stream to subscribe to a job starts one poller task for it,
which reads at once and then every ``interval_s`` and keeps the latest reading where each subscriber looks; the
last subscriber to leave stops the task. A reading that raised (Redis unreachable) is raised to each subscriber
that looks, until a later read succeeds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Reading = TypeVar("Reading")


class _Poller(Generic[Reading]):
    """One job's poller task, its subscribers and its latest reading."""

    def __init__(self, read: Callable[[], Awaitable[Reading]], interval_s: float):
        self.subscribers = 0
        self.outcome: Reading | Exception | None = None
        self.has_read = asyncio.Event()
        self.task = asyncio.create_task(self._run(read, interval_s))

    async def _run(self, read: Callable[[], Awaitable[Reading]], interval_s: float) -> None:
        while True:
            try:
                self.outcome = await read()
            except Exception as exc:  # handed to the subscribers, who raise it
                self.outcome = exc
            self.has_read.set()
            await asyncio.sleep(interval_s)


class Subscription(Generic[Reading]):
    """One stream's interest in a job's readings; :meth:`close` it when done (closing twice is harmless)."""

    def __init__(self, polls: SharedPolls[Reading], job_id: str, poller: _Poller[Reading]):
        self._polls, self._job_id, self._poller = polls, job_id, poller
        self.closed = False

    async def latest(self) -> Reading:
        """The latest reading (waits for the first one); raises what the latest read raised."""
        await self._poller.has_read.wait()
        outcome = self._poller.outcome
        if isinstance(outcome, Exception):
            raise outcome
        return outcome  # has_read is set: a reading, not the initial None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._polls._leave(self._job_id, self._poller)


class SharedPolls(Generic[Reading]):
    """The pollers of one API process (its event loop), one per job that at least one stream subscribes to."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s  # between the end of one read and the start of the next
        self._pollers: dict[str, _Poller[Reading]] = {}

    def subscribe(self, job_id: str, read: Callable[[], Awaitable[Reading]]) -> Subscription[Reading]:
        """Subscribe to ``job_id``'s readings. ``read`` reads its state; only the first subscriber's (the one
        that starts the poller) is used, so every subscriber of a job passes the same read."""
        poller = self._pollers.get(job_id)
        if poller is None:
            poller = self._pollers[job_id] = _Poller(read, self.interval_s)
        poller.subscribers += 1
        return Subscription(self, job_id, poller)

    def polling(self) -> int:
        """How many jobs this process polls now."""
        return len(self._pollers)

    def _leave(self, job_id: str, poller: _Poller[Reading]) -> None:
        poller.subscribers -= 1
        if poller.subscribers == 0:
            poller.task.cancel()
            del self._pollers[job_id]
