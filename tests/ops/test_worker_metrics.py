"""Worker-side metrics, probe files and JSON logs: in-process pieces and one real worker."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from segsvc.db import session_scope
from segsvc.devserver import process_commands
from segsvc.metrics import WORKER_READY
from segsvc.models import Job, TrainingRun, utcnow
from segsvc.settings import Settings
from tests.conftest import REDIS_URL, encode_image, free_port, start_worker, stop_process
from tests.segsvc.webhooks.factories import finish_job, make_job, start_job
from worker import metrics_server, observability
from worker.metrics_server import (
    ServedModel,
    record_models,
    sample_queue_depth,
    start_metrics_server,
)
from worker.probes import ALIVE, READY, check, clear_probes, main, probe_age, write_probe

WORKER_SERIES = (
    "segsvc_model_info",
    "segsvc_model_load_seconds",
    "segsvc_worker_ready",
    "segsvc_jobs",
    "segsvc_job_queue_wait_seconds",
    "segsvc_batch_predict_seconds",
    "segsvc_batch_size",
)


def png_bytes() -> bytes:
    return encode_image(Image.new("RGB", (50, 40), (200, 10, 30)))


def submit(client, auth) -> str:  # type: ignore[no-untyped-def]
    resp = client.post(
        "/v1/jobs",
        headers=auth,
        content_type="multipart/form-data",
        data={"image": (io.BytesIO(png_bytes()), "x.png")},
    )
    assert resp.status_code == 202
    return str(resp.get_json()["id"])


def scrape(port: int) -> dict[str, list]:  # type: ignore[type-arg]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_sample_queue_depth_counts_postgres_rows_and_broker_lists(client, auth, settings) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        submit(client, auth)
    depth = sample_queue_depth(settings)
    assert depth == {"queued_jobs": 3, settings.queue_name: 3, settings.webhook_queue_name: 0}
    assert REGISTRY.get_sample_value("segsvc_queue_depth") == 3
    assert (
        REGISTRY.get_sample_value("segsvc_broker_queue_length", {"queue": settings.queue_name}) == 3
    )


def test_the_sampler_counts_what_keda_counts_and_pending_webhook_messages(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings
) -> None:
    """KEDA scales on the jobs Postgres holds queued or running, not on the broker's list
    (which the dashboard said): beat exports both states, and the webhook messages pending."""
    ids = [submit(client, auth) for _ in range(3)]
    with session_scope(settings) as session:
        session.execute(update(Job).where(Job.id == uuid.UUID(ids[0])).values(status="running"))
    finish_job(settings, start_job(settings, make_job(settings, "https://hooks.example/x")))
    sample_queue_depth(settings)
    state = {
        s: REGISTRY.get_sample_value("segsvc_jobs_in_state", {"state": s})
        for s in ("queued", "running")
    }
    assert state == {"queued": 2, "running": 1}
    assert REGISTRY.get_sample_value("segsvc_queue_depth") == 2
    assert REGISTRY.get_sample_value("segsvc_webhook_pending_messages") == 1


def test_broker_list_lengths_are_read_from_the_broker_not_from_seg_redis_url(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, redis_db: int
) -> None:
    """With SEG_REDIS_URL set apart from the broker (rate limits on a database of their own),
    the sampler read the lists where no message ever is: 0 whatever the backlog."""
    for _ in range(3):
        submit(client, auth)  # three messages on the broker's inference list
    other = 14 if redis_db != 14 else 15  # only read here: the benchmarks' databases
    cfg = settings.model_copy(update={"redis_url": f"{REDIS_URL}/{other}"})
    depth = sample_queue_depth(cfg)
    assert depth == {"queued_jobs": 3, settings.queue_name: 3, settings.webhook_queue_name: 0}
    assert (
        REGISTRY.get_sample_value("segsvc_broker_queue_length", {"queue": settings.queue_name}) == 3
    )


def test_broker_list_lengths_are_skipped_when_the_broker_is_not_redis(
    settings: Settings, tmp_path: Path
) -> None:
    """A broker that is not Redis has no lists to read: SEG_REDIS_URL's are none of its."""
    cfg = settings.model_copy(
        update={"broker_url": None, "redis_url": settings.broker_url, "var_dir": tmp_path}
    )
    assert not cfg.celery_broker_url.startswith("redis")
    assert sample_queue_depth(cfg) == {"queued_jobs": 0}


