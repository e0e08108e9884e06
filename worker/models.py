"""The model versions one worker holds loaded, the one its requests for ``"latest"`` run on, and where it gets the
others.

``MODEL_VERSION`` names what a worker serves: a version, ``latest``, or, with ``MODEL_STORE``, an alias of the model
store (facegen/contract/model_store.py). Without a store, versions load from ``CHECKPOINT_DIR`` as they lie there
(``latest``: its newest plain version). With a store, every version comes from the store: pulled into
``CHECKPOINT_DIR`` with the newest published student distilled from it, every file checked against its sha256
before anything is loaded (a tampered or partial download leaves nothing behind); ``latest`` is the newest plain
version published. Loading checks every hash again (facegen.model.checkpoints).

The *served* version is where ``"latest"`` jobs run. Other versions stay loaded for the jobs that name them (pinned
jobs): a job naming a version the worker lacks has it pulled and loaded first, and a version that cannot be had
fails that job with the reason (an unreachable store: a transient failure, retried). Once the versions loaded beside
the served one hold more than ``LOADED_MODELS_MAX_MIB`` of parameters and buffers, the least recently used go.

Following an alias: between batches, at most every ``MODEL_ALIAS_POLL_S``, one ``resolve`` of the alias (before a
batch starts: an idle worker looks when it next takes a job). A move makes its version the one ``"latest"`` jobs
ask for: the next batch of them pulls and loads it (its leader claimed alone meanwhile), then it is served;
the version served before stays loaded (least recently used first out) for jobs pinned to it. Rolling back is moving
the alias back (a version still loaded is served again at once). A store unreachable during a poll: one warning per
outage, and the served version goes on.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from facegen.contract.model_store import (
    SERVED_KIND,
    ModelStore,
    ModelStoreError,
    ModelStoreUnavailable,
    NotPublished,
    VerificationError,
    VersionRecord,
)
from facegen.contract.spec import LATEST
from facegen.model.checkpoints import CheckpointError, served_versions

from .engine import Engine
from .errors import PermanentJobError
from .metrics import WorkerMetrics
from .settings import WorkerSettings

log = logging.getLogger(__name__)
MIB = 1 << 20
T = TypeVar("T")
KeepAlive = Callable[[], None]  # ticks the liveness (and heartbeats the jobs claimed) while a version loads


def newest_plain(records: list[VersionRecord]) -> str | None:
    """The newest published diffusion version that is not a distilled student (``records``: oldest first)."""
    plain = [r.version for r in records if r.kind == SERVED_KIND and r.teacher is None]
    return plain[-1] if plain else None


def newest_student(records: list[VersionRecord], teacher: str) -> str | None:
    """The newest published student whose manifest's ``distillation.teacher`` is ``teacher``."""
    students = [r.version for r in records if r.kind == SERVED_KIND and r.teacher == teacher]
    return students[-1] if students else None


