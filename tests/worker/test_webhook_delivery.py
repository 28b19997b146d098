"""Webhook delivery through the worker: in-process attempts, then real Celery worker processes."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from prometheus_client import REGISTRY
from standardwebhooks.webhooks import Webhook

from api.app import create_app
from segsvc.db import session_scope
from segsvc.logging_setup import configure_logging
from segsvc.models import WebhookMessage, db_time
from segsvc.services import webhooks as webhook_service
from segsvc.settings import Settings
from segsvc.webhooks.dispatch import claim_due
from segsvc.webhooks.outbox import JOB_COMPLETED, JOB_STARTED, job_message_id
from tests.conftest import free_port, sample_images, start_celery, stop_process
from tests.segsvc.webhooks.factories import finish_job, make_job, start_job
from tests.segsvc.webhooks.receiver import (
    LOOPBACK_ONLY,
    Received,
    Receiver,
    Reply,
    hook_settings,
    receiver,
)
from worker.webhook_tasks import deliver_message

__all__ = ["hook_settings", "receiver"]


def pump(
    settings: Settings, until: str, message_id: str | None = None, timeout: float = 15.0
) -> WebhookMessage:
    """Run the dispatcher and the task in this process until the message reaches `until`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(settings) as session:
            claimed = claim_due(session=session)
        for mid, lease in claimed:
            deliver_message(settings, mid, lease)
        msg = only_message(settings, message_id)
        if msg.status == until:
            return msg
        time.sleep(0.05)
    raise AssertionError(f"message stayed {msg.status}")


def only_message(settings: Settings, message_id: str | None = None) -> WebhookMessage:
    with session_scope(settings) as session:
        rows = session.query(WebhookMessage).order_by(WebhookMessage.created_at).all()
        msgs = [m for m in rows if message_id in (None, m.id)]
        for m in msgs:
            _ = m.attempt_log  # load while the session is open
        return msgs[-1]


def secret_keys(settings: Settings) -> list[str]:
    with session_scope(settings) as session:
        return [r.secret for r in webhook_service.signing_secrets(session=session, client_id=None)]


def test_deliver_message_retries_failures_on_growing_delays(
    receiver: Receiver, hook_settings: Settings
) -> None:
    cfg = hook_settings.model_copy(update={"webhook_schedule": "0,1,4"})
    receiver.script(Reply(500), Reply(503))
    finish_job(cfg, start_job(cfg, make_job(cfg, receiver.url)))
    msg = pump(cfg, "delivered")
    assert msg.attempts == 3
    assert [a.status_code for a in msg.attempt_log] == [500, 503, 200]
    at = [r.at for r in receiver.wait_for(3)]
    gaps = [at[1] - at[0], at[2] - at[1]]
    assert 0.8 < gaps[0] < 2.5 < gaps[1] < 8, gaps  # 1 s then 4 s, each +-10%
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    assert len({r.headers["webhook-timestamp"] for r in receiver.requests}) >= 2


def test_deliver_message_signature_verifies_and_payload_is_job_json(
    receiver: Receiver, hook_settings: Settings
) -> None:
    job_id = make_job(hook_settings, receiver.url)
    finish_job(hook_settings, start_job(hook_settings, job_id))
    pump(hook_settings, "delivered")
    (got,) = receiver.wait_for(1)
    (key,) = secret_keys(hook_settings)
    event = Webhook(key).verify(got.body, got.headers)
    assert event["type"] == "job.completed"
    assert event["data"]["id"] == str(job_id)
    assert event["data"]["status"] == "succeeded"
    assert event["data"]["urls"]["mask"] == f"http://127.0.0.1:8000/v1/jobs/{job_id}/mask.png"
    assert got.headers["webhook-signature"].startswith("v1,")


def test_deliver_message_rotation_window_signs_with_both(
    receiver: Receiver, hook_settings: Settings
) -> None:
    (old,) = secret_keys(hook_settings)
    with session_scope(hook_settings) as session:
        new = webhook_service.rotate_secret(
            session=session, client_id=None, settings=hook_settings
        ).secret
    finish_job(hook_settings, start_job(hook_settings, make_job(hook_settings, receiver.url)))
    pump(hook_settings, "delivered")
    (got,) = receiver.wait_for(1)
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    for key in (old, new):
        Webhook(key).verify(got.body, got.headers)


def test_deliver_message_410_disables_endpoint(receiver: Receiver, hook_settings: Settings) -> None:
    receiver.script(Reply(410))
    first = make_job(hook_settings, receiver.url, ["start", "completed"])
    finish_job(hook_settings, start_job(hook_settings, first))
    pump(hook_settings, "disabled")  # the completed message, after the started one got 410
    time.sleep(0.2)
    assert len(receiver.requests) == 1
    second = make_job(hook_settings, receiver.url)
    finish_job(hook_settings, start_job(hook_settings, second))
    assert only_message(hook_settings).status == "disabled"


