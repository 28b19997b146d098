"""Which model versions a worker holds in memory, and which one serves a given job.

The production version is loaded first. A background thread polls the registry every
`registry_poll_seconds`; a new production or canary version is loaded beside the ones serving,
then a new routing table replaces the old in one assignment, so a batch in flight finishes on
the models it started with and the next one uses the new table. A canary that is no longer
wanted stops serving before any such load starts. Versions no longer serving
are dropped (freed once the last batch using them ends). Canary jobs are picked by a stable
hash of the job id; a version that is not production or canary is never loaded or routed to.
A thread of its own tends the shared artifact cache every `CACHE_TEND_S` (see
`tend_artifact_cache`), so that a refresh busy converting a new version for many minutes, or a
long `registry_poll_seconds`, never leaves the folders being served unmarked for a pruner.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from segsvc.db import session_scope
from segsvc.ml import IMAGE_SIZE
from segsvc.ml.artifact_cache import PruneResult
from segsvc.ml.convert import (
    CONVERTED_KINDS,
    ConversionError,
    artifact_folder,
    check_model_file,
    mark_used,
)
from segsvc.ml.runtime import (
    Runtime,
    faithful_runtimes,
    load_runtime,
    resolve_kind,
    serving_batch_sizes,
)
from segsvc.models import ModelStatus, ModelVersion
from segsvc.services import artifacts, registry, rollout
from segsvc.settings import Settings
from worker.metrics_server import ServedModel, record_models

log = logging.getLogger(__name__)

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
# A version that failed to load (or failed at inference as a canary) is not retried on every
# poll, but it is after this long: the failure may have been passing (memory, storage, a
# conversion cut short), and a production version must not be skipped for the process's life.
BROKEN_RETRY_S = 300.0
# A canary is rejected in the registry (for the whole fleet) when its load fails this many
# times in a row on one worker, each try BROKEN_RETRY_S after the last, or at once when the
# failure is deterministic (its conversion failed twice with the same error). One passing
# failure on one worker (an OOM-killed conversion child, a storage error, a MemoryError at
# inference) only takes it out of that worker's routing until the retry; any other error at
# inference rejects it at once (the model's fault: its inputs are the shapes it was gated on).
CANARY_LOAD_ATTEMPTS = 2
# A canary's MemoryErrors at inference on one worker count towards rejecting it only within
# this long of each other: two a week apart say nothing more of the model than one does.
RUN_FAILURE_WINDOW_S = 3600.0
# How often a polling worker marks the artifact folders it serves from as used and prunes the
# cache: far inside the shortest grace period (SEG_ARTIFACT_GRACE_HOURS >= 1), so that no
# pruner, of this image or of another one sharing the volume, deletes a folder in service.
CACHE_TEND_S = 600.0


@dataclass(frozen=True)
class LoadedModel:
    """A model version in memory."""

    version: str
    sha256: str
    runtime: Runtime
    load_seconds: float


@dataclass(frozen=True)
class Wanted:
    """A version the registry says should serve."""

    version: str
    path: str
    sha256: str
    share: float
    faithful: tuple[str, ...] = ()  # runtimes measured faithful for these weights
    stale: tuple[str, ...] = ()  # measured faithful, but with other converters than ours


@dataclass(frozen=True)
class Routing:
    """An immutable routing table: swapped whole, never edited."""

    production: LoadedModel
    canary: LoadedModel | None = None
    share: float = 0.0


class NoModelError(RuntimeError):
    """No production model is registered."""


# Builds in a row when the registry keeps moving during loads (each may take minutes).
SETTLE_TRIES = 3
# After a first load failed (no version serves yet), how long other callers (each batch's claim)
# get the failure at once instead of loading (converting: minutes of CPU) again themselves:
# the readiness thread retries (`load(retry=True)`, its backoff is at most this long).
FIRST_LOAD_BACKOFF_S = 60.0


class ModelNotLoadedError(RuntimeError):
    """No version serves yet and the last try to load one failed moments ago."""


class ModelManager:
    """Loads serving versions, keeps them current, and routes each job to one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()  # serialises loads, never held while routing
        # Guards every replacement of the routing table (a compare-and-swap: read, check,
        # assign); held for a few instructions only, so the model thread may take it.
        self._swap = threading.Lock()
        self._routing: Routing | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._tender: threading.Thread | None = None
        # (version, sha256) -> when it failed to load or to run; see BROKEN_RETRY_S
        self._broken: dict[tuple[str, str], float] = {}
        # (version, sha256) -> load failures in a row; see CANARY_LOAD_ATTEMPTS
        self._load_failures: dict[tuple[str, str], int] = {}
        # (version, sha256) -> failures of a canary at inference; see _canary_failed
        self._run_failures: dict[tuple[str, str], list[float]] = {}  # their times
        self._first_load_failed: tuple[float, str] | None = None  # when, and why

    def load(self, *, retry: bool = False) -> LoadedModel:
        """Load the serving versions (once), warm them up and start polling the registry.

        Until a first load succeeds, one that failed less than FIRST_LOAD_BACKOFF_S ago is
        not tried again here (ModelNotLoadedError at once) unless `retry` (the readiness
        thread's retries): each batch's claim converted the model again, one after another,
        each holding the model thread for as long as the conversion took."""
        routing = self._routing
        if routing is None:
            failed = self._first_load_failed
            if (
                not retry
                and failed is not None
                and time.monotonic() - failed[0] < (FIRST_LOAD_BACKOFF_S)
            ):
                raise ModelNotLoadedError(f"the model failed to load moments ago: {failed[1]}")
            with self._lock:
                if self._routing is None:
                    try:
                        # Settled, as a poll's is: the first load converts for minutes too,
                        # and a canary rejected (or a production rolled back) meanwhile must
                        # not serve from the read made before it until the first poll.
                        self._switch(self._settled(self._wanted(), None))
                    except Exception as exc:
                        self._first_load_failed = (time.monotonic(), repr(exc)[:300])
                        raise
                routing = self._routing
                assert routing is not None
            self._start_polling()
        return routing.production

    @property
    def loaded(self) -> bool:
        """True once a model is in memory."""
        return self._routing is not None

    @property
    def routing(self) -> Routing:
        """The current routing table (loads on first use)."""
        self.load()
        assert self._routing is not None
        return self._routing

    def model_for(self, job_id: uuid.UUID) -> LoadedModel:
        """The version that serves `job_id`: the canary for its hash share, else production."""
        routing = self.routing
        if routing.canary is not None and rollout.routes_to_canary(job_id, routing.share):
            return routing.canary
        return routing.production

    def refresh(self) -> bool:
        """Poll the registry once and switch if it changed; True when the table changed."""
        wanted = self._wanted()
        with self._lock:
            current = self._routing
            if current is not None and _same(current, wanted):
                return False
            if current is not None and _drops_canary(current, wanted):
                # A canary no longer wanted stops serving now, not after a new version has
                # loaded (minutes, for a conversion): `_build` still reuses what `current` holds.
                self._switch(Routing(production=current.production))
            new = self._switch(self._settled(wanted, current))
        log.info(
            "serving %s%s",
            new.production.version,
            f" + canary {new.canary.version} at {new.share:.0%}" if new.canary else "",
        )
        del current
        gc.collect()  # free the dropped versions now rather than at some later collection
        return True

    def tend_artifact_cache(self) -> PruneResult | None:
        """Mark the artifact folders of the versions in memory used, then prune the cache of
        what no servable version needs; None when that failed (logged: serving goes on)."""
        routing = self._routing
        held = [] if routing is None else [routing.production, routing.canary]
        for model in held:
            if model is not None and model.sha256 and model.runtime.name in CONVERTED_KINDS:
                mark_used(
                    artifact_folder(self.settings.artifact_dir, model.sha256, model.runtime.name)
                )
        try:
            result = artifacts.prune_artifact_cache(self.settings)
        except Exception:
            log.warning("could not prune the artifact cache", exc_info=True)
            return None
        if result.removed:
            log.info(
                "pruned %d unused artifact folders and files (%.0f MB)",
                len(result.removed),
                result.freed_bytes / 1e6,
            )
        return result

    def close(self) -> None:
        """Stop polling (the loaded models stay usable)."""
        self._stop.set()
        for thread in (self._poller, self._tender):
            if thread is not None:
                thread.join(timeout=10)

    # --- internals ------------------------------------------------------------------------
    def _start_polling(self) -> None:
        # With polling off (SEG_REGISTRY_POLL_SECONDS=0) the cache is still tended: the worker
        # serves from its folders for as long as it runs.
        if self._tender is not None:
            return
        with self._lock:
            if self._tender is None:
                if self.settings.registry_poll_seconds > 0:
                    self._poller = threading.Thread(
                        target=self._poll, name="registry-poll", daemon=True
                    )
                    self._poller.start()
                self._tender = threading.Thread(
                    target=self._tend, name="artifact-tend", daemon=True
                )
                self._tender.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.registry_poll_seconds):
            try:
                self.refresh()
            except Exception:  # keep serving what we have; the next poll tries again
                log.warning("registry poll failed; still serving the loaded models", exc_info=True)

    def _tend(self) -> None:
        # At start too: a new image brings new converter fingerprints.
        while True:
            try:
                self.tend_artifact_cache()
            except Exception:  # a shared volume's hiccup: the next pass marks them again
                log.warning("could not mark the served artifact folders used", exc_info=True)
            if self._stop.wait(CACHE_TEND_S):
                return

    def _wanted(self) -> tuple[Wanted, Wanted | None]:
        with session_scope(self.settings) as session:
            rows = registry.serving_versions(session=session)
        production = next((r for r in rows if r.status == ModelStatus.PRODUCTION), None)
        canary = next(
            (r for r in rows if r.status == ModelStatus.CANARY and r.traffic_share > 0), None
        )
        want_canary = _wanted(canary) if canary is not None else None
        if want_canary is not None and self._is_broken(want_canary.version, want_canary.sha256):
            want_canary = None
        current = self._routing
        if current is not None and (
            production is None or self._failed_to_load(production.version, production.sha256)
        ):
            # Keep serving rather than stop on a registry gap or an artifact that will not load.
            # (Not on a canary's passing failure at inference: promoted since, the version the
            # fleet serves kept this worker on the archived one for BROKEN_RETRY_S.)
            p = current.production
            return Wanted(p.version, "", p.sha256, 1.0), want_canary
        if production is None:
            raise NoModelError("No production model; run `segsvc models init`.")
        return _wanted(production), want_canary

    def _settled(self, wanted: tuple[Wanted, Wanted | None], current: Routing | None) -> Routing:
        """`_build` for `wanted`, then again while the registry moved during the load (a
        conversion takes minutes): a canary rejected or a production rolled back meanwhile is
        not installed from the stale read, to serve until the next poll. What either table
        holds is reused; only a version neither holds is loaded."""
        new = self._build(wanted, current=current)
        for _ in range(SETTLE_TRIES):
            try:
                fresh = self._wanted()
            except Exception:  # the registry cannot say now: keep what took minutes to load
                log.warning("could not re-read the registry after a load", exc_info=True)
                break
            if _same(new, fresh):
                break
            log.info("the registry changed while a version loaded; following it")
            new = self._build(fresh, current=current, also=new)
        return new

    def _build(
        self,
        wanted: tuple[Wanted, Wanted | None],
        current: Routing | None,
        also: Routing | None = None,
    ) -> Routing:
        """Load what is not in memory yet, reusing what is (a promoted canary is not reloaded):
        what `current`, and `also` (a table just built), hold."""
        have = {
            m.version: m
            for table in (current, also)
            if table is not None
            for m in (table.production, table.canary)
            if m is not None
        }
        want_prod, want_canary = wanted
        production = have.get(want_prod.version) or self._load(want_prod)
        canary = None
        if want_canary is not None and self._is_broken(want_canary.version, want_canary.sha256):
            want_canary = None  # failed after `wanted` was read: never load or route it again
        if want_canary is not None and want_canary.version != want_prod.version:
            try:
                canary = have.get(want_canary.version) or self._guard(self._load(want_canary))
            except Exception as exc:  # this worker serves production only meanwhile
                self._canary_load_failed(want_canary, exc)
        share = want_canary.share if canary is not None and want_canary is not None else 0.0
        return Routing(production=production, canary=canary, share=share)

    def _guard(self, model: LoadedModel) -> LoadedModel:
        """The canary with a runtime that takes it out of service if it raises."""
        guarded = _CanaryRuntime(
            model.runtime, lambda exc: self._canary_failed(model.version, model.sha256, exc)
        )
        return replace(model, runtime=guarded)

    def _switch(self, new: Routing) -> Routing:
        """Install a table built from an earlier read, without a canary that failed since
        (a refresh that read the registry before the failure must not put it back)."""
        with self._swap:
            canary = new.canary
            if canary is not None and self._is_broken(canary.version, canary.sha256):
                new = Routing(production=new.production)
            old, self._routing = self._routing, new  # the atomic switch
            # Under the lock: two switches (a refresh, a canary failing meanwhile) publish in
            # the order they installed their tables, so /metrics never keeps the older one.
            _publish(old, new)
        return new

    def _canary_failed(self, version: str, sha256: str, exc: Exception) -> None:
        """Stop routing to a canary that failed at inference: here at once, and in the registry
        too unless the failure was the host's (memory) and its first on this worker."""
        key = (version, sha256)
        with self._swap:  # not `_lock`: a refresh may hold that through a minutes-long load
            routing = self._routing
            if routing is None or routing.canary is None or routing.canary.version != version:
                return  # promoted meanwhile, or already dropped
            self._broken[key] = time.monotonic()
            now = time.monotonic()
            recent = [t for t in self._run_failures.get(key, []) if now - t < RUN_FAILURE_WINDOW_S]
            self._run_failures[key] = recent = [*recent, now]
            failures = len(recent)
            # Built from the table of this instant, so a production switched in meanwhile stays.
            self._routing = Routing(production=routing.production)  # the batch retries on it
            _publish(routing, self._routing)
        if isinstance(exc, MemoryError) and failures < CANARY_LOAD_ATTEMPTS:
            # One worker short of memory says nothing of the model: the canary's verdict (and
            # the retraining run behind it) must not be thrown away for it.
            log.error(
                "canary %s ran out of memory at inference; serving production only, trying "
                "again in %.0fs",
                version,
                BROKEN_RETRY_S,
            )
            return
        log.error("canary %s failed at inference (%r); serving production only", version, exc)
        self._reject_canary(version, f"failed at inference: {exc!r}"[:500])

    def _canary_load_failed(self, wanted: Wanted, exc: Exception) -> None:
        """Reject the canary fleet-wide only when its failure to load is not a passing one."""
        failures = self._load_failures.get((wanted.version, wanted.sha256), 0)
        deterministic = isinstance(exc, ConversionError) and exc.deterministic
        if not deterministic and failures < CANARY_LOAD_ATTEMPTS:
            log.exception(
                "could not load canary %s (try %d of %d); serving production only, trying "
                "again in %.0fs",
                wanted.version,
                failures,
                CANARY_LOAD_ATTEMPTS,
                BROKEN_RETRY_S,
            )
            return
        how = (
            "its conversion fails the same way every time"
            if deterministic
            else (f"{failures} tries {BROKEN_RETRY_S:.0f}s apart")
        )
        log.exception("could not load canary %s (%s); rejecting it", wanted.version, how)
        self._reject_canary(wanted.version, f"{rollout.LOAD_FAILURE} ({how}): {exc}")

    def _reject_canary(self, version: str, why: str) -> None:
        try:
            with session_scope(self.settings) as session:
                row = session.get(ModelVersion, version)
                if row is not None and row.status == ModelStatus.CANARY:
                    rollout.reject(
                        session=session,
                        version=version,
                        reason=f"canary rolled back by worker {WORKER_ID}: {why}",
                    )
        except Exception:  # the registry is unreachable: this worker alone stops routing to it
            log.warning("could not record the rejection of canary %s", version, exc_info=True)

    def _load(self, wanted: Wanted) -> LoadedModel:
        key = (wanted.version, wanted.sha256)
        try:
            loaded = load_model_version(
                self.settings,
                version=wanted.version,
                path=wanted.path,
                sha256=wanted.sha256,
                faithful=wanted.faithful,
                stale=wanted.stale,
            )
        except Exception:
            self._broken[key] = time.monotonic()
            self._load_failures[key] = self._load_failures.get(key, 0) + 1
            raise
        self._load_failures.pop(key, None)
        return loaded

    def _failed_to_load(self, version: str, sha256: str) -> bool:
        """True while a recent failure of this version was a failure to load it."""
        return self._is_broken(version, sha256) and (version, sha256) in self._load_failures

    def _is_broken(self, version: str, sha256: str) -> bool:
        """True while a failure of this version is recent (see BROKEN_RETRY_S)."""
        failed = self._broken.get((version, sha256))
        return failed is not None and time.monotonic() - failed < BROKEN_RETRY_S


