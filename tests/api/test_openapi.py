"""The OpenAPI document: served, generated from the code, and fuzzed with schemathesis."""

from __future__ import annotations

import inspect
import io
import ipaddress
import re
import socket
import sys
from collections.abc import Callable
from typing import Any

import hypothesis
import pytest
import schemathesis
from PIL import Image
from schemathesis import GenerationMode, checks

from api.openapi import OPERATIONS

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
