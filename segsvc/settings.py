"""Typed settings for every process (API, worker, beat, CLI), read from `SEG_*` env vars."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from celery.schedules import crontab

ROOT = Path(__file__).resolve().parent.parent

Runtime = Literal["auto", "keras", "xla", "onnx", "litert", "litert-fp16", "litert-int8"]


# Postgres takes its timeouts in milliseconds as a 32-bit integer (up to ~24.8 days): larger
# values, or infinity, would fail every connection at connect time.
MAX_DB_TIMEOUT_S = 24 * 86400.0


# The shortest row retention: past webhook retries (3 days) and idempotency keys (24 h).
MIN_JOB_RETENTION_DAYS = 7


class Settings(BaseSettings):
    """All configuration; every factory takes `settings: Settings | None = None`."""

    # No float setting means anything at infinity or NaN (a limit is turned off with 0 where
    # it can be): `SEG_RECONCILE_INTERVAL_SECONDS=inf` passed, then failed in the worker.
    # `.env` beside the code (what `make run` reads) and then the current folder's: the
    # operator CLI run from elsewhere saw neither the checkout's SEG_VAR_DIR nor its folders.
    model_config = SettingsConfigDict(
        env_prefix="SEG_", env_file=(ROOT / ".env", ".env"), extra="ignore", allow_inf_nan=False
    )

    # --- storage and transport -------------------------------------------------------------
    var_dir: Path = Field(ROOT / "var", description="Local state: SQLite files, model cache.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; unset -> embedded SQLite under var_dir."
    )
    broker_url: str | None = Field(
        None, description="Celery broker; unset -> Celery's SQLAlchemy transport on SQLite."
    )
    redis_url: str | None = Field(
        None, description="Redis for rate limits and queue depth; defaults to broker_url if redis."
    )
    require_servers: bool = Field(
        False,
        description="Refuse to start without SEG_DATABASE_URL and SEG_BROKER_URL instead of "
        "falling back to the embedded SQLite files: set wherever processes run on several "
        "hosts (docker-compose, Kubernetes), where a missing secret would otherwise give each "
        "process a database of its own.",
    )
    db_role: Literal["admin", "api", "worker"] = Field(
        "admin",
        description="Whose limits below this process's Postgres connections get. The API sets "
        "`api` and the inference and webhook workers `worker` themselves; other processes "
        "(migrations, the CLI, retraining and the other maintenance tasks) take this: `admin`, "
        "no limits.",
    )
    api_statement_timeout_seconds: float = Field(
        10.0,
        ge=0,
        le=MAX_DB_TIMEOUT_S,
        allow_inf_nan=False,
        description="Postgres cancels an API statement running longer (the request gets 503 "
        "`database_timeout`); 0: no limit.",
    )
    worker_statement_timeout_seconds: float = Field(
        60.0,
        ge=0,
        le=MAX_DB_TIMEOUT_S,
        allow_inf_nan=False,
        description="Postgres cancels an inference or webhook worker statement running longer "
        "(the batch is released and runs again); 0: no limit.",
    )
    db_lock_timeout_seconds: float = Field(
        5.0,
        ge=0,
        le=MAX_DB_TIMEOUT_S,
        allow_inf_nan=False,
        description="Longest an API or worker statement waits for a lock (e.g. behind a "
        "migration) before it fails like a timeout; 0: up to its statement timeout.",
    )
    migration_lock_timeout_seconds: float = Field(
        2.0,
        ge=0,
        le=MAX_DB_TIMEOUT_S,
        allow_inf_nan=False,
        description="Longest a migration step waits for a table lock (behind a long "
        "transaction) before it gives up and tries again later: requests that queue behind its "
        "wait are held no longer than this (it is lowered to half of their own lock wait where "
        "that is shorter); 0: wait as long as it takes.",
    )
    migration_lock_wait_seconds: float = Field(
        900.0,
        ge=0,
        le=MAX_DB_TIMEOUT_S,
        allow_inf_nan=False,
        description="How long `segsvc db upgrade` keeps retrying a step that cannot get its "
        "lock before it fails, naming the oldest open transactions.",
    )
    db_idle_in_transaction_timeout_seconds: float = Field(
        120.0,
        ge=0,
        le=MAX_DB_TIMEOUT_S,
        allow_inf_nan=False,
        description="Postgres closes an API or worker connection left idle inside a transaction "
        "this long, releasing its locks; 0: never.",
    )

    # --- API ---------------------------------------------------------------------------------
    port: int = Field(8000, ge=1, le=65535, description="Port `make run` serves the API on.")
    public_url: str = Field(
        "",
        description="Base URL used in links (empty: the request's in API answers, and "
        "`http://127.0.0.1:<SEG_PORT>` in webhooks, which workers send: set it).",
    )
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest accepted upload.")
    max_pixels: int = Field(40_000_000, ge=1, description="Largest accepted width x height.")
    batch_submit_max_images: int = Field(
        16, ge=1, description="Most images one `POST /v1/jobs/batch` may carry (1: batches off)."
    )
    batch_submit_max_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1,
        description="Largest `POST /v1/jobs/batch` body, all images together.",
    )
    max_queue_depth: int = Field(
        10_000,
        ge=0,
        description="Queued jobs above which submits get 503 (a bound for backpressure: "
        "submits arriving at the same moment can each pass it once).",
    )
    rate_limit_per_minute: int = Field(600, ge=0, description="Submissions per API key per minute.")
    rate_limit_burst: int = Field(120, ge=1, description="Token-bucket burst size per API key.")
    auth_required: bool = Field(
        True,
        description="Require `Authorization: Bearer` on /v1 (false: every caller is an admin, "
        "may promote or roll back models and sees every job).",
    )
    api_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU niceness of the API on a machine it shares with workers: inference "
        "gets the CPU first, so accepted jobs finish before more are taken (0: share equally).",
    )
    long_poll_max_waiters: int = Field(
        8, ge=0, description="Long polls one API process holds at once (more answer at once)."
    )
    # A request's bytes are read on one of gunicorn's threads (12 per process): without these,
    # a dozen clients sending headers or bodies that never end held every thread
    # (api/gunicorn_worker.py).
    request_header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        allow_inf_nan=False,
        description="A request's line and headers must arrive within this many seconds of its "
        "first byte (else 408 and the connection closes). Idle keep-alive connections wait "
        "without a thread and are not timed by it.",
    )
    request_body_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        allow_inf_nan=False,
        description="Longest wait for the next bytes of a request body, and the allowance at "
        "its start before SEG_REQUEST_BODY_MIN_RATE counts (else 408).",
    )
    request_body_min_rate: int = Field(
        16384,
        ge=0,
        description="Bytes per second a request body must average after its first "
        "SEG_REQUEST_BODY_TIMEOUT_SECONDS (time spent waiting for the client only), so a body "
        "trickled a byte at a time ends too; 16 KiB/s lets a 10 MiB upload take up to ~11 min "
        "(0: no rate, the per-wait timeout only).",
    )

    # --- model and serving -------------------------------------------------------------------
    model_dir: Path = Field(ROOT / "models", description="Where model artifacts live.")
    shipped_model_dir: Path = Field(
        ROOT / "models",
        description="The trained model shipped with the code (baseline.keras + .json; /app/models "
        "in the images): `segsvc models init` copies it into model_dir when model_dir lacks it.",
    )
    encoder_weights: Path | None = Field(
        None, description="Local MobileNetV2 weights file for new models (None: random init)."
    )
    runtime: Runtime = Field(
        "auto",
        description=(
            "Inference runtime. auto: XLA on a GPU; on CPU LiteRT int8 where the model version's "
            "metrics list it faithful, else ONNX Runtime float32."
        ),
    )
    artifact_cache_dir: Path | None = Field(
        None, description="Converted artifacts cache (default var_dir/artifacts)."
    )
    artifact_grace_hours: float = Field(
        72.0,
        ge=1,
        description="Converted artifacts no servable version needs (and older converter "
        "fingerprints) are deleted once unused this long (workers mark theirs every 10 min).",
    )
    artifact_keep_archived: int = Field(
        2,
        ge=0,
        description="Retired production versions (newest first) whose converted artifacts are "
        "kept for a rollback, besides production's rollback target.",
    )
    batch_max_size: int = Field(32, ge=1, description="Largest micro-batch a worker runs.")
    batch_max_wait_ms: float = Field(
        10.0, ge=0, description="Longest a partial batch waits for more jobs (0 on an idle queue)."
    )
    inference_threads: int = Field(
        1,
        ge=0,
        description="Intra-op threads per worker process (0: all cores); on CPU one thread per "
        "process and one process per core runs the most images per core.",
    )
    job_max_attempts: int = Field(3, ge=1, description="Attempts before a job ends failed.")
    job_lease_seconds: int = Field(120, ge=1, description="How long a running job's lease lasts.")
    registry_poll_seconds: float = Field(
        5.0,
        ge=0,
        description="How often workers poll the registry (0: never: versions change at restart).",
    )
    reconcile_interval_seconds: float = Field(30.0, gt=0, description="Reconciler period.")
    queue_name: str = Field("inference", description="Celery queue for inference.")

    # --- webhooks ----------------------------------------------------------------------------
    webhook_queue_name: str = Field(
        "webhooks",
        description="Celery queue for deliveries; the webhook workers' `-Q` must name it "
        "(a worker on another queue logs QUEUE MISMATCH and delivers nothing).",
    )
    webhook_timeout_seconds: float = Field(15.0, gt=0, description="Per-attempt timeout.")
    webhook_max_age_seconds: int = Field(
        3 * 24 * 3600, ge=1, description="Stop retrying after this."
    )
    webhook_schedule: str = Field(
        "0,5,300,1800,7200,18000,36000",
        description="Retry delays in seconds (last one repeats until max age).",
    )
    webhook_endpoint_pause_max_seconds: float = Field(
        300.0,
        ge=0,
        le=86400,
        description="Longest pause of an endpoint whose attempts keep failing: after each "
        "failure in a row all its messages wait the next retry delay (5 s, then longer), at most "
        "this, so a dead receiver holds no delivery thread another client's notices need.",
    )
    webhook_allow_networks: str = Field(
        "", description="Comma-separated CIDRs allowed as webhook targets despite SSRF rules."
    )
    webhook_secret_rotation_seconds: int = Field(
        24 * 3600, ge=0, description="How long the old secret keeps signing after a rotation."
    )
    webhook_body_cap_bytes: int = Field(
        4096, ge=0, description="Response body bytes kept per attempt."
    )

    # --- retraining and rollout --------------------------------------------------------------
    train_data_dir: Path | None = Field(None, description="Base training data (Oxford layout).")
    eval_data_dir: Path | None = Field(None, description="Fixed evaluation set (Oxford layout).")
    retrain_cron: str = Field("0 3 * * *", description="Retraining schedule (cron, UTC).")
    retrain_epochs: int = Field(3, ge=1, description="Fine-tuning epochs per retraining run.")
    retrain_learning_rate: float = Field(1e-4, gt=0, description="Fine-tuning learning rate.")
    retrain_min_new_labels: int = Field(20, ge=0, description="New labels needed to retrain.")
    retrain_max_labels: int = Field(
        5000,
        ge=1,
        description="Most labels one retraining run trains on: the newest. A run holds ~0.3 MB "
        "per label at its peak (decoded pairs, the joined set, TensorFlow's copy), and labelled "
        "inputs are kept for ever: without a bound each run needs more memory than the last, "
        "until the worker is killed on every run.",
    )
    model_file_grace_days: float = Field(
        7.0,
        ge=0,
        description="Model files retraining wrote to var_dir/models that can never serve, of "
        "rejected versions and of archived versions past the rollback targets (rejected or "
        "archived this long ago too) and of crashed runs (named by no version), are deleted "
        "once this old: after each run, or by `segsvc models prune-files`. Production, canary "
        "and candidate versions' files and the rollback targets' (SEG_MODEL_KEEP_ARCHIVED) "
        "stay.",
    )
    model_keep_archived: int = Field(
        3,
        ge=1,
        description="Archived versions (production before a promotion) whose model files "
        "stay, newest first, besides production's parent: the rollback targets. Older "
        "archived versions' files of retraining's own are deleted like rejected ones'.",
    )
    gate_miou_tolerance: float = Field(0.0, ge=0, description="Candidate mIoU may trail by this.")
    gate_min_eval_images: int = Field(
        20,
        ge=1,
        description="Usable image/trimap pairs the evaluation folder must hold: a gate on a "
        "handful of images promotes noise. Checked before training and after evaluation.",
    )
    gate_latency_ratio: float = Field(
        1.2, gt=0, description="Candidate latency may exceed by this."
    )
    canary_share: float = Field(
        0.10,
        gt=0,
        lt=1,
        description="Share of jobs served by a canary (below 1: its verdict compares it with "
        "the production jobs served beside it).",
    )
    canary_min_jobs: int = Field(
        50, ge=1, description="Canary jobs before auto promote/rollback (at least 1)."
    )
    retention_days: int = Field(
        30, ge=1, description="Unlabeled inputs older than this are deleted."
    )
    job_retention_days: int = Field(
        0,
        ge=0,
        description="Ended jobs submitted and ended longer ago than this are deleted with their "
        "results and webhook log, except those with a corrected mask or a webhook still retried "
        "(0: kept for ever). Below SEG_RETENTION_DAYS it ends the labelling window too: an "
        "unlabelled job's input goes with its row.",
    )

    # --- operations --------------------------------------------------------------------------
    log_format: Literal["auto", "json", "text"] = Field("auto", description="Log line format.")
    log_level: str = Field("INFO", description="Log level.")
    blob_store: Literal["db", "fs"] = Field("db", description="Where inputs/masks are kept.")
    blob_dir: Path | None = Field(None, description="Folder for blob_store=fs.")
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="/metrics port. Workers and beat serve it there (0: none); the API listens "
        "on it too and serves /metrics there only, not on its public port (0: on its port).",
    )
    metrics_bind: str = Field(
        "0.0.0.0",  # noqa: S104 - in a container, Prometheus scrapes from outside it
        description="Address the workers' and beat's /metrics listen on (SEG_METRICS_PORT): "
        "every interface, for a scraper outside the container; `segsvc run` sets 127.0.0.1.",
    )
    probe_dir: Path | None = Field(
        None, description="Worker writes `ready` (model loaded) and `alive` files here."
    )

    # Values parsed where they are used (a delivery, beat) are checked here too, so a typo stops
    # the process at start instead of failing each delivery (or each submit) at run time.
    @model_validator(mode="after")
    def _servers_when_required(self) -> Settings:
        missing = [
            f"SEG_{name.upper()}"
            for name in ("database_url", "broker_url")
            if self.require_servers and not getattr(self, name)
        ]
        if missing:
            raise ValueError(
                f"SEG_REQUIRE_SERVERS is set but {' and '.join(missing)} is missing (is the "
                "secret that holds it mounted?); refusing the embedded SQLite fallback."
            )
        return self

    @field_validator("job_retention_days")
    @classmethod
    def _job_retention_after_retries(cls, value: int) -> int:
        if 0 < value < MIN_JOB_RETENTION_DAYS:
            raise ValueError(
                f"must be 0 (keep) or at least {MIN_JOB_RETENTION_DAYS} days: a job's webhook is "
                "retried for up to 3 days and its idempotency key holds for 24 h"
            )
        return value

    @model_validator(mode="after")
    def _job_retention_after_webhook_retries(self) -> Settings:
        # A message is retried for webhook_max_age_seconds after its event; deleting its job
        # (and with it the message) sooner ends those retries without a word.
        needed = self.webhook_max_age_seconds + 86400
        if self.job_retention_days > 0 and self.job_retention_days * 86400 < needed:
            raise ValueError(
                f"SEG_JOB_RETENTION_DAYS={self.job_retention_days} would delete jobs whose "
                f"webhooks are still retried (SEG_WEBHOOK_MAX_AGE_SECONDS="
                f"{self.webhook_max_age_seconds}): make it at least {-(-needed // 86400)} days"
            )
        return self

    @field_validator("webhook_schedule")
    @classmethod
    def _valid_schedule(cls, value: str) -> str:
        from segsvc.webhooks.schedule import parse_schedule

        parse_schedule(value)
        return value

    @field_validator("webhook_allow_networks")
    @classmethod
    def _valid_networks(cls, value: str) -> str:
        from segsvc.webhooks.ssrf import parse_networks

        parse_networks(value)
        return value

    @field_validator("metrics_bind")
    @classmethod
    def _valid_bind(cls, value: str) -> str:
        ipaddress.ip_address(value)  # a typo fails at start, not as the server binds
        return value

    @field_validator("retrain_cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        parse_cron(value)
        return value

    @property
    def sqlalchemy_url(self) -> str:
        """Database URL, the embedded SQLite file when none is configured."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.var_dir / 'segsvc.db'}"

    @property
    def celery_broker_url(self) -> str:
        """Broker URL, Celery's SQLAlchemy transport on SQLite when none is configured."""
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{self.var_dir / 'broker.db'}"

    @property
    def serving_lock_wait_seconds(self) -> float:
        """The longest the API or a worker waits for a lock before its statement fails (its
        lock timeout, or its statement timeout where that is shorter); 0: no limit."""
        waits = [
            min(w for w in (self.db_lock_timeout_seconds, statement) if w > 0)
            for statement in (
                self.api_statement_timeout_seconds,
                self.worker_statement_timeout_seconds,
            )
            if self.db_lock_timeout_seconds > 0 or statement > 0
        ]
        return min(waits, default=0.0)

    @property
    def migration_lock_wait_per_try(self) -> float:
        """SEG_MIGRATION_LOCK_TIMEOUT_SECONDS, lowered to half the serving processes' lock wait
        where that is shorter: requests queued behind a migration's wait must outlast it, or
        they fail at their own limit first, the stall the short wait is there to prevent."""
        wanted, serving = self.migration_lock_timeout_seconds, self.serving_lock_wait_seconds
        if wanted > 0 and 0 < serving <= wanted:
            return serving / 2
        return wanted  # 0: as long as it takes, the operator's choice

    @property
    def effective_redis_url(self) -> str | None:
        """Redis used for rate limits and queue depth, if any."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url and is_redis_url(self.broker_url):
            return self.broker_url
        return None

    @property
    def artifact_dir(self) -> Path:
        """Converted model artifacts, keyed by sha256."""
        return self.artifact_cache_dir or (self.var_dir / "artifacts")


def parse_cron(expr: str) -> crontab:
    """A 5-field cron expression (minute hour day-of-month month day-of-week) as a crontab."""
    from celery.schedules import crontab

    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"a cron expression needs 5 fields (m h dom mon dow), got {expr!r}")
    minute, hour, dom, month, dow = fields
    return crontab(minute=minute, hour=hour, day_of_month=dom, month_of_year=month, day_of_week=dow)


def is_redis_url(url: str) -> bool:
    """Whether `url` names a Redis server (plain or TLS): a broker this code can look into."""
    return url.startswith(("redis://", "rediss://"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings."""
    return Settings()
