"""The OpenAPI 3.1 document, built from the app's URL map, the pydantic models in
`api/schemas_openapi.py` and a registry of what each endpoint accepts and answers."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api import schemas_openapi as s
from segsvc.services.jobs import MAX_WAIT_SECONDS

PNG = "image/png"
SERVED_PREFIXES = ("/v1/",)
SERVED_PATHS = ("/healthz", "/startupz", "/readyz", "/openapi.json")
ERROR_TEXT = {
    201: "Created, and finished within `?wait=`: the whole job.",
    400: "Malformed request.",
    401: "Missing or unknown API key.",
    403: "Needs an admin key.",
    404: "No such job for this key (another key's job is not found either).",
    409: "Not possible in the job's state; for a submit, `idempotency_key_in_use`: a twin "
    "request with this key is being stored (retry after Retry-After to get its job).",
    410: "What the picture is made of is no longer kept (retention).",
    413: "Upload over the size limit.",
    415: "Not a JPEG, PNG or WebP image.",
    422: "Invalid image or field.",
    429: "Rate limited; see Retry-After.",
    503: "Overloaded or a dependency is down; see Retry-After.",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}


@dataclass(frozen=True)
class Operation:
    """What one endpoint accepts and answers (status -> model, or a media type for bytes)."""

    responses: Mapping[int, type[BaseModel] | str]
    form: type[BaseModel] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # name -> JSON schema
    required_query: frozenset[str] = frozenset()  # of `query`, those the endpoint needs
    located: bool = False  # its 201/202/200 carry Location (the job's URL)
    png_too: frozenset[int] = frozenset()  # statuses that answer `Accept: image/png` with a PNG
    replays: bool = False  # a 200 is an Idempotency-Key replay (header Idempotent-Replayed)
    descriptions: Mapping[int, str] = field(default_factory=dict)  # status -> over ERROR_TEXT


IDEMPOTENCY = {
    "Idempotency-Key": "Replays the same job for the same body within 24 h: 1-255 printable "
    "ASCII characters, no comma; send it once (a repeated header is a 422)."
}
# The public one-line summary of each operation (a view's docstring speaks to maintainers:
# its first line was cut mid-sentence and named internals). The docstring's first sentence
# serves an endpoint not listed here.
SUMMARIES = {
    "health.healthz": "The process is up.",
    "health.startupz": "Postgres is reachable and its schema is this release's (the startup "
    "probe).",
    "health.readyz": "Postgres, the broker and (file blobs) the blob volume are ready: the full "
    "report.",
    "docs.openapi_json": "This OpenAPI 3.1 document.",
    "jobs.submit_job": "Submit one photo; `?wait=S` answers with the finished job (or its mask "
    "PNG) if it ends within S s.",
    "jobs.submit_batch": "Submit several photos at once (repeat the field `image`): all are "
    "accepted, or none.",
    "jobs.read_jobs": "Several jobs at once (`?ids=a,b,...`, up to 100); `?wait=S` until every "
    "one has ended.",
    "jobs.read_job": "A job's state, timings and links; `?wait=S` long-polls up to S seconds "
    "for its end.",
    "jobs.cancel_job": "Cancel a queued job (a running one stops at its next batch boundary).",
    "jobs.read_mask": "The class mask PNG (0 pet, 1 background, 2 border) at the photo's size.",
    "jobs.read_overlay": "The photo with its mask blended on it (PNG).",
    "feedback.post_feedback": "Rate a job's mask and/or send a corrected one (retraining "
    "learns from it).",
    "webhooks.list_messages": "A job's webhook messages, each with its attempts.",
    "webhooks.redeliver": "Send a webhook message again now.",
    "webhooks.read_secret": "Your `whsec_` webhook signing secret.",
    "webhooks.rotate_secret": "A new webhook signing secret; the previous one keeps signing "
    "for a while.",
    "models.list_models": "Model versions with status, traffic share and metrics, and recent "
    "training runs.",
    "models.comparison_sheet": "A candidate's masks beside production's on evaluation photos "
    "(PNG).",
    "models.promote_model": "Make a version production now (the old one is archived).",
    "models.reject_model": "Reject a version now: a canary stops serving, production untouched.",
    "models.rollback_model": "Return to the previous production version now.",
}
# What a submit (one photo or a batch) can answer besides its 2xx.
UPLOAD_ERRORS: dict[int, type[BaseModel] | str] = dict.fromkeys(
    (400, 409, 413, 415, 422, 429, 503), s.Error
)


def wait_query(description: str) -> dict[str, Any]:
    """The `?wait=` parameter's schema: seconds to hold the answer, up to the long-poll cap."""
    return {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS, "description": description}


