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


def test_a_batch_submit_inserts_its_rows_one_parameter_set_each(settings: Settings) -> None:
    # Regression: a server default on jobs.releases made the ORM insert a batch as one
    # multi-VALUES statement (to fetch the default back) holding every image's bytes at once:
    # +20 MB peak RSS per API process under load (bench: 131 -> 152 MB, over the 150 budget).
    from segsvc.images import validate_image
    from segsvc.services.jobs import create_jobs
    from tests.segsvc.test_feedback import photo_bytes

    engine = get_engine(settings)
    inserts: list[tuple[object, bool]] = []

    def record(_conn: object, _cur: object, statement: str, params: object, _ctx: object,
               executemany: bool) -> None:  # fmt: skip
        if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
            inserts.append((params, executemany))

    images = [
        validate_image(photo_bytes(seed=i), max_bytes=10**7, max_pixels=10**8) for i in range(3)
    ]
    event.listen(engine, "before_cursor_execute", record)
    try:
        with session_scope(settings) as session:
            create_jobs(session=session, images=images)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(inserts) == 1
    params, executemany = inserts[0]
    assert executemany
    assert isinstance(params, list)
    assert len(params) == 3  # one parameter set per row, streamed by the driver


def test_the_mask_pointer_index_holds_values_of_a_pointers_length() -> None:
    from segsvc.blobs import POINTER_LENGTH, pointer_to
    from segsvc.models import MASK_POINTER_WHERE

    assert f"length(mask_png) = {POINTER_LENGTH}" == MASK_POINTER_WHERE
    assert len(pointer_to("0" * 64)) == POINTER_LENGTH


def test_a_naive_timestamp_is_stored_as_utc_whatever_the_sessions_zone(
    settings: Settings,
) -> None:
    from datetime import datetime

    from sqlalchemy import text

    from segsvc.db import session_scope
    from segsvc.models import ApiKey

    with session_scope(settings) as session:
        session.execute(text("SET LOCAL TimeZone = 'America/New_York'"))
        row = ApiKey(
            name="tz", key_hash="t" * 64, prefix="seg_tz", created_at=datetime(2026, 1, 2, 3, 4)
        )
        session.add(row)
        session.flush()
        stored = session.scalar(
            text(
                "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') "
                "FROM api_keys WHERE id = :id"
            ),
            {"id": row.id},
        )
    assert stored == "2026-01-02 03:04"
