"""segsvc/models.py column types on real Postgres."""

from __future__ import annotations

from datetime import UTC

from sqlalchemy import event, select

from segsvc.db import get_engine, session_scope
from segsvc.models import Job
from segsvc.settings import Settings
from tests.segsvc.test_feedback import make_job


def test_timestamps_come_back_in_utc_whatever_the_session_time_zone(settings: Settings) -> None:
    # Regression: psycopg returns timestamptz in the session's TimeZone, so a server set to
    # another zone put "-05:00" times into the API's and webhooks' JSON.
    job_id = make_job(settings)
    engine = get_engine(settings)

    def new_york(dbapi_conn: object, _record: object) -> None:
        with dbapi_conn.cursor() as cur:  # type: ignore[attr-defined]
            cur.execute("SET TIME ZONE 'America/New_York'")

    engine.dispose()
    event.listen(engine, "connect", new_york)
    try:
        with session_scope(settings) as session:
            created, completed = session.execute(
                select(Job.created_at, Job.completed_at).where(Job.id == job_id)
            ).one()
    finally:
        event.remove(engine, "connect", new_york)
        engine.dispose()
    assert created.tzinfo == UTC
    assert completed.tzinfo == UTC