OPERATIONS: dict[str, Operation] = {
    "jobs.submit_job": Operation(
        {
            202: s.AcceptedJob,
            201: s.Job,
            200: s.AcceptedJob,
            **UPLOAD_ERRORS,
        },
        form=s.JobSubmission,
        headers=IDEMPOTENCY,
        located=True,
        replays=True,
        png_too=frozenset({201}),
        query={
            "wait": wait_query(
                "Hold the answer until the job ends (201 with the finished job; with "
                "`Accept: image/png`, a succeeded job's mask PNG itself, its id in X-Job-Id) "
                "or for this many seconds (202). An Idempotency-Key replay waits alike: 201 "
                "as above once its job has ended, else 200."
            )
        },
    ),
    "jobs.submit_batch": Operation(
        {
            202: s.AcceptedBatch,
            200: s.AcceptedBatch,
            **UPLOAD_ERRORS,
        },
        form=s.BatchSubmission,
        headers=IDEMPOTENCY,
        replays=True,
    ),
    "jobs.read_jobs": Operation(
        {200: s.JobList, 422: s.Error},
        query={
            "ids": {"type": "string", "description": "Comma-separated job ids (up to 100)."},
            "wait": wait_query(
                "Long poll: answer when every job has ended, or after this many seconds."
            ),
        },
        required_query=frozenset({"ids"}),
    ),
    "jobs.read_job": Operation(
        {200: s.Job, 422: s.Error},
        query={
            "wait": wait_query("Long poll: answer when the job ends, or after this many seconds.")
        },
    ),
    # 409: the job has not succeeded (yet); 410: what the picture is made of is gone (a mask
    # file lost from the blob store; for the overlay, the input retention deleted). An overlay
    # over 1 MP (METERED_OVERLAY_PIXELS) takes a submission token: 429 over the rate.
    "jobs.read_mask": Operation({200: PNG, 409: s.Error, 410: s.Error}),
    "jobs.read_overlay": Operation({200: PNG, 409: s.Error, 410: s.Error, 429: s.Error}),
    "jobs.cancel_job": Operation({200: s.Job, 409: s.Error}),
    # A rating and/or a corrected mask. Each post takes a submission token (a mask is decoded
    # as an upload is: one over LARGE_DECODE_PIXELS waits for the large-decode turn, 503).
    "feedback.post_feedback": Operation(
        {
            201: s.Feedback,
            **dict.fromkeys((400, 404, 409, 413, 422, 429, 503), s.Error),
        },
        form=s.FeedbackSubmission,
        descriptions={
            201: "Stored: the feedback.",
            400: "Neither a mask nor a rating, an empty mask file, or a part sent as the wrong "
            "kind (`mask` without a filename, `rating` with one).",
            409: "The job has not succeeded, or (for a mask) its input is no longer kept.",
            413: "The mask is over the upload size limit.",
            422: "`invalid_mask` (not a single-channel PNG of the input's size with values "
            "0..2), `invalid_rating` (not good or bad), or `validation_error` (a field sent "
            "twice).",
            503: "Overloaded (e.g. `large_decodes_busy`) or a dependency is down; see Retry-After.",
        },
    ),
    "webhooks.read_secret": Operation({200: s.WebhookSecret}),
    # Rotations and redeliveries take a submission token each (429 over the rate).
    "webhooks.rotate_secret": Operation({200: s.RotatedWebhookSecret, 429: s.Error}),
    "webhooks.list_messages": Operation({200: s.WebhookMessageList}),
    "webhooks.redeliver": Operation(
        {202: s.WebhookMessage, 404: s.Error, 429: s.Error},
        descriptions={
            202: "Due now: the message, pending again (its endpoint enabled again).",
            404: "No such job for this key, or no such message of the job.",
        },
    ),
    # The registry: admin keys only (403 for any other key).
    "models.list_models": Operation({200: s.ModelRegistry, 403: s.Error}),
    "models.comparison_sheet": Operation(
        {200: PNG, 403: s.Error, 404: s.Error},
        descriptions={
            200: "Photo | truth | production | candidate on the evaluation photos where the two "
            "models disagree most, as the retraining run that made the version drew it.",
            404: "No such version, or it has no sheet (not made by retraining, or pruned).",
        },
    ),
    "models.promote_model": Operation(
        {200: s.ModelVersion, 403: s.Error, 404: s.Error, 409: s.Error},
        descriptions={
            200: "The version, now production (the previous one archived).",
            404: "No such model version.",
            409: "Already production, or its model file was pruned (`model_file_deleted`).",
        },
    ),
    "models.reject_model": Operation(
        {200: s.ModelVersion, 403: s.Error, 404: s.Error, 409: s.Error},
        descriptions={
            200: "The version, now rejected: a canary stops serving at the workers' next "
            "registry poll, production untouched.",
            404: "No such model version.",
            409: "It is production (roll back instead), or it is already rejected.",
        },
    ),
    "models.rollback_model": Operation(
        {200: s.ModelVersion, 403: s.Error, 409: s.Error},
        descriptions={
            200: "The previous production version, production again.",
            409: "No production version, or no earlier one (with its model file) to return to.",
        },
    ),
    "health.healthz": Operation({200: s.Health}),
    "health.startupz": Operation({200: s.Readiness, 503: s.Readiness}),
    "health.readyz": Operation({200: s.Readiness, 503: s.Readiness}),
    "docs.openapi_json": Operation({200: "application/json"}),
}
MODELS: list[type[BaseModel]] = [
    s.Error,
    s.Job,
    s.AcceptedJob,
    s.JobSubmission,
    s.AcceptedBatch,
    s.BatchSubmission,
    s.JobList,
    s.Health,
    s.Readiness,
    s.FeedbackSubmission,
    s.Feedback,
    s.WebhookSecret,
    s.RotatedWebhookSecret,
    s.WebhookMessageList,
    s.ModelRegistry,
    s.ModelVersion,
]
_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def build_openapi(app: Flask) -> dict[str, Any]:
    """The whole document for the routes this app serves."""
    _, defs = models_json_schema(
        [(m, "validation") for m in MODELS], ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if not _served(rule.rule) or "<path:" in rule.rule:
            continue
        path = _PARAM.sub(r"{\1}", rule.rule)
        view = app.view_functions[rule.endpoint]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(
                rule.endpoint, path, sorted(rule.arguments), (view.__doc__ or "").strip()
            )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "segsvc",
            "version": "1",
            "description": "Image segmentation jobs: submit a photo, poll, fetch the mask.",
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _served(rule: str) -> bool:
    return rule.startswith(SERVED_PREFIXES) or rule in SERVED_PATHS


def _operation(endpoint: str, path: str, params: list[str], doc: str) -> dict[str, Any]:
    spec = OPERATIONS.get(endpoint)
    summary = SUMMARIES.get(endpoint) or " ".join(doc.split("\n\n")[0].split()).split(". ")[0]
    op: dict[str, Any] = {"operationId": endpoint, "summary": summary}
    parameters = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
    ]
    responses: dict[str, Any] = {}
    if spec is None:  # an endpoint not described yet: any answer, but never a 5xx
        responses["default"] = {"description": "See the endpoint's documentation."}
    else:
        responses.update({str(k): _response(k, v, spec) for k, v in spec.responses.items()})
        parameters += [
            {
                "name": h,
                "in": "header",
                "required": False,
                "description": d,
                "schema": {"type": "string", "maxLength": 255},
            }
            for h, d in spec.headers.items()
        ]
        parameters += [
            {"name": q, "in": "query", "required": q in spec.required_query, "schema": schema}
            for q, schema in spec.query.items()
        ]
        if spec.form is not None:
            op["requestBody"] = {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {"$ref": f"#/components/schemas/{spec.form.__name__}"}
                    }
                },
            }
    if path.startswith("/v1/"):
        op["security"] = [{"bearer": []}]
        responses.setdefault("401", _response(401, s.Error))
        responses.setdefault("503", _response(503, s.Error))
        if params:
            responses.setdefault("404", _response(404, s.Error))
    if parameters:
        op["parameters"] = parameters
    op["responses"] = responses
    return op


