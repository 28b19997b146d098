"""Fault tests with real processes: nothing accepted is lost, nothing runs twice.

Each test prints `submitted / succeeded / failed / lost` and the attempt histogram. Redis and
Postgres outages use servers these tests start themselves, never the shared ones.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from segsvc.db import session_scope
from segsvc.migrate import upgrade
from segsvc.models import Job, ModelStatus
from segsvc.queue import enqueue_job, make_celery
from segsvc.services import registry
from segsvc.services.keys import create_key
from segsvc.settings import Settings
from tests.fault.harness import (
    INJECT,
    OwnPostgres,
    OwnRedis,
    Processes,
    fast_settings,
    photos,
    report,
    statuses,
    submit,
    wait_terminal,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def api(settings: Settings):  # type: ignore[no-untyped-def]
    from api.app import create_app

    return create_app(settings).test_client()


def submit_all(client, auth, images: list[bytes]) -> list[str]:  # type: ignore[no-untyped-def]
    ids = []
    for data in images:
        resp = submit(client, auth, data)
        assert resp.status_code == 202, resp.get_json()
        ids.append(resp.get_json()["id"])
    return ids


def test_fault_worker_killed_mid_batch_every_job_succeeds_once(
    settings: Settings, production_model: str, auth: dict[str, str], tmp_path: Path
) -> None:
    cfg = fast_settings(settings)
    procs = Processes(cfg, tmp_path, PYTHONPATH=str(INJECT), SEG_FAULT_SLOW_S="0.25")
    try:
        victim = procs.start_worker()
        procs.start_beat()
        ids = submit_all(api(cfg), auth, photos(24))
        wait_until(
            lambda: any(s[0] == "running" for s in statuses(cfg, ids).values()),
            60,
            "no job started",
        )
        procs.kill9(victim)
        in_flight = sum(s[0] == "running" for s in statuses(cfg, ids).values())
        procs.start_worker()
        state = wait_terminal(cfg, ids, timeout=120)
    finally:
        procs.stop()
    counts = report("kill -9 mid-batch", ids, state)
    print(f"[kill -9 mid-batch] running when killed={in_flight}")
    assert in_flight > 0
    assert counts["succeeded"] == len(ids), procs.logs()
    assert counts["lost"] == 0
    # The jobs the victim held ran once more each, the others once: nothing ran a third time.
    assert max(s[1] for s in state.values()) <= 2
    assert sum(s[1] == 2 for s in state.values()) == in_flight, state


def test_fault_flushall_with_50_queued_all_succeed(
    settings: Settings, production_model: str, auth: dict[str, str], tmp_path: Path
) -> None:
    own = OwnRedis()
    own.start()
    cfg = fast_settings(settings, broker_url=own.url)
    procs = Processes(cfg, tmp_path)
    try:
        ids = submit_all(api(cfg), auth, photos(50))
        queued = redis.Redis.from_url(own.url).llen(cfg.queue_name)
        redis.Redis.from_url(own.url).flushall()
        print(f"\n[FLUSHALL] messages in Redis before FLUSHALL={queued}")
        procs.start_worker()
        procs.start_beat()
        state = wait_terminal(cfg, ids, timeout=150)
    finally:
        procs.stop()
        own.stop()
    counts = report("FLUSHALL with 50 queued", ids, state)
    assert queued == 50
    assert counts["succeeded"] == 50, procs.logs()
    assert counts["lost"] == 0


def test_fault_redis_restarted_during_load_loses_nothing(
    settings: Settings, production_model: str, auth: dict[str, str], tmp_path: Path
) -> None:
    own = OwnRedis()
    own.start()
    cfg = fast_settings(settings, broker_url=own.url)
    procs = Processes(cfg, tmp_path)
    client = api(cfg)
    images = photos(60)
    codes: list[int] = []
    ids: list[str] = []
    try:
        procs.start_worker()
        procs.start_beat()
        for i, data in enumerate(images):
            if i == 20:
                own.stop()  # Redis dies with everything in it
            if i == 40:
                own.start()  # comes back empty
            started = time.monotonic()
            resp = submit(client, auth, data)
            codes.append(resp.status_code)
            assert time.monotonic() - started < 3, "a submission stalled on the dead broker"
            if resp.status_code == 202:
                ids.append(resp.get_json()["id"])
            time.sleep(0.05)
        state = wait_terminal(cfg, ids, timeout=150)
    finally:
        procs.stop()
        own.stop()
    counts = report("Redis restarted during load", ids, state)
    print(f"[Redis restarted during load] answers={dict(sorted(_hist(codes).items()))}")
    assert codes.count(202) == 60  # accepted and stored while Redis was down (outbox)
    assert counts["succeeded"] == len(ids), procs.logs()
    assert counts["lost"] == 0


def test_fault_postgres_down_10s_gives_503_then_everything_accepted_succeeds(
    settings: Settings, model_file: Path, tmp_path: Path
) -> None:
    pg = OwnPostgres()
    pg.start()
    cfg = fast_settings(settings, database_url=pg.url)
    upgrade(settings=cfg)
    with session_scope(cfg) as session:
        registry.register_version(
            session=session, version="fault-v1", path=model_file, status=ModelStatus.PRODUCTION
        )
        _, key = create_key(session=session, name="fault")
    auth = {"Authorization": f"Bearer {key}"}
    procs = Processes(cfg, tmp_path)
    client = api(cfg)
    codes: list[int] = []
    ready: list[int] = []
    ids: list[str] = []
    images = photos(12)
    try:
        procs.start_worker()
        procs.start_beat()
        started = time.monotonic()
        down_at, up_at = started + 3, started + 13
        stopped = restarted = False
        while time.monotonic() < started + 20:
            now = time.monotonic()
            if not stopped and now >= down_at:
                pg.stop()
                stopped = True
            if stopped and not restarted and now >= up_at:
                pg.start()
                restarted = True
            resp = submit(client, auth, images[len(codes) % len(images)])
            codes.append(resp.status_code)
            if resp.status_code == 202:
                ids.append(resp.get_json()["id"])
            else:
                assert resp.status_code == 503, resp.data
                assert resp.get_json()["error"] == "database_unavailable"
                assert int(resp.headers["Retry-After"]) >= 1
                ready.append(client.get("/readyz").status_code)
            time.sleep(0.2)
        state = wait_terminal(cfg, ids, timeout=120)
    finally:
        procs.stop()
        pg.remove()
    counts = report("Postgres down 10 s", ids, state)
    print(f"[Postgres down 10 s] answers={dict(sorted(_hist(codes).items()))}")
    assert codes.count(503) > 0
    assert set(ready) == {503}
    assert codes[-1] == 202  # recovered by itself
    assert counts["succeeded"] == len(ids), procs.logs()
    assert counts["lost"] == 0


def test_fault_poison_input_fails_after_retry_limit_others_succeed(
    settings: Settings, production_model: str, auth: dict[str, str], tmp_path: Path
) -> None:
    poison_width = 4099
    cfg = fast_settings(settings)
    procs = Processes(
        cfg, tmp_path, PYTHONPATH=str(INJECT), SEG_FAULT_POISON_WIDTH=str(poison_width)
    )
    client = api(cfg)
    ids = submit_all(client, auth, photos(6))
    poison = ids[2]
    with session_scope(cfg) as session:  # this job's input crashes the worker every time
        session.execute(
            update(Job).where(Job.id == uuid.UUID(poison)).values(input_width=poison_width)
        )
    crashes = 0
    try:
        procs.start_beat()
        worker = None
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:  # a supervisor: restart the worker when it dies
            state = statuses(cfg, ids)
            if all(s[0] in ("succeeded", "failed") for s in state.values()):
                break
            if worker is None or worker.poll() is not None:
                crashes += worker is not None
                try:
                    worker = procs.start_worker()
                except RuntimeError:  # it took the poison job and died before saying ready
                    worker = None
                    crashes += 1
            time.sleep(0.3)
    finally:
        procs.stop()
    state = statuses(cfg, ids)
    counts = report("poison input", ids, state)
    print(f"[poison input] worker crashes={crashes} poison={state[poison]}")
    assert state[poison][0] == "failed"
    assert state[poison][2] == "poison_input"
    assert state[poison][1] == cfg.job_max_attempts
    assert counts["succeeded"] == len(ids) - 1, procs.logs()
    assert counts["lost"] == 0


def test_fault_duplicate_delivery_runs_once(
    settings: Settings, production_model: str, auth: dict[str, str], tmp_path: Path
) -> None:
    cfg = fast_settings(settings)
    procs = Processes(cfg, tmp_path)
    celery = make_celery(cfg)
    try:
        ids = submit_all(api(cfg), auth, photos(20))
        for job_id in ids:  # every message delivered twice more
            enqueue_job(celery, uuid.UUID(job_id), settings=cfg)
            enqueue_job(celery, uuid.UUID(job_id), settings=cfg)
        broker = redis.Redis.from_url(cfg.effective_redis_url)
        assert broker.llen(cfg.queue_name) >= 60  # the queue the drain below is read from
        procs.start_worker()
        state = wait_terminal(cfg, ids, timeout=120)
        # Every copy consumed and acknowledged before the claims are counted (after a fixed
        # sleep, copies not yet taken left the count at 20 whatever a copy would have done).
        wait_until(
            lambda: broker.llen(cfg.queue_name) == 0 and broker.hlen("unacked") == 0,
            60,
            "the duplicate messages were not all consumed",
        )
    finally:
        procs.stop()
    counts = report("same message delivered 3 times", ids, state)
    claimed = sum(int(n) for n in re.findall(r"'claimed': (\d+)", procs.logs(tail=None)))
    print(f"[same message delivered 3 times] messages=60 claims={claimed}")
    assert counts["succeeded"] == 20
    assert {s[1] for s in state.values()} == {1}
    assert claimed == 20


def _hist(values: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def test_fault_sigterm_mid_batch_stores_and_acknowledges_it_before_the_channel_closes(
    settings: Settings, production_model: str, auth: dict[str, str], tmp_path: Path
) -> None:
    """A warm shutdown finishes the batch in flight and acknowledges its messages while the
    broker channel is still open. Celery closed the channel first (putting the unacknowledged
    batch back on the queue, for a peer to take while its jobs were still leased) and only then
    let the batch finish: its acks went nowhere."""
    cfg = fast_settings(settings)
    procs = Processes(cfg, tmp_path, PYTHONPATH=str(INJECT), SEG_FAULT_SLOW_S="1.0")
    broker = redis.Redis.from_url(cfg.broker_url or "")
    try:
        victim = procs.start_worker()
        ids = submit_all(api(cfg), auth, photos(2))
        wait_until(
            lambda: all(s[0] == "running" for s in statuses(cfg, ids).values()),
            60,
            "the batch did not start",
        )
        victim.terminate()  # SIGTERM: a warm shutdown
        victim.wait(timeout=60)
        state = statuses(cfg, ids)
        waiting = broker.llen(cfg.queue_name)
        unacked = broker.hlen("unacked")
    finally:
        procs.stop()
    assert [s[0] for s in state.values()] == ["succeeded", "succeeded"], procs.logs()
    assert waiting == 0, procs.logs()  # nothing of the stored batch went back to the queue
    assert unacked == 0
