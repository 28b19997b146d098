"""The Segmenter: loads the serving model once per process and runs micro-batches of jobs."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
from segsvc.models import Job
from segsvc.services import jobs as job_service
from segsvc.settings import Settings, get_settings
from worker.model_manager import LoadedModel, ModelManager

log = logging.getLogger(__name__)

INPUT_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3


class Segmenter:
    """`load / predict / healthcheck` around the models, plus running batches of jobs."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.models = ModelManager(self.settings)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="seg-post")

    # --- model --------------------------------------------------------------------------
    def load(self) -> LoadedModel:
        """Load the serving model(s); the worker is ready only after this."""
        return self.models.load()

    def healthcheck(self) -> bool:
        """True once a model is loaded and answers."""
        if not self.models.loaded:
            return False
        out = self.load().runtime.predict(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))
        return bool(out.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3))

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Logits for a batch of model inputs (production model)."""
        return self.load().runtime.predict(batch)

    # --- jobs -------------------------------------------------------------------------------
    def run_jobs(self, job_ids: Sequence[str]) -> dict[str, int]:
        """Claim, predict in one forward pass, store results; returns counts by outcome."""
        ids = _parse_ids(job_ids)
        self.load()
        with session_scope(self.settings) as session:
            claimed = job_service.claim_jobs(
                session=session, job_ids=ids, lease_seconds=self.settings.job_lease_seconds
            )
        if not claimed:
            return {"claimed": 0, "succeeded": 0, "failed": 0}
        groups: dict[str, list[tuple[job_service.Claimed, npt.NDArray[np.float32]]]] = {}
        models: dict[str, LoadedModel] = {}
        failed = []
        for job in claimed:
            try:
                model = self.models.model_for(job.id)
                groups.setdefault(model.version, []).append((job, self._model_input(job)))
                models[model.version] = model
            except Exception as exc:
                failed.append((job, exc))
        self._fail_poison(failed)
        results = []
        for version, items in groups.items():
            results.extend(self._run_group(models[version], items))
        with session_scope(self.settings) as session:
            job_service.complete_jobs(session=session, results=results)
        return {"claimed": len(claimed), "succeeded": len(results), "failed": len(failed)}

    def _run_group(
        self, model: LoadedModel, items: list[tuple[job_service.Claimed, npt.NDArray[np.float32]]]
    ) -> list[dict[str, Any]]:
        """One forward pass for jobs served by the same version."""
        started = time.perf_counter()
        logits = model.runtime.predict(np.stack([x for _, x in items]))
        predict_ms = (time.perf_counter() - started) * 1000.0
        return list(self._pool.map(
            lambda pair: self._result(pair[0], pair[1], model, predict_ms, len(items)),
            zip([job for job, _ in items], logits, strict=True),
        ))

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
