"""ORM models: the whole schema, created only by the Alembic migrations in `migrations/`."""

from __future__ import annotations

import enum
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Interval,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    Uuid,
    func,
    literal,
    select,
    text,
    type_coerce,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    deferred,
    mapped_column,
    relationship,
)
from sqlalchemy.sql.elements import ColumnElement

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware now on this host's clock (timestamps that decide nothing across hosts)."""
    return datetime.now(UTC)


def db_now(session: Session, *, plus_seconds: float = 0.0) -> ColumnElement[datetime]:
    """Now (plus an offset) on the database's clock, for a statement that grants or judges a
    lease: Postgres' `statement_timestamp()`, one clock for every host however far theirs
    drift; SQLite, which runs in this process, has no other clock than this host's."""
    if session.get_bind().dialect.name != "postgresql":
        return literal(utcnow() + timedelta(seconds=plus_seconds), UTCDateTime())
    stamp: ColumnElement[Any] = func.statement_timestamp()
    if plus_seconds:
        stamp = stamp + literal(timedelta(seconds=plus_seconds), Interval())
    return type_coerce(stamp, UTCDateTime())


def db_time(session: Session) -> datetime:
    """The database's clock now, read once (this host's on SQLite): see `db_now`."""
    if session.get_bind().dialect.name != "postgresql":
        return utcnow()
    return session.scalars(select(db_now(session))).one()


# How long a reading of the database's clock serves `db_clock` (carried forward by this host's
# monotonic clock, which NTP slews by parts per million but never steps).
DB_CLOCK_READ_EVERY_S = 60.0
_db_clock_readings: dict[tuple[int, int], tuple[float, datetime]] = {}


def db_clock(session: Session) -> datetime:
    """Now on the database's clock, as `db_time`, without a round trip on most calls: the
    database is read at most every DB_CLOCK_READ_EVERY_S per process and engine, and that
    reading is carried forward by `time.monotonic()`. For stamps on a hot path (a job's
    created_at), right to a few milliseconds however far this host's wall clock is off, and
    unmoved when that clock is stepped. This host's clock on SQLite (see `db_now`)."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        return utcnow()
    key = (os.getpid(), id(bind))
    now = time.monotonic()
    reading = _db_clock_readings.get(key)
    if reading is None or now - reading[0] >= DB_CLOCK_READ_EVERY_S:
        session.connection()  # checked out (and pinged, perhaps reconnected) before the timing
        stamp = db_time(session)
        now = time.monotonic()
        # The database read its clock somewhere between the query's send and `now`: pinned to
        # `now`, the readings carried forward run at most that round trip behind, never ahead
        # (a job stamped ahead of the database would look younger than it is).
        reading = (now, stamp)
        _db_clock_readings[key] = reading  # one store of a tuple: threads see old or new
    at, stamp = reading
    return stamp + timedelta(seconds=now - at)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp in UTC on every backend: SQLite hands back naive values, and psycopg gives
    `timestamptz` in the session's TimeZone (a server set to another zone would otherwise leak
    into the API's and webhooks' times)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """A naive value is UTC here, as read values are: Postgres would otherwise take it in
        the session's TimeZone, whatever the server was set to."""
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# Result masks stored as a blob file's pointer (`segsvc.blobs.POINTER_LENGTH` bytes).
MASK_POINTER_WHERE = "length(mask_png) = 83"


def _where(condition: str) -> dict[str, Any]:
    """A partial index's condition, on Postgres and SQLite alike."""
    return {"postgresql_where": text(condition), "sqlite_where": text(condition)}


