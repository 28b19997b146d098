# syntax=docker/dockerfile:1.7
# Targets:
#   api         gunicorn + Flask, no TensorFlow             docker build --target api .
#   worker      Celery inference worker on CPU (ONNX Runtime; TF converts the artifact)
#   worker-gpu  the same worker on the TensorFlow GPU image (one GPU per container)
# Dependencies are pinned by requirements/*.txt (generated from the tested venv by
# requirements/lock.py). Every target runs as the unprivileged user `segsvc` (uid 10001).
# The worker images carry the shipped trained model (models/baseline.keras + .json) at
# /app/models (SEG_SHIPPED_MODEL_DIR's default); `segsvc models init` copies it onto the shared
# volume (SEG_MODEL_DIR, a PVC in Kubernetes), where retraining puts later versions and where
# converted artifacts are cached once for every pod (SEG_ARTIFACT_CACHE_DIR).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TF_GPU_IMAGE=tensorflow/tensorflow:2.21.0-gpu

# --- shared base ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 segsvc \
 && useradd --system --uid 10001 --gid segsvc --home-dir /app --shell /usr/sbin/nologin segsvc \
 && install -d -o segsvc -g segsvc /var/lib/segsvc

# --- dependency layers (rebuilt only when a lock file changes) --------------------------------
FROM base AS api-deps
COPY requirements/api.txt /tmp/requirements.txt
RUN python -m venv /opt/venv && pip install -r /tmp/requirements.txt

FROM base AS worker-deps
COPY requirements/worker.txt /tmp/requirements.txt
RUN python -m venv /opt/venv && pip install -r /tmp/requirements.txt

# --- application source (no tests, benchmarks or local state; see .dockerignore) --------------
FROM base AS source
WORKDIR /src
COPY pyproject.toml alembic.ini README.md ./
COPY segsvc ./segsvc
COPY api ./api
COPY worker ./worker
COPY retrain ./retrain
COPY migrations ./migrations
# The `segsvc` command (keys, db, models, retrain) for `docker compose exec` / `kubectl exec`:
# the images run the source tree from /app rather than an installed package.
RUN mkdir bin \
 && printf '#!/bin/sh\nexec python -m segsvc.cli "$@"\n' > bin/segsvc \
 && chmod 755 bin/segsvc

# --- API ------------------------------------------------------------------------------------------
FROM base AS api
COPY --from=api-deps /opt/venv /opt/venv
COPY --from=source /src /app
WORKDIR /app
ENV PYTHONPATH=/app \
    PATH=/app/bin:$PATH \
    SEG_VAR_DIR=/var/lib/segsvc \
    SEG_MODEL_DIR=/var/lib/segsvc/models \
    SEG_ARTIFACT_CACHE_DIR=/var/lib/segsvc/artifacts \
    GUNICORN_WORKER_TMP_DIR=/dev/shm \
    GUNICORN_BIND=0.0.0.0:8000
USER segsvc
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["gunicorn", "-c", "python:api.gunicorn_conf", "api.wsgi:app"]

# --- inference worker, CPU ----------------------------------------------------------------------
FROM base AS worker
COPY --from=worker-deps /opt/venv /opt/venv
COPY --from=source /src /app
COPY models/baseline.keras models/baseline.json /app/models/
WORKDIR /app
ENV PYTHONPATH=/app \
    PATH=/app/bin:$PATH \
    SEG_VAR_DIR=/var/lib/segsvc \
    SEG_MODEL_DIR=/var/lib/segsvc/models \
    SEG_ARTIFACT_CACHE_DIR=/var/lib/segsvc/artifacts \
    SEG_PROBE_DIR=/tmp/segsvc-probes \
    SEG_METRICS_PORT=9100 \
    TF_CPP_MIN_LOG_LEVEL=2
USER segsvc
EXPOSE 9100
# Healthy once the model is loaded and the Celery event loop still turns (see worker/probes.py).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-m", "worker.probes"]
# The queue the API sends to (SEG_QUEUE_NAME): a worker on another one would run no job.
CMD ["sh", "-c", "exec celery -A worker.celery_app worker -Q \"${SEG_QUEUE_NAME:-inference}\" --pool solo --hostname inference@%h --without-gossip --without-mingle"]

# --- inference worker, GPU ----------------------------------------------------------------------
FROM ${TF_GPU_IMAGE} AS worker-gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 segsvc \
 && useradd --system --uid 10001 --gid segsvc --home-dir /app --shell /usr/sbin/nologin segsvc \
 && install -d -o segsvc -g segsvc /var/lib/segsvc
COPY requirements/worker-gpu.txt /tmp/requirements.txt
# The base image's TensorFlow (built against its CUDA) stays; the rest is pinned like the CPU one.
RUN python -m pip install -r /tmp/requirements.txt
COPY --from=source /src /app
COPY models/baseline.keras models/baseline.json /app/models/
WORKDIR /app
ENV PYTHONPATH=/app \
    PATH=/app/bin:$PATH \
    SEG_VAR_DIR=/var/lib/segsvc \
    SEG_MODEL_DIR=/var/lib/segsvc/models \
    SEG_ARTIFACT_CACHE_DIR=/var/lib/segsvc/artifacts \
    SEG_PROBE_DIR=/tmp/segsvc-probes \
    SEG_METRICS_PORT=9100 \
    SEG_RUNTIME=auto \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TF_FORCE_GPU_ALLOW_GROWTH=true
USER segsvc
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-m", "worker.probes"]
CMD ["sh", "-c", "exec celery -A worker.celery_app worker -Q \"${SEG_QUEUE_NAME:-inference}\" --pool solo --hostname inference-gpu@%h --without-gossip --without-mingle"]
