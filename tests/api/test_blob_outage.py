"""A blob store that cannot be written or read (`SEG_BLOB_STORE=fs`): a retryable 503."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from flask.testing import FlaskClient
from sqlalchemy import func, select

from segsvc.blobs import blob_store, pointer_digest
from segsvc.db import session_scope
from segsvc.ml.preprocess import encode_mask_png
from segsvc.models import Job
from segsvc.settings import Settings
from tests.api.test_jobs import mark_succeeded, png_bytes, submit
from tests.segsvc.test_blob_mark import unmount


def fs_client(settings: Settings, blob_dir: Path) -> tuple[Settings, FlaskClient]:
    from api.app import create_app

    cfg = settings.model_copy(update={"blob_store": "fs", "blob_dir": blob_dir})
    return cfg, create_app(cfg).test_client()


def job_count(settings: Settings) -> int:
    with session_scope(settings) as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def assert_retryable_503(resp) -> None:  # type: ignore[no-untyped-def]
    assert resp.status_code == 503, (resp.status_code, resp.get_json())
    assert resp.get_json()["error"] == "blob_store_unavailable"
    assert int(resp.headers["Retry-After"]) >= 1


def test_submit_while_the_blob_store_cannot_be_written_is_503_and_stores_nothing(
    settings: Settings,
    auth: dict[str, str],
    tmp_path: Path,
) -> None:
    not_a_folder = tmp_path / "blobs"
    not_a_folder.write_bytes(b"")  # as a full, read-only or unmounted volume: the write fails
    cfg, client = fs_client(settings, not_a_folder)
    resp = submit(client, auth, png_bytes((64, 48)))
    assert_retryable_503(resp)
    assert str(tmp_path) not in resp.get_data(as_text=True)  # a 5xx hides internals
    batch = client.post(
        "/v1/jobs/batch",
        headers=auth,
        data={"image": [(io.BytesIO(png_bytes()), "a.png"), (io.BytesIO(png_bytes()), "b.png")]},
        content_type="multipart/form-data",
    )
    assert_retryable_503(batch)
    assert job_count(cfg) == 0  # nothing half-written: no job row names a file not there


def test_results_whose_file_cannot_be_read_are_503_not_500(
    settings: Settings,
    auth: dict[str, str],
    tmp_path: Path,
) -> None:
    cfg, client = fs_client(settings, tmp_path / "blobs")
    job_id = submit(client, auth, png_bytes((64, 48))).get_json()["id"]
    mask = blob_store(cfg).put(encode_mask_png(np.ones((48, 64), np.uint8)))
    mark_succeeded(cfg, job_id, mask)
    assert client.get(f"/v1/jobs/{job_id}/mask.png", headers=auth).status_code == 200
    path = blob_store(cfg).path_for(pointer_digest(mask))
    path.unlink()
    path.mkdir()  # unreadable, but there (as EIO, EACCES or a stale NFS handle): not a 410
    try:
        for picture in ("mask.png", "overlay.png"):
            assert_retryable_503(client.get(f"/v1/jobs/{job_id}/{picture}", headers=auth))
    finally:
        shutil.rmtree(path)


def test_a_blob_volume_that_is_not_mounted_is_503_for_submits_and_results(
    settings: Settings,
    auth: dict[str, str],
    tmp_path: Path,
) -> None:
    """Regression: with the volume away, SEG_BLOB_DIR was an empty folder that took uploads
    (hidden by the next mount) and answered 410 Gone for masks that were on the volume."""
    from segsvc import blob_mark

    blob_mark.forget()
    folder = tmp_path / "blobs"
    cfg, client = fs_client(settings, folder)
    job_id = submit(client, auth, png_bytes((64, 48))).get_json()["id"]
    mark_succeeded(cfg, job_id, blob_store(cfg).put(encode_mask_png(np.ones((48, 64), np.uint8))))
    away = unmount(folder)
    try:
        assert_retryable_503(submit(client, auth, png_bytes((32, 32))))
        for picture in ("mask.png", "overlay.png"):
            assert_retryable_503(client.get(f"/v1/jobs/{job_id}/{picture}", headers=auth))
        assert job_count(cfg) == 1
        assert list(folder.iterdir()) == []
    finally:
        folder.rmdir()
        away.rename(folder)
    assert client.get(f"/v1/jobs/{job_id}/mask.png", headers=auth).status_code == 200
    assert submit(client, auth, png_bytes((32, 32))).status_code == 202