def engine_bytes(engine: Engine) -> int:
    """Bytes of the parameters and buffers of the engine's networks (its model's UNet, VAE and reader, its
    student's UNet), each tensor counted once (a student shares its teacher's VAE)."""
    modules = [module for model in (engine.model, engine.student) if model is not None
               for module in (model.unet, model.vae, model.reader) if module is not None]
    tensors = {id(t): t for module in modules for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def refusal(version: str, exc: Exception) -> PermanentJobError:
    """The failure of the jobs naming a version that cannot be loaded, after one line in the log."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    log.error("model %s cannot be served: %s", version, first)
    return PermanentJobError(f"model {version!r} is not served by this worker: {first}")


def run_keeping_alive(work: Callable[[], T], keep_alive: KeepAlive, interval_s: float) -> T:
    """``work()`` on a helper thread while this one calls ``keep_alive()`` every ``interval_s``; its result, or
    what it raised."""
    with ThreadPoolExecutor(1, thread_name_prefix="model-load") as helper:
        future = helper.submit(work)
        while True:
            try:
                return future.result(timeout=interval_s)
            except TimeoutError:
                keep_alive()


class ModelPool:
    """The engines of the versions loaded (least recently used first), the served one among them, and the store
    they come from (``None``: ``CHECKPOINT_DIR`` alone). Used from the worker's main thread; :meth:`snapshot` may
    be called from any thread."""

    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics, store: ModelStore | None):
        self.settings, self.metrics, self.store = settings, metrics, store
        self.engines: OrderedDict[str, Engine] = OrderedDict()
        self.sizes: dict[str, int] = {}  # engine_bytes of each loaded version
        self.served: Engine | None = None
        self.alias: str | None = None  # MODEL_VERSION, when it is an alias of the store (followed)
        self.target: str | None = None  # where the alias points, while that version is not loaded yet
        self.refused: str | None = None  # an alias target that cannot be had: not tried again until the alias moves
        self.next_poll = 0.0  # time.monotonic() of the next look at the alias
        self.store_down = False  # the last poll found the store unreachable (warned once per outage)
        self.lock = threading.Lock()  # guards engines and served against snapshot()
        self.changed = threading.Event()  # set when a version is loaded, unloaded or served (for the registry)

    # ---- start ----------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Resolve ``MODEL_VERSION``, pull it (with a store) and load it as the served version. Raises
        :class:`ModelStoreUnavailable` when the store cannot be reached, any other :class:`ModelStoreError`
        (:class:`VerificationError`, :class:`NotPublished`), :class:`CheckpointError` or what loading raises
        when the version cannot be served."""
        version = self.resolve_start()
        engine = self.load(version)
        self.add(engine)
        self.serve(engine)
        return engine

    def resolve_start(self) -> str:
        """The version ``MODEL_VERSION`` names now; an alias of the store is followed from then on."""
        name = self.settings.model_version
        if self.store is None:
            return served_versions(self.settings.checkpoint_dir, name)[0]
        if name == LATEST:
            version = newest_plain(self.store.versions())
            if version is None:
                raise NotPublished(f"no diffusion version in {self.store.location}")
            return version
        version = self.store.resolve(name)
        if version != name:
            self.alias = name
            self.next_poll = time.monotonic() + self.settings.model_alias_poll_s
            log.info("MODEL_VERSION %s is an alias of %s: it points at %s, looked at again every %g s", name,
                     self.store.location, version, self.settings.model_alias_poll_s)
        return version

    # ---- which engine a job runs on ---------------------------------------------------------------------
    def version_for(self, model: str) -> str:
        """The version a job naming ``model`` runs on: ``"latest"`` is the alias's new version while it is being
        loaded, else the served one."""
        if model != LATEST:
            return model
        return self.target or self.served.version

    def ready(self, model: str) -> Engine | None:
        """The loaded engine a job naming ``model`` runs on (now the most recently used), ``None`` when its version
        must be loaded first (:meth:`engine`)."""
        version = self.version_for(model)
        with self.lock:
            engine = self.engines.get(version)
            if engine is not None:
                self.engines.move_to_end(version)
        return engine

    def engine(self, model: str, keep_alive: KeepAlive) -> Engine:
        """The engine a job naming ``model`` runs on, pulled and loaded when it is not yet (``keep_alive`` is
        called meanwhile). The alias's new version becomes the served one once loaded; when it cannot be had, the
        reason is logged and ``"latest"`` jobs stay on the version served so far. Raises
        :class:`PermanentJobError` for a version that cannot be had, :class:`ModelStoreUnavailable` when the
        store cannot be reached (a transient failure)."""
        engine = self.ready(model)
        if engine is not None:
            return engine
        version = self.version_for(model)
        try:
            engine = self.acquire(version, keep_alive)
        except (PermanentJobError, ModelStoreUnavailable) as exc:
            if version != self.target:
                raise
            log.warning("\"latest\" stays on %s: alias %s points at %s, which cannot be served (%s)",
                        self.served.version, self.alias, version, exc)
            self.target = None
            if isinstance(exc, PermanentJobError):
                self.refused = version  # a store that could not be reached is tried again at the next poll
            return self.served
        if version == self.target:
            self.target = None
            self.serve(engine)
        self.evict(keep=engine)
        return engine

    def acquire(self, version: str, keep_alive: KeepAlive) -> Engine:
        """Pull and load ``version`` (warming up its compile buckets with ``COMPILE`` on) and keep it loaded."""
        interval = min(self.settings.heartbeat_ttl, self.settings.liveness_timeout) / 6
        try:
            engine = run_keeping_alive(lambda: self.load_fitting(version), keep_alive, interval)
        except ModelStoreUnavailable:
            raise
        except (ModelStoreError, CheckpointError, KeyError, ValueError, RuntimeError) as exc:
            raise refusal(version, exc) from None
        if engine.buckets:
            try:
                engine.warm_up(lambda rows, seconds: keep_alive())
            except Exception as exc:  # noqa: BLE001 - inductor/Triton failures have many types
                raise refusal(version, exc) from None
        self.add(engine)
        log.info("loaded model %s beside %s", version, self.served.version)
        return engine

    def load_fitting(self, version: str) -> Engine:
        """:meth:`load`; out of device memory, once more after unloading every version but the served one."""
        try:
            return self.load(version)
        except torch.OutOfMemoryError:
            log.warning("out of device memory loading model %s: unloading the versions beside %s", version,
                        self.served.version)
        self.evict(keep=self.served, budget=0)
        return self.load(version)

    def load(self, version: str) -> Engine:
        """Pull ``version`` and its newest student (with a store), then load it from ``CHECKPOINT_DIR``."""
        if self.store is not None:
            self.pull(version)
        s = self.settings
        return Engine(s.checkpoint_dir, version, s.device, s.precision, s.max_batch, s.compile)

    def pull(self, version: str) -> None:
        """Pull ``version`` and the newest published student of it into ``CHECKPOINT_DIR``, verified; counted by
        outcome."""
        try:
            self.store.pull(version, self.settings.checkpoint_dir)
            student = newest_student(self.store.versions(), version)
            if student is not None:
                self.store.pull(student, self.settings.checkpoint_dir)
        except ModelStoreError as exc:
            outcome = {NotPublished: "not_published", ModelStoreUnavailable: "unavailable",
                       VerificationError: "refused"}.get(type(exc), "error")
            self.metrics.model_pulls.labels(outcome).inc()
            raise
        self.metrics.model_pulls.labels("pulled").inc()

    # ---- the set of loaded versions -------------------------------------------------------------------------
    def add(self, engine: Engine) -> None:
        size = engine_bytes(engine)
        with self.lock:
            self.engines[engine.version] = engine
            self.sizes[engine.version] = size
        self.changed.set()
        self.metrics.loaded_model_bytes.labels(engine.version).set(size)

    def serve(self, engine: Engine) -> None:
        """Run ``"latest"`` jobs on ``engine`` (a loaded version) from the next batch on."""
        previous = self.served
        with self.lock:
            self.served = engine
        self.changed.set()
        self.metrics.model.info({"version": engine.version, "vae_version": engine.model.manifest.vae_version,
                                 "device": engine.device.type, "dtype": str(engine.dtype).removeprefix("torch.")})
        if previous is not None and previous is not engine:
            log.info("serving model %s for \"latest\" (alias %s); %s stays loaded for the jobs naming it",
                     engine.version, self.alias, previous.version)

    def evict(self, keep: Engine, budget: int | None = None) -> None:
        """Unload the least recently used versions but the served one and ``keep`` while those beside the served
        one hold more than ``budget`` bytes (``LOADED_MODELS_MAX_MIB``)."""
        budget = self.settings.loaded_models_max_mib * MIB if budget is None else budget
        evicted = []
        with self.lock:
            total = sum(size for version, size in self.sizes.items() if version != self.served.version)
            for version in list(self.engines):
                if total <= budget:
                    break
                if version in (self.served.version, keep.version):
                    continue
                del self.engines[version]
                total -= self.sizes.pop(version)
                evicted.append(version)
        if not evicted:
            return
        self.changed.set()
        for version in evicted:
            self.metrics.loaded_model_bytes.remove(version)
        gc.collect()
        if keep.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("unloaded model %s (LOADED_MODELS_MAX_MIB=%d)", ", ".join(evicted),
                 self.settings.loaded_models_max_mib)

    def snapshot(self) -> tuple[Engine, list[Engine]]:
        """The served engine and every loaded one, least recently used first."""
        with self.lock:
            return self.served, list(self.engines.values())

    # ---- following an alias ---------------------------------------------------------------------------------
    def follow_alias(self) -> None:
        """Between batches: where the alias points, looked up at most every ``MODEL_ALIAS_POLL_S``. A version
        still loaded is served at once; another is loaded by the next batch of ``"latest"`` jobs (:meth:`engine`)."""
        if self.alias is None or time.monotonic() < self.next_poll:
            return
        self.next_poll = time.monotonic() + self.settings.model_alias_poll_s
        try:
            version = self.store.resolve(self.alias)
        except ModelStoreError as exc:
            if not self.store_down:
                log.warning("cannot look up alias %s (%s): serving %s meanwhile", self.alias, exc,
                            self.served.version)
            self.store_down = True
            return
        if self.store_down:
            log.info("the model store answers again: alias %s points at %s", self.alias, version)
            self.store_down = False
        self.move_to(version)

    def move_to(self, version: str) -> None:
        """The alias points at ``version`` now."""
        if version == self.refused:
            return
        self.refused = None
        if version == self.served.version:
            self.target = None
            return
        with self.lock:
            loaded = self.engines.get(version)
        if loaded is not None:
            self.target = None
            self.serve(loaded)
            self.evict(keep=loaded)
            return
        if version != self.target:
            log.info("alias %s moved to %s: the next batch of \"latest\" jobs loads it", self.alias, version)
        self.target = version
