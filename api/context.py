"""Per-request resources: the DB session (closed at teardown), settings, the Celery sender."""

from __future__ import annotations

from typing import Any

from celery import Celery
from flask import Flask, current_app, g
from sqlalchemy.orm import Session

from segsvc.db import get_sessionmaker
from segsvc.settings import Settings


def settings() -> Settings:
    """The app's settings."""
    value: Settings = current_app.config["SEG_SETTINGS"]
    return value


def celery() -> Celery:
    """The app's Celery client (sends by task name only)."""
    value: Celery = current_app.extensions["segsvc_celery"]
    return value


def db() -> Session:
    """The request's session, opened on first use."""
    if "db" not in g:
        g.db = get_sessionmaker(settings())()
    session: Session = g.db
    return session


def _close_session(_exc: BaseException | None) -> None:
    session: Any = g.pop("db", None)
    if session is not None:
        session.close()


def register_context(app: Flask) -> None:
    """Close the request's session when the request ends."""
    app.teardown_appcontext(_close_session)
