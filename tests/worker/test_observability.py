"""worker/observability.py: a worker whose queues miss SEG_QUEUE_NAME says so at start."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from retrain.tasks import MAINTENANCE_QUEUE
from segsvc.queue import WEBHOOK_APP
from segsvc.settings import Settings
from worker import observability


def consumer(*queues: str) -> SimpleNamespace:
    """What Celery's worker_ready signal sends: a consumer whose app consumes `queues`."""
    consume_from = SimpleNamespace(consume_from=dict.fromkeys(queues))
    return SimpleNamespace(app=SimpleNamespace(amqp=SimpleNamespace(queues=consume_from)))


@pytest.fixture
def gpu_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """SEG_QUEUE_NAME=gpu, probe files in `tmp_path`."""
    cfg = Settings(queue_name="gpu", probe_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    monkeypatch.setattr(observability, "get_settings", lambda: cfg)
    return cfg


def test_a_worker_on_another_inference_queue_than_seg_queue_name_says_so_loudly(
    gpu_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """`-Q inference` (the manifests' queue) while SEG_QUEUE_NAME is `gpu`: the worker loaded
    no model and took none of the API's jobs, and said nothing."""
    with caplog.at_level(logging.ERROR, logger=observability.__name__):
        observability._worker_ready(consumer("inference"))
    [record] = [r for r in caplog.records if "QUEUE MISMATCH" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert "'inference'" in record.getMessage()
    assert "'gpu'" in record.getMessage()


def test_workers_that_run_no_model_or_consume_seg_queue_name_do_not_warn(
    gpu_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    assert observability.MAINTENANCE_QUEUE == MAINTENANCE_QUEUE  # the copy kept in step
    with caplog.at_level(logging.ERROR, logger=observability.__name__):
        for queues in (("webhooks",), ("maintenance",), ("maintenance", "webhooks")):
            observability._worker_ready(consumer(*queues))
        assert not observability.warn_of_queue_mismatch(consumer("gpu", "inference").app)
    assert not [r for r in caplog.records if "QUEUE MISMATCH" in r.getMessage()]


def test_a_webhook_worker_on_another_queue_than_seg_webhook_queue_name_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`-Q webhooks` (the manifests' queue, once written in) while SEG_WEBHOOK_QUEUE_NAME is
    `hooks`: the dispatcher sends every delivery to `hooks`, none was delivered, and the only
    line named SEG_QUEUE_NAME, the inference queue's setting."""
    cfg = Settings(webhook_queue_name="hooks", probe_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    monkeypatch.setattr(observability, "get_settings", lambda: cfg)
    webhook_worker = consumer("webhooks")
    webhook_worker.app.main = WEBHOOK_APP
    with caplog.at_level(logging.ERROR, logger=observability.__name__):
        observability._worker_ready(webhook_worker)
    [record] = [r for r in caplog.records if "QUEUE MISMATCH" in r.getMessage()]
    assert "SEG_WEBHOOK_QUEUE_NAME is 'hooks'" in record.getMessage()
    assert "'webhooks'" in record.getMessage()
    caplog.clear()
    on_its_queue = consumer("hooks")
    on_its_queue.app.main = WEBHOOK_APP
    with caplog.at_level(logging.ERROR, logger=observability.__name__):
        assert not observability.warn_of_queue_mismatch(on_its_queue.app)
    assert not caplog.records
