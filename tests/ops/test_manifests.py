"""Deployment files validate: yamllint, Kubernetes schemas (KEDA via shipped JSON schemas),
the compose file against the Compose spec, kustomize renders, and the promises they make
(GPU per worker pod, scale to zero, one beat, probes and resources everywhere)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
def test_links_in_webhooks_name_the_ingress_host(overlay: str) -> None:
    """Workers build webhook payload links from SEG_PUBLIC_URL (they have no request's host):
    it must name the host the Ingress serves, or every link points at a pod's loopback."""
    docs = rendered(overlay)
    public = urlsplit(find(docs, "ConfigMap", "segsvc-config")["data"]["SEG_PUBLIC_URL"])
    hosts = [rule["host"] for rule in find(docs, "Ingress", "segsvc-api")["spec"]["rules"]]
    assert public.hostname in hosts
    tls = find(docs, "Ingress", "segsvc-api")["spec"].get("tls")
    assert public.scheme == ("https" if tls else "http")


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
    # What the trigger counts: tests/ops/test_keda_scaler.py.
    assert [t["type"] for t in scaled["triggers"]] == ["postgresql"]
    worker = find(docs, "Deployment", "segsvc-inference-worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["exec"]["command"][-2:] == ["worker.probes", "ready"]
    # A pod started during a Redis outage waits for it: no restarts at the startup probe.
    assert container["startupProbe"]["exec"]["command"][-2:] == ["worker.probes", "started"]
    assert "$(SEG_QUEUE_NAME)" in container["command"]
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
    # At maxReplicaCount (the GPU count) a surge pod finds no GPU: an old pod must go first.
    deployment = find(docs, "Deployment", "segsvc-inference-worker")
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_beat_is_a_singleton_and_dev_overlay_runs_its_own_datastores() -> None:
    beat = find(rendered("base"), "Deployment", "segsvc-beat")["spec"]
    assert beat["replicas"] == 1
    assert beat["strategy"]["type"] == "Recreate"
    base_kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered("base")}
    dev_kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered("overlays/dev")}
    assert ("StatefulSet", "postgres") not in base_kinds
    assert {("StatefulSet", "postgres"), ("StatefulSet", "redis")} <= dev_kinds


