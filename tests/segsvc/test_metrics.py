"""segsvc/metrics.py: each process role exports the families it records and no others, and
the queue wait's buckets reach past a cold start."""

from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from segsvc import metrics
from segsvc.metrics import (
    API_SERIES,
    BEAT_SERIES,
    INFERENCE_SERIES,
    MAINTENANCE_SERIES,
    QUEUE_WAIT,
    WEBHOOK_SERIES,
    metrics_registry,
)

ROLES = {
    "api": API_SERIES,
    "inference": INFERENCE_SERIES,
    "webhook": WEBHOOK_SERIES,
    "maintenance": MAINTENANCE_SERIES,
    "beat": BEAT_SERIES,
}
# Unlabeled series, each set by one role only: exported anywhere else, their default (a 0, an
# empty info) reads as a value (an empty row in "Model version in service", a queue depth of
# 0 with beat down, workers counted "not ready" that serve no model).
OWNER = {
    "segsvc_model_info": "inference",
    "segsvc_worker_ready": "inference",
    "segsvc_queue_depth": "beat",
    "segsvc_webhook_pending_messages": "beat",
    "segsvc_retrain_last_success_timestamp_seconds": "maintenance",
}


def scrape(only: frozenset[str] | None) -> set[str]:
    """The sample names a registry built with `only` exposes (this process, no multiprocess)."""
    text = generate_latest(metrics_registry(only=only)).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_exports_only_the_unlabeled_series_it_sets(
    role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Webhook, maintenance and beat processes exported `segsvc_model_info 1.0` with no labels,
    `segsvc_worker_ready 0` and `segsvc_queue_depth 0`; inference workers a queue depth too."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    names = scrape(ROLES[role])
    for series, owner in OWNER.items():
        if series == "segsvc_model_info" and role == "inference":
            continue  # once set (test_an_info_not_set_yet_is_not_exported)
        assert (series in names) == (owner == role), (role, series)
    families = {m.name for m in metrics_registry(only=ROLES[role]).collect()}
    ours = {f for f in families if f.startswith("segsvc_")}
    assert ROLES[role] - {"segsvc_model"} <= ours <= ROLES[role]  # the info family once set
    assert any(f.startswith("python_") for f in families), "the client library's own stay"


def test_every_family_belongs_to_a_role() -> None:
    """A series added to segsvc/metrics.py without a role would be exported by no process."""
    roles = frozenset().union(*ROLES.values())
    ours = {m.name for m in REGISTRY.collect() if m.name.startswith("segsvc_")}
    assert ours - roles == set()
    assert roles - ours == set()  # and no role names a family that does not exist


def test_new_series_are_exported_by_their_roles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    webhook = scrape(WEBHOOK_SERIES)
    for status in metrics.WEBHOOK_END_STATUSES:  # at 0 from the start: rate() sees the first
        assert (
            REGISTRY.get_sample_value("segsvc_webhook_messages_ended_total", {"status": status})
            is not None
        )
    assert "segsvc_webhook_messages_ended_total" in webhook
    beat = scrape(BEAT_SERIES)
    assert {"segsvc_webhook_pending_messages", "segsvc_queue_depth"} <= beat
    maintenance = scrape(MAINTENANCE_SERIES)
    assert {
        "segsvc_retrain_runs_total",
        "segsvc_retrain_last_success_timestamp_seconds",
    } <= maintenance


def test_queue_wait_buckets_reach_past_a_cold_start() -> None:
    """With the workers scaled to zero a job waits for a pod, a model load (54 s) and perhaps
    an XLA compile (minutes), a backlog longer: buckets that ended at 120 s held p95 and p99
    at 120 exactly then."""
    (family,) = QUEUE_WAIT.collect()
    bounds = [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]
    assert bounds[-1] == math.inf
    assert bounds[-4:-1] == [300.0, 600.0, 1800.0]
    assert 120.0 in bounds
    assert bounds == sorted(bounds)
    # The request latencies keep theirs.
    assert metrics.LATENCY_BUCKETS[-1] == 120


def test_an_info_not_set_yet_is_not_exported() -> None:
    """Regression: an inference worker loading its first model exported `segsvc_model_info 1.0`
    without labels, an empty row in the dashboard's table of the versions in service."""
    from prometheus_client import CollectorRegistry, Info

    from segsvc.metrics import _Only

    registry = CollectorRegistry()
    info = Info("segsvc_loading_model", "A version in service.", registry=registry)
    only = CollectorRegistry()
    only.register(_Only(registry, frozenset({"segsvc_loading_model"})))
    assert b"segsvc_loading_model" not in generate_latest(only)
    info.info({"production": "v1"})
    assert b'segsvc_loading_model_info{production="v1"} 1.0' in generate_latest(only)
