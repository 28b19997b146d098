"""worker/observability.py: a worker whose queues miss SEG_QUEUE_NAME says so at start."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from retrain.tasks import MAINTENANCE_QUEUE
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
