"""ops/prometheus/rules.yml: a rules file Prometheus loads (its structure checked here, as
`promtool check rules` would, where promtool is not installed), wired into prometheus.yml and
mounted by compose, whose alerts query only series the code exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import segsvc.metrics  # noqa: F401  (registers the series)
from tests.conftest import ROOT

RULES = ROOT / "ops/prometheus/rules.yml"
CONFIG = ROOT / "ops/prometheus/prometheus.yml"
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    found = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        assert group["name"]
        assert group["rules"]
        found.extend(group["rules"])
    return found


def test_rules_have_the_structure_prometheus_loads() -> None:
    names = []
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]), rule
        names.append(rule["alert"])
        assert isinstance(rule["expr"], str)
        assert rule["expr"].strip()
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        if "for" in rule:
            assert DURATION.match(rule["for"]), rule
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert all(isinstance(v, str) for v in rule["labels"].values())
        assert {"summary", "description"} <= set(rule["annotations"])
    assert len(names) == len(set(names))


def test_alerts_cover_what_operators_must_hear_of() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in rules()}
    joined = " ".join(exprs.values())
    assert 'segsvc_webhook_messages_ended_total{status="failed"}' in joined
    assert "segsvc_worker_ready" in joined
    assert "segsvc_queue_depth" in joined
    assert "segsvc_retrain_last_success_timestamp_seconds" in joined
    assert "2 * 86400" in joined
    assert 'segsvc_jobs_total{status="failed"}' in joined


def test_alerts_query_only_series_the_code_exports() -> None:
    known = {m.name for m in REGISTRY.collect()}
    for rule in rules():
        series = re.findall(r"\bsegsvc_\w+", rule["expr"])
        assert series, rule["alert"]
        for name in series:
            base = re.sub(r"_(bucket|sum|count|total|info)$", "", name)
            assert base in known or name in known, (rule["alert"], name)


def test_prometheus_loads_the_rules_compose_mounts() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    (path,) = config["rule_files"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert f"./ops/prometheus/rules.yml:{path}:ro" in volumes


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_checks_the_rules() -> None:
    subprocess.run(["promtool", "check", "rules", str(RULES)], check=True, timeout=60)
