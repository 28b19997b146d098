"""`/openapi.json`: the API's OpenAPI document, generated from the code (no auth)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from api.openapi import build_openapi

bp = Blueprint("docs", __name__)


@bp.get("/openapi.json")
def openapi_json() -> Response:
    """The OpenAPI 3.1 document of this API."""
    doc: dict[str, Any] | None = current_app.extensions.get("segsvc_openapi")
    if doc is None:
        doc = current_app.extensions["segsvc_openapi"] = build_openapi(current_app)
    return jsonify(doc)
