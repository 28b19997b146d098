"""Alembic migrations: the only thing that creates the schema."""