def test_deliver_message_redirect_is_not_followed(
    receiver: Receiver, hook_settings: Settings
) -> None:
    receiver.script(Reply(307, headers={"Location": "/elsewhere"}))
    finish_job(hook_settings, start_job(hook_settings, make_job(hook_settings, receiver.url)))
    deadline = time.monotonic() + 15
    while not only_message(hook_settings).attempt_log and time.monotonic() < deadline:
        with session_scope(hook_settings) as session:
            claimed = claim_due(session=session)
        for mid, lease in claimed:
            deliver_message(hook_settings, mid, lease)
    msg = only_message(hook_settings)
    assert msg.status == "pending"  # tried again later, on the schedule
    assert "not followed" in (msg.attempt_log[0].error or "")
    assert [r.path for r in receiver.requests] == ["/hook"]


def test_a_message_refused_on_its_own_keeps_its_backoff_while_others_are_delivered(
    receiver: Receiver, hook_settings: Settings
) -> None:
    # Regression: a receiver that answers 400 to job.started and 204 to job.completed. Each
    # 2xx made every message of the endpoint more than a lease ahead due, so job.started was
    # tried again after every delivery (eight attempts in 16 s, each pausing the endpoint and
    # holding up the notices it takes), not 5 min later, then 30 min, 2 h... for 3 days.
    cfg = hook_settings.model_copy(
        update={
            "webhook_schedule": "0,0.5,300,1800,7200",
            "webhook_endpoint_pause_max_seconds": 0.5,
        }
    )

    def answer(got: Received) -> Reply:
        refused = json.loads(got.body)["type"] == "job.started"
        return Reply(400 if refused else 204, body=b"")

    receiver.answer = answer
    first = make_job(cfg, receiver.url, ["start", "completed"])
    claimed = start_job(cfg, first)
    started = job_message_id(first, JOB_STARTED)
    deadline = time.monotonic() + 15
    while only_message(cfg, started).attempts < 2:  # at once, then 0.5 s later: 400 both
        assert time.monotonic() < deadline, "job.started was not tried twice"
        pump(cfg, "pending", started)
        time.sleep(0.05)
    finish_job(cfg, claimed)
    pump(cfg, "delivered", job_message_id(first, JOB_COMPLETED))
    for _ in range(3):  # later jobs' notices: each one delivered
        other = make_job(cfg, receiver.url)
        finish_job(cfg, start_job(cfg, other))
        pump(cfg, "delivered", job_message_id(other, JOB_COMPLETED))
    time.sleep(0.6)  # past any pause: what is due now would be claimed
    pump(cfg, "pending", started)
    message = only_message(cfg, started)
    assert message.attempts == 2, [a.attempted_at for a in message.attempt_log]
    assert message.next_attempt_at is not None
    with session_scope(cfg) as session:
        waits = message.next_attempt_at - db_time(session)
    assert timedelta(seconds=240) < waits < timedelta(seconds=330)  # its own 5 min (+-10%)
    events = [json.loads(r.body)["type"] for r in receiver.requests]
    assert events.count("job.started") == 2
    assert events.count("job.completed") == 4


def ended() -> dict[str, float]:
    """`segsvc_webhook_messages_ended_total` by status, as this process counted so far."""
    return {
        status: REGISTRY.get_sample_value("segsvc_webhook_messages_ended_total", {"status": status})
        or 0.0
        for status in ("delivered", "failed", "disabled")
    }


def ended_since(before: dict[str, float]) -> dict[str, float]:
    return {status: count - before[status] for status, count in ended().items()}


def test_a_retry_past_the_max_age_is_counted_as_a_message_failed_once(
    receiver: Receiver, hook_settings: Settings
) -> None:
    """Its next attempt (60 s) would pass the max age (30 s): the message ends failed after
    its first attempt, which `segsvc_webhook_deliveries_total` counts as a retry; no series
    said it was given up on."""
    cfg = hook_settings.model_copy(
        update={"webhook_schedule": "0,60", "webhook_max_age_seconds": 30}
    )
    receiver.default = Reply(500)
    before = ended()
    finish_job(cfg, start_job(cfg, make_job(cfg, receiver.url)))
    msg = pump(cfg, "failed")
    assert msg.attempts == 1
    time.sleep(0.1)
    pump_once(cfg)  # nothing more to claim: counted once
    assert ended_since(before) == {"delivered": 0, "failed": 1, "disabled": 0}


