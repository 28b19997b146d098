"""docker-compose.yml publishes the API through nginx (ops/nginx/segsvc.conf), and every
deployment's inference workers consume the queue SEG_QUEUE_NAME sends jobs to."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.app import MULTIPART_OVERHEAD
from segsvc.services.jobs import MAX_WAIT_SECONDS
from segsvc.settings import Settings
from tests.conftest import ROOT

NGINX_CONF = ROOT / "ops" / "nginx" / "segsvc.conf"
INFERENCE_WORKERS = {  # overlay: where its inference worker Deployment comes from
    "base": "k8s/base/inference-worker.yaml",
    "overlays/gpu": "k8s/overlays/gpu/inference-worker-gpu.yaml",
}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def directives() -> dict[str, str]:
    """The nginx config's `name value;` lines (the last of each name), comments dropped."""
    text = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s*([a-z_]+)\s+([^;{]*);", text, re.M)}


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[unit]


def megabytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmM]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "k": 1024, "m": 1024 * 1024}[unit.lower()]


def test_only_the_proxy_publishes_the_api_port() -> None:
    services = compose()["services"]
    proxy, api = services["proxy"], services["api"]
    assert "ports" not in api  # gunicorn is reached through the proxy only
    assert proxy["ports"] == ["${API_PORT:-8000}:8000"]
    assert proxy["image"].startswith("nginx:")
    assert "./ops/nginx/segsvc.conf:/etc/nginx/conf.d/default.conf:ro" in proxy["volumes"]
    assert "api" in proxy["depends_on"]
    # gunicorn trusts the proxy's X-Forwarded-* headers (its address is not fixed)
    assert api["environment"]["FORWARDED_ALLOW_IPS"] == "*"


def test_proxy_bounds_slow_clients_and_buffers_whole_requests() -> None:
    conf, defaults = directives(), Settings(_env_file=None)
    assert seconds(conf["client_header_timeout"]) <= defaults.request_header_timeout_seconds
    assert seconds(conf["client_body_timeout"]) <= defaults.request_body_timeout_seconds
    assert conf["proxy_request_buffering"] == "on"
    assert conf["proxy_pass"] == "$segsvc_api"
    assert conf["set"] == "$segsvc_api http://api:8000"
    assert conf["resolver"].startswith("127.0.0.11 ")  # Docker's DNS, asked at request time


def test_proxy_admits_the_largest_upload_and_the_longest_poll() -> None:
    conf, defaults = directives(), Settings(_env_file=None)
    largest = max(defaults.batch_submit_max_bytes, defaults.max_upload_bytes) + MULTIPART_OVERHEAD
    body_cap = megabytes(conf["client_max_body_size"])
    assert largest <= body_cap < largest + 2 * 1024 * 1024  # room, but not an open door
    assert seconds(conf["proxy_read_timeout"]) >= MAX_WAIT_SECONDS + 10


def test_proxy_forwards_the_client_as_gunicorn_expects() -> None:
    text = NGINX_CONF.read_text()
    for header in ("Host $http_host", "X-Forwarded-For $remote_addr", "X-Forwarded-Proto $scheme"):
        assert f"proxy_set_header {header};" in text


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx is not installed")
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n  client_body_temp_path {tmp_path}/body;\n  proxy_temp_path {tmp_path}/proxy;\n"
        f"  include {NGINX_CONF};\n}}\n"
    )
    result = subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(main)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


# --- the inference queue -------------------------------------------------------------------


def queue_of(command: list[str]) -> str:
    return command[command.index("-Q") + 1]


def test_compose_inference_workers_consume_seg_queue_name() -> None:
    services = compose()["services"]
    for name in ("worker", "worker-gpu"):
        env = services[name]["environment"]
        assert queue_of(services[name]["command"]) == env["SEG_QUEUE_NAME"], name
    assert services["api"]["environment"]["SEG_QUEUE_NAME"] == env["SEG_QUEUE_NAME"]


def kustomize(overlay: str) -> list[dict[str, Any]]:
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build"]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize"]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    out = subprocess.run(
        [*cmd, str(ROOT / "k8s" / overlay)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.mark.parametrize("overlay", sorted(INFERENCE_WORKERS))
def test_k8s_inference_workers_consume_seg_queue_name(overlay: str) -> None:
    """The queue comes from the ConfigMap the API reads too: `$(SEG_QUEUE_NAME)`, which the
    kubelet expands from the container's environment (envFrom included)."""
    docs = kustomize(overlay)
    config = next(d for d in docs if d["kind"] == "ConfigMap" and "SEG_QUEUE_NAME" in d["data"])
    worker = next(
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "segsvc-inference-worker"
    )
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert queue_of(container["command"]) == "$(SEG_QUEUE_NAME)"
    refs = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
    assert config["metadata"]["name"] in refs
    assert not any(e["name"] == "SEG_QUEUE_NAME" for e in container.get("env", []))
