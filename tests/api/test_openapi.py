"""The OpenAPI document: served, generated from the code, and fuzzed with schemathesis."""

from __future__ import annotations

import inspect
import io
import ipaddress
import re
import socket
import sys
import uuid
from collections.abc import Callable
from typing import Any

import hypothesis
import jsonschema
import pytest
import schemathesis
from flask.testing import FlaskClient
from PIL import Image
from schemathesis import GenerationMode, checks
from sqlalchemy import select
from werkzeug.test import TestResponse

from api.openapi import OPERATIONS
from segsvc.db import session_scope
from segsvc.models import ModelStatus, TrainingRun, WebhookAttempt, WebhookMessage, db_time
from segsvc.services import registry
from segsvc.settings import Settings
from tests.api.test_feedback import post as post_feedback
from tests.api.test_feedback import submit_and_finish
from tests.segsvc.test_feedback import good_mask
from tests.segsvc.webhooks.factories import png_bytes, start_job

EXAMPLES = 10  # per operation and mode: the whole fuzz stays well under a minute
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


def test_openapi_describes_every_api_route(client, app) -> None:  # type: ignore[no-untyped-def]
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    described = {(path, m) for path, ops in doc["paths"].items() for m in ops}
    routes = {
        re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", r.rule)
        for r in app.url_map.iter_rules()
        if r.rule.startswith("/v1/")
    }
    assert routes <= {path for path, _ in described}
    assert ("/v1/jobs", "post") in described
    assert set(OPERATIONS) <= {
        op["operationId"] for ops in doc["paths"].values() for op in ops.values()
    }


def test_openapi_submit_documents_limits(client) -> None:  # type: ignore[no-untyped-def]
    op = client.get("/openapi.json").get_json()["paths"]["/v1/jobs"]["post"]
    assert {"202", "200", "401", "413", "415", "422", "429", "503"} <= set(op["responses"])
    assert "Retry-After" in op["responses"]["429"]["headers"]
    assert op["security"] == [{"bearer": []}]


def test_openapi_documents_the_401_challenge_the_api_sends(client) -> None:  # type: ignore[no-untyped-def]
    op = client.get("/openapi.json").get_json()["paths"]["/v1/jobs"]["post"]
    assert "WWW-Authenticate" in op["responses"]["401"]["headers"]
    sent = client.post("/v1/jobs")  # no key
    assert sent.status_code == 401
    assert sent.headers["WWW-Authenticate"].startswith("Bearer")


def _may_rate_limit(func: Callable[..., Any], seen: set[Callable[..., Any]]) -> bool:
    """Whether `func`, or a function of its own module that it calls (and so on), calls
    limits.check_rate: read from the source, so a new caller is found without a list."""
    seen.add(func)
    source = inspect.getsource(func)
    if "limits.check_rate(" in source:
        return True
    module = sys.modules[func.__module__]
    for name in set(re.findall(r"\b(\w+)\(", source)):
        callee = getattr(module, name, None)
        if (
            inspect.isfunction(callee)
            and callee.__module__ == func.__module__
            and callee not in seen
            and _may_rate_limit(callee, seen)
        ):
            return True
    return False


def test_openapi_documents_429_wherever_a_route_takes_submission_tokens(client, app) -> None:  # type: ignore[no-untyped-def]
    """Regression: the overlay (over 4 MP) takes a token but its operation listed no 429."""
    doc = client.get("/openapi.json").get_json()
    limited = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/v1/") or not _may_rate_limit(
            app.view_functions[rule.endpoint], set()
        ):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            limited.add(rule.endpoint)
            responses = doc["paths"][path][method.lower()]["responses"]
            assert "429" in responses or "default" in responses, (rule.endpoint, method)
            if "429" in responses:
                assert "Retry-After" in responses["429"]["headers"]
    assert {"jobs.submit_job", "jobs.submit_batch", "jobs.read_overlay"} <= limited
    assert "jobs.read_mask" not in limited