def cpu_cores(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_gib(value: str) -> float:
    for suffix, scale in (("Mi", 1 / 1024), ("Gi", 1.0)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value) / 2**30


# What a default minikube's own pods request (kube-apiserver 250m, kube-controller-manager
# 200m, kube-scheduler 100m, etcd 100m, coredns 100m): the node's 2 CPUs less this are ours.
MINIKUBE_SYSTEM_CPUS = 0.75


def replica_counts(docs: list[dict[str, Any]]) -> dict[str, int]:
    """Pods per workload while it serves: `replicas`, or its autoscaler's floor (a KEDA scaler
    that scales to zero runs one pod once there is work)."""
    counts: dict[str, int] = {}
    for doc in docs:
        spec = doc.get("spec") or {}
        if doc["kind"] in ("Deployment", "StatefulSet"):
            counts.setdefault(doc["metadata"]["name"], int(spec.get("replicas", 1)))
    for doc in docs:
        spec = doc.get("spec") or {}
        if doc["kind"] == "HorizontalPodAutoscaler":
            counts[spec["scaleTargetRef"]["name"]] = int(spec.get("minReplicas", 1))
        elif doc["kind"] == "ScaledObject":
            counts[spec["scaleTargetRef"]["name"]] = max(1, int(spec.get("minReplicaCount", 0)))
    return counts


def test_dev_overlay_fits_a_default_minikube_with_a_rollout_under_way() -> None:
    """minikube's default VM has 2 CPUs: the base's requests (2 CPUs for each of the inference
    and maintenance workers) left pods of the dev overlay Pending for good. Each workload counts
    once per replica (two webhook workers were counted as one), and the cluster's own pods
    take their share of the node first."""
    docs = rendered("overlays/dev")
    replicas = replica_counts(docs)
    cpus, gib, surge = 0.0, 0.0, 0.0
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        containers = doc["spec"]["template"]["spec"]["containers"]
        pod_cpus = sum(
            cpu_cores(c.get("resources", {}).get("requests", {}).get("cpu", 0)) for c in containers
        )
        pod_gib = sum(
            memory_gib(c.get("resources", {}).get("requests", {}).get("memory", "0"))
            for c in containers
        )
        count = replicas[doc["metadata"]["name"]]
        cpus += pod_cpus * count
        gib += pod_gib * count
        surge = max(surge, pod_cpus)  # one pod of a rolling update runs beside the old one
    assert cpus + surge <= 2.0 - MINIKUBE_SYSTEM_CPUS, (cpus, surge)
    assert gib <= 3.0, gib


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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migrations_run_the_cli_itself_and_keep_failed_pods(overlay: str) -> None:
    """Under `sh -c` a stop signal went to the shell (PID 1: ignored), the CLI was killed after
    the grace period, and its ALTER TABLE stayed queued on the server; with OnFailure a failed
    Job's pod, and the logs naming what it waited for, were deleted."""
    job = find(rendered(overlay), "Job", "segsvc-migrations")["spec"]
    (container,) = job["template"]["spec"]["containers"]
    expected = ["python", "-m", "segsvc.cli", "db", "upgrade", "--init-models"]
    assert container["command"] == expected
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["activeDeadlineSeconds"] >= 1800  # the lock retries (15 min) and index builds
    assert compose()["services"]["migrate"]["command"] == expected


def test_compose_workers_link_to_the_api_not_to_their_own_loopback() -> None:
    env = compose()["x-segsvc-env"]
    assert env["SEG_PUBLIC_URL"].startswith("${SEG_PUBLIC_URL:-http")
    # On the port the API is published on: with API_PORT=8080 every link said :8000.
    assert env["SEG_PUBLIC_URL"] == "${SEG_PUBLIC_URL:-http://localhost:${API_PORT:-8000}}"
    assert "${API_PORT:-8000}:8000" in compose()["services"]["proxy"]["ports"]


def test_webhook_workers_consume_the_queue_deliveries_are_sent_to() -> None:
    """`-Q webhooks` was written into the commands while SEG_WEBHOOK_QUEUE_NAME, which the
    dispatcher sends every delivery to, is a setting: changed, no webhook was delivered."""
    container = find(rendered("base"), "Deployment", "segsvc-webhook-worker")["spec"]["template"]
    command = container["spec"]["containers"][0]["command"]
    assert command[command.index("-Q") + 1] == "$(SEG_WEBHOOK_QUEUE_NAME)"
    config = find(rendered("base"), "ConfigMap", "segsvc-config")["data"]
    assert config["SEG_WEBHOOK_QUEUE_NAME"] == "webhooks"
    data = compose()
    service = data["services"]["webhook-worker"]
    queue = service["command"][service["command"].index("-Q") + 1]
    assert queue == service["environment"]["SEG_WEBHOOK_QUEUE_NAME"] == data["x-webhook-queue"]


def test_prometheus_scrapes_every_metrics_port_in_compose() -> None:
    """Every compose service with a metrics port is scraped there. Regression: the maintenance
    worker (SEG_METRICS_PORT from the worker environment) was not, so the failures its
    reconcile pass counts in segsvc_jobs_total never reached Prometheus."""
    config = yaml.safe_load((ROOT / "ops/prometheus/prometheus.yml").read_text())
    scraped = {
        (name, str(sd["port"]))
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    } | {
        tuple(target.split(":"))
        for job in config["scrape_configs"]
        for sc in job.get("static_configs", [])
        for target in sc["targets"]
    }
    services = compose()["services"]
    serving = {
        (name, str(port))
        for name, service in services.items()
        if str(port := (service.get("environment") or {}).get("SEG_METRICS_PORT") or "0") != "0"
    }
    names = {name for name, _ in serving}
    assert {"api", "worker", "webhook-worker", "maintenance-worker", "beat"} <= names
    assert serving - scraped == set()
    assert {name for name, _ in scraped} - {"localhost"} <= set(services)


def test_prometheus_jobs_do_not_mix_services_of_different_compose_profiles() -> None:
    """worker-gpu runs only with `--profile gpu`: looked up in the CPU workers' job, its name
    failed to resolve on every refresh of that job in a default `docker compose up`."""
    services = compose()["services"]
    config = yaml.safe_load((ROOT / "ops/prometheus/prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        names = [n for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        profiles = {tuple(services[n].get("profiles", [])) for n in names}
        assert len(profiles) <= 1, (job["job_name"], names)


def test_prometheus_scrapes_the_api_on_its_metrics_port_which_is_not_published() -> None:
    """The API serves /metrics only on SEG_METRICS_PORT (its public port answers 404): the
    scrape configs must aim there, and compose must not publish that port."""
    api = compose()["services"]["api"]
    port = api["environment"]["SEG_METRICS_PORT"]
    config = yaml.safe_load((ROOT / "ops/prometheus/prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "api")
    assert [str(sd["port"]) for sd in job["dns_sd_configs"]] == [port]
    assert not any(str(p).endswith(f":{port}") for p in api.get("ports", []))

    docs = rendered("base")
    settings = find(docs, "ConfigMap", "segsvc-config")["data"]
    pod = find(docs, "Deployment", "segsvc-api")["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == settings["SEG_METRICS_PORT"]
    ports = {p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert int(settings["SEG_METRICS_PORT"]) in ports


def test_api_readiness_does_not_hang_on_the_shared_datastores() -> None:
    """/readyz fails while Postgres or Redis does: as the readiness probe it took every API pod
    out of the Service in an outage, though the API accepts jobs with Redis down (202) and
    answers a JSON 503 with Retry-After with Postgres down."""
    pod = find(rendered("base"), "Deployment", "segsvc-api")["spec"]["template"]["spec"]
    (api,) = pod["containers"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # ...but a new pod must reach Postgres (at its release's schema) once: a release that
    # cannot (a wrong database URL) stalls its rollout instead of replacing every working pod.
    # Not Redis: with /readyz, no new API pod started during a Redis outage (HPA scale-out, an
    # evicted pod's replacement), though it would accept jobs (202) like the running ones.
    assert api["startupProbe"]["httpGet"]["path"] == "/startupz"


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


def dashboard_panel(title: str) -> dict[str, Any]:
    dashboard = json.loads((ROOT / "ops/grafana/dashboards/segsvc.json").read_text())
    panel: dict[str, Any] = next(p for p in dashboard["panels"] if p["title"] == title)
    return panel


def test_grafana_dashboard_panels_say_and_plot_what_they_mean() -> None:
    """Slips a review found: KEDA said to scale on the broker list (it counts Postgres rows),
    the API latency dominated by scrapes and probes, seconds on an ops axis, and the model
    table's two queries shown as separate frames."""
    queue = dashboard_panel("Queue depth")
    assert "broker list length" not in queue["description"]
    assert "queued or running" in queue["description"]
    backlog = [t for t in queue["targets"] if "KEDA backlog" in t["legendFormat"]]
    assert [t["expr"] for t in backlog] == ["sum(max by (state) (segsvc_jobs_in_state))"]

    for target in dashboard_panel("API latency percentiles")["targets"]:
        (matcher,) = re.findall(r'route!~"([^"]+)"', target["expr"])
        assert set(matcher.split("|")) == {"/metrics", "/healthz", "/readyz", "/startupz"}

    hooks = dashboard_panel("Webhook outcomes")
    (seconds,) = [t for t in hooks["targets"] if "attempt_seconds" in t["expr"]]
    (override,) = hooks["fieldConfig"]["overrides"]
    assert override["matcher"] == {"id": "byFrameRefID", "options": seconds["refId"]}
    assert {"id": "unit", "value": "s"} in override["properties"]

    models = dashboard_panel("Model version in service")
    assert [t["id"] for t in models["transformations"]] == ["merge"]

    ended = dashboard_panel("Webhook messages ended and pending")
    exprs = " ".join(t["expr"] for t in ended["targets"])
    assert "segsvc_webhook_messages_ended_total" in exprs
    assert "segsvc_webhook_pending_messages" in exprs

    # Only inference workers export it: none at all when they are scaled to zero.
    (ready,) = dashboard_panel("Workers ready")["targets"]
    assert ready["expr"].endswith(" or vector(0)")


# --- what the manifests promise the code (settings, routes, ownership) ------------------------

PRODUCTION = ["base", "overlays/gpu"]
SHARED_CLAIM = "segsvc-artifacts"
VAR_MOUNT_USERS = [  # processes that read or write var_dir on the shared volume
    ("Job", "segsvc-migrations"),  # models init copies the shipped model into model_dir
    ("Deployment", "segsvc-api"),  # fs blob store: uploads in, masks out
    ("Deployment", "segsvc-inference-worker"),  # artifacts, masks
    ("Deployment", "segsvc-maintenance-worker"),  # retraining output, artifacts, blob sweep
]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def effective_env(docs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment from its ConfigMaps (envFrom) and its own `env` values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def effective_settings(docs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> Settings:
    env = {
        k.removeprefix("SEG_").lower(): v
        for k, v in effective_env(docs, container).items()
        if k.startswith("SEG_") and k.removeprefix("SEG_").lower() in Settings.model_fields
    }
    if any("secretRef" in source for source in container.get("envFrom", [])):
        # The Secret (not in the production kustomizations) holds the two URLs.
        env.setdefault("database_url", "postgresql+psycopg://segsvc@postgres/segsvc")
        env.setdefault("broker_url", "redis://redis:6379/0")
    return Settings(_env_file=None, **env)  # type: ignore[call-arg]


def claim_mounts(doc: dict[str, Any], container: dict[str, Any], claim: str) -> list[Path]:
    """Where `container` mounts the PersistentVolumeClaim `claim`."""
    volumes = {
        v["name"]
        for v in pod_spec(doc).get("volumes", [])
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    }
    return [Path(m["mountPath"]) for m in container.get("volumeMounts", []) if m["name"] in volumes]


def on_shared_volume(doc: dict[str, Any], container: dict[str, Any], path: Path) -> bool:
    return any(path.is_relative_to(m) for m in claim_mounts(doc, container, SHARED_CLAIM))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_production_overlays_ship_no_secret(overlay: str) -> None:
    # Regression: base shipped segsvc-secrets with CHANGE-ME values, so every
    # `kubectl apply -k k8s/overlays/gpu` overwrote the real secret.
    secrets = [d["metadata"]["name"] for d in rendered(overlay) if d["kind"] == "Secret"]
    if overlay in PRODUCTION:
        assert secrets == []
    else:
        assert secrets == ["segsvc-secrets"]
        data = find(rendered(overlay), "Secret", "segsvc-secrets")["stringData"]
        assert "CHANGE-ME" not in json.dumps(data)


def test_example_secret_is_valid_and_in_no_kustomization() -> None:
    example = K8S / "secret.example.yaml"
    (doc,) = load_all(example)
    validate_resource(doc)
    assert doc["metadata"]["name"] == "segsvc-secrets"
    # Every key the pods and KEDA read from it.
    needed = {"SEG_DATABASE_URL", "SEG_BROKER_URL"}
    for overlay in OVERLAYS:
        for auth in (d for d in rendered(overlay) if d["kind"] == "TriggerAuthentication"):
            needed |= {
                ref["key"]
                for ref in auth["spec"]["secretTargetRef"]
                if ref["name"] == "segsvc-secrets"
            }
    assert needed <= set(doc["stringData"])
    for kustomization in K8S.glob("**/kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        files = [
            *spec.get("resources", []),
            *(p["path"] for p in spec.get("patches", []) if "path" in p),
        ]
        for entry in files:
            assert (kustomization.parent / entry).resolve() != example.resolve(), kustomization


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaled_deployments_leave_replicas_to_their_autoscaler(overlay: str) -> None:
    # Regression: `replicas:` in a Deployment an HPA or ScaledObject owns reset the scaled
    # count on every apply.
    docs = rendered(overlay)
    owned = {
        d["spec"]["scaleTargetRef"]["name"]
        for d in docs
        if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
    }
    assert {"segsvc-api", "segsvc-inference-worker"} <= owned
    for name in owned:
        assert "replicas" not in find(docs, "Deployment", name)["spec"], name


@pytest.mark.parametrize("overlay", PRODUCTION)
def test_migrations_run_before_the_rollout_and_can_run_again(overlay: str) -> None:
    docs = rendered(overlay)
    job = find(docs, "Job", "segsvc-migrations")
    annotations = job["metadata"].get("annotations", {})
    assert annotations.get("argocd.argoproj.io/hook") == "PreSync"
    assert annotations.get("argocd.argoproj.io/hook-delete-policy") == "BeforeHookCreation"
    # Plain kubectl (docs/scaling.md): `apply -k ... -l segsvc/phase=migrate` must bring
    # everything the Job needs (bar the Secret, which production provides) and no Deployment.
    phase = {
        (d["kind"], d["metadata"]["name"])
        for d in docs
        if d["metadata"].get("labels", {}).get("segsvc/phase") == "migrate"
    }
    assert ("Job", "segsvc-migrations") in phase
    assert ("Namespace", "segsvc") in phase
    assert not {kind for kind, _ in phase} & {"Deployment", "HorizontalPodAutoscaler"}
    pod = pod_spec(job)
    for volume in pod.get("volumes", []):
        if "persistentVolumeClaim" in volume:
            assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in phase
    for container in pod["containers"]:
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert ("ConfigMap", source["configMapRef"]["name"]) in phase
    docs_text = (ROOT / "docs" / "scaling.md").read_text()
    for step in (
        "kubectl -n segsvc delete job segsvc-migrations --ignore-not-found",
        "-l segsvc/phase=migrate",
        "kubectl -n segsvc wait --for=condition=complete job/segsvc-migrations",
    ):
        assert step in docs_text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_state_lives_on_the_shared_volume(overlay: str) -> None:
    # Regressions: artifacts were cached in per-pod /tmp (every pod converted every version),
    # and the API, which writes fs blobs, did not mount the volume at all.
    docs = rendered(overlay)
    for kind, name in VAR_MOUNT_USERS:
        doc = find(docs, kind, name)
        for container in pod_spec(doc)["containers"]:
            cfg = effective_settings(docs, container)
            where = f"{name}/{container['name']}"
            blob_dir = cfg.blob_dir or cfg.var_dir / "blobs"
            for path in (cfg.var_dir, cfg.model_dir, cfg.artifact_dir, blob_dir):
                assert on_shared_volume(doc, container, path), f"{where}: {path}"
            if claim_mounts(doc, container, SHARED_CLAIM):
                assert pod_spec(doc)["securityContext"].get("fsGroup") == 10001, where


def test_inference_worker_memory_in_the_docs_matches_the_manifest() -> None:
    worker = find(rendered("base"), "Deployment", "segsvc-inference-worker")
    resources = pod_spec(worker)["containers"][0]["resources"]
    text = re.sub(r"\s+", " ", (ROOT / "docs" / "scaling.md").read_text())
    match = re.search(r"CPU worker (\S+)/(\S+) with", text)
    assert match is not None
    assert match.groups() == (resources["requests"]["memory"], resources["limits"]["memory"])


def size_bytes(value: str) -> int:
    """An nginx size (`33m`, `512k`, bytes) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit.lower()]


def flask_paths() -> set[str]:
    """Every URL rule of the API, with its variable parts cut off (`/ui/<path:name>` -> /ui/)."""
    from api.app import create_app

    app = create_app(Settings(_env_file=None))  # type: ignore[call-arg]
    return {rule.rule.split("<", 1)[0] for rule in app.url_map.iter_rules()}


def ingress_routes(path: str, routes: list[dict[str, Any]]) -> bool:
    """Whether a rule (or, ending in '/', every path under it) reaches the API's Service."""
    for route in routes:
        if route["pathType"] == "Exact" and route["path"] == path:
            return True
        if route["pathType"] == "Prefix":
            prefix = route["path"].rstrip("/")
            if prefix and (path == prefix or path.startswith(prefix + "/")):
                return True
    return False


INTERNAL_PATHS = {"/metrics", "/healthz", "/readyz", "/startupz"}  # Prometheus, the kubelet


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_routes_every_public_path_the_api_serves(overlay: str) -> None:
    # Regression: the page loads /ui/... and the docs point at /openapi.json; neither was routed.
    from api.app import MULTIPART_OVERHEAD

    ingress = find(rendered(overlay), "Ingress", "segsvc-api")
    (rule,) = ingress["spec"]["rules"]
    routes = rule["http"]["paths"]
    for route in routes:
        assert route["backend"]["service"]["name"] == "segsvc-api"
    paths = flask_paths()
    assert {"/", "/ui/", "/openapi.json", "/v1/jobs"} <= paths
    for path in paths - INTERNAL_PATHS:
        assert ingress_routes(path, routes), f"{path} is not routed"
    for path in INTERNAL_PATHS:
        assert not ingress_routes(path, routes), f"{path} must stay inside the cluster"
    # Regression: 11m refused batch submits (up to SEG_BATCH_SUBMIT_MAX_BYTES, 32 MiB) at nginx.
    cfg = Settings(_env_file=None)  # type: ignore[call-arg]
    largest = max(cfg.max_upload_bytes, cfg.batch_submit_max_bytes) + MULTIPART_OVERHEAD
    body = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert size_bytes(body) >= largest


def test_compose_maintenance_worker_tolerates_a_training_run_like_k8s() -> None:
    # Regression: compose left SEG_PROBE_MAX_AGE at 60 s, so a retraining run (which blocks the
    # solo loop's heartbeats) made the container unhealthy.
    worker = find(rendered("base"), "Deployment", "segsvc-maintenance-worker")
    command = " ".join(pod_spec(worker)["containers"][0]["livenessProbe"]["exec"]["command"])
    k8s_age = re.search(r"SEG_PROBE_MAX_AGE=(\d+)", command)
    assert k8s_age is not None
    service = compose()["services"]["maintenance-worker"]
    assert "worker.probes" in service["healthcheck"]["test"]
    assert service["environment"]["SEG_PROBE_MAX_AGE"] == k8s_age.group(1)
    # The rest of the worker environment stays (a YAML merge, not a replacement).
    assert (
        service["environment"]["SEG_BROKER_URL"]
        == compose()["services"]["worker"]["environment"]["SEG_BROKER_URL"]
    )


def beat_probe_code(command: list[str], schedule: str) -> str:
    assert command[:2] == ["python", "-c"]
    code = command[2]
    assert f"'{schedule}*'" in code
    return code


@pytest.mark.parametrize("where", ["k8s", "compose"])
def test_beat_liveness_checks_that_the_scheduler_loop_turns(where: str, tmp_path: Path) -> None:
    # Regression: beat's probe fetched /metrics, which a thread of its own serves while the
    # scheduler loop is wedged; compose had no check at all.
    if where == "k8s":
        beat = find(rendered("base"), "Deployment", "segsvc-beat")
        container = pod_spec(beat)["containers"][0]
        argv, command = container["command"], container["livenessProbe"]["exec"]["command"]
    else:
        service = compose()["services"]["beat"]
        argv, command = service["command"], service["healthcheck"]["test"][1:]
    schedule = argv[argv.index("--schedule") + 1]
    code = beat_probe_code(command, schedule).replace(schedule, str(tmp_path / "schedule"))

    def probe() -> int:
        return subprocess.run([sys.executable, "-c", code], timeout=30, check=False).returncode

    assert probe() == 1  # no schedule file yet
    store = tmp_path / "schedule.db"
    store.write_bytes(b"")
    assert probe() == 0
    os.utime(store, (0, 0))  # the loop stopped writing it long ago
    assert probe() == 1


def test_compose_publishes_only_the_api_on_every_interface() -> None:
    """Flower, Prometheus and Grafana have no login of their own (Grafana's admin password
    defaults to change-me, and an admin can add the database as a data source): they bind to
    OPS_BIND, 127.0.0.1 unless the operator says otherwise."""
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            if name in ("api", "proxy"):
                continue
            assert str(port).startswith("${OPS_BIND:-127.0.0.1}:"), (name, port)


def test_the_maintenance_worker_runs_canary_verdicts_beside_a_training_run() -> None:
    """One solo loop ran retraining, canary checks and retention in turn: a failing canary kept
    its share of traffic until a training run ended. Every deployment gives it two threads."""
    from segsvc import devserver
    from segsvc.settings import Settings

    k8s = pod_spec(find(rendered("base"), "Deployment", "segsvc-maintenance-worker"))
    commands = {
        "k8s": k8s["containers"][0]["command"],
        "compose": compose()["services"]["maintenance-worker"]["command"],
        "make run": devserver.process_commands(Settings(_env_file=None), api_workers=1)[  # type: ignore[call-arg]
            "maintenance"
        ],
    }
    for where, command in commands.items():
        pool = command[command.index("--pool") + 1]
        concurrency = int(command[command.index("--concurrency") + 1])
        assert (pool, concurrency >= 2) == ("threads", True), where


def test_a_retraining_message_is_acknowledged_on_receipt() -> None:
    """acks_late redelivered a run longer than the 1 h visibility timeout, to run again."""
    from retrain.tasks import retrain_task

    assert retrain_task.acks_late is False


def test_webhook_workers_may_reach_only_public_addresses_and_the_datastores() -> None:
    """Defence in depth for the SSRF checks: in the dev overlay (the opt-in component), the
    pods that POST to client-chosen URLs cannot open connections to what the checks refuse."""
    import ipaddress

    from segsvc.webhooks.ssrf import refusal_reason

    docs = rendered("overlays/dev")
    policy = find(docs, "NetworkPolicy", "segsvc-webhook-worker-egress")
    worker = find(docs, "Deployment", "segsvc-webhook-worker")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_spec_labels(worker).items()
    assert policy["spec"]["policyTypes"] == ["Egress"]
    blocks = [
        peer["ipBlock"]
        for rule in policy["spec"]["egress"]
        for peer in rule["to"]
        if "ipBlock" in peer
    ]

    def allowed(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(
            ip in ipaddress.ip_network(b["cidr"])
            and not any(ip in ipaddress.ip_network(e) for e in b.get("except", []))
            for b in blocks
            if ipaddress.ip_network(b["cidr"]).version == ip.version
        )

    refused = [
        "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.100.100.200",
        "127.0.0.2", "192.0.0.192", "0.0.0.1", "fd00:ec2::254", "fe80::1", "::1",
        "::ffff:10.0.0.1", "64:ff9b::a00:1",
    ]  # fmt: skip
    for address in refused:
        assert refusal_reason(address) is not None  # what the checks refuse...
        assert not allowed(address), address  # ...the network refuses too
    for address in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"):
        assert refusal_reason(address) is None
        assert allowed(address), address
    datastore = {"segsvc.io/datastore": "true"}
    for name in ("postgres", "redis"):
        assert datastore.items() <= pod_spec_labels(find(docs, "StatefulSet", name)).items()


def pod_spec_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_inference_pod_outlasts_a_model_conversion_at_startup(overlay: str) -> None:
    """The startup probe gave 600 s, a conversion may take 900: a pod on a slow node was
    killed part-way, and each restart converted again from nothing."""
    from segsvc.ml.convert import CONVERT_TIMEOUT_S

    worker = find(rendered(overlay), "Deployment", "segsvc-inference-worker")
    probe = worker["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] > CONVERT_TIMEOUT_S


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tensorflow_threads_follow_each_worker_pods_cpu_limit(overlay: str) -> None:
    """TensorFlow sized its pools by the node's cores: a 2-CPU pod on a 64-core node converted
    (and a 4-CPU one trained) with 64 threads, throttled by the quota."""
    docs = rendered(overlay)
    for name in ("segsvc-inference-worker", "segsvc-maintenance-worker"):
        container = find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        cpus = str(container["resources"]["limits"]["cpu"])
        assert env.get("TF_NUM_INTRAOP_THREADS") == cpus, (overlay, name, env)
        assert env.get("OMP_NUM_THREADS") == cpus, (overlay, name)


def test_the_api_scales_out_at_the_submit_rate_the_capacity_plan_counts() -> None:
    """70% Utilization is of the 500m request: the HPA scaled out at 0.35 cores a pod (~32
    submits/s at 10.8 core-ms each), twice the pods docs/scaling.md plans at ~65/s a pod."""
    (metric,) = find(rendered("base"), "HorizontalPodAutoscaler", "segsvc-api")["spec"]["metrics"]
    assert metric["resource"]["target"] == {"type": "AverageValue", "averageValue": "700m"}
