"""The API's /metrics endpoint, request ids and access logs."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import request_id_from
from segsvc.db import session_scope
from segsvc.logging_setup import configure_logging
from segsvc.ml.preprocess import encode_mask_png
from segsvc.models import Job
from segsvc.settings import Settings
from tests.api.test_idempotency import keyed_wait, png
from tests.api.test_long_poll import finish_next_job
from tests.conftest import encode_image


def png_bytes() -> bytes:
    return encode_image(Image.new("RGB", (40, 30), (10, 200, 30)))


def submit(client, headers: dict[str, str], data: bytes):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/jobs",
        headers=headers,
        data={"image": (io.BytesIO(data), "x.png")},
        content_type="multipart/form-data",
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rejections() -> float:
    """Refused submissions, every reason together."""
    return sum(
        s.value
        for family in REGISTRY.collect()
        if family.name == "segsvc_rejections"
        for s in family.samples
        if s.name == "segsvc_rejections_total"
    )


@pytest.fixture
def log_lines(settings: Settings) -> Iterator[io.StringIO]:
    """Root logs as JSON into a buffer for the test's duration."""
    stream = io.StringIO()
    level = logging.getLogger().level
    handler = configure_logging(
        settings.model_copy(update={"log_format": "json"}), service="api", stream=stream
    )
    yield stream
    logging.getLogger().removeHandler(handler)
    logging.getLogger().setLevel(level)


def test_metrics_endpoint_exposes_request_and_submission_series(client, auth) -> None:  # type: ignore[no-untyped-def]
    accepted = sample("segsvc_submissions_total")
    refused = sample("segsvc_rejections_total", reason="invalid_image")
    route = {"route": "/v1/jobs", "method": "POST"}
    ok_before = sample("segsvc_http_requests_total", status="202", **route)
    assert submit(client, auth, png_bytes()).status_code == 202
    assert submit(client, auth, b"not an image").status_code in (400, 415, 422)
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.mimetype == "text/plain"
    families = {f.name: f for f in text_string_to_metric_families(resp.get_data(as_text=True))}
    for name in (
        "segsvc_http_requests",
        "segsvc_http_request_duration_seconds",
        "segsvc_submissions",
        "segsvc_rejections",
    ):
        assert name in families
    assert sample("segsvc_http_requests_total", status="202", **route) == ok_before + 1
    assert sample("segsvc_http_request_duration_seconds_count", **route) >= 2
    assert sample("segsvc_submissions_total") == accepted + 1
    reasons = {s.labels["reason"] for s in families["segsvc_rejections"].samples}
    assert reasons, "a refused upload is counted with its reason"
    assert sample("segsvc_rejections_total", reason="invalid_image") >= refused


def test_submissions_count_the_jobs_of_batch_submits_and_not_replays(client, auth) -> None:  # type: ignore[no-untyped-def]
    # Regression: batch submits (the fast path) were not counted at all, and an idempotent
    # replay (200) counted as a new job.
    accepted = sample("segsvc_submissions_total")
    files = [(io.BytesIO(png_bytes()), f"{i}.png") for i in range(3)]
    batch = client.post(
        "/v1/jobs/batch",
        headers=auth,
        data={"image": files},
        content_type="multipart/form-data",
    )
    assert batch.status_code == 202
    assert sample("segsvc_submissions_total") == accepted + 3
    keyed = {**auth, "Idempotency-Key": uuid.uuid4().hex}
    assert submit(client, keyed, png_bytes()).status_code == 202
    assert submit(client, keyed, png_bytes()).status_code == 200  # the replay
    assert sample("segsvc_submissions_total") == accepted + 4
    refused = rejections()
    bad = client.post(
        "/v1/jobs/batch",
        headers=auth,
        data={"image": [(io.BytesIO(b"not an image"), "x.png")]},
        content_type="multipart/form-data",
    )
    assert bad.status_code >= 400
    assert rejections() == refused + 1  # a refused batch counts once, with its reason
    assert sample("segsvc_submissions_total") == accepted + 4


def test_a_keyed_wait_replayed_as_201_is_not_a_new_submission(client, auth, settings) -> None:  # type: ignore[no-untyped-def]
    """A keyed `POST /v1/jobs?wait=` retried after its job ended is replayed as 201 (the
    finished job, or its mask), with `Idempotent-Replayed: 1`: it counted as a new job, as
    the first 201 did (docs/scaling.md: a replay adds none)."""
    worker = finish_next_job(settings, mask_png=encode_mask_png(np.ones((16, 16), np.uint8)))
    key = uuid.uuid4().hex
    first = keyed_wait(client, auth, key, png(), 10)
    worker.join()
    assert first.status_code == 201
    accepted = sample("segsvc_submissions_total")
    for accept in (None, "image/png"):  # the lost answer was the job, or its mask
        again = keyed_wait(client, auth, key, png(), 10, accept=accept)
        assert (again.status_code, again.headers.get("Idempotent-Replayed")) == (201, "1")
    assert sample("segsvc_submissions_total") == accepted


def test_metrics_route_label_is_the_url_rule_not_the_path(client, auth) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, auth, png_bytes()).get_json()["id"]
    labels = {"route": "/v1/jobs/<job_id>", "method": "GET", "status": "200"}
    before = sample("segsvc_http_requests_total", **labels)
    client.get(f"/v1/jobs/{job_id}", headers=auth)
    assert sample("segsvc_http_requests_total", **labels) == before + 1
    assert (
        sample("segsvc_http_requests_total", route=f"/v1/jobs/{job_id}", method="GET", status="200")
        == 0
    )