# Unfinished jobs lost at least twice (`reconcile.SUSPECT_AFTER_ATTEMPTS`; lost runs are
# attempts - releases) or retried once and running: the quarantine's suspects.
SUSPECT_WHERE = "status IN ('queued', 'running') AND attempts - releases >= 2"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        """True once the job can no longer change."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


# What a job lets go of in the statement that ends it (succeeded, failed or canceled): the
# 48 KiB model input the API derived from the upload for the worker's claim alone. The upload
# itself stays until retention (retraining and the overlay read it). Kept, the model input was
# ~40% of a finished job's stored bytes for the whole retention period (4.8 GB a day at 100k
# jobs a day).
ENDED_JOB_CLEARS: dict[str, None] = {"model_input": None}


class ModelStatus(enum.StrEnum):
    CANDIDATE = "candidate"
    REJECTED = "rejected"
    CANARY = "canary"
    PRODUCTION = "production"
    ARCHIVED = "archived"


class ApiKey(Base):
    """A client of the API; only the key's sha256 is stored."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Job(Base):
    """One segmentation request: its input, state, result and timings."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_client_idempotency", "client_id", "idempotency_key", unique=True),
        # A unique index counts NULLs as distinct: keys of jobs without a client (auth off)
        # need one of their own.
        Index(
            "ix_jobs_anonymous_idempotency",
            "idempotency_key",
            unique=True,
            **_where("client_id IS NULL"),
        ),
        # The retention purge: old jobs that still hold an input, and whether an input file
        # (content-addressed: named by the upload's sha256) is still kept by another job.
        Index("ix_jobs_input_kept_created_at", "created_at", **_where("input_bytes IS NOT NULL")),
        Index("ix_jobs_input_kept_sha256", "input_sha256", **_where("input_bytes IS NOT NULL")),
        # ... nor by a result mask (an upload byte-identical to a mask names its file; 0009).
        Index("ix_jobs_mask_pointer", "mask_png", **_where(MASK_POINTER_WHERE)),
        # The reconciler's scans (`services/reconcile.py`, migration 0005): expired leases,
        # queued jobs paged by (created_at, id), suspects in flight or waiting, and queued jobs
        # a client canceled. Each reads only the few rows it wants, however deep the backlog.
        Index("ix_jobs_running_lease", "lease_expires_at", **_where("status = 'running'")),
        Index("ix_jobs_queued_created_at_id", "created_at", "id", **_where("status = 'queued'")),
        Index(
            "ix_jobs_suspect_status_lease",
            "status",
            "lease_expires_at",
            **_where(SUSPECT_WHERE),
        ),
        Index(
            "ix_jobs_queued_cancel_requested",
            "created_at",
            **_where("status = 'queued' AND cancel_requested IS true"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    client_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Claims a worker gave back (its batch's forward pass or result write failed): not lost, so
    # not held against the job. Lost runs = attempts - releases (`reconcile.lost_runs`).
    # No server_default here (migration 0004 has one, for old rows): with it the ORM inserted a
    # batch as one multi-VALUES statement holding every image at once (+20 MB per API process).
    releases: Mapped[int] = mapped_column(Integer, default=0)
    first_released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The give-up window (`services.jobs.give_back_job`, 0011): the latest release, and the
    # releases since `first_released_at` (NULL on older rows: all of `releases`).
    last_released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    window_releases: Mapped[int | None] = mapped_column(Integer)
    lease_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))

    input_sha256: Mapped[str] = mapped_column(String(64))
    input_content_type: Mapped[str] = mapped_column(String(32))
    input_width: Mapped[int] = mapped_column(Integer)
    input_height: Mapped[int] = mapped_column(Integer)
    input_bytes: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    # The decoded, oriented, resized 128x128x3 uint8 model input, made once by the API so the
    # worker never decodes an upload again.
    model_input: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))

    mask_png: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    class_fractions: Mapped[list[Any] | None] = mapped_column(JSON)
    queue_ms: Mapped[float | None] = mapped_column(Float)
    predict_ms: Mapped[float | None] = mapped_column(Float)
    batch_size: Mapped[int | None] = mapped_column(Integer)

    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[Any] | None] = mapped_column(JSON)

    @property
    def job_status(self) -> JobStatus:
        """The status as an enum."""
        return JobStatus(self.status)


class ModelVersion(Base):
    """A saved model artifact and its place in the rollout."""

    __tablename__ = "model_versions"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=ModelStatus.CANDIDATE, index=True)
    traffic_share: Mapped[float] = mapped_column(Float, default=0.0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    parent_version: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When the model-file pruner deleted a rejected version's file: the row stays (its metrics
    # and reason are history), but the version can never serve again.
    file_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookSecret(Base):
    """A signing secret; while a rotated-out secret has not expired, both sign."""

    __tablename__ = "webhook_secrets"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    client_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"), index=True)
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookEndpoint(Base):
    """Per-client endpoint state: a `410 Gone` disables it; consecutive failed attempts pause
    all of its messages until `paused_until` (`segsvc.webhooks.dispatch`)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        Index("ix_webhook_endpoints_client_url", "client_id", "url", unique=True),
        # A message's endpoint is matched by URL and a client that may be NULL (IS NOT
        # DISTINCT FROM, which the pair's index cannot serve): the dispatcher, per due message.
        Index("ix_webhook_endpoints_url", "url"),
        Index(
            "ix_webhook_endpoints_anonymous_url", "url", unique=True, **_where("client_id IS NULL")
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    client_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"))
    url: Mapped[str] = mapped_column(Text)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    paused_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookMessage(Base):
    """One event for one job; its `id` is the stable `webhook-id` across retries."""

    __tablename__ = "webhook_messages"
    __table_args__ = (
        Index("ix_webhook_messages_status_next", "status", "next_attempt_at"),
        # One endpoint's pending messages (`webhooks.dispatch`: a pause moves its backlog, a
        # delivery lets it go), found without reading every client's (0011).
        Index(
            "ix_webhook_messages_pending_endpoint",
            "client_id",
            "url",
            "next_attempt_at",
            **_where("status = 'pending'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"))
    event_type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A client's redeliver: the first attempt after it is made however old the message is.
    redelivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The retry time its own last attempt set (its backoff), kept apart from the endpoint's
    # pauses that move `next_attempt_at`: a delivery lets it go no earlier than this (0013).
    scheduled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    attempt_log: Mapped[list[WebhookAttempt]] = relationship(
        back_populates="message", order_by="WebhookAttempt.attempted_at"
    )


class WebhookAttempt(Base):
    """One HTTP try of a message."""

    __tablename__ = "webhook_attempts"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    message_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_messages.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    response_body: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    message: Mapped[WebhookMessage] = relationship(back_populates="attempt_log")


class Feedback(Base):
    """A user's rating and/or corrected mask for a job."""

    __tablename__ = "feedback"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"))
    model_version: Mapped[str | None] = mapped_column(String(64))
    rating: Mapped[str | None] = mapped_column(String(8))
    mask_png: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TrainingRun(Base):
    """One retraining run: its data snapshot, both models' metrics and the outcome."""

    __tablename__ = "training_runs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    status: Mapped[str] = mapped_column(String(16), default="running")
    trigger: Mapped[str] = mapped_column(String(16), default="schedule")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reason: Mapped[str | None] = mapped_column(Text)
    feedback_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    data_counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    production_version: Mapped[str | None] = mapped_column(String(64))
    candidate_version: Mapped[str | None] = mapped_column(String(64))
    production_metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    candidate_metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    duration_s: Mapped[float | None] = mapped_column(Float)
    log: Mapped[str] = mapped_column(Text, default="")


class BlobStoreMark(Base):
    """The id of the folder the file blobs are in (one row; `segsvc.blob_mark`): the folder's
    `.segsvc-store` file holds the same id, so a folder that is not the store (a volume that
    is not mounted, another one) is refused before anything is written to it or read from it."""

    __tablename__ = "blob_store_mark"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, default=1)
    store_id: Mapped[str] = mapped_column(String(64))
    root: Mapped[str] = mapped_column(Text)  # where it was marked (said in the refusal's log)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