def test_metrics_server_serves_model_gauges() -> None:
    port = free_port()
    assert start_metrics_server(0) is False
    assert start_metrics_server(port) is True
    record_models(ServedModel("v-old", "cd" * 32, "onnx", 3.0))
    record_models(
        ServedModel("v-test", "ab" * 32, "onnx", 1.5),
        ServedModel("v-canary", "ef" * 32, "litert", 0.5),
        dropped=["v-old"],
    )
    families = scrape(port)
    info = families["segsvc_model_info"][0]
    assert info.labels == {
        "production": "v-test",
        "sha256": "abababababab",
        "runtime": "onnx",
        "canary": "v-canary",
        "canary_runtime": "litert",
    }
    loads = {s.labels["model_version"]: s.value for s in families["segsvc_model_load_seconds"]}
    assert (loads["v-test"], loads["v-canary"]) == (1.5, 0.5)
    assert "v-old" not in loads


def test_probe_files_written_refreshed_and_cleared(tmp_path: Path) -> None:
    write_probe(None, READY)  # probes off: nothing happens
    write_probe(tmp_path, READY)
    assert probe_age(tmp_path, READY) is not None
    assert (probe_age(tmp_path, READY) or 99) < 5
    clear_probes(tmp_path)
    assert probe_age(tmp_path, READY) is None
    assert probe_age(tmp_path, ALIVE) is None