def test_a_message_past_its_max_age_without_an_attempt_is_counted_failed_once(
    receiver: Receiver, hook_settings: Settings
) -> None:
    """`start_attempt` fails a message past its max age without an attempt: it was counted
    nowhere at all."""
    cfg = hook_settings.model_copy(update={"webhook_max_age_seconds": 1})
    receiver.default = Reply(500)
    before = ended()
    finish_job(cfg, start_job(cfg, make_job(cfg, receiver.url)))
    time.sleep(1.2)
    msg = pump(cfg, "failed")
    assert msg.attempts == 0
    assert receiver.requests == []
    pump_once(cfg)
    assert ended_since(before) == {"delivered": 0, "failed": 1, "disabled": 0}


def test_a_410_counts_its_message_and_the_backlog_it_disables_once_each(
    receiver: Receiver, hook_settings: Settings
) -> None:
    receiver.script(Reply(410))
    before = ended()
    first = make_job(hook_settings, receiver.url, ["start", "completed"])
    finish_job(hook_settings, start_job(hook_settings, first))
    pump(hook_settings, "disabled")  # job.started refused (failed), job.completed disabled
    pump_once(hook_settings)
    assert ended_since(before) == {"delivered": 0, "failed": 1, "disabled": 1}
    before = ended()
    finish_job(hook_settings, start_job(hook_settings, make_job(hook_settings, receiver.url)))
    pump_once(hook_settings)  # recorded disabled: never pending, not counted as ending
    assert ended_since(before) == {"delivered": 0, "failed": 0, "disabled": 0}


def test_a_delivery_is_counted_once_and_its_log_lines_carry_the_job_and_request_ids(
    receiver: Receiver, hook_settings: Settings
) -> None:
    """The worker's lines named the message only, though its row has the job's id (and the
    job the id of the request that submitted it, which the API's lines carry)."""
    stream = io.StringIO()
    level = logging.getLogger().level
    handler = configure_logging(
        hook_settings.model_copy(update={"log_format": "json"}),
        service="webhook-worker",
        stream=stream,
    )
    try:
        before = ended()
        job_id = make_job(hook_settings, receiver.url, request_id="req-7f3a")
        finish_job(hook_settings, start_job(hook_settings, job_id))
        pump(hook_settings, "delivered")
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    assert ended_since(before) == {"delivered": 1, "failed": 0, "disabled": 0}
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    ours = [r for r in lines if r["logger"] == "worker.webhook_tasks"]
    assert ours, lines
    assert all(r.get("job_id") == str(job_id) for r in ours), ours
    assert all(r.get("request_id") == "req-7f3a" for r in ours), ours


def pump_once(settings: Settings) -> None:
    """One dispatcher pass, run in this process."""
    with session_scope(settings) as session:
        claimed = claim_due(session=session)
    for mid, lease in claimed:
        deliver_message(settings, mid, lease)


# --- real worker processes ------------------------------------------------------------------
def start_webhook_worker(
    settings: Settings, log_path: Path, **extra: str
) -> subprocess.Popen[bytes]:
    """A real Celery worker on the webhooks queue only (no model, threads pool)."""
    return start_celery(
        settings,
        log_path,
        app="worker.webhook_tasks",
        queue=settings.webhook_queue_name,
        pool=("--pool", "threads", "--concurrency", "4"),
        timeout=60,
        SEG_WEBHOOK_ALLOW_NETWORKS=LOOPBACK_ONLY,
        **extra,
    )


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_worker_restart_mid_retry_loses_no_delivery(
    receiver: Receiver, settings: Settings, tmp_path: Path
) -> None:
    receiver.script(Reply(500))
    fast = {"SEG_WEBHOOK_SCHEDULE": "0,3", "SEG_WEBHOOK_TIMEOUT_SECONDS": "2"}
    proc = start_webhook_worker(settings, tmp_path / "hooks1.log", **fast)
    try:
        log_text = (tmp_path / "hooks1.log").read_text()
        assert ".> webhooks" in log_text
        assert ".> inference" not in log_text
        finish_job(settings, start_job(settings, make_job(settings, receiver.url)))
        receiver.wait_for(1)
        deadline = time.monotonic() + 10
        while only_message(settings).attempts < 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # the failed attempt is recorded, its retry scheduled
    finally:
        proc.kill()  # dies between attempts, the retry only in Postgres
        proc.wait()
    redis.Redis.from_url(settings.broker_url or "").flushdb()  # and the broker forgets all
    msg = only_message(settings)
    assert (msg.status, msg.attempts) == ("pending", 1)
    proc = start_webhook_worker(settings, tmp_path / "hooks2.log", **fast)
    try:
        receiver.wait_for(2, timeout=30)
        deadline = time.monotonic() + 10
        while only_message(settings).status != "delivered" and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop_process(proc)
    msg = only_message(settings)
    assert (msg.status, msg.attempts) == ("delivered", 2)
    assert [a.status_code for a in msg.attempt_log] == [500, 200]