def test_metrics_method_label_is_bounded(client) -> None:  # type: ignore[no-untyped-def]
    """Clients choose the method: invented ones share the label value "other"."""

    def others() -> float:
        return sum(
            sample("segsvc_http_requests_total", route="unmatched", method="other", status=code)
            for code in ("404", "405")
        )

    before = others()
    for i in range(3):
        client.open("/nowhere", method=f"ZZ{i:04d}")
    methods = {
        s.labels.get("method", "")
        for family in REGISTRY.collect()
        for s in family.samples
        if s.name == "segsvc_http_requests_total"
    }
    assert not [m for m in methods if m.startswith("ZZ")]
    assert others() == before + 3


def test_request_id_is_generated_stored_and_returned(client, auth, settings) -> None:  # type: ignore[no-untyped-def]
    resp = submit(client, auth, png_bytes())
    rid = resp.headers["X-Request-ID"]
    assert len(rid) == 32
    with session_scope(settings) as session:
        job = session.get(Job, uuid.UUID(resp.get_json()["id"]))
        assert job is not None
        assert job.request_id == rid


def test_request_id_from_caller_kept_when_plain_replaced_when_unsafe(client, auth) -> None:  # type: ignore[no-untyped-def]
    kept = submit(client, {**auth, "X-Request-ID": "abc-123"}, png_bytes())
    assert kept.headers["X-Request-ID"] == "abc-123"
    long = submit(client, {**auth, "X-Request-ID": "x" * 300}, png_bytes())
    assert long.status_code == 202
    assert long.headers["X-Request-ID"] != "x" * 300
    assert request_id_from("a b\nc") != "a b\nc"


def test_access_log_is_one_json_line_with_correlation_fields(client, auth, log_lines) -> None:  # type: ignore[no-untyped-def]
    resp = submit(client, {**auth, "X-Request-ID": "req-42"}, png_bytes())
    job_id = resp.get_json()["id"]
    client.get(f"/v1/jobs/{job_id}", headers={**auth, "X-Request-ID": "req-43"})
    records = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    access = [r for r in records if r["logger"] == "segsvc.access"]
    assert [r["request_id"] for r in access] == ["req-42", "req-43"]
    assert all(r["job_id"] == job_id for r in access)
    assert access[0]["status"] == 202
    assert access[0]["route"] == "/v1/jobs"
    assert {"ts", "level", "message", "service", "duration_ms"} <= set(access[0])


def test_api_metrics_in_multiprocess_mode_leave_out_the_workers_series(  # type: ignore[no-untyped-def]
    client, tmp_path: Path, monkeypatch
) -> None:
    """Every series in segsvc.metrics writes a zero to a gunicorn process's files as it is
    imported: the API exported `segsvc_worker_ready{pid=...} 0`, `segsvc_queue_depth{pid=...} 0`
    and empty worker histograms, flat series on the dashboards for each API process."""
    code = (
        "import segsvc.metrics as m; "
        "m.HTTP_REQUESTS.labels('/v1/jobs', 'POST', '202').inc(); m.SUBMISSIONS.inc()"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # what gunicorn_conf sets
    resp = client.get("/metrics")
    assert resp.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(resp.get_data(as_text=True))}
    assert set(families) <= {
        "segsvc_http_requests",
        "segsvc_http_request_duration_seconds",
        "segsvc_http_long_poll_duration_seconds",
        "segsvc_submissions",
        "segsvc_rejections",
    }, sorted(families)
    requests = {s.labels["status"]: s.value for s in families["segsvc_http_requests"].samples}
    assert requests["202"] == 1
    assert [
        s.value for s in families["segsvc_submissions"].samples if s.name.endswith("_total")
    ] == [1]


def test_a_long_polls_hold_is_not_counted_as_request_latency(client, auth) -> None:  # type: ignore[no-untyped-def]
    """A GET ?wait= held for its job counted its hold (up to 30 s) as request latency: the
    latency panels showed how long clients chose to wait, not how fast the API answers."""
    job_id = submit(client, auth, png_bytes()).get_json()["id"]
    route = "/v1/jobs/<job_id>"
    latency = sample("segsvc_http_request_duration_seconds_count", route=route, method="GET")
    held = sample("segsvc_http_long_poll_duration_seconds_count", route=route, method="GET")
    fast = {"route": route, "method": "GET", "le": "0.5"}
    slow = sample("segsvc_http_request_duration_seconds_bucket", **fast)
    for _ in range(2):
        assert client.get(f"/v1/jobs/{job_id}?wait=0.7", headers=auth).status_code == 200
    client.get(f"/v1/jobs/{job_id}", headers=auth)
    assert sample("segsvc_http_long_poll_duration_seconds_count", route=route, method="GET") == (
        held + 2
    )
    assert sample("segsvc_http_request_duration_seconds_count", route=route, method="GET") == (
        latency + 1
    )
    assert sample("segsvc_http_request_duration_seconds_bucket", **fast) == slow + 1


def test_the_access_line_names_the_job_of_a_replay_and_of_a_batch(  # type: ignore[no-untyped-def]
    client, auth, log_lines
) -> None:
    headers = {**auth, "Idempotency-Key": "access-1"}
    job_id = submit(client, headers, png_bytes()).get_json()["id"]
    assert submit(client, headers, png_bytes()).status_code == 200  # the replay
    batch = client.post(
        "/v1/jobs/batch",
        headers=auth,
        data={"image": [(io.BytesIO(png_bytes()), "a.png"), (io.BytesIO(png_bytes()), "b.png")]},
        content_type="multipart/form-data",
    )
    first = batch.get_json()["jobs"][0]["id"]
    records = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    access = [r for r in records if r["logger"] == "segsvc.access"]
    assert [r.get("job_id") for r in access] == [job_id, job_id, first]
