"""Run Alembic programmatically with the project's config."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from segsvc.settings import ROOT, Settings, get_settings


def alembic_config(settings: Settings | None = None) -> Config:
    """The project's Alembic config pointed at the settings' database."""
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    url = (settings or get_settings()).sqlalchemy_url
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(*, revision: str = "head", settings: Settings | None = None) -> None:
    """Bring the schema to `revision`."""
    command.upgrade(alembic_config(settings), revision)
