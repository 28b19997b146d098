"""Which model versions a worker holds in memory, and which one serves a given job.

Today: the production version, loaded once. The rollout issue extends this with canary routing
(a stable hash of the job id) and hot swaps (poll the registry, load beside, switch atomically).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np

from segsvc.db import session_scope
from segsvc.ml import IMAGE_SIZE
from segsvc.ml.runtime import Runtime, load_runtime
from segsvc.services import registry
from segsvc.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model version in memory."""

    version: str
    sha256: str
    runtime: Runtime
    load_seconds: float


class NoModelError(RuntimeError):
    """No production model is registered."""


class ModelManager:
    """Loads serving versions and routes each job to one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._production: LoadedModel | None = None

    def load(self) -> LoadedModel:
        """Load the production version (once) and warm it up."""
        with self._lock:
            if self._production is None:
                self._production = self._load_production()
            return self._production

    @property
    def loaded(self) -> bool:
        """True once a model is in memory."""
        return self._production is not None

    def model_for(self, job_id: uuid.UUID) -> LoadedModel:
        """The version that serves `job_id`."""
        return self.load()

    def _load_production(self) -> LoadedModel:
        with session_scope(self.settings) as session:
            row = registry.production_version(session=session)
            if row is None:
                raise NoModelError("No production model; run `segsvc models init`.")
            version, path, sha = row.version, row.path, row.sha256
        return load_model_version(self.settings, version=version, path=path, sha256=sha)


def load_model_version(settings: Settings, *, version: str, path: str, sha256: str) -> LoadedModel:
    """Load one version with the configured runtime and warm it up."""
    started = time.perf_counter()
    runtime = load_runtime(path, kind=settings.runtime, threads=settings.inference_threads)
    runtime.predict(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))  # trace/compile now
    seconds = time.perf_counter() - started
    log.info("loaded model %s (%s) in %.1fs", version, runtime.name, seconds)
    return LoadedModel(version=version, sha256=sha256, runtime=runtime, load_seconds=seconds)
