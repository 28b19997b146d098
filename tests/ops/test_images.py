"""The Dockerfile and .dockerignore, read statically (no Docker engine here): the worker images
carry the shipped trained model, and converted artifacts land on the shared volume."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import PurePosixPath

import pytest

from segsvc.services.bootstrap import SHIPPED_MODEL, SHIPPED_REPORT
from segsvc.settings import Settings
from tests.conftest import ROOT

SHIPPED = [f"models/{SHIPPED_MODEL}", f"models/{SHIPPED_REPORT}"]
APP_DIR = PurePosixPath("/app")  # where every stage copies the code (its PYTHONPATH)


def ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (negated, regex) in file order; the last match decides, as in Docker."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.removeprefix("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*|\*|\?)", glob):
            regex += {"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        # A pattern that matches a folder matches everything in it.
        patterns.append((negated, re.compile(f"{regex}(/.*)?")))
    return patterns


def in_build_context(path: str) -> bool:
    """Whether `docker build .` sends this file (Docker's .dockerignore matching)."""
    included = True
    for negated, pattern in ignore_patterns():
        if pattern.fullmatch(path):
            included = negated
    return included


def stages() -> dict[str, list[str]]:
    """Dockerfile instructions (continuation lines joined) per `FROM ... AS name` stage."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    result: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("FROM "):
            current = result.setdefault(line.split()[-1], [])
        elif line and not line.startswith("#"):
            current.append(line)
    return result


def stage_env(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in stages()[stage]:
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in shlex.split(line[4:]))
    return env


def test_dockerignore_matching_follows_docker() -> None:
    assert in_build_context("segsvc/settings.py")
    assert not in_build_context("tests/conftest.py")
    assert not in_build_context("var/segsvc.db")
    assert not in_build_context("segsvc/__pycache__/settings.cpython-311.pyc")
    assert not in_build_context("models/baseline_contact_sheet.png")


def test_build_context_carries_the_shipped_model() -> None:
    # Regression: .dockerignore excluded models/, so the images had no trained model.
    for path in SHIPPED:
        assert (ROOT / path).is_file()
        assert in_build_context(path), path


@pytest.mark.parametrize("stage", ["worker", "worker-gpu"])
def test_worker_images_copy_the_shipped_model_where_bootstrap_looks(stage: str) -> None:
    # Bootstrap falls back to shipped_model_dir, by default the code's own models/ folder:
    # /app/models in the images. The migrations Job and compose's `migrate` run this image.
    default = Settings(_env_file=None).shipped_model_dir  # type: ignore[call-arg]
    target = APP_DIR / default.relative_to(ROOT)
    env = stage_env(stage)
    assert env["PYTHONPATH"] == str(APP_DIR)
    assert "SEG_SHIPPED_MODEL_DIR" not in env
    copied = set()
    for line in stages()[stage]:
        if line.startswith("COPY ") and "--from" not in line:
            *sources, dest = shlex.split(line)[1:]
            if PurePosixPath(dest) == target:
                copied |= set(sources)
    assert set(SHIPPED) <= copied


@pytest.mark.parametrize("stage", ["api", "worker", "worker-gpu"])
def test_images_cache_converted_artifacts_on_the_shared_volume(stage: str) -> None:
    # Regression: /tmp/segsvc-artifacts is per-container scratch, so every container converted
    # every model version (a 2.3 GB child process) instead of reading the shared cache.
    env = stage_env(stage)
    var_dir = PurePosixPath(env["SEG_VAR_DIR"])
    artifacts = PurePosixPath(env.get("SEG_ARTIFACT_CACHE_DIR", str(var_dir / "artifacts")))
    assert artifacts.is_relative_to(var_dir)
    assert PurePosixPath(env["SEG_MODEL_DIR"]).is_relative_to(var_dir)


@pytest.mark.parametrize("stage", ["api", "worker", "worker-gpu"])
def test_every_image_has_the_segsvc_command(stage: str) -> None:
    """The docs have operators run `segsvc keys create` and `segsvc models check-runtimes`
    in a container; the images run the source tree, so a launcher in /app/bin provides it."""
    assert stage_env(stage)["PATH"].startswith("/app/bin:")
    made = " ".join(stages()["source"])
    assert "bin/segsvc" in made
    assert "exec python -m segsvc.cli" in made


def test_python_m_segsvc_cli_is_the_segsvc_command() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "segsvc.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "keys" in out.stdout
    assert "models" in out.stdout


@pytest.mark.parametrize("stage", ["worker", "worker-gpu"])
def test_worker_images_consume_seg_queue_name(stage: str) -> None:
    """The images ran `-Q inference` whatever SEG_QUEUE_NAME said, while the API sends to
    SEG_QUEUE_NAME: with another value no job ever ran."""
    (cmd,) = [line for line in stages()[stage] if line.startswith("CMD ")]
    shell, flag, script = json.loads(cmd[4:])
    assert (shell, flag) == ("sh", "-c")
    argv = shlex.split(script)
    assert argv[:2] == ["exec", "celery"]
    assert argv[argv.index("-Q") + 1] == "${SEG_QUEUE_NAME:-inference}"
    expanded = subprocess.run(
        ["sh", "-c", script.replace("exec celery", "printf '%s\\n'")],
        env={"SEG_QUEUE_NAME": "gpu-jobs", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert expanded[expanded.index("-Q") + 1] == "gpu-jobs"


def test_the_gpu_image_alone_serves_mixed_precision_like_compose_and_k8s() -> None:
    """SEG_RUNTIME=xla in the image served float32 XLA where `auto` (compose's and the GPU
    overlay's value) serves `xla-gpu`, in mixed precision: a bare `docker run` got the slower."""
    assert stage_env("worker-gpu")["SEG_RUNTIME"] == "auto"