def test_probe_command_checks_ready_and_fresh_alive(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SEG_PROBE_DIR", str(tmp_path))
    assert main(["ready"]) == 1
    write_probe(tmp_path, READY)
    assert main(["ready"]) == 0
    assert main([]) == 1  # alive missing
    write_probe(tmp_path, ALIVE)
    assert main([]) == 0
    old = time.time() - 600
    os.utime(tmp_path / ALIVE, (old, old))
    assert check(tmp_path, need=(ALIVE,), max_age=60) == "alive is 600s old"
    assert main(["alive"]) == 1


def test_a_stale_alive_is_excused_while_the_broker_does_not_answer(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch, settings: Settings
) -> None:
    """Celery sends no heartbeats while it reconnects to Redis: every worker's liveness probe
    failed during a Redis outage, and the orchestrator restarted them all, to no avail."""
    monkeypatch.setenv("SEG_PROBE_DIR", str(tmp_path))
    write_probe(tmp_path, READY)
    assert main(["alive"]) == 1  # missing: never excused
    write_probe(tmp_path, ALIVE)
    old = time.time() - 600
    os.utime(tmp_path / ALIVE, (old, old))
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    monkeypatch.setenv("SEG_BROKER_URL", down)
    assert main(["alive"]) == 0
    monkeypatch.setenv("SEG_BROKER_URL", settings.broker_url or "")
    assert main(["alive"]) == 1  # the broker answers: a stale alive is the worker's own


def test_probes_of_a_worker_started_during_a_broker_outage_wait_for_it(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch, settings: Settings
) -> None:
    """A worker writes its probe files only once it has connected: one started while Redis was
    down had no `alive` at all, and its liveness probe (and the inference pod's startup probe,
    on `ready`) killed it again and again, although it only waited for Redis."""
    monkeypatch.setenv("SEG_PROBE_DIR", str(tmp_path))
    monkeypatch.setenv("SEG_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing there
    assert main(["alive"]) == 0
    assert main(["started"]) == 0
    assert main(["ready"]) == 1  # not ready: readiness still waits
    monkeypatch.setenv("SEG_BROKER_URL", settings.broker_url or "")
    assert main(["alive"]) == 1  # connected yet no heartbeat: the worker's own fault
    assert main(["started"]) == 1
    write_probe(tmp_path, READY)
    assert main(["started"]) == 0


class FlakySegmenter:
    """Stands in for the Segmenter: its model load fails `failures` times, then succeeds once
    `released` is set."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.released = threading.Event()

    def load(self, *, retry: bool = False) -> SimpleNamespace:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("database blip")
        self.released.wait(30)
        runtime = SimpleNamespace(name="onnx")
        return SimpleNamespace(version="v-retry", sha256="cd" * 32, runtime=runtime, load_seconds=2)


def consumer(queue: str) -> SimpleNamespace:
    """What Celery's worker_ready signal sends: a consumer whose app consumes `queue`."""
    queues = SimpleNamespace(consume_from={queue: None})
    return SimpleNamespace(app=SimpleNamespace(amqp=SimpleNamespace(queues=queues)))


@pytest.fixture
def signal_settings(settings: Settings, tmp_path: Path, monkeypatch) -> Iterator[Settings]:  # type: ignore[no-untyped-def]
    """The observability hooks on the test settings, probe files in `tmp_path`, fast retries."""
    cfg = settings.model_copy(update={"probe_dir": tmp_path})
    monkeypatch.setattr(observability, "get_settings", lambda: cfg)
    monkeypatch.setattr(observability, "_stopping", threading.Event(), raising=False)
    monkeypatch.setattr(observability, "LOAD_RETRY_FIRST_S", 0.05, raising=False)
    monkeypatch.setattr(observability, "LOAD_RETRY_MAX_S", 0.1, raising=False)
    WORKER_READY.set(0)
    yield cfg
    observability._stopping.set()  # ends a retry thread left running
    WORKER_READY.set(0)


def test_a_failed_model_load_at_start_is_retried_until_the_worker_is_ready(  # type: ignore[no-untyped-def]
    signal_settings: Settings, tmp_path: Path, monkeypatch
) -> None:
    """A model load that failed at start (a database blip) left the worker unready for good,
    though its jobs loaded the model later and it served: the startup probe killed it."""
    segmenter = FlakySegmenter(failures=2)
    monkeypatch.setattr("worker.tasks.get_segmenter", lambda: segmenter)
    observability._worker_ready(consumer(signal_settings.queue_name))
    assert probe_age(tmp_path, READY) is None
    segmenter.released.set()  # the next try succeeds (however slow this machine is)
    for thread in threading.enumerate():
        if thread.name == "model-load-retry":
            thread.join(timeout=30)  # ready, then the gauge: wait for both
    assert probe_age(tmp_path, READY) is not None, "never ready after the load succeeded"
    assert segmenter.failures == 0
    assert REGISTRY.get_sample_value("segsvc_worker_ready") == 1


def test_the_load_retry_ends_when_the_worker_stops(  # type: ignore[no-untyped-def]
    signal_settings: Settings, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr("worker.tasks.get_segmenter", lambda: FlakySegmenter(failures=10**6))
    observability._worker_ready(consumer(signal_settings.queue_name))
    retry = next(t for t in threading.enumerate() if t.name == "model-load-retry")
    observability._worker_shutdown()
    retry.join(timeout=5)
    assert not retry.is_alive()
    assert probe_age(tmp_path, READY) is None


def test_alive_is_kept_fresh_while_the_model_loads(  # type: ignore[no-untyped-def]
    signal_settings: Settings, tmp_path: Path, monkeypatch
) -> None:
    """No heartbeat runs while the model loads: after a startup probe passed on `started`
    (the broker was down), the liveness probe would kill a pod loading its model."""
    seen: list[float | None] = []

    class SlowSegmenter(FlakySegmenter):
        def load(self, *, retry: bool = False) -> SimpleNamespace:
            (tmp_path / ALIVE).unlink(missing_ok=True)
            time.sleep(0.5)
            seen.append(probe_age(tmp_path, ALIVE))
            return super().load(retry=retry)

    monkeypatch.setattr(observability, "ALIVE_EVERY_S", 0.05, raising=False)
    monkeypatch.setattr("worker.tasks.get_segmenter", lambda: SlowSegmenter(failures=0))
    observability._worker_ready(consumer(signal_settings.queue_name))
    assert seen[0] is not None, "alive written during the load"
    assert probe_age(tmp_path, READY) is not None


def test_only_inference_workers_count_as_workers_ready(
    signal_settings: Settings, tmp_path: Path
) -> None:
    """The dashboard's "Workers ready" is sum(segsvc_worker_ready): webhook and maintenance
    workers set it to 1 too, so it counted workers that serve no model."""
    for queue in (signal_settings.webhook_queue_name, "maintenance"):
        observability._worker_ready(consumer(queue))
        assert probe_age(tmp_path, READY) is not None  # ready for its probes all the same
        assert REGISTRY.get_sample_value("segsvc_worker_ready") == 0


def _stop_metrics_server(port: int) -> None:
    server = metrics_server._started.pop(port)[0]  # type: ignore[index]  # (server, thread)
    server.shutdown()  # type: ignore[attr-defined]
    server.server_close()  # type: ignore[attr-defined]


@pytest.fixture
def role_settings(signal_settings: Settings, monkeypatch) -> Settings:  # type: ignore[no-untyped-def]
    """The hooks' settings with a metrics port of their own, on loopback; no beat sampler."""
    cfg = signal_settings.model_copy(
        update={"metrics_port": free_port(), "metrics_bind": "127.0.0.1"}
    )
    monkeypatch.setattr(observability, "get_settings", lambda: cfg)
    monkeypatch.setattr(metrics_server, "get_settings", lambda: cfg)

    class NoSampler:
        def __init__(self, settings: Settings) -> None:
            pass

        def start(self) -> None:
            pass

    monkeypatch.setattr(observability, "QueueDepthSampler", NoSampler)
    monkeypatch.setattr(observability, "_sampler", None)
    return cfg


# Unlabeled series that each read as a value wherever they are exported: only their role's.
OWNED = {
    "segsvc_model_info": "inference",
    "segsvc_worker_ready": "inference",
    "segsvc_queue_depth": "beat",
    "segsvc_webhook_pending_messages": "beat",
    "segsvc_retrain_last_success_timestamp_seconds": "maintenance",
}


@pytest.mark.parametrize("role", ["inference", "webhook", "maintenance", "beat"])
def test_each_process_serves_the_series_of_its_role_only(  # type: ignore[no-untyped-def]
    role_settings: Settings, role: str
) -> None:
    """Every process served every series: webhook, maintenance and beat processes
    `segsvc_model_info 1.0` (an empty row in "Model version in service"),
    `segsvc_worker_ready 0` and `segsvc_queue_depth 0` (0 with beat down, not "no data")."""
    port = role_settings.metrics_port
    queue = {
        "inference": role_settings.queue_name,
        "webhook": role_settings.webhook_queue_name,
        "maintenance": observability.MAINTENANCE_QUEUE,
    }.get(role)
    if queue is None:
        observability._beat_init()
    else:
        observability._worker_init(sender=consumer(queue))
    try:
        families = scrape(port)
    finally:
        _stop_metrics_server(port)
    for series, owner in OWNED.items():
        assert (series in families) == (owner == role), (role, series, sorted(families))
    assert ("segsvc_jobs" in families) == (role in ("inference", "maintenance"))  # reconciler
    assert ("segsvc_webhook_messages_ended" in families) == (role == "webhook")
    assert ("segsvc_retrain_runs" in families) == (role == "maintenance")
    assert ("segsvc_jobs_in_state" in families) == (role == "beat")


def test_the_maintenance_worker_reads_its_last_successful_retraining_run_on_start(  # type: ignore[no-untyped-def]
    role_settings: Settings,
) -> None:
    """From 0 after each restart, an alert on its age fired at every deploy."""
    ended = utcnow() - timedelta(hours=5)
    with session_scope(role_settings) as session:
        for status, at in (("skipped", ended), ("failed", utcnow()), ("running", None)):
            session.add(
                TrainingRun(
                    id=uuid.uuid4(),
                    status=status,
                    trigger="schedule",
                    started_at=ended - timedelta(minutes=1),
                    completed_at=at,
                )
            )
    observability._worker_init(sender=consumer(observability.MAINTENANCE_QUEUE))
    _stop_metrics_server(role_settings.metrics_port)
    value = REGISTRY.get_sample_value("segsvc_retrain_last_success_timestamp_seconds")
    assert value == pytest.approx(ended.timestamp(), abs=1e-3)


@pytest.mark.parametrize(
    ("process", "name"),
    [
        ("worker", "worker"),
        ("webhooks", "webhook-worker"),
        ("maintenance", "maintenance-worker"),
        ("beat", "beat"),
    ],
)
def test_log_lines_name_the_process_that_wrote_them(
    settings: Settings,
    monkeypatch,
    process: str,
    name: str,  # type: ignore[no-untyped-def]
) -> None:
    """The maintenance worker's lines said `worker`, like an inference worker's."""
    monkeypatch.setattr(observability, "get_settings", lambda: settings)
    argv = process_commands(settings, api_workers=1)[process]
    assert observability.service_name(argv) == name
    k8s = ["celery", "-A", "worker.celery_app", "worker", "-Q", "maintenance", "--pool"]
    assert observability.service_name(k8s) == "maintenance-worker"
    both = [
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        f"{settings.queue_name},maintenance",
    ]
    assert observability.service_name(both) == "worker"  # it serves the model


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_worker_exposes_series_probes_and_json_logs_after_a_job(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, production_model: str, tmp_path: Path
) -> None:
    port, probes, log_path = free_port(), tmp_path / "probes", tmp_path / "worker.log"
    proc = start_worker(
        settings,
        log_path,
        SEG_METRICS_PORT=str(port),
        SEG_PROBE_DIR=str(probes),
        SEG_LOG_FORMAT="json",
    )
    try:
        assert probe_age(probes, READY) is not None, "ready is written once the model loads"
        job_id = submit(client, auth)
        deadline = time.monotonic() + 60
        while client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["status"] != "succeeded":
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(2.5)  # one heartbeat
        assert (probe_age(probes, ALIVE) or 99) < 5
        families = scrape(port)
    finally:
        stop_process(proc)
    missing = [name for name in WORKER_SERIES if name not in families]
    assert not missing, missing
    assert families["segsvc_model_info"][0].labels["production"] == production_model
    assert families["segsvc_worker_ready"][0].value == 1
    jobs = {
        s.labels.get("status"): s.value
        for s in families["segsvc_jobs"]
        if s.name == "segsvc_jobs_total"
    }
    assert jobs.get("succeeded", 0) >= 1, families["segsvc_jobs"]
    assert probe_age(probes, READY) is None, "a stopped worker is not ready"
    records = [
        json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")
    ]
    assert any(r["message"].endswith(" ready.") for r in records)
    assert all(r["service"] == "worker" for r in records)


def test_metrics_import_where_the_multiprocess_folder_does_not_exist(tmp_path: Path) -> None:
    """The webhook worker runs on the API image: with PROMETHEUS_MULTIPROC_DIR set and its
    folder missing (a fresh /tmp), importing the metrics failed and the worker never started."""
    folder = tmp_path / "not-yet" / "prometheus"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    code = "import segsvc.metrics as m; m.WEBHOOK_DELIVERIES.labels(outcome='ok').inc()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert any(folder.iterdir())  # the series went to the folder


def test_only_the_api_sets_multiprocess_mode_in_the_image() -> None:
    """The webhook worker shares the API image; gunicorn's config sets the variable itself."""
    dockerfile = (Path(__file__).parents[2] / "Dockerfile").read_text()
    assert "PROMETHEUS_MULTIPROC_DIR" not in dockerfile