def _response(
    status: int, body: type[BaseModel] | str, spec: Operation | None = None
) -> dict[str, Any]:
    if isinstance(body, str):
        schema: dict[str, Any] = {"type": "string", "format": "binary"} if body == PNG else {}
        content = {body: {"schema": schema}}
    else:
        ref = {"$ref": f"#/components/schemas/{body.__name__}"}
        content = {"application/json": {"schema": ref}}
        if spec is not None and status in spec.png_too:
            content[PNG] = {"schema": {"type": "string", "format": "binary"}}
    described = spec.descriptions.get(status) if spec is not None else None
    out: dict[str, Any] = {
        "description": described or ERROR_TEXT.get(status, "OK"),
        "content": content,
    }
    headers: dict[str, Any] = {}
    if status in (429, 503) or (status == 409 and spec is not None and spec.replays):
        headers.update(RETRY_AFTER)
    if status in (200, 201, 202) and spec is not None and spec.located:
        headers["Location"] = {"description": "The job URL.", "schema": {"type": "string"}}
    if spec is not None and status in spec.png_too:
        headers["X-Job-Id"] = {
            "description": "The job's id, when the body is its mask PNG (`Accept: image/png`).",
            "schema": {"type": "string"},
        }
    if status == 200 and spec is not None and spec.replays:
        out["description"] = "An Idempotency-Key replay: the job(s) the first request stored."
        headers["Idempotent-Replayed"] = {"description": "1", "schema": {"type": "string"}}
    if status == 201 and spec is not None and spec.replays:
        headers["Idempotent-Replayed"] = {
            "description": "1 when an Idempotency-Key replay's `?wait=` saw the stored job end.",
            "schema": {"type": "string"},
        }
    if headers:
        out["headers"] = headers
    if status == 401:
        out["headers"] = {
            "WWW-Authenticate": {
                "description": 'The scheme to send: `Bearer realm="segsvc"`.',
                "schema": {"type": "string"},
            }
        }
    return out
