"""Pydantic models of the API's JSON bodies; `api/openapi.py` turns them into the OpenAPI document
(the handlers build plain dicts; `tests/api/test_openapi.py` checks they match these)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Error(BaseModel):
    """Every 4xx/5xx answer."""

    error: str = Field(description="Machine-readable code, e.g. `rate_limited`.")
    message: str = Field(description="What went wrong, for people.")


class JobUrls(BaseModel):
    self: str
    mask: str
    overlay: str


class JobInput(BaseModel):
    width: int
    height: int
    content_type: Literal["image/jpeg", "image/png", "image/webp"]
    sha256: str


class JobError(BaseModel):
    code: str = Field(description="`worker_lost`, `poison_input`, `canceled`, ...")
    message: str | None


class JobResult(BaseModel):
    class_fractions: list[float] = Field(description="Share of pixels per class (pet, bg, border).")


class JobMetrics(BaseModel):
    queue_ms: float | None
    predict_ms: float | None
    batch_size: int | None


JobStatusName = Literal["queued", "running", "succeeded", "failed", "canceled"]


class Job(BaseModel):
    """A job as `GET /v1/jobs/{job_id}` returns it."""

    id: str
    status: JobStatusName
    created_at: str | None
    started_at: str | None
    completed_at: str | None
    model_version: str | None
    attempts: int
    error: JobError | None
    input: JobInput
    result: JobResult | None
    metrics: JobMetrics
    urls: JobUrls


class AcceptedJob(BaseModel):
    """The answer to a submission (202, or 200 when an Idempotency-Key replays)."""

    id: str
    status: JobStatusName
    created_at: str | None
    urls: JobUrls


class WebhookFields(BaseModel):
    """The optional webhook subscription of a submission (see docs/webhooks.md)."""

    webhook: str | None = Field(
        None,
        description="A public http(s) URL to POST the job's events to (signed, retried).",
        json_schema_extra={"format": "uri"},
    )
    webhook_events: str | None = Field(
        None,
        description="Comma-separated events to send: `start`, `completed` (default: completed).",
    )


class JobSubmission(WebhookFields):
    """The multipart form of `POST /v1/jobs`."""

    image: bytes = Field(
        description="A JPEG, PNG or WebP photo.", json_schema_extra={"format": "binary"}
    )


class AcceptedBatch(BaseModel):
    """The answer to a batch submission: one job per image, in upload order."""

    jobs: list[AcceptedJob]


class BatchSubmission(WebhookFields):
    """The multipart form of `POST /v1/jobs/batch`: the field `image` once per photo; the
    webhook fields apply to every job."""

    image: list[bytes] = Field(
        description="JPEG, PNG or WebP photos (repeat the field).",
        json_schema_extra={"items": {"type": "string", "format": "binary"}},
    )


class JobList(BaseModel):
    """Several jobs, as `GET /v1/jobs?ids=` returns them."""

    jobs: list[Job]
    not_found: list[str] = Field(description="Asked-for ids this key has no job for.")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]
