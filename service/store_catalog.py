"""The model store as the API reads it (``MODEL_STORE``, signed with the API's read-only S3 identity): ``GET
/models`` lists its versions and aliases, and a request naming a model that no live worker serves is checked
against it (facegen/contract/model_store.py holds the store itself).

A listing (the record of every published diffusion version, and every alias) is reused for
``MODEL_STORE_CACHE_S`` seconds, a failed one too, so that neither a burst of requests nor a stream of unknown
names reaches the store more than once a window. It is read on a thread of its own, one listing at a time: callers
share the listing under way, and wait for it at most ``MODEL_STORE_TIMEOUT_S`` (then the store counts as
unreachable for them, while the listing goes on for the next caller). A published version never changes, so its
record, once listed, stays known to the process whether the store answers or not; aliases move, and are as fresh
as the listing.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from facegen.contract.model_store import (
    SERVED_KIND,
    AliasMove,
    ModelStore,
    ModelStoreError,
    ModelStoreSettings,
    ModelStoreUnavailable,
    VersionRecord,
)


@dataclass(frozen=True)
class StoreListing:
    """What the store held when it was listed: its diffusion versions' records by version (oldest first) and its
    aliases by name."""

    versions: dict[str, VersionRecord]
    aliases: dict[str, AliasMove]

    def find(self, name: str) -> VersionRecord | None:
        """The record of version ``name``, or of the version alias ``name`` points at; ``None`` for neither."""
        move = self.aliases.get(name)
        return self.versions.get(move.version if move is not None else name)


class StoreCatalog:
    """A model store's listing, cached (see the module docstring); thread-safe, and usable from the event loop."""

    def __init__(self, store: ModelStore, max_age_s: float, wait_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.max_age_s = max_age_s  # MODEL_STORE_CACHE_S
        self.wait_s = wait_s  # MODEL_STORE_TIMEOUT_S
        self.clock = clock  # seconds, monotonic
        self._lock = threading.Lock()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="model-store")
        self._listing: Future[StoreListing | ModelStoreError] | None = None
        self._listed_at = -math.inf  # clock() when the last listing ended
        self._records: dict[str, VersionRecord] = {}  # every diffusion version ever listed: records never change

    @classmethod
    def open(cls, settings: ModelStoreSettings, max_age_s: float) -> StoreCatalog | None:
        """The catalog of the store ``MODEL_STORE`` names; ``None`` when it is unset."""
        if not settings.model_store:
            return None
        return cls(ModelStore(settings), max_age_s, settings.model_store_timeout_s)

    @property
    def location(self) -> str:
        return self.store.location

    def listing(self) -> StoreListing:
        """The store's listing at most ``max_age_s`` old; :class:`ModelStoreUnavailable` when the store did not
        answer (or answered something unreadable)."""
        try:
            return _outcome(self._current().result(timeout=self.wait_s))
        except TimeoutError:
            raise self._no_answer() from None

    async def listing_async(self) -> StoreListing:
        """:meth:`listing`, awaited on the event loop (no thread of the loop's pool waits for the store)."""
        pending = asyncio.wrap_future(self._current())
        try:  # shielded: a caller that stops waiting leaves the listing to the next one
            return _outcome(await asyncio.wait_for(asyncio.shield(pending), self.wait_s))
        except TimeoutError:
            raise self._no_answer() from None

    def find(self, name: str) -> VersionRecord | None:
        """The diffusion version ``name`` names (a version, or an alias of the store), as in :meth:`listing`."""
        known = self._records.get(name)
        return known if known is not None else self.listing().find(name)

    async def find_async(self, name: str) -> VersionRecord | None:
        """:meth:`find`, awaited on the event loop."""
        known = self._records.get(name)
        return known if known is not None else (await self.listing_async()).find(name)

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)

    def _current(self) -> Future[StoreListing | ModelStoreError]:
        """The listing under way, or the last one while it is younger than ``max_age_s``, else a new one."""
        with self._lock:
            listing = self._listing
            if listing is None or (listing.done() and self.clock() - self._listed_at >= self.max_age_s):
                listing = self._listing = self._reader.submit(self._read)
            return listing

    def _read(self) -> StoreListing | ModelStoreError:
        """A listing, or the error that stopped it (kept as a value: each caller raises an error of its own)."""
        try:
            records = [record for record in self.store.versions() if record.kind == SERVED_KIND]
            listing = StoreListing({record.version: record for record in records}, self.store.aliases())
        except ModelStoreError as exc:
            return exc
        finally:
            self._listed_at = self.clock()
        self._records.update(listing.versions)
        return listing

    def _no_answer(self) -> ModelStoreUnavailable:
        return ModelStoreUnavailable(f"model store: {self.location} did not answer within {self.wait_s:g} s")


def _outcome(result: StoreListing | ModelStoreError) -> StoreListing:
    if isinstance(result, ModelStoreError):
        raise ModelStoreUnavailable(str(result))
    return result
