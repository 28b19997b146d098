"""Settings refuse values that would only fail (or do harm) later, at start, with the name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from segsvc.settings import Settings


def load(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(f"SEG_{name.upper()}", value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        # Regression: accepted, then each delivery needing a retry raised after its POST and was
        # sent again every ~90 s for ever.
        ("webhook_schedule", "5,30m", "could not convert"),
        ("webhook_schedule", "0,-5", "non-negative"),
        # Regression: accepted, then every submit with a webhook was a 500.
        ("webhook_allow_networks", "10.0.0.0/8,not-a-net", "does not appear to be"),
        ("retrain_cron", "every day", "5 fields"),
        ("retrain_cron", "0 25 * * *", "25 > 23"),
        # Regression: 0 made the hourly purge delete every finished job's input.
        ("retention_days", "0", "greater than or equal to 1"),
        ("canary_share", "0", "greater than 0"),
        ("canary_share", "1.5", "less than 1"),
        # Regression: at 1 production served nothing to compare with, so one failed canary job
        # rolled the canary back (`rollout.excess_failure_p_value` read it as p = 0).
        ("canary_share", "1", "less than 1"),
        ("retrain_max_labels", "0", "greater than or equal to 1"),
        # Regression: 0 turned every worker's reconciler into a busy loop.
        ("reconcile_interval_seconds", "0", "greater than 0"),
        ("job_lease_seconds", "0", "greater than or equal to 1"),
        ("job_max_attempts", "0", "greater than or equal to 1"),
        ("batch_max_size", "0", "greater than or equal to 1"),
        ("max_upload_bytes", "-1", "greater than or equal to 1"),
        ("webhook_timeout_seconds", "0", "greater than 0"),
        ("port", "70000", "less than or equal to 65535"),
    ],
)
def test_a_bad_value_stops_the_process_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, why: str
) -> None:
    with pytest.raises(ValidationError, match=why) as err:
        load(monkeypatch, **{name: value})
    assert name in str(err.value)


def test_off_switches_and_the_defaults_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load(
        monkeypatch,
        max_queue_depth="0",
        rate_limit_per_minute="0",
        inference_threads="0",
        batch_max_wait_ms="0",
        metrics_port="0",
        webhook_allow_networks="10.0.0.0/8, 2001:db8::/32",
        retrain_cron="*/30 1-5 * * mon-fri",
    )
    assert cfg.max_queue_depth == 0
    assert cfg.retrain_cron == "*/30 1-5 * * mon-fri"
    assert Settings(_env_file=None).retention_days == 30  # type: ignore[call-arg]


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 3e6, -1.0])
def test_database_timeouts_postgres_cannot_take_are_refused(value: float) -> None:
    """Postgres takes its timeouts as int32 milliseconds: these would fail every connection."""
    with pytest.raises(ValidationError):
        Settings(api_statement_timeout_seconds=value, _env_file=None)  # type: ignore[call-arg]


def test_required_servers_refuse_the_sqlite_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment whose secret is missing fails at start with the reason, instead of each
    process quietly opening a SQLite file of its own."""
    for name in ("SEG_DATABASE_URL", "SEG_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValidationError, match="SEG_DATABASE_URL and SEG_BROKER_URL is missing"):
        Settings(require_servers=True, _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="SEG_BROKER_URL is missing"):
        Settings(require_servers=True, database_url="postgresql://db/x", _env_file=None)  # type: ignore[call-arg]
    both = Settings(
        require_servers=True,
        database_url="postgresql+psycopg://db/x",
        broker_url="redis://r:6379/0",
        _env_file=None,  # type: ignore[call-arg]
    )
    assert both.sqlalchemy_url.startswith("postgresql")
    assert Settings(_env_file=None).sqlalchemy_url.startswith("sqlite")  # type: ignore[call-arg]


def test_a_migration_gives_up_on_a_lock_before_the_requests_behind_it_do() -> None:
    def wait(**values: float) -> float:
        return Settings(**values, _env_file=None).migration_lock_wait_per_try  # type: ignore[arg-type]

    assert wait() == 2.0  # below the serving processes' 5 s
    # Not below it: lowered to half of it, so requests queued behind the try still go on
    # (a configuration that is valid for the API and workers does not stop them at start).
    assert wait(migration_lock_timeout_seconds=5) == 2.5
    assert wait(db_lock_timeout_seconds=3, migration_lock_timeout_seconds=3) == 1.5
    # A statement timeout bounds a lock wait too: the API's 1 s here, not the 5 s lock timeout.
    assert wait(api_statement_timeout_seconds=1) == 0.5
    # With no lock timeout of their own, their statement timeouts bound it (API 10 s).
    assert wait(db_lock_timeout_seconds=0, migration_lock_timeout_seconds=12) == 5.0
    assert wait(db_lock_timeout_seconds=0, migration_lock_timeout_seconds=9) == 9.0
    # 0: the migration waits as long as it takes, by choice; unlimited requests wait too.
    assert wait(migration_lock_timeout_seconds=0) == 0.0
    unlimited = {"api_statement_timeout_seconds": 0, "worker_statement_timeout_seconds": 0}
    assert wait(db_lock_timeout_seconds=0, migration_lock_timeout_seconds=30, **unlimited) == 30


def test_a_canary_needs_at_least_one_job_to_be_judged() -> None:
    """0 promoted a canary at its first check with no canary job served at all."""
    with pytest.raises(ValidationError):
        Settings(canary_min_jobs=0)
    with pytest.raises(ValidationError):
        Settings(gate_min_eval_images=0)


def test_job_retention_outlasts_a_longer_webhook_max_age() -> None:
    # Regression: the 7-day floor assumed the default 3 days of retries; with 30 days of them
    # a 7-day retention deleted messages still being retried, silently.
    month = 30 * 86400
    with pytest.raises(ValidationError, match="at least 31 days"):
        Settings(job_retention_days=7, webhook_max_age_seconds=month)
    assert Settings(job_retention_days=31, webhook_max_age_seconds=month).job_retention_days == 31
    assert Settings(job_retention_days=0, webhook_max_age_seconds=month).job_retention_days == 0


def test_job_retention_is_off_or_past_webhook_retries() -> None:
    assert Settings(job_retention_days=0).job_retention_days == 0
    assert Settings(job_retention_days=7).job_retention_days == 7
    with pytest.raises(ValidationError, match="at least 7 days"):
        Settings(job_retention_days=3)


@pytest.mark.parametrize(
    "name",
    [
        "reconcile_interval_seconds",
        "registry_poll_seconds",
        "batch_max_wait_ms",
        "webhook_timeout_seconds",
        "artifact_grace_hours",
        "gate_latency_ratio",
    ],
)
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_no_float_setting_takes_infinity_or_nan(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`SEG_RECONCILE_INTERVAL_SECONDS=inf` passed the settings and then failed in the worker
    (int(inf)): every float setting refuses infinity and NaN at start."""
    monkeypatch.setenv(f"SEG_{name.upper()}", value)
    with pytest.raises(ValidationError, match=name):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_the_compose_env_example_changes_no_setting_of_make_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cp .env.example .env` (the compose quick start) also configured `make run`, which reads
    .env: JSON logs, webhook links on port 8000 whatever SEG_PORT, and every retraining run
    failing on /var/lib/segsvc/eval. The example sets compose's own variables only."""
    from segsvc.settings import ROOT

    for name in list(os.environ):
        if name.startswith("SEG_"):
            monkeypatch.delenv(name)
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())
    monkeypatch.chdir(tmp_path)
    assert Settings() == Settings(_env_file=None)  # type: ignore[call-arg]


def test_settings_read_the_checkouts_env_file_wherever_they_run_from() -> None:
    """The operator CLI run from another folder saw no `.env` (only the current folder's was
    read): `segsvc keys create` then made an empty database beside the code, and `segsvc
    retrain now` found no evaluation folder. The checkout's is read first, the current
    folder's over it."""
    from segsvc.settings import ROOT

    assert Settings.model_config["env_file"] == (ROOT / ".env", ".env")