def _publish(old: Routing | None, new: Routing) -> None:
    """Publish the versions `new` serves (`segsvc_model_info`, each one's load time) on every
    switch, not only at the first load: after a canary started, a promotion or a rollback the
    series named the version the worker started with. And drop the per-version series of the
    versions `old` served (`record_models` keeps those `new` serves)."""
    dropped = [m.version for m in (() if old is None else (old.production, old.canary)) if m]
    record_models(
        _served(new.production),
        _served(new.canary) if new.canary is not None else None,
        dropped=dropped,
    )


def _served(model: LoadedModel) -> ServedModel:
    return ServedModel(model.version, model.sha256, model.runtime.name, model.load_seconds)


class _CanaryRuntime:
    """A canary's runtime: an error at inference calls `on_error` before it propagates."""

    def __init__(self, inner: Runtime, on_error: Callable[[Exception], None]) -> None:
        self.name = inner.name
        self.inner = inner
        self._on_error = on_error

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        try:
            return self.inner.predict(batch)
        except Exception as exc:
            self._on_error(exc)
            raise


def _wanted(row: ModelVersion) -> Wanted:
    faithful = faithful_runtimes(row.metrics)
    return Wanted(
        row.version,
        row.path,
        row.sha256,
        float(row.traffic_share),
        faithful.trusted,
        faithful.stale,
    )


