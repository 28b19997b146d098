"""Deployment files validate: yamllint, Kubernetes schemas (KEDA via shipped JSON schemas),
the compose file against the Compose spec, kustomize renders, and the promises they make
(GPU per worker pod, scale to zero, one beat, probes and resources everywhere)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY

import segsvc.metrics  # noqa: F401  (registers the series)
from segsvc.settings import Settings
from tests.conftest import ROOT

K8S = ROOT / "k8s"
SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSION = "1.30"
OVERLAYS = ["base", "overlays/gpu", "overlays/dev"]
CRD_SCHEMAS = {
    "ScaledObject": "keda-scaledobject.json",
    "TriggerAuthentication": "keda-triggerauthentication.json",
}
YAML_FILES = sorted(
    [
        ROOT / "docker-compose.yml",
        ROOT / ".yamllint.yaml",
        *ROOT.glob("ops/**/*.yml"),
        *K8S.glob("**/*.yaml"),
    ]
)


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[kind]).read_text())
    return jsonschema.Draft202012Validator(schema)


def validate_resource(doc: dict[str, Any]) -> None:
    """Kubernetes built-ins by kubernetes-validate (strict), KEDA kinds by their schema."""
    if doc["kind"] in CRD_SCHEMAS:
        crd_validator(doc["kind"]).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    out = subprocess.run(
        [*cmd, str(K8S / overlay)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_yaml_files_pass_yamllint() -> None:
    assert len(YAML_FILES) > 20
    result = subprocess.run(
        [
            str(Path(shutil.which("yamllint") or ROOT / ".venv/bin/yamllint")),
            "-c",
            str(ROOT / ".yamllint.yaml"),
            "-f",
            "parsable",
            *map(str, YAML_FILES),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", sorted((K8S / "base").glob("*.yaml")), ids=lambda p: p.name)
def test_base_manifest_files_validate_against_their_schemas(path: Path) -> None:
    if path.name == "kustomization.yaml":
        return
    for doc in load_all(path):
        validate_resource(doc)


def test_keda_schema_rejects_a_misspelt_field() -> None:
    doc = load_all(K8S / "base" / "inference-worker-scaledobject.yaml")[0]
    doc["spec"]["minReplicas"] = 0  # the HPA spelling, which KEDA would silently ignore
    with pytest.raises(jsonschema.ValidationError):
        validate_resource(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_overlay_renders_valid_resources(overlay: str) -> None:
    docs = rendered(overlay)
    for doc in docs:
        validate_resource(doc)
        assert doc["kind"] == "Namespace" or doc["metadata"].get("namespace") == "segsvc"
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Job",
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "ScaledObject",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
    } <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_and_resources(overlay: str) -> None:
    for doc in rendered(overlay):
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod["containers"]:
            where = f"{doc['metadata']['name']}/{container['name']}"
            assert "livenessProbe" in container, where
            assert {"requests", "limits"} <= set(container["resources"]), where
            assert "memory" in container["resources"]["limits"], where
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where


def test_inference_worker_scales_on_the_queue_to_zero_and_is_ready_after_load() -> None:
    docs = rendered("base")
    scaled = find(docs, "ScaledObject", "segsvc-inference-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "segsvc-inference-worker"
    assert scaled["minReplicaCount"] == 0
    assert scaled["maxReplicaCount"] > 1
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == Settings(_env_file=None).queue_name  # type: ignore[call-arg]
    worker = find(docs, "Deployment", "segsvc-inference-worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["exec"]["command"][-2:] == ["worker.probes", "ready"]
    assert "inference" in container["command"]
    assert "solo" in container["command"]


def test_gpu_overlay_gives_each_worker_pod_one_gpu() -> None:
    docs = rendered("overlays/gpu")
    pod = find(docs, "Deployment", "segsvc-inference-worker")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "worker-gpu" in container["image"]
    assert container["command"][container["command"].index("--pool") + 1] == "solo"
    assert find(docs, "ScaledObject", "segsvc-inference-worker")["spec"]["minReplicaCount"] == 0


def test_beat_is_a_singleton_and_dev_overlay_runs_its_own_datastores() -> None:
    beat = find(rendered("base"), "Deployment", "segsvc-beat")["spec"]
    assert beat["replicas"] == 1
    assert beat["strategy"]["type"] == "Recreate"
    base_kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered("base")}
    dev_kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered("overlays/dev")}
    assert ("StatefulSet", "postgres") not in base_kinds
    assert {("StatefulSet", "postgres"), ("StatefulSet", "redis")} <= dev_kinds


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_file_validates_against_the_compose_spec() -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(compose())


def test_compose_config_accepted_by_docker_compose_when_available() -> None:
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30
        ).returncode
        != 0
    ):
        pytest.skip("docker compose is not installed")
    result = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_the_promised_services() -> None:
    services = compose()["services"]
    assert {
        "postgres",
        "redis",
        "migrate",
        "api",
        "worker",
        "webhook-worker",
        "beat",
        "flower",
        "prometheus",
        "grafana",
    } <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    assert "webhooks" in services["webhook-worker"]["command"]
    assert "inference" in services["worker"]["command"]
    assert "deploy" not in services["beat"] or services["beat"]["deploy"].get("replicas", 1) == 1
    env_example = (ROOT / ".env.example").read_text()
    for var in set(re.findall(r"\$\{(\w+)", (ROOT / "docker-compose.yml").read_text())):
        assert f"{var}=" in env_example, f"{var} is not documented in .env.example"


def test_prometheus_scrapes_every_metrics_port_in_compose() -> None:
    config = yaml.safe_load((ROOT / "ops/prometheus/prometheus.yml").read_text())
    names = {
        n
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for n in sd["names"]
    }
    targets = {
        t.split(":")[0]
        for job in config["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }
    assert {"api", "worker", "webhook-worker"} <= names
    assert "beat" in targets
    assert (names | targets) - {"localhost"} <= set(compose()["services"])


def test_grafana_dashboard_queries_only_series_we_export() -> None:
    dashboard = json.loads((ROOT / "ops/grafana/dashboards/segsvc.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("queue depth", "jobs/s", "latency", "batch size", "model version", "webhook"):
        assert topic in titles
    known = {m.name for m in REGISTRY.collect()}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for series in re.findall(r"\b(segsvc_\w+)", target["expr"]):
                base = re.sub(r"_(bucket|sum|count|total|info)$", "", series)
                assert base in known or series in known, series
