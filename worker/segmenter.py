"""The Segmenter: loads the serving model once per process and runs micro-batches of jobs."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from segsvc.db import session_scope
from segsvc.ml import IMAGE_SIZE
from segsvc.ml.preprocess import (
    class_fractions,
    encode_mask_png,
    normalize,
    postprocess,
    preprocess_bytes,
)
from segsvc.ml.runtime import Runtime, load_runtime
from segsvc.models import Job
from segsvc.services import jobs as job_service
from segsvc.services import registry
from segsvc.settings import Settings, get_settings

log = logging.getLogger(__name__)

INPUT_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3


@dataclass
class LoadedModel:
    """A model version in memory."""

    version: str
    sha256: str
    runtime: Runtime


class NoModelError(RuntimeError):
    """No production model is registered."""


class Segmenter:
    """`load / predict / healthcheck` around the model, plus running batches of jobs."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="seg-post")

    # --- model --------------------------------------------------------------------------
    def load(self) -> LoadedModel:
        """Load the production version from the registry (once)."""
        with self._lock:
            if self._model is None:
                self._model = self._load_production()
                self.healthcheck()  # warm-up: trace/compile now, not on the first job
            return self._model

    def _load_production(self) -> LoadedModel:
        with session_scope(self.settings) as session:
            row = registry.production_version(session=session)
            if row is None:
                raise NoModelError("No production model; run `segsvc models init`.")
            version, path, sha = row.version, row.path, row.sha256
        started = time.perf_counter()
        runtime = load_runtime(
            path, kind=self.settings.runtime, threads=self.settings.inference_threads
        )
        log.info("loaded model %s (%s) in %.1fs", version, runtime.name,
                 time.perf_counter() - started)
        return LoadedModel(version=version, sha256=sha, runtime=runtime)

    def healthcheck(self) -> bool:
        """True once a model is loaded and answers."""
        model = self._model
        if model is None:
            return False
        out = model.runtime.predict(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))
        return bool(out.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3))

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Logits for a batch of model inputs."""
        return self.load().runtime.predict(batch)

    # --- jobs -------------------------------------------------------------------------------
    def run_jobs(self, job_ids: Sequence[str]) -> dict[str, int]:
        """Claim, predict in one forward pass, store results; returns counts by outcome."""
        ids = _parse_ids(job_ids)
        model = self.load()
        with session_scope(self.settings) as session:
            claimed = job_service.claim_jobs(
                session=session, job_ids=ids, lease_seconds=self.settings.job_lease_seconds
            )
        if not claimed:
            return {"claimed": 0, "succeeded": 0, "failed": 0}
        inputs, ok, failed = [], [], []
        for job in claimed:
            try:
                inputs.append(self._model_input(job))
                ok.append(job)
            except Exception as exc:
                failed.append((job, exc))
        self._fail_poison(failed)
        if ok:
            started = time.perf_counter()
            logits = model.runtime.predict(np.stack(inputs))
            predict_ms = (time.perf_counter() - started) * 1000.0
            results = list(self._pool.map(
                lambda pair: self._result(pair[0], pair[1], model, predict_ms, len(ok)),
                zip(ok, logits, strict=True),
            ))
            with session_scope(self.settings) as session:
                job_service.complete_jobs(session=session, results=results)
        return {"claimed": len(claimed), "succeeded": len(ok), "failed": len(failed)}

    def _model_input(self, job: job_service.Claimed) -> npt.NDArray[np.float32]:
        if job.model_input is not None and len(job.model_input) == INPUT_BYTES:
            pixels = np.frombuffer(job.model_input, dtype=np.uint8)
            return normalize(pixels.reshape(IMAGE_SIZE, IMAGE_SIZE, 3))
        # Rows written without a prepared input: decode the stored upload.
        with session_scope(self.settings) as session:
            row = session.get(Job, job.id)
            data = row.input_bytes if row is not None else None
        if not data:
            raise ValueError("the job has no stored input image")
        return preprocess_bytes(data).array

    def _result(
        self, job: job_service.Claimed, logits: npt.NDArray[np.float32], model: LoadedModel,
        predict_ms: float, batch_size: int,
    ) -> dict[str, Any]:
        mask = postprocess(logits, job.width, job.height)
        return {
            "id": job.id,
            "lease_token": job.lease_token,
            "mask_png": encode_mask_png(mask),
            "class_fractions": class_fractions(mask),
            "model_version": model.version,
            "queue_ms": (job.started_at - job.created_at).total_seconds() * 1000.0,
            "predict_ms": predict_ms,
            "batch_size": batch_size,
        }

    def _fail_poison(self, failed: list[tuple[job_service.Claimed, Exception]]) -> None:
        if not failed:
            return
        with session_scope(self.settings) as session:
            for job, exc in failed:
                log.warning("job %s has a bad stored image: %s", job.id, exc)
                job_service.fail_job(
                    session=session, job_id=job.id, code="poison_input",
                    message=f"The stored image could not be processed: {exc}",
                    lease_token=job.lease_token,
                )


def _parse_ids(raw: Sequence[str]) -> list[uuid.UUID]:
    out = []
    for value in raw:
        try:
            out.append(uuid.UUID(str(value)))
        except ValueError:
            log.warning("ignoring malformed job id %r", value)
    return out
