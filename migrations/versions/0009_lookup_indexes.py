"""lookup indexes: result masks that name a blob file, webhook endpoints by URL

`ix_jobs_mask_pointer`: with `SEG_BLOB_STORE=fs`, uploads and result masks share one
content-addressed folder, so an upload byte-identical to some job's mask (a client sending a
returned mask back as an image) names the same file. The retention purge checked only the
inputs still kept before deleting a purged input's file, and deleted that other job's mask with
it; it now asks this index too. Partial: only values of a pointer's length (83 bytes) are
indexed, so with the `db` store, whose rows hold the masks' bytes, it stays empty.

`ix_webhook_endpoints_url`: the endpoint of a message is matched by its URL and a client that
may be NULL (`IS NOT DISTINCT FROM`, which no index on (client_id, url) serves), for every due
message the dispatcher looks at and every batch of results with webhooks. The table keeps a row
per (client, URL) that ever failed, so without it those lookups read the whole table.

Built and dropped CONCURRENTLY on Postgres (outside the migration's transaction), as 0005's
indexes are: a re-run drops an INVALID leftover of a failed build first.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 14:00:00
"""
from collections.abc import Sequence

from migrations.ops import (
    IndexSpec,
    create_indexes_concurrently,
    drop_indexes_concurrently,
    partial_where,
)

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (name, table, columns, keywords); the same as `segsvc.models`.
INDEXES: tuple[IndexSpec, ...] = (
    ("ix_jobs_mask_pointer", "jobs", ["mask_png"], partial_where("length(mask_png) = 83")),
    ("ix_webhook_endpoints_url", "webhook_endpoints", ["url"], {}),
)


def upgrade() -> None:
    create_indexes_concurrently(INDEXES)


def downgrade() -> None:
    drop_indexes_concurrently(INDEXES)
