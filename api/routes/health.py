"""Liveness and startup probes (/healthz, /startupz) and the full readiness report (/readyz)."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor, wait

from celery import Celery
from flask import Blueprint, Response, jsonify
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from api.context import celery, settings
from segsvc.db import get_engine
from segsvc.schema import schema_behind
from segsvc.settings import Settings

bp = Blueprint("health", __name__)

# The checks run at once and the answer comes within this, whatever Postgres or Redis do: under
# the startupProbe's timeoutSeconds (3, k8s/base/api.yaml), so a hung dependency reads as
# "not ready" instead of a probe timeout, and a probe never holds a request thread for long.
READY_TIMEOUT_S = 2.0
_executors: dict[int, ThreadPoolExecutor] = {}


def _executor() -> ThreadPoolExecutor:
    """This process's check threads (made after gunicorn forks: threads do not survive a fork).
    A few, so checks stuck on a hung dependency make later probes fail fast, not pile up."""
    pid = os.getpid()
    if pid not in _executors:
        _executors[pid] = ThreadPoolExecutor(max_workers=4, thread_name_prefix="readyz")
    return _executors[pid]


@bp.get("/healthz")
def healthz() -> Response:
    """The process is up."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Postgres and the broker are reachable, and the schema is at this release's migrations
    (or past them): a pod that started before its release's migrations Job ended (one `kubectl
    apply -k`, Flux) passed every probe and answered 500s on columns not there yet. With file
    blobs (`SEG_BLOB_STORE=fs`), the folder is the database's store (`segsvc.blob_mark`: a
    volume that is not mounted is not). The full report, for operators and dashboards; no
    probe of the API's pods asks it."""
    pool, cfg = _executor(), settings()
    checks = {
        "database": pool.submit(_check_database, cfg),
        "broker": pool.submit(_check_broker, celery()),
    }
    if cfg.blob_store == "fs":
        checks["blob_store"] = pool.submit(_check_blob_store, cfg)
    return _answer(checks)


@bp.get("/startupz")
def startupz() -> tuple[Response, int]:
    """Postgres is reachable and at this release's schema: what the API needs to serve (the
    startupProbe). Not the broker: with Redis down the API still accepts and stores jobs (202),
    and a pod started during an outage must be able to, as the running ones do."""
    return _answer({"database": _executor().submit(_check_database, settings())})


def _answer(futures: dict[str, Future[str]]) -> tuple[Response, int]:
    """The checks' results within READY_TIMEOUT_S: 200 when all are ok, else 503."""
    done, _ = wait(futures.values(), timeout=READY_TIMEOUT_S)
    checks = {
        name: future.result() if future in done else f"error: no answer in {READY_TIMEOUT_S:g} s"
        for name, future in futures.items()
    }
    ok = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ok" if ok else "unavailable", "checks": checks}), 200 if ok else 503


def _check_database(cfg: Settings) -> str:
    try:
        with get_engine(cfg).connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL statement_timeout = 1500"))
            conn.execute(text("SELECT 1"))
            try:
                rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars()
                revisions = set(rows)
            except DBAPIError:  # no table: never migrated
                revisions = set()
        behind = schema_behind(revisions)
        return f"error: {behind}" if behind else "ok"
    except Exception as exc:
        return f"error: {exc.__class__.__name__}"


def _check_blob_store(cfg: Settings) -> str:
    from segsvc.blob_mark import StoreNotMarkedError, check_mark
    from segsvc.blobs import blob_folder

    try:
        check_mark(cfg, blob_folder(cfg), create=False)
        return "ok"
    except StoreNotMarkedError:
        return "error: the blob folder is not the store (is its volume mounted?)"
    except Exception as exc:
        return f"error: {exc.__class__.__name__}"


def _check_broker(app: Celery) -> str:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=READY_TIMEOUT_S)
        return "ok"
    except Exception as exc:
        return f"error: {exc.__class__.__name__}"
