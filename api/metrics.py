"""Request metrics, request ids and access logs for the API, plus its /metrics endpoint.

Under gunicorn each worker is its own process, so prometheus-client runs in multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`, set by `api/gunicorn_conf.py`) and /metrics aggregates the files.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import NotFound

from api.context import settings
from segsvc.logging_setup import bind_context, reset_context
from segsvc.metrics import (
    API_SERIES,
    HTTP_LATENCY,
    HTTP_LONG_POLL,
    HTTP_REQUESTS,
    REJECTIONS,
    SUBMISSIONS,
    metrics_registry,
)

log = logging.getLogger("segsvc.access")

REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
SUBMIT_ENDPOINT = "jobs.submit_job"
BATCH_ENDPOINT = "jobs.submit_batch"
REPLAYED_HEADER = "Idempotent-Replayed"  # on an Idempotency-Key replay (api/routes/jobs.py)


def request_id_from(value: str | None) -> str:
    """The caller's request id when it is short and plain, else a fresh one."""
    if value and _SAFE_ID.match(value):
        return value
    return uuid.uuid4().hex


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _before() -> None:
    g.metrics_started = time.perf_counter()
    rid = request_id_from(request.headers.get(REQUEST_ID_HEADER))
    # Handlers read the id from the header (it is stored on the job row, a 64-char column), so
    # the sanitized or generated value replaces the raw one in the WSGI environ.
    request.environ["HTTP_X_REQUEST_ID"] = rid
    g.request_id = rid
    g.log_token = bind_context(request_id=rid)


def _after(response: Response) -> Response:
    started = g.pop("metrics_started", None)
    if started is None:
        return response
    elapsed = time.perf_counter() - started
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    # Clients choose the method (gunicorn takes any token): only known ones become a label
    # value, so requests with invented methods cannot grow the metrics without bound.
    method = request.method if request.method in HTTP_METHODS else "other"
    HTTP_REQUESTS.labels(route, method, str(response.status_code)).inc()
    held = request.args.get("wait", "") not in ("", "0")  # the client asked to be held
    (HTTP_LONG_POLL if held else HTTP_LATENCY).labels(route, method).observe(elapsed)
    job_id = (request.view_args or {}).get("job_id")
    if request.endpoint in (SUBMIT_ENDPOINT, BATCH_ENDPOINT):
        job_id = _count_submission(response) or job_id
    response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
    log.info(
        "%s %s %s",
        request.method,
        request.path,
        response.status_code,
        extra={
            "route": route,
            "method": request.method,
            "status": response.status_code,
            "duration_ms": round(elapsed * 1000.0, 2),
            **({"job_id": job_id} if job_id else {}),
        },
    )
    return response


def _count_submission(response: Response) -> str | None:
    """Count the jobs a submit or batch submit accepted (202, or 201 when `?wait=` saw the job
    end), or its refusal; a single submit's job id. A replay of an idempotent one accepts
    nothing new: 200, or 201 when a keyed `?wait=` is retried after its job ended, each with
    `Idempotent-Replayed` (that 201 counted as a new job)."""
    body = response.get_json(silent=True) if response.is_json else None
    body = body if isinstance(body, dict) else {}
    jobs = body.get("jobs")
    replayed = REPLAYED_HEADER in response.headers
    if response.status_code in (201, 202) and not replayed:
        SUBMISSIONS.inc(len(jobs) if isinstance(jobs, list) else 1)
    if response.status_code >= 400:
        REJECTIONS.labels(str(body.get("error") or response.status_code)).inc()
        return None
    if body.get("id"):  # a submit's job, a replay's (200) too
        return str(body["id"])
    if isinstance(jobs, list) and jobs and isinstance(jobs[0], dict):  # a batch: its first job
        return str(jobs[0].get("id") or "") or None
    return response.headers.get("X-Job-Id")  # a finished submit answered with its mask


def _teardown(_exc: BaseException | None) -> None:
    token = g.pop("log_token", None)
    if token is not None:
        reset_context(token)


def keep_metrics_on_their_port() -> None:
    """With `SEG_METRICS_PORT` set, gunicorn listens on that port too (`api/gunicorn_conf.py`):
    /metrics answers there only, and that port answers nothing else. The public port (the one
    a compose file publishes or an Ingress routes to) then never shows the metrics, which name
    error codes, routes and traffic, to anyone who can reach the API."""
    port = settings().metrics_port
    if not port:
        return
    if on_metrics_port(request.environ, port) != (request.endpoint == "metrics"):
        raise NotFound()  # the same answer as a path no route has


def on_metrics_port(environ: dict[str, Any], port: int) -> bool:
    """Whether the request came in on the metrics port: the local address of the connection
    gunicorn accepted. Not `SERVER_PORT`, which on a unix-socket bind gunicorn takes from the
    client's Host header: `Host: api:9100` on the public socket read the metrics. Without
    gunicorn (a test client, a dev server) `SERVER_PORT` is all there is."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return bool(environ.get("SERVER_PORT") == str(port))
    try:
        local = sock.getsockname()
    except OSError:
        return False
    return isinstance(local, tuple) and len(local) >= 2 and local[1] == port


def metrics_view() -> Response:
    """Prometheus exposition of every series this API process (group) records."""
    registry = metrics_registry(only=API_SERIES)
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def register_metrics(app: Flask) -> None:
    """Time and count every request, tag it with a request id, serve /metrics."""
    app.before_request(_before)
    app.before_request(keep_metrics_on_their_port)
    app.after_request(_after)
    app.teardown_request(_teardown)
    app.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])
