"""The web page at `/` and its static files (no auth: the page asks for the key itself)."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, jsonify, send_from_directory

from api.context import settings

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Everything the page loads comes from this origin; result images are blob: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)

bp = Blueprint("web", __name__)


@bp.after_request
def add_security_headers(resp: Response) -> Response:
    """Lock the page to its own origin."""
    resp.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp


@bp.get("/")
def index() -> Response:
    """The upload page."""
    resp = send_from_directory(STATIC_DIR, "index.html", max_age=0)
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.get("/ui/<path:name>")
def asset(name: str) -> Response:
    """The page's scripts and styles (revalidated, so a deploy shows up at once)."""
    resp = send_from_directory(STATIC_DIR, name, max_age=0)
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.get("/ui/config.json")
def config() -> Response:
    """What the page needs to know before uploading (no secrets)."""
    cfg = settings()
    return jsonify(
        {
            "auth_required": cfg.auth_required,
            "max_upload_bytes": cfg.max_upload_bytes,
            "max_pixels": cfg.max_pixels,
        }
    )
