"""KEDA's postgresql trigger: what it counts, run against the real schema as the role
`ops/postgres/keda-scaler-role.sql` makes, and the fields KEDA's scaler reads."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from segsvc.db import session_scope
from segsvc.images import validate_image
from segsvc.services import jobs as job_service
from segsvc.settings import Settings
from tests.conftest import PG_ADMIN, ROOT
from tests.ops.test_manifests import OVERLAYS, effective_settings, find, rendered
from tests.segsvc.webhooks.factories import finish_job, make_job, png_bytes, start_job

ROLE_SQL = ROOT / "ops" / "postgres" / "keda-scaler-role.sql"
# The fields of KEDA's postgresql scaler (pkg/scalers/postgresql_scaler.go, 2.12-2.16): a
# misspelt one is silently ignored by the cluster, as the ScaledObject schema cannot tell.
TRIGGER_METADATA = {"query", "targetQueryValue", "activationTargetQueryValue"}
AUTH_PARAMETERS = {"host", "port", "dbName", "userName", "password", "sslmode"}


def trigger(overlay: str) -> dict[str, Any]:
    (only,) = find(rendered(overlay), "ScaledObject", "segsvc-inference-worker")["spec"]["triggers"]
    return only


def batch_max_size(overlay: str) -> int:
    docs = rendered(overlay)
    worker = find(docs, "Deployment", "segsvc-inference-worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    return effective_settings(docs, container).batch_max_size


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trigger_counts_jobs_in_postgres_with_fields_keda_reads(overlay: str) -> None:
    found = trigger(overlay)
    assert found["type"] == "postgresql"
    assert set(found["metadata"]) == TRIGGER_METADATA
    assert found["metadata"]["activationTargetQueryValue"] == "0"  # wakes from zero on one job
    # One worker's worth: its prefetch (worker/celery_app.py, 3 x SEG_BATCH_MAX_SIZE).
    assert int(found["metadata"]["targetQueryValue"]) == 3 * batch_max_size(overlay)
    auth = find(rendered(overlay), "TriggerAuthentication", found["authenticationRef"]["name"])
    refs = auth["spec"]["secretTargetRef"]
    # Field by field, never `connection`: KEDA keys its shared pools by host, user and
    # database, which a bare connection string leaves empty.
    assert {ref["parameter"] for ref in refs} == AUTH_PARAMETERS
    if overlay == "overlays/dev":
        secret = find(rendered(overlay), "Secret", "segsvc-secrets")["stringData"]
        assert {ref["key"] for ref in refs} <= set(secret)
        # KEDA runs in its own namespace: only a fully qualified service name resolves there.
        assert secret["KEDA_POSTGRES_HOST"].endswith(".segsvc.svc.cluster.local")


@pytest.fixture
def scaler_role(settings: Settings) -> Iterator[str]:
    """The role of ops/postgres/keda-scaler-role.sql (under a name of this test's own: roles
    belong to the whole cluster), made by psql from the shipped file, as the docs say."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    role = f"segsvc_keda_test_{os.getpid()}"
    url = make_url(settings.database_url or "").set(drivername="postgresql")
    dsn = url.render_as_string(hide_password=False)
    script = ROLE_SQL.read_text().replace("segsvc_keda", role)
    for _ in range(2):  # the docs promise a second run changes nothing
        subprocess.run(
            [psql, dsn, "-v", "ON_ERROR_STOP=1", "-q", "-f", "-"],
            input=script,
            text=True,
            check=True,
            capture_output=True,
        )
    try:
        yield url.set(username=role).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_the_query_counts_queued_and_running_jobs_as_the_scaler_role(
    settings: Settings, scaler_role: str
) -> None:
    # A batch submit of 3 (one Redis message: KEDA's Redis scaler counted it once) and 1 alone.
    image = validate_image(png_bytes(), max_bytes=10**6, max_pixels=10**6)
    with session_scope(settings) as session:
        queued = [j.id for j in job_service.create_jobs(session=session, images=[image] * 3)]
    queued.append(make_job(settings, None))
    running = [make_job(settings, None) for _ in range(2)]
    for job_id in running:
        start_job(settings, job_id)
    finish_job(settings, start_job(settings, make_job(settings, None)))
    canceled = make_job(settings, None)
    with session_scope(settings) as session:
        job_service.cancel_job(session=session, job_id=str(canceled), client_id=None)
    with session_scope(settings) as session:
        assert job_service.queue_depth(session=session) == len(queued)
    query = trigger("base")["metadata"]["query"]
    for overlay in OVERLAYS:
        assert trigger(overlay)["metadata"]["query"] == query

    with psycopg.connect(scaler_role, autocommit=True) as conn:
        (value,) = conn.execute(query).fetchone() or (None,)
        assert value == len(queued) + len(running)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("5s",)
        # With only the status column to read, the planner can still use an index.
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN {query}"))
        assert "Index" in plan, plan
        assert "Seq Scan" not in plan, plan
        # ... and nothing else: no uploads, masks, keys or webhook secrets.
        for forbidden in (
            "SELECT input_bytes FROM jobs",
            "SELECT mask_png FROM jobs",
            "SELECT count(*) FROM api_keys",
            "SELECT count(*) FROM webhook_messages",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(forbidden)
