"""store encoded images and model inputs uncompressed

Postgres tries pglz on every bytea value over 2 kB before moving it out of line. JPEG, PNG and
WebP bytes do not compress, and the raw 128x128x3 model input compresses little, so that attempt
cost about 1.9 ms of database CPU per submitted job (2.5 ms per insert instead of 0.65 ms,
measured on the benchmark machine) for almost no space. EXTERNAL keeps the values out of line,
uncompressed, and lets Postgres read slices of them cheaply.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 03:40:00
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("jobs", "input_bytes"),
    ("jobs", "model_input"),
    ("jobs", "mask_png"),
    ("feedback", "mask_png"),
)


def _set_storage(storage: str) -> None:
    if op.get_context().dialect.name != "postgresql":
        return  # SQLite has no per-column storage
    for table, column in COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE {storage}")


def upgrade() -> None:
    _set_storage("EXTERNAL")


def downgrade() -> None:
    _set_storage("EXTENDED")
