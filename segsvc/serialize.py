"""The public JSON view of a job: the API's response and the webhook payload."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from segsvc.models import Job


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC, or None."""
    return value.isoformat().replace("+00:00", "Z") if value else None


def job_urls(job_id: object, *, base_url: str) -> dict[str, str]:
    """Links to a job and its results."""
    root = f"{base_url.rstrip('/')}/v1/jobs/{job_id}"
    return {"self": root, "mask": f"{root}/mask.png", "overlay": f"{root}/overlay.png"}


def job_json(job: Job, *, base_url: str) -> dict[str, Any]:
    """Everything a client may know about a job (never the image or mask bytes)."""
    error = {"code": job.error_code, "message": job.error_message} if job.error_code else None
    return {
        "id": str(job.id),
        "status": job.status,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "completed_at": iso(job.completed_at),
        "model_version": job.model_version,
        "attempts": job.attempts,
        "error": error,
        "input": {
            "width": job.input_width,
            "height": job.input_height,
            "content_type": job.input_content_type,
            "sha256": job.input_sha256,
        },
        "result": {"class_fractions": job.class_fractions} if job.class_fractions else None,
        "metrics": {
            "queue_ms": job.queue_ms,
            "predict_ms": job.predict_ms,
            "batch_size": job.batch_size,
        },
        "urls": job_urls(job.id, base_url=base_url),
    }
