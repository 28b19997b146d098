from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from segsvc.settings import Settings


def test_healthz_is_ok(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_readyz_checks_database_and_broker(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_fails_when_broker_unreachable(settings) -> None:  # type: ignore[no-untyped-def]
    from api.app import create_app

    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    resp = create_app(broken).test_client().get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["checks"]["broker"].startswith("error")


def test_readyz_with_file_blobs_fails_while_the_volume_is_not_mounted(
    settings: Settings, tmp_path: Path
) -> None:
    """`/startupz` stays up (the API still serves everything but files); `/readyz` says why."""
    from api.app import create_app
    from segsvc import blob_mark
    from segsvc.blobs import blob_store
    from tests.segsvc.test_blob_mark import unmount

    blob_mark.forget()
    folder = tmp_path / "blobs"
    cfg = settings.model_copy(update={"blob_store": "fs", "blob_dir": folder})
    client = create_app(cfg).test_client()
    blob_store(cfg).put(b"a mask")
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"]["blob_store"] == "ok"
    unmount(folder)
    unready = client.get("/readyz")
    assert unready.status_code == 503
    assert "is its volume mounted" in unready.get_json()["checks"]["blob_store"]
    assert client.get("/startupz").status_code == 200


def test_startupz_passes_with_the_broker_down_where_readyz_fails(settings: Settings) -> None:
    """README: with Redis down, submissions are still accepted and stored (202). The API's
    startupProbe was /readyz, which fails while the broker does: during a Redis outage no new
    API pod (HPA scale-out, an evicted pod's replacement) ever started, each restarted after
    300 s. /startupz asks what the API needs to serve: Postgres, at this release's schema."""
    from api.app import create_app

    down = settings.model_copy(
        update={"broker_url": "redis://127.0.0.1:1/0", "redis_url": "redis://127.0.0.1:1/0"}
    )
    client = create_app(down).test_client()
    started = client.get("/startupz")
    assert started.status_code == 200
    assert started.get_json() == {"status": "ok", "checks": {"database": "ok"}}
    assert client.get("/readyz").status_code == 503  # operators still see the broker down


def test_startupz_fails_while_postgres_is_unreachable(settings: Settings) -> None:
    from api.app import create_app

    down = settings.model_copy(
        update={"database_url": "postgresql+psycopg://segsvc@127.0.0.1:1/segsvc"}
    )
    resp = create_app(down).test_client().get("/startupz")
    assert resp.status_code == 503
    assert resp.get_json()["status"] == "unavailable"
    assert resp.get_json()["checks"]["database"].startswith("error")


def test_probes_answer_on_the_public_port_only(settings: Settings) -> None:
    """Like /healthz and /readyz, /startupz needs no key and is not on SEG_METRICS_PORT."""
    from api.app import create_app

    client = create_app(settings.model_copy(update={"metrics_port": 9100})).test_client()
    for path in ("/healthz", "/readyz", "/startupz"):
        assert client.get(path, environ_overrides={"SERVER_PORT": "8000"}).status_code == 200
        assert client.get(path, environ_overrides={"SERVER_PORT": "9100"}).status_code == 404


@contextmanager
def silent_server() -> Iterator[int]:
    """A loopback port that takes connections and never answers: a hung server."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()  # the connections waiting in its backlog are reset: the checks end


def test_readyz_runs_checks_at_once_and_answers_in_time_when_they_hang(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: the checks ran one after the other with 2-5 s timeouts each, past the
    # readinessProbe's 3 s, while holding a request thread.
    from api.app import create_app
    from api.routes import health

    assert health.READY_TIMEOUT_S == 2.0  # the wait below is the one shipped
    with silent_server() as database, silent_server() as broker:
        hung = settings.model_copy(
            update={
                "database_url": f"postgresql+psycopg://segsvc@127.0.0.1:{database}/segsvc",
                "broker_url": f"redis://127.0.0.1:{broker}/0",
            }
        )
        client = create_app(hung).test_client()
        start = time.monotonic()
        resp = client.get("/readyz")
        took = time.monotonic() - start
    assert resp.status_code == 503
    assert resp.get_json()["checks"] == {
        "database": "error: no answer in 2 s",
        "broker": "error: no answer in 2 s",
    }
    assert took < 3.5  # one timeout for both, not one after the other (4 s)


def test_readyz_and_startupz_fail_while_the_schema_is_behind_this_release(client, settings) -> None:  # type: ignore[no-untyped-def]
    """A pod that started before its release's migrations Job ended passed every probe and
    answered 500s on columns not there yet."""
    from sqlalchemy import text

    from segsvc.db import session_scope

    with session_scope(settings) as session:
        (head,) = session.execute(text("SELECT version_num FROM alembic_version")).scalars()
        session.execute(text("UPDATE alembic_version SET version_num = '0009'"))
    try:
        behind = client.get("/readyz")
        not_started = client.get("/startupz")
        with session_scope(settings) as session:  # a newer release's migration: still ready
            session.execute(text("UPDATE alembic_version SET version_num = '9999_next'"))
        ahead = client.get("/readyz")
        started = client.get("/startupz")
    finally:
        with session_scope(settings) as session:
            session.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": head})
    assert behind.status_code == 503
    assert f"schema at 0009, this release needs {head}" in behind.get_json()["checks"]["database"]
    assert ahead.status_code == 200
    assert client.get("/readyz").status_code == 200
    # A new pod does not start before its release's migrations either.
    assert not_started.status_code == 503
    assert f"needs {head}" in not_started.get_json()["checks"]["database"]
    assert started.status_code == 200


def test_the_code_knows_its_schema_head(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from segsvc.schema import code_revisions, schema_behind

    for name, revision, down in (("a.py", "0001", None), ("b.py", "0002", "0001")):
        down_text = "None" if down is None else f"'{down}'"
        (tmp_path / name).write_text(
            f"revision: str = '{revision}'\ndown_revision: str | None = {down_text}\n"
        )
    assert code_revisions(tmp_path) == (frozenset({"0001", "0002"}), frozenset({"0002"}))
    assert schema_behind({"0002"}, tmp_path) is None
    assert schema_behind({"0003"}, tmp_path) is None  # ahead: a newer release migrated it
    assert "needs 0002" in (schema_behind({"0001"}, tmp_path) or "")
    assert "at none" in (schema_behind(set(), tmp_path) or "")