@pytest.fixture
def webhook_worker(settings: Settings, tmp_path: Path) -> Iterator[Path]:
    log_path = tmp_path / "hooks.log"
    proc = start_webhook_worker(
        settings, log_path, SEG_WEBHOOK_TIMEOUT_SECONDS="3", SEG_WEBHOOK_SCHEDULE="0,1,2"
    )
    yield log_path
    stop_process(proc)


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_end_to_end_signed_events_in_order_and_slow_receiver_never_blocks_inference(
    settings: Settings,
    auth: dict[str, str],
    worker: Path,
    webhook_worker: Path,
    receiver: Receiver,
) -> None:
    slow = Receiver()
    slow.default = Reply(200, delay=5.0)
    slow.thread.start()
    try:
        api = create_app(settings.model_copy(update={"webhook_allow_networks": LOOPBACK_ONLY}))
        client = api.test_client()
        key = client.get("/v1/webhooks/secret", headers=auth).get_json()["key"]
        slow_job = submit(client, auth, webhook=slow.url, webhook_events="start,completed")
        both = submit(client, auth, webhook=receiver.url, webhook_events="start,completed")
        default = submit(client, auth, webhook=receiver.url)
        for job_id in (slow_job, both, default):
            body = wait_job(client, auth, job_id)
            assert body["status"] == "succeeded", worker.read_text()[-2000:]
        received = receiver.wait_for(3, timeout=30)
        events = [json.loads(r.body) for r in received]
        order = {j: [e["type"] for e in events if e["data"]["id"] == j] for j in (both, default)}
        assert order == {both: ["job.started", "job.completed"], default: ["job.completed"]}
        for got in received:
            Webhook(key).verify(got.body, got.headers)
        # The slow receiver's first attempt times out after the job itself had finished.
        log = wait_log(client, auth, slow_job)
        first = log[0]["attempt_log"][0]
        assert "timed out" in first["error"], log
        done = client.get(f"/v1/jobs/{slow_job}", headers=auth).get_json()["completed_at"]
        ended = parse_iso(first["attempted_at"]) + timedelta(milliseconds=first["duration_ms"])
        assert parse_iso(done) < ended
    finally:
        slow.server.shutdown()
        slow.server.server_close()


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def submit(client: FlaskClient, auth: dict[str, str], **fields: str) -> str:
    photo = sample_images(1)[0]
    data = {"image": (io.BytesIO(photo.read_bytes()), photo.name), **fields}
    resp = client.post("/v1/jobs", headers=auth, data=data, content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_json()
    return str(resp.get_json()["id"])


def wait_job(client: FlaskClient, auth: dict[str, str], job_id: str) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def wait_log(client: FlaskClient, auth: dict[str, str], job_id: str) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log = client.get(f"/v1/jobs/{job_id}/webhooks", headers=auth).get_json()["messages"]
        if log and log[0]["attempt_log"]:
            return log  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"no attempts for job {job_id}")


def test_the_dispatcher_keeps_at_most_a_high_water_of_hints_in_the_broker(
    settings: Settings,
) -> None:
    """A backlog claimed faster than the workers took it went stale in the queue and was
    claimed and sent again every minute; now the rest waits, due, in Postgres."""
    from worker import webhook_tasks

    for _ in range(3):
        finish_job(settings, start_job(settings, make_job(settings, "https://hooks.example/x")))
    sent: list[str] = []

    class Sender:
        def send_task(self, name: str, args: list[str], queue: str) -> None:
            sent.append(args[0])

    # a rate-limit Redis of its own (SEG_REDIS_URL) must not hide the broker's list
    settings = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    broker = redis.Redis.from_url(settings.celery_broker_url)
    queue = settings.webhook_queue_name
    broker.delete(queue)
    broker.rpush(queue, *[b"hint"] * (webhook_tasks.DISPATCH_HIGH_WATER - 2))
    try:
        assert webhook_tasks.dispatch_due(settings, Sender()) == 2  # type: ignore[arg-type]
        assert len(sent) == 2
        broker.rpush(queue, b"hint", b"hint")
        assert webhook_tasks.dispatch_due(settings, Sender()) == 0  # type: ignore[arg-type]
        broker.delete(queue)
        assert webhook_tasks.dispatch_due(settings, Sender()) == 1  # type: ignore[arg-type]
    finally:
        broker.delete(queue)
    assert len(set(sent)) == 3
