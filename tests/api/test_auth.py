from __future__ import annotations

import io

from PIL import Image


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, format="PNG")
    return buf.getvalue()


def test_v1_requires_bearer_key(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/v1/jobs/00000000-0000-0000-0000-000000000000")
    assert resp.status_code == 401
    assert resp.get_json()["error"] == "unauthorized"


def test_v1_rejects_unknown_key(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/v1/jobs/x", headers={"Authorization": "Bearer seg_nope"})
    assert resp.status_code == 401


def test_other_clients_job_is_404(client, auth, admin_key) -> None:  # type: ignore[no-untyped-def]
    job_id = client.post(
        "/v1/jobs",
        headers=auth,
        data={"image": (io.BytesIO(png()), "a.png")},
        content_type="multipart/form-data",
    ).get_json()["id"]
    other = {"Authorization": f"Bearer {admin_key}"}
    assert client.get(f"/v1/jobs/{job_id}", headers=other).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
