"""Jobs with webhooks, moved through their lifecycle by the real services (no model)."""

from __future__ import annotations

import io
import uuid

from PIL import Image

from segsvc.db import session_scope
from segsvc.images import validate_image
from segsvc.services import jobs as job_service
from segsvc.settings import Settings


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (120, 80, 40)).save(buf, format="PNG")
    return buf.getvalue()


def make_job(
    settings: Settings,
    url: str | None,
    events: list[str] | None = None,
    client_id: uuid.UUID | None = None,
    request_id: str | None = None,
) -> uuid.UUID:
    image = validate_image(png_bytes(), max_bytes=10**6, max_pixels=10**6)
    with session_scope(settings) as session:
        job = job_service.create_job(
            session=session,
            image=image,
            webhook_url=url,
            webhook_events=events,
            client_id=client_id,
            request_id=request_id,
        )
        return job.id


def start_job(settings: Settings, job_id: uuid.UUID) -> job_service.Claimed:
    with session_scope(settings) as session:
        (claimed,) = job_service.claim_jobs(session=session, job_ids=[job_id], lease_seconds=60)
    return claimed


def finish_job(settings: Settings, claimed: job_service.Claimed) -> None:
    result = {
        "id": claimed.id,
        "lease_token": claimed.lease_token,
        "mask_png": b"",
        "class_fractions": [0.5, 0.4, 0.1],
        "model_version": "test-v1",
        "queue_ms": 1.0,
        "predict_ms": 2.0,
        "batch_size": 1,
    }
    with session_scope(settings) as session:
        assert len(job_service.complete_jobs(session=session, results=[result])) == 1
