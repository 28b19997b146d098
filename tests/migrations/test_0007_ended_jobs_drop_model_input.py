"""Migration 0007: jobs that ended before ENDED_JOB_CLEARS let go of their model input, in
batches walking the primary key; jobs still queued or running keep theirs."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor, wait

from sqlalchemy import text

from segsvc.db import get_engine
from segsvc.migrate import upgrade
from segsvc.settings import Settings
from tests.segsvc.test_db import holding

STATUSES = ("queued", "running", "succeeded", "failed", "canceled")


def test_0007_clears_the_model_input_of_ended_jobs_only(empty_db: Settings) -> None:
    upgrade(settings=empty_db, revision="0006")
    sqlite = empty_db.database_url is None
    rows = [  # more than two batches of 1,000
        {
            "id": uuid.uuid4().hex if sqlite else uuid.uuid4(),
            "status": STATUSES[i % len(STATUSES)],
        }
        for i in range(2_345)
    ]
    with get_engine(empty_db).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, status, created_at, attempts, releases, cancel_requested, "
                "input_sha256, input_content_type, input_width, input_height, input_bytes, "
                "model_input) VALUES (:id, :status, '2026-11-26 10:00:00+00', 1, 0, false, '0', "
                "'image/png', 1, 1, :upload, :derived)"
            ),
            [{**row, "upload": b"jpeg", "derived": b"pixels"} for row in rows],
        )
    upgrade(settings=empty_db)
    with get_engine(empty_db).connect() as conn:
        kept = dict(
            conn.execute(
                text(
                    "SELECT status, count(*) FROM jobs "
                    "WHERE model_input IS NOT NULL AND input_bytes IS NOT NULL GROUP BY status"
                )
            ).all()
        )
        uploads = conn.scalar(text("SELECT count(*) FROM jobs WHERE input_bytes IS NOT NULL"))
    assert kept == {"queued": 469, "running": 469}
    assert uploads == len(rows)  # every upload stays
    upgrade(settings=empty_db)  # at head: nothing more to do, nothing fails


def test_0007_waits_for_a_row_a_worker_holds_instead_of_giving_up(pg_db: Settings) -> None:
    # A give-up there would start the walk over on the retry; the wait holds up no one else's
    # reads and writes, so it waits past the migration's short lock wait (and with no retry).
    cfg = pg_db.model_copy(
        update={"migration_lock_timeout_seconds": 0.1, "migration_lock_wait_seconds": 0}
    )
    upgrade(settings=cfg, revision="0006")
    job = uuid.uuid4()
    with get_engine(cfg).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, status, created_at, attempts, releases, cancel_requested, "
                "input_sha256, input_content_type, input_width, input_height, input_bytes, "
                "model_input) VALUES (:id, 'succeeded', now(), 1, 0, false, '0', 'image/png', "
                "1, 1, 'jpeg', 'pixels')"
            ),
            {"id": job},
        )
    assert cfg.database_url is not None
    row_lock = f"SELECT 1 FROM jobs WHERE id = '{job}' FOR UPDATE"
    with ThreadPoolExecutor(1) as pool:
        with holding(cfg.database_url, row_lock, seconds=60):
            migrating = pool.submit(upgrade, settings=cfg)
            wait([migrating], timeout=1.0)  # ten times its lock wait
            assert not migrating.done(), migrating.exception()
        migrating.result(timeout=30)  # the worker let go of the row
    with get_engine(cfg).connect() as conn:
        assert conn.scalar(text("SELECT model_input FROM jobs")) is None