@pytest.mark.timeout(180)
def test_openapi_fuzz_no_server_errors(app, admin_key: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every operation, valid and invalid inputs: no 5xx, and every answer matches the spec.

    Generated webhook URLs name random hosts: the SSRF check resolves only numeric ones here,
    so the fuzz sends no DNS query off this machine."""
    real_getaddrinfo = socket.getaddrinfo

    def numeric_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            ipaddress.ip_address(str(host).strip("[]").split("%")[0])
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, "the fuzz resolves no names") from None
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", numeric_only)
    api = schemathesis.openapi.from_wsgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {admin_key}"}
    failures: list[str] = []
    counts = {"operations": 0, "cases": 0}
    for result in api.get_all_operations():
        operation = result.ok()
        counts["operations"] += 1
        for mode in GenerationMode:

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            def run(case) -> None:  # type: ignore[no-untyped-def]
                counts["cases"] += 1
                case.call_and_validate(headers=headers, checks=CHECKS)

            try:
                run()
            except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (no inputs)
                continue
            except Exception as exc:
                failures.append(f"{operation.label} [{mode.value}]: {str(exc)[:1500]}")
    print(f"schemathesis: {counts}, failures: {len(failures)}")
    assert counts["operations"] >= 8
    assert not failures, "\n\n".join(failures)


def test_openapi_says_what_the_routes_need_and_answer(client) -> None:  # type: ignore[no-untyped-def]
    doc = client.get("/openapi.json").get_json()
    read_many = doc["paths"]["/v1/jobs"]["get"]
    ids = next(p for p in read_many["parameters"] if p["name"] == "ids")
    assert ids["required"] is True  # 422 without it
    for picture in ("mask.png", "overlay.png"):
        assert "410" in doc["paths"][f"/v1/jobs/{{job_id}}/{picture}"]["get"]["responses"]
    schemas = doc["components"]["schemas"]
    for form in ("JobSubmission", "BatchSubmission"):
        assert {"image", "webhook", "webhook_events"} <= set(schemas[form]["properties"])
        assert schemas[form]["required"] == ["image"]


def test_openapi_headers_are_the_ones_the_submits_send(client, auth) -> None:  # type: ignore[no-untyped-def]
    """The batch's 202 has no Location (it named one); a replay's 200 carries
    Idempotent-Replayed, a key in use's 409 Retry-After; the 410 says what it means."""
    doc = client.get("/openapi.json").get_json()
    single = doc["paths"]["/v1/jobs"]["post"]["responses"]
    batch = doc["paths"]["/v1/jobs/batch"]["post"]["responses"]
    image = io.BytesIO()
    Image.new("RGB", (32, 24)).save(image, format="PNG")
    for path, responses in (("/v1/jobs", single), ("/v1/jobs/batch", batch)):
        sent = []
        for _ in range(2):  # the second is the replay
            image.seek(0)
            sent.append(
                client.post(
                    path,
                    headers={**auth, "Idempotency-Key": f"openapi-{path}"},
                    data={"image": (io.BytesIO(image.getvalue()), "a.png")},
                    content_type="multipart/form-data",
                )
            )
        accepted, replay = sent
        assert (accepted.status_code, replay.status_code) == (202, 200)
        for resp in (accepted, replay):
            documented = set(responses[str(resp.status_code)].get("headers", {}))
            assert ("Location" in resp.headers) == ("Location" in documented), path
        assert replay.headers["Idempotent-Replayed"] == "1"
        assert "Idempotent-Replayed" in responses["200"]["headers"]
        assert "Retry-After" in responses["409"]["headers"]
    gone = doc["paths"]["/v1/jobs/{job_id}/mask.png"]["get"]["responses"]["410"]
    assert gone["description"] != "OK"


def _conforms(doc: dict[str, Any], path: str, method: str, resp: TestResponse) -> None:
    """The answer's status is documented for the operation and its JSON body matches the
    documented schema (references resolved against the document's components)."""
    responses = doc["paths"][path][method]["responses"]
    assert str(resp.status_code) in responses, (path, method, resp.status_code, resp.get_json())
    schema = responses[str(resp.status_code)]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator({**schema, "components": doc["components"]})
    validator.validate(resp.get_json())


def _schema(doc: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = doc["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]
    return schema


def test_openapi_documents_the_feedback_form_and_its_answers(client) -> None:  # type: ignore[no-untyped-def]
    """Regression: the feedback operation had no requestBody and only a `default` response,
    so a client generated from the document could not send a mask."""
    doc = client.get("/openapi.json").get_json()
    op = doc["paths"]["/v1/jobs/{job_id}/feedback"]["post"]
    form = _schema(doc, op["requestBody"]["content"]["multipart/form-data"]["schema"])
    assert form["properties"]["mask"]["format"] == "binary"
    assert "default" not in form["properties"]["mask"]  # a form has no null to send
    assert form["properties"]["rating"]["enum"] == ["good", "bad"]
    assert not form.get("required")  # either field alone will do (one of them is needed)
    responses = op["responses"]
    assert {"201", "400", "401", "404", "409", "413", "422", "429", "503"} <= set(responses)
    assert "default" not in responses
    assert "Retry-After" in responses["429"]["headers"]
    created = _schema(doc, responses["201"]["content"]["application/json"]["schema"])
    assert {"id", "job_id", "rating", "has_mask"} <= set(created["properties"])


def test_openapi_documents_an_answer_for_every_api_operation(client, app) -> None:  # type: ignore[no-untyped-def]
    """Every /v1 operation has a registry entry: a success and its errors, never only `default`."""
    doc = client.get("/openapi.json").get_json()
    missing = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/v1/"):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            responses = doc["paths"][path][method.lower()]["responses"]
            if "default" in responses or not any(code.startswith("2") for code in responses):
                missing.append(f"{method} {path}")
    assert not missing, missing


def test_openapi_webhook_and_model_operations_list_their_real_statuses(client) -> None:  # type: ignore[no-untyped-def]
    paths = client.get("/openapi.json").get_json()["paths"]

    def statuses(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    assert {"200", "401", "503"} <= statuses("/v1/webhooks/secret", "get")
    assert {"200", "429"} <= statuses("/v1/webhooks/secret/rotate", "post")
    assert {"200", "404"} <= statuses("/v1/jobs/{job_id}/webhooks", "get")
    redeliver = statuses("/v1/jobs/{job_id}/webhooks/{message_id}/redeliver", "post")
    assert {"202", "404", "429"} <= redeliver
    assert "200" not in redeliver
    assert {"200", "403"} <= statuses("/v1/models", "get")
    assert {"200", "403", "404", "409"} <= statuses("/v1/models/{version}/promote", "post")
    assert {"200", "403", "409"} <= statuses("/v1/models/rollback", "post")
    assert {"200", "403", "404", "409"} <= statuses("/v1/models/{version}/reject", "post")
    promote_404 = paths["/v1/models/{version}/promote"]["post"]["responses"]["404"]
    assert "model version" in promote_404["description"]


def test_openapi_feedback_answers_match_the_document(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    doc = client.get("/openapi.json").get_json()
    path = "/v1/jobs/{job_id}/feedback"
    job_id = submit_and_finish(client, auth, settings)
    sent: list[tuple[dict[str, Any], int]] = [
        ({"mask": good_mask(), "rating": "good"}, 201),
        ({"rating": "bad"}, 201),
        ({"mask": b"not a png"}, 422),
        ({"rating": "meh"}, 422),
        ({}, 400),
    ]
    for fields, status in sent:
        resp = post_feedback(client, auth, job_id, **fields)
        assert resp.status_code == status, (fields, resp.get_json())
        _conforms(doc, path, "post", resp)
    missing = post_feedback(client, auth, str(uuid.uuid4()), rating="good")
    assert missing.status_code == 404
    _conforms(doc, path, "post", missing)


def test_openapi_webhook_answers_match_the_document(  # type: ignore[no-untyped-def]
    open_client: FlaskClient, auth, settings: Settings
) -> None:
    doc = open_client.get("/openapi.json").get_json()
    _conforms(
        doc, "/v1/webhooks/secret", "get", open_client.get("/v1/webhooks/secret", headers=auth)
    )
    rotated = open_client.post("/v1/webhooks/secret/rotate", headers=auth)
    _conforms(doc, "/v1/webhooks/secret/rotate", "post", rotated)
    submitted = open_client.post(
        "/v1/jobs",
        headers=auth,
        data={
            "image": (io.BytesIO(png_bytes()), "pet.png"),
            "webhook": "http://127.0.0.1:9/hook",
            "webhook_events": "start",
        },
        content_type="multipart/form-data",
    )
    job_id = submitted.get_json()["id"]
    start_job(settings, uuid.UUID(job_id))
    with session_scope(settings) as session:  # one failed attempt, so the log shows its fields
        message = session.scalars(select(WebhookMessage)).one()
        session.add(
            WebhookAttempt(
                message_id=message.id,
                attempted_at=db_time(session),
                status_code=500,
                duration_ms=12.5,
                error="HTTP 500",
                response_body="oops",
                next_attempt_at=db_time(session),
            )
        )
        message_id = message.id
    log = open_client.get(f"/v1/jobs/{job_id}/webhooks", headers=auth)
    _conforms(doc, "/v1/jobs/{job_id}/webhooks", "get", log)
    assert log.get_json()["messages"][0]["attempt_log"]
    redeliver = "/v1/jobs/{job_id}/webhooks/{message_id}/redeliver"
    again = open_client.post(f"/v1/jobs/{job_id}/webhooks/{message_id}/redeliver", headers=auth)
    assert again.status_code == 202
    _conforms(doc, redeliver, "post", again)
    missing = open_client.post(f"/v1/jobs/{job_id}/webhooks/nope/redeliver", headers=auth)
    _conforms(doc, redeliver, "post", missing)


def test_openapi_model_registry_answers_match_the_document(  # type: ignore[no-untyped-def]
    client, auth, admin_key: str, settings: Settings, tmp_path
) -> None:
    doc = client.get("/openapi.json").get_json()
    admin = {"Authorization": f"Bearer {admin_key}"}
    _conforms(doc, "/v1/models/rollback", "post", client.post("/v1/models/rollback", headers=admin))
    model = tmp_path / "m.keras"
    model.write_bytes(b"weights")
    with session_scope(settings) as session:
        for version, status in (("v1", ModelStatus.PRODUCTION), ("v2", ModelStatus.CANDIDATE)):
            registry.register_version(
                session=session,
                version=version,
                path=model,
                status=status,
                metrics={"mean_iou": 0.5},
                sha256="0" * 64,
            )
        session.add(
            TrainingRun(
                status="completed",
                trigger="manual",
                data_counts={"labels": 3},
                production_version="v1",
                candidate_version="v2",
                production_metrics={"mean_iou": 0.5},
                candidate_metrics={"mean_iou": 0.6},
                duration_s=1.5,
            )
        )
    listed = client.get("/v1/models", headers=admin)
    _conforms(doc, "/v1/models", "get", listed)
    assert listed.get_json()["training_runs"]
    _conforms(doc, "/v1/models", "get", client.get("/v1/models", headers=auth))  # 403
    promote = "/v1/models/{version}/promote"
    _conforms(doc, promote, "post", client.post("/v1/models/v2/promote", headers=admin))
    _conforms(doc, promote, "post", client.post("/v1/models/v2/promote", headers=admin))  # 409
    _conforms(doc, promote, "post", client.post("/v1/models/nope/promote", headers=admin))
    _conforms(doc, "/v1/models/rollback", "post", client.post("/v1/models/rollback", headers=admin))
    reject = "/v1/models/{version}/reject"
    with session_scope(settings) as session:
        registry.register_version(session=session, version="v3", path=model, sha256="0" * 64)
    rejected = client.post("/v1/models/v3/reject", headers=admin)
    assert rejected.status_code == 200
    _conforms(doc, reject, "post", rejected)
    _conforms(doc, reject, "post", client.post("/v1/models/v3/reject", headers=admin))  # 409
    _conforms(doc, reject, "post", client.post("/v1/models/v1/reject", headers=admin))  # 409
    _conforms(doc, reject, "post", client.post("/v1/models/nope/reject", headers=admin))
    _conforms(doc, reject, "post", client.post("/v1/models/v1/reject", headers=auth))  # 403


def test_openapi_summaries_are_whole_public_sentences(client, app) -> None:  # type: ignore[no-untyped-def]
    """Regression: each summary was its view docstring's first line, cut mid-sentence ("...;
    `?wait=S` then holds") and naming internals (`overlay_turn`)."""
    from api.openapi import SUMMARIES

    spec = client.get("/openapi.json").get_json()
    ops = {op["operationId"]: op for path in spec["paths"].values() for op in path.values()}
    assert set(ops) <= set(SUMMARIES)  # every operation has a written summary
    for endpoint, op in ops.items():
        summary = op["summary"]
        assert summary == SUMMARIES[endpoint]
        assert summary.endswith((".", ")")), summary
        assert len(summary) <= 100, summary
        assert "_turn" not in summary
