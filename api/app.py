"""The Flask app factory."""

from __future__ import annotations

import logging

from flask import Flask, Response, current_app, request

from api.context import register_context
from api.errors import register_error_handlers
from api.metrics import register_metrics
from segsvc.db import with_db_role
from segsvc.errors import NotFoundError, ValidationError
from segsvc.queue import make_celery
from segsvc.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Multipart framing around the file; the image itself is checked against the exact limit.
MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API app from settings."""
    # Its Postgres statements get the API's limits (SEG_API_STATEMENT_TIMEOUT_SECONDS, ...).
    settings = with_db_role(settings or get_settings(), "api")
    # No /static route: the page's files are served by the web blueprint under /ui, with its
    # security headers (CSP with frame-ancestors, nosniff); Flask's default route sent the same
    # files without them, so the page could be framed from elsewhere.
    app = Flask(__name__, static_folder=None)
    # A path with a doubled slash (`/v1//jobs`) is a 404 like any other unknown path. werkzeug's
    # default merges the slashes with a 308 redirect, which Flask answers itself (routing
    # redirects never reach the JSON error handlers): an HTML body, and a client that follows
    # it uploads its batch again. Each rule takes this default when it is added (bound), so it
    # is set before any route is.
    app.url_map.merge_slashes = False
    app.config["SEG_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + MULTIPART_OVERHEAD
    # Text fields are small, but werkzeug applies this limit to its parse buffer too (a 64 KiB
    # read plus any leftover), so it must stay well above 64 KiB or some photos get a 413.
    app.config["MAX_FORM_MEMORY_SIZE"] = 512 * 1024
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["segsvc_celery"] = make_celery(settings, name="segsvc-api")
    register_metrics(app)
    register_request_guards(app)
    register_context(app)
    register_blueprints(app)
    register_error_handlers(app)
    if not settings.auth_required:
        log.warning(
            "SEG_AUTH_REQUIRED is false: every caller is an admin (may promote and roll back "
            "models) and sees every job; keep this process off any network others reach"
        )
    return app


def register_blueprints(app: Flask) -> None:
    """Attach every route group."""
    from api.routes import docs, feedback, health, jobs, models, web, webhooks

    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(web.bp)
    app.register_blueprint(feedback.bp)
    app.register_blueprint(models.bp)
    app.register_blueprint(docs.bp)


def register_request_guards(app: Flask) -> None:
    """App-wide checks that run before any blueprint's (authentication included)."""
    app.before_request(refuse_nul_bytes)
    app.before_request(answer_options)


def refuse_nul_bytes() -> None:
    """Refuse a NUL in the path or the query before anything reaches the database: Postgres text
    cannot hold one, and psycopg's refusal would be a 500."""
    if "\x00" in request.path:
        raise NotFoundError("No such resource: the path contains a NUL byte.")
    for name, value in request.args.items(multi=True):
        if "\x00" in name or "\x00" in value:
            raise ValidationError(f"The query parameter {name[:64]!r} contains a NUL byte.")


def answer_options() -> Response | None:
    """Flask's automatic OPTIONS answer (200 with Allow), without an API key: it tells only which
    methods a path takes, and CORS preflights never carry credentials."""
    if request.method == "OPTIONS" and getattr(
        request.url_rule, "provide_automatic_options", False
    ):
        return current_app.make_default_options_response()
    return None
