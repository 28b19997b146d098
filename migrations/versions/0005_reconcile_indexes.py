"""reconciler indexes: partial indexes for each scan of a reconcile pass

A pass (and the quarantine's step, every few seconds while suspects wait) reads:

- running jobs whose lease expired, oldest first: `ix_jobs_running_lease` on the lease of
  running jobs only, so it reads the expired ones and not every running job;
- queued jobs missing from the broker, paged by `(created_at, id)`: `ix_jobs_queued_created_at_id`
  serves the keyset `(created_at, id) > (...)` and its order directly, where
  `ix_jobs_status_created_at` could only filter on `id` and sort each page;
- whether a suspect is in flight (queued, or running on a live lease, lost twice or more):
  `ix_jobs_suspect_status_lease` holds only unfinished jobs lost at least twice, a handful,
  where the query otherwise read every queued job of a backlog;
- queued jobs a client canceled after a release: `ix_jobs_queued_cancel_requested`, almost
  always empty, where the query otherwise read every queued job on each pass.

Postgres guesses a third of the rows match `attempts - releases >= 2` (an expression it has no
statistics for), so it preferred a sequential scan that stops at the first suspect, reading
every job when none is in flight; statistics on the expression (`jobs_lost_runs`, Postgres 14+)
tell it how few match, and it uses the suspect index. The reconciler's queries write the indexes'
constants into the SQL (`reconcile._status_is`), so prepared statements can use them too.

Built and dropped CONCURRENTLY on Postgres (outside the migration's transaction), so submits and
claims go on meanwhile. A concurrent build that fails or is cancelled leaves an INVALID index of
its name behind (and the revision at 0004): a re-run drops those first and skips the indexes
already built, so it can always be run again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 01:00:00
"""
from collections.abc import Sequence

from alembic import op

from migrations.ops import drop_invalid_indexes, offline, partial_where, patient_block

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (name, columns, condition); the same as `segsvc.models.Job.__table_args__`.
INDEXES = (
    ("ix_jobs_running_lease", ["lease_expires_at"], "status = 'running'"),
    ("ix_jobs_queued_created_at_id", ["created_at", "id"], "status = 'queued'"),
    (
        "ix_jobs_suspect_status_lease",
        ["status", "lease_expires_at"],
        "status IN ('queued', 'running') AND attempts - releases >= 2",
    ),
    (
        "ix_jobs_queued_cancel_requested",
        ["created_at"],
        "status = 'queued' AND cancel_requested IS true",
    ),
)



STATISTICS = "jobs_lost_runs"


def _has_expression_statistics() -> bool:
    if offline():  # a script has no server to ask: Postgres 14+ is asked for below
        return False
    bind = op.get_bind()
    version = bind.dialect.server_version_info or (0,)
    return bind.dialect.name == "postgresql" and version >= (14,)


def upgrade() -> None:
    # A plain CREATE INDEX would block every submit and claim on a large jobs table.
    with patient_block():
        drop_invalid_indexes([name for name, _columns, _condition in INDEXES])
        for name, columns, condition in INDEXES:
            op.create_index(
                name,
                "jobs",
                columns,
                postgresql_concurrently=True,
                if_not_exists=True,
                **partial_where(condition),
            )
        if _has_expression_statistics():
            # Neither blocks writes; ANALYZE samples a bounded number of rows.
            op.execute(
                f"CREATE STATISTICS IF NOT EXISTS {STATISTICS} ON (attempts - releases) FROM jobs"
            )
            op.execute("ANALYZE jobs")
        elif offline() and op.get_context().dialect.name == "postgresql":
            # The script decides on the server it runs on.
            op.execute(
                "DO $$ BEGIN IF current_setting('server_version_num')::int >= 140000 THEN "
                f"EXECUTE 'CREATE STATISTICS IF NOT EXISTS {STATISTICS} ON (attempts - releases) "
                "FROM jobs'; EXECUTE 'ANALYZE jobs'; END IF; END $$"
            )


def downgrade() -> None:
    with patient_block():
        if _has_expression_statistics() or offline():  # IF EXISTS: any server's script
            op.execute(f"DROP STATISTICS IF EXISTS {STATISTICS}")
        for name, _columns, _condition in reversed(INDEXES):
            op.drop_index(name, table_name="jobs", postgresql_concurrently=True, if_exists=True)
