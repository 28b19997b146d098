"""Pydantic models of the API's JSON bodies; `api/openapi.py` turns them into the OpenAPI document
(the handlers build plain dicts; `tests/api/test_openapi.py` checks they match these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema


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


Rating = Literal["good", "bad"]


def _one_field_at_least(schema: dict[str, Any]) -> None:
    """A form of optional fields, one of which must be sent: no `default: null` (a multipart
    form has no null; a field left out is not sent), and `anyOf` one of them required."""
    properties: dict[str, dict[str, Any]] = schema["properties"]
    for prop in properties.values():
        prop.pop("default", None)
    schema["anyOf"] = [{"required": [name]} for name in properties]


class FeedbackSubmission(BaseModel):
    """The multipart form of `POST /v1/jobs/{job_id}/feedback`: a corrected mask, a rating, or
    both (at least one)."""

    model_config = ConfigDict(json_schema_extra=_one_field_at_least)

    mask: bytes | SkipJsonSchema[None] = Field(
        None,
        description="A single-channel (8-bit grey or palette) PNG the size of the job's input, "
        "each pixel 0 (pet), 1 (background) or 2 (border); sent as a file, up to the upload "
        "size limit. It becomes a training label.",
        json_schema_extra={"format": "binary"},
    )
    rating: Rating | SkipJsonSchema[None] = Field(
        None, description="How the mask looked (case-insensitive; blank counts as none)."
    )


class Feedback(BaseModel):
    """Stored feedback (never the mask bytes)."""

    id: str
    job_id: str
    model_version: str | None = Field(description="The version that made the job's mask.")
    rating: Rating | None
    has_mask: bool
    created_at: str | None


class WebhookSecret(BaseModel):
    """The caller's current signing secret."""

    key: str = Field(description="`whsec_...`: verify the `webhook-signature` header with it.")


class RotatedWebhookSecret(WebhookSecret):
    """A new current secret; the previous one keeps signing for a while."""

    previous_valid_for_seconds: int = Field(
        description="How long deliveries are signed with the previous secret as well."
    )


class WebhookAttempt(BaseModel):
    """One delivery attempt of a message."""

    attempted_at: str | None
    status_code: int | None = Field(description="The receiver's HTTP status (None: no answer).")
    duration_ms: float | None
    error: str | None
    response_body: str | None = Field(description="The start of the receiver's answer.")
    next_attempt_at: str | None


class WebhookMessage(BaseModel):
    """A webhook message of a job and every attempt to deliver it."""

    id: str
    event_type: str = Field(description="`job.started`, `job.completed`, ...")
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    created_at: str | None
    next_attempt_at: str | None
    last_attempt_at: str | None
    completed_at: str | None
    attempt_log: list[WebhookAttempt]


class WebhookMessageList(BaseModel):
    """A job's webhook messages, oldest first."""

    messages: list[WebhookMessage]


ModelStatusName = Literal["candidate", "rejected", "canary", "production", "archived"]


class ModelVersionUrls(BaseModel):
    """Where to look at a version."""

    comparison: str | None = Field(
        description="Its comparison sheet (photo | truth | production | candidate, PNG), drawn "
        "by the retraining run that made it; null for a version without one."
    )


class ModelVersion(BaseModel):
    """A model version in the registry."""

    version: str
    status: ModelStatusName
    traffic_share: float = Field(description="Share of new jobs it serves (0..1).")
    metrics: dict[str, Any]
    parent_version: str | None
    reason: str | None = Field(description="Why it last changed status.")
    sha256: str
    created_at: str | None
    promoted_at: str | None
    retired_at: str | None
    file_deleted_at: str | None = Field(description="When its model file was pruned, if it was.")
    urls: ModelVersionUrls


class TrainingRun(BaseModel):
    """A retraining run's summary."""

    id: str
    status: str = Field(
        description="`running`, `completed`, `failed`, `skipped`, or `interrupted`: its row "
        "says running but no process holds the retraining lock (the process running it "
        "ended; the next run marks it failed)."
    )
    trigger: str = Field(description="`schedule` or `manual`.")
    reason: str | None
    started_at: str | None
    duration_s: float | None
    labels: int = Field(description="Corrected masks it trained on.")
    data_counts: dict[str, Any] | None
    production_version: str | None
    candidate_version: str | None
    production_mean_iou: float | None
    candidate_mean_iou: float | None
    log_tail: list[str] = Field(
        description="The last lines of its log: a running run's phase and latest epoch (stored "
        "every 10 s while it runs), a finished one's verdict."
    )


class ModelRegistry(BaseModel):
    """Every model version, and the most recent training runs (newest first)."""

    versions: list[ModelVersion]
    training_runs: list[TrainingRun]