def _drops_canary(current: Routing, wanted: tuple[Wanted, Wanted | None]) -> bool:
    """True when the current canary serves on in neither role (rejected, rolled back, or
    replaced by another canary); a promoted one becomes production without a load."""
    prod, canary = wanted
    if current.canary is None or current.canary.version == prod.version:
        return False
    return canary is None or canary.version != current.canary.version


def _same(current: Routing, wanted: tuple[Wanted, Wanted | None]) -> bool:
    prod, canary = wanted
    if current.production.version != prod.version:
        return False
    if canary is None:
        return current.canary is None
    return (
        current.canary is not None
        and current.canary.version == canary.version
        and current.share == canary.share
    )


def load_model_version(
    settings: Settings,
    *,
    version: str,
    path: str,
    sha256: str,
    faithful: Sequence[str] = (),
    stale: Sequence[str] = (),
) -> LoadedModel:
    """Load one version with the configured runtime and warm it up. Its file must still have
    the version's sha256 (`ModelFileMismatchError` otherwise, a failure to load): a file
    replaced at the path (a `git pull` of a new baseline, a `segsvc train --out` over it) holds
    other weights, which must not serve, or be cached, under this version's name."""
    started = time.perf_counter()
    _check_file(version, path, sha256)  # before minutes of conversion, or a cached artifact
    runtime = load_runtime(
        path,
        kind=settings.runtime,
        threads=settings.inference_threads,
        sha256=sha256 or None,
        artifact_dir=settings.artifact_dir,
        batch_sizes=serving_batch_sizes(settings.batch_max_size),
        faithful=faithful,
    )
    runtime.predict(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))  # trace/compile now
    # Again: a Keras runtime read the path itself, which may have been replaced in between
    # (a conversion checks the very bytes it converts).
    _check_file(version, path, sha256)
    seconds = time.perf_counter() - started
    log.info("loaded model %s (%s) in %.1fs", version, runtime.name, seconds)
    would = resolve_kind(settings.runtime, (*faithful, *stale))
    if would != resolve_kind(settings.runtime, faithful):  # the old measure chose another
        log.warning(
            "model %s: %s was measured faithful with other converters than this worker's "
            "(another TensorFlow or LiteRT), so it serves %s until it is measured again here: "
            "`segsvc models check-runtimes --version %s --data <labelled images>` in this "
            "worker's image",
            version,
            would,
            runtime.name,
            version,
        )
    return LoadedModel(version=version, sha256=sha256, runtime=runtime, load_seconds=seconds)


def _check_file(version: str, path: str, sha256: str) -> None:
    try:
        check_model_file(path, sha256)
    except Exception as exc:
        log.error("model %s will not be served: %s", version, exc)
        raise
