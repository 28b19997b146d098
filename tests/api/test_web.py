"""The web page and its static files."""

from __future__ import annotations

import json
import re

from api.routes.web import STATIC_DIR
from segsvc.ml.imaging import OVERLAY_ALPHA, PALETTE


def test_index_serves_page_without_auth(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/")
    assert resp.status_code == 200
    assert resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    assert 'src="/ui/app.js"' in html
    assert 'href="/ui/style.css"' in html
    assert 'id="drop-zone"' in html


def test_assets_served_with_types_and_csp(client) -> None:  # type: ignore[no-untyped-def]
    for name, mimetype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        resp = client.get(f"/ui/{name}")
        assert resp.status_code == 200, name
        assert resp.mimetype == mimetype
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    csp = client.get("/").headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp
    assert "img-src 'self' blob:" in csp


def test_the_page_is_served_only_with_its_security_headers(client) -> None:  # type: ignore[no-untyped-def]
    """Flask's default /static route served the page's files without the CSP (whose
    frame-ancestors keeps the page, and the key it holds, from being framed) or nosniff."""
    for name in ("index.html", "app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 404, name
    page = client.get("/")
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]


def test_asset_missing_or_escaping_is_not_found(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/ui/nope.js").status_code == 404
    assert client.get("/ui/../routes/web.py").status_code == 404
    assert client.get("/ui/%2e%2e/app.py").status_code == 404


def test_config_reports_limits_without_secrets(client, settings) -> None:  # type: ignore[no-untyped-def]
    body = client.get("/ui/config.json").get_json()
    assert body == {
        "auth_required": True,
        "max_upload_bytes": settings.max_upload_bytes,
        "max_pixels": settings.max_pixels,
    }


def test_static_files_load_nothing_from_other_origins() -> None:
    """The page must work offline: no CDN, no absolute URLs in markup, script or style."""
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name
        assert "@import" not in text, path.name


def test_api_still_requires_key(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/v1/jobs/00000000-0000-0000-0000-000000000000")
    assert resp.status_code == 401
    assert resp.get_json()["error"] == "unauthorized"


def _js_rgba_table(name: str) -> list[list[int]]:
    """An `[[r, g, b, a], ...]` constant of the page's script."""
    match = re.search(
        rf"const {name} = (\[\[[\d, \[\]]+\]\]);", (STATIC_DIR / "app.js").read_text()
    )
    assert match, name
    table: list[list[int]] = json.loads(match.group(1))
    return table


def test_page_draws_the_overlay_in_the_servers_colours() -> None:
    """The page draws the overlay itself (the server's overlay.png of a large photo took many
    seconds to download): in `imaging`'s colours and opacities, and the mask in the legend's."""
    overlay = _js_rgba_table("OVERLAY_COLOURS")
    assert len(overlay) == len(PALETTE)
    for (*rgb, alpha), colour, opacity in zip(overlay, PALETTE, OVERLAY_ALPHA, strict=True):
        assert alpha == round(opacity * 255)
        assert alpha == 0 or tuple(rgb) == colour
    css = (STATIC_DIR / "style.css").read_text()
    legend = [
        re.search(rf"\.swatch\.{name} {{ background: rgb\((\d+), (\d+), (\d+)\)", css)
        for name in ("pet", "background", "border")
    ]
    swatches = [[int(v) for v in m.groups()] + [255] for m in legend if m]
    assert _js_rgba_table("MASK_COLOURS") == swatches
