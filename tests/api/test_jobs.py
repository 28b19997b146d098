from __future__ import annotations

import io
import threading
import time
import uuid

import numpy as np
import pytest
import redis
from PIL import Image
from sqlalchemy import func, select, update

from segsvc.db import session_scope
from segsvc.ml.preprocess import encode_mask_png
from segsvc.models import Job
from segsvc.settings import Settings


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 80, 40)).save(buf, format="PNG")
    return buf.getvalue()


def submit(client, auth, data: bytes, name: str = "pet.png"):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/jobs",
        headers=auth,
        data={"image": (io.BytesIO(data), name)},
        content_type="multipart/form-data",
    )


def test_submit_job_stores_and_enqueues(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    import redis

    resp = submit(client, auth, png_bytes())
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["status"] == "queued"
    assert uuid.UUID(body["id"])
    assert resp.headers["Location"] == body["urls"]["self"]
    assert set(body["urls"]) == {"self", "mask", "overlay"}
    with session_scope(settings) as session:
        job = session.get(Job, uuid.UUID(body["id"]))
        assert job is not None
        assert job.input_width == 64
        assert job.input_bytes
    queued = redis.Redis.from_url(settings.broker_url or "").lrange(settings.queue_name, 0, -1)
    assert any(body["id"].encode() in m for m in queued)


def test_read_job_returns_public_fields(client, auth) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, auth, png_bytes()).get_json()["id"]
    body = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
    # Exactly these: a lease token, the upload or the mask bytes must never show up here.
    assert set(body) == {
        "id",
        "status",
        "created_at",
        "started_at",
        "completed_at",
        "model_version",
        "attempts",
        "error",
        "input",
        "result",
        "metrics",
        "urls",
    }
    assert set(body["input"]) == {"width", "height", "content_type", "sha256"}
    assert set(body["metrics"]) == {"queue_ms", "predict_ms", "batch_size"}
    assert set(body["urls"]) == {"self", "mask", "overlay"}


def mark_succeeded(settings: Settings, job_id: str, mask_png: bytes, **values: object) -> None:
    """Finish a stored job as a worker would (with its mask), plus any column overrides."""
    with session_scope(settings) as session:
        session.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id))
            .values(status="succeeded", mask_png=mask_png, **values)
        )


def test_results_conflict_until_finished(client, auth) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, auth, png_bytes()).get_json()["id"]
    for kind in ("mask.png", "overlay.png"):
        resp = client.get(f"/v1/jobs/{job_id}/{kind}", headers=auth)
        assert resp.status_code == 409
        assert resp.get_json()["error"] == "conflict"


def test_results_served_once_succeeded(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, auth, png_bytes((64, 48))).get_json()["id"]
    mark_succeeded(settings, job_id, encode_mask_png(np.ones((48, 64), np.uint8)))
    mask = client.get(f"/v1/jobs/{job_id}/mask.png", headers=auth)
    assert mask.status_code == 200
    assert mask.mimetype == "image/png"
    with Image.open(io.BytesIO(mask.data)) as img:
        assert img.size == (64, 48)
        assert img.mode == "L"
    overlay = client.get(f"/v1/jobs/{job_id}/overlay.png", headers=auth)
    with Image.open(io.BytesIO(overlay.data)) as img:
        assert img.size == (64, 48)
        assert img.mode == "RGB"


def test_overlays_of_large_inputs_are_drawn_one_at_a_time(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overlay decodes its input at full size; for a large one, a second request waits for
    the first (503 + Retry-After if it waits too long) instead of doubling the memory; a
    usual photo's overlay never waits."""
    from api.routes import jobs as routes

    small = submit(client, auth, png_bytes((64, 48))).get_json()["id"]
    large = submit(client, auth, png_bytes((64, 48))).get_json()["id"]
    mask = encode_mask_png(np.ones((48, 64), np.uint8))
    mark_succeeded(settings, small, mask)
    mark_succeeded(settings, large, mask, input_width=6400)  # 6400x48: over the line below
    monkeypatch.setattr(routes, "LARGE_DECODE_PIXELS", 64 * 48 * 10)
    monkeypatch.setattr(routes, "LARGE_DECODE_WAIT_S", 0.2)
    routes.LARGE_DECODES_AT_ONCE.acquire()  # another large picture is being decoded
    try:
        busy = client.get(f"/v1/jobs/{large}/overlay.png", headers=auth)
        unaffected = client.get(f"/v1/jobs/{small}/overlay.png", headers=auth)
    finally:
        routes.LARGE_DECODES_AT_ONCE.release()
    assert busy.status_code == 503
    assert busy.get_json()["error"] == "large_decodes_busy"
    assert busy.headers["Retry-After"] == "1"
    assert unaffected.status_code == 200
    with session_scope(settings) as session:  # the real size back, for the overlay's check
        session.execute(update(Job).where(Job.id == uuid.UUID(large)).values(input_width=64))
    monkeypatch.setattr(routes, "LARGE_DECODE_PIXELS", 0)  # every overlay takes a turn now
    assert client.get(f"/v1/jobs/{large}/overlay.png", headers=auth).status_code == 200


def test_drawing_a_large_overlay_takes_a_rate_token(  # type: ignore[no-untyped-def]
    auth, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One client asking again and again for its own large overlay held the process's one
    large-decode turn as long as it liked; a usual overlay stays free."""
    from api.app import create_app
    from api.routes import jobs as routes

    limited = settings.model_copy(update={"rate_limit_per_minute": 1, "rate_limit_burst": 3})
    client = create_app(limited).test_client()
    small = submit(client, auth, png_bytes((64, 48))).get_json()["id"]
    large = submit(client, auth, png_bytes((64, 48))).get_json()["id"]  # two tokens gone
    mask = encode_mask_png(np.ones((48, 64), np.uint8))
    mark_succeeded(settings, small, mask)
    mark_succeeded(settings, large, mask)
    with session_scope(settings) as session:  # as if 40 MP; drawn from its 64 x 48 input
        session.execute(update(Job).where(Job.id == uuid.UUID(large)).values(input_height=480))
    monkeypatch.setattr(routes, "LARGE_DECODE_PIXELS", 64 * 48 * 5)
    for _ in range(3):
        assert client.get(f"/v1/jobs/{small}/overlay.png", headers=auth).status_code == 200
    codes = [client.get(f"/v1/jobs/{large}/overlay.png", headers=auth).status_code]
    codes.append(client.get(f"/v1/jobs/{large}/overlay.png", headers=auth).status_code)
    assert codes[1] == 429  # the last token went on the first drawing
    assert codes[0] == 200


def test_large_png_uploads_decode_one_at_a_time_and_drafted_jpegs_never_wait(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PNG decodes at full size; a JPEG for the model at a reduced DCT scale: only the PNG
    waits for the turn another large picture holds (and, waiting too long, stores nothing)."""
    from api.routes import jobs as routes
    from segsvc import images

    monkeypatch.setattr(routes, "LARGE_DECODE_WAIT_S", 0.2)
    jpeg = io.BytesIO()
    Image.new("RGB", (2048, 2048), (200, 120, 40)).save(jpeg, format="JPEG")
    # the PNG's 300 x 300 over it; the JPEG's 2048 x 2048 at 1/8 (256 x 256) not
    monkeypatch.setattr(images, "LARGE_DECODE_PIXELS", 256 * 256)
    routes.LARGE_DECODES_AT_ONCE.acquire()
    try:
        busy = submit(client, auth, png_bytes((300, 300)))
        with session_scope(settings) as session:
            stored_while_busy = session.scalar(select(func.count()).select_from(Job))
        as_jpeg = submit(client, auth, jpeg.getvalue(), name="pet.jpg")
    finally:
        routes.LARGE_DECODES_AT_ONCE.release()
    assert busy.status_code == 503
    assert busy.get_json()["error"] == "large_decodes_busy"
    assert stored_while_busy == 0
    assert as_jpeg.status_code == 202
    assert submit(client, auth, png_bytes((300, 300))).status_code == 202


@pytest.mark.parametrize("path", ["/v1/jobs/{}", "/v1/jobs/{}/mask.png", "/v1/jobs/{}/overlay.png"])
def test_unknown_job_is_404(client, auth, path: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.get(path.format(uuid.uuid4()), headers=auth)
    assert resp.status_code == 404
    assert resp.get_json()["error"] == "not_found"


@pytest.mark.parametrize("raw", ["not-a-uuid", "..%2F..%2Fetc%2Fpasswd", "1" * 300])
def test_malformed_job_id_is_404(client, auth, raw: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.get(f"/v1/jobs/{raw}", headers=auth)
    assert resp.status_code == 404
    assert resp.is_json


def test_a_job_id_in_other_scripts_digits_is_not_that_job(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings
) -> None:
    """`uuid.UUID` reads Arabic-Indic or fullwidth digits as digits: such an id found the job,
    and its raw text went into Content-Disposition, a header gunicorn then refused (an HTML
    500). It is not found now, and the header names the job's own id."""
    job_id = submit(client, auth, png_bytes((64, 48))).get_json()["id"]
    mark_succeeded(settings, job_id, encode_mask_png(np.ones((48, 64), np.uint8)))
    digit = next(i for i, c in enumerate(job_id) if c.isdigit())
    for other in (
        "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669",
        "".join(chr(0xFF10 + d) for d in range(10)),  # fullwidth
    ):
        odd = job_id[:digit] + other[int(job_id[digit])] + job_id[digit + 1 :]
        for path in (f"/v1/jobs/{odd}", f"/v1/jobs/{odd}/mask.png", f"/v1/jobs?ids={odd}"):
            resp = client.get(path, headers=auth)
            assert resp.status_code in (404, 422), (path, resp.status_code)
            assert resp.is_json
    resp = client.get(f"/v1/jobs/{job_id.upper()}/mask.png", headers=auth)
    assert resp.status_code == 200
    assert f'filename="{job_id}-mask.png"' in resp.headers["Content-Disposition"]


def test_submit_without_file_is_400(client, auth) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/v1/jobs", headers=auth, data={}, content_type="multipart/form-data")
    assert resp.status_code == 400
    assert resp.get_json()["error"] == "bad_request"


def test_submit_non_image_is_415(client, auth) -> None:  # type: ignore[no-untyped-def]
    resp = submit(client, auth, b"just some text, not a picture", "notes.txt")
    assert resp.status_code == 415
    assert resp.get_json()["error"] == "unsupported_media_type"


def test_submit_truncated_image_is_422(client, auth) -> None:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    Image.effect_noise((300, 200), 50).convert("RGB").save(buf, format="JPEG")
    resp = submit(client, auth, buf.getvalue()[:3000], "cut.jpg")
    assert resp.status_code == 422
    assert resp.get_json()["error"] == "invalid_image"


def test_submit_too_many_pixels_is_422(client, auth) -> None:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buf, format="PNG")  # 48 MP > 40 MP default limit
    resp = submit(client, auth, buf.getvalue(), "bomb.png")
    assert resp.status_code == 422
    assert "pixels" in resp.get_json()["message"]


def test_submit_over_size_limit_is_413(settings: Settings, auth) -> None:  # type: ignore[no-untyped-def]
    from api.app import create_app

    small = settings.model_copy(update={"max_upload_bytes": 2000})
    client = create_app(small).test_client()
    resp = submit(client, auth, png_bytes((200, 200)) + b"\0" * 3000)
    assert resp.status_code == 413
    assert resp.get_json()["error"] == "payload_too_large"
    huge = submit(client, auth, b"\0" * 200_000)
    assert huge.status_code == 413
    assert huge.is_json


def test_rejected_submission_writes_nothing(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    refused = submit(client, auth, b"garbage")
    assert refused.status_code == 415
    assert refused.get_json()["error"] == "unsupported_media_type"
    with session_scope(settings) as session:
        assert session.query(Job).count() == 0
    assert redis.Redis.from_url(settings.broker_url or "").llen(settings.queue_name) == 0


def test_cancel_queued_job(client, auth) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, auth, png_bytes()).get_json()["id"]
    resp = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert resp.status_code == 200
    assert resp.get_json()["status"] == "canceled"
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert again.status_code == 409


def test_results_after_retention_are_410(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, auth, png_bytes((64, 48))).get_json()["id"]
    mark_succeeded(
        settings, job_id, encode_mask_png(np.ones((48, 64), np.uint8)), input_bytes=None
    )  # what the retention task does
    assert client.get(f"/v1/jobs/{job_id}/mask.png", headers=auth).status_code == 200
    resp = client.get(f"/v1/jobs/{job_id}/overlay.png", headers=auth)
    assert resp.status_code == 410
    assert resp.get_json()["error"] == "gone"


def test_fs_blob_store_serves_results(settings: Settings, auth) -> None:  # type: ignore[no-untyped-def]
    from api.app import create_app
    from segsvc.blobs import blob_store, is_pointer

    cfg = settings.model_copy(update={"blob_store": "fs"})
    fs_client = create_app(cfg).test_client()
    job_id = submit(fs_client, auth, png_bytes((64, 48))).get_json()["id"]
    with session_scope(cfg) as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        assert is_pointer(job.input_bytes)
    mark_succeeded(cfg, job_id, blob_store(cfg).put(encode_mask_png(np.ones((48, 64), np.uint8))))
    mask = fs_client.get(f"/v1/jobs/{job_id}/mask.png", headers=auth)
    with Image.open(io.BytesIO(mask.data)) as img:
        assert img.size == (64, 48)
    overlay = fs_client.get(f"/v1/jobs/{job_id}/overlay.png", headers=auth)
    assert overlay.status_code == 200


def test_wrong_method_is_405_with_allow(client, auth) -> None:  # type: ignore[no-untyped-def]
    # RFC 9110 §15.5.6: a 405 must list the methods the resource supports.
    for path, allowed in (("/v1/jobs", {"GET", "POST"}), ("/v1/jobs/x/cancel", {"POST"})):
        resp = client.delete(path, headers=auth)
        assert resp.status_code == 405
        assert resp.get_json()["error"] == "method_not_allowed"
        methods = {m.strip() for m in resp.headers["Allow"].split(",")}
        assert allowed <= methods
        assert "DELETE" not in methods


def test_submit_with_two_images_is_422(client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    resp = client.post(
        "/v1/jobs",
        headers=auth,
        data={"image": [(io.BytesIO(png_bytes()), "a.png"), (io.BytesIO(png_bytes()), "b.png")]},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 422
    body = resp.get_json()
    assert body["error"] == "validation_error"
    assert "'image'" in body["message"]
    assert "POST /v1/jobs/batch" in body["message"]
    with session_scope(settings) as session:
        assert session.query(Job).count() == 0


def test_submit_with_two_webhooks_is_422(open_client, auth, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    resp = open_client.post(
        "/v1/jobs",
        headers=auth,
        data={
            "image": (io.BytesIO(png_bytes()), "a.png"),
            "webhook": ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"],
        },
        content_type="multipart/form-data",
    )
    assert resp.status_code == 422
    body = resp.get_json()
    assert body["error"] == "validation_error"
    assert "'webhook'" in body["message"]
    with session_scope(settings) as session:
        assert session.query(Job).count() == 0


def test_submit_ignores_unknown_extra_fields(client, auth) -> None:  # type: ignore[no-untyped-def]
    resp = client.post(
        "/v1/jobs",
        headers=auth,
        data={"image": (io.BytesIO(png_bytes()), "a.png"), "note": ["x", "y"]},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 202


def test_a_repeated_query_parameter_is_refused_not_half_read(client, auth) -> None:  # type: ignore[no-untyped-def]
    # Regression: `?ids=a&ids=b` answered for `a` alone (and `?wait=` took the first value).
    first = submit(client, auth, png_bytes()).get_json()["id"]
    second = submit(client, auth, png_bytes()).get_json()["id"]
    for path in (
        f"/v1/jobs?ids={first}&ids={second}",
        f"/v1/jobs?ids={first},{second}&wait=1&wait=2",
        f"/v1/jobs/{first}?wait=0&wait=5",
    ):
        resp = client.get(path, headers=auth)
        assert resp.status_code == 422, path
        assert resp.get_json()["error"] == "validation_error"
        assert "more than once" in resp.get_json()["message"]
    listed = client.get(f"/v1/jobs?ids={first},{second}", headers=auth).get_json()
    assert [job["id"] for job in listed["jobs"]] == [first, second]


def count_overlays_drawn_at_once(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each overlay drawn 0.2 s slower (a 4 MP decode, blend and encode take ~0.7 s); the
    list's one item: how many were drawn at once, at most."""
    from segsvc.services import jobs as job_service

    real, lock, now, peak = job_service.read_overlay_png, threading.Lock(), [0], [0]

    def counted(**kwargs):  # type: ignore[no-untyped-def]
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            time.sleep(0.2)
            return real(**kwargs)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(job_service, "read_overlay_png", counted)
    return peak


def ask_for_overlay_from_threads(  # type: ignore[no-untyped-def]
    client, auth, job: str, n: int
) -> tuple[list[int], list[threading.Thread]]:
    """`n` threads started, each asking for the job's overlay once: the statuses they got (as
    they come) and the threads, for the caller to join."""
    codes: list[int] = []

    def get() -> None:
        answer = client.application.test_client().get(f"/v1/jobs/{job}/overlay.png", headers=auth)
        codes.append(answer.status_code)

    threads = [threading.Thread(target=get) for _ in range(n)]
    for thread in threads:
        thread.start()
    return codes, threads


def test_overlays_draw_within_the_processs_pixel_budget(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overlays under the large-decode line had no bound at all: 24 threads drawing one
    client's 4 MP overlay took two API processes to 2 GB (each decodes its input at full
    size). They now draw within a budget of pixels in flight, and wait for it (503 past the
    wait)."""
    from api.routes import jobs as routes

    job = submit(client, auth, png_bytes((64, 48))).get_json()["id"]
    mark_succeeded(settings, job, encode_mask_png(np.ones((48, 64), np.uint8)))
    budget = routes.PixelBudget(2 * 64 * 48, busy=routes.OverlaysBusyError)  # two at once
    monkeypatch.setattr(routes, "OVERLAY_PIXELS_AT_ONCE", budget)
    peak = count_overlays_drawn_at_once(monkeypatch)
    codes, threads = ask_for_overlay_from_threads(client, auth, job, 6)
    for thread in threads:
        thread.join()
    assert codes == [200] * 6
    assert peak[0] == 2
    monkeypatch.setattr(routes, "LARGE_DECODE_WAIT_S", 0.2)
    with budget.hold(budget.total, 1.0):  # others' overlays take the whole budget
        busy = client.get(f"/v1/jobs/{job}/overlay.png", headers=auth)
    assert (busy.status_code, busy.get_json()["error"]) == (503, "overlays_busy")
    assert busy.headers["Retry-After"] == "1"


def test_one_key_holds_one_large_decode_at_a_time_so_others_get_their_turn(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key asking for its own large overlay from several threads held the process's one
    large-decode turn for good (each took a token, but the rate allows ten a second), and
    another client's large upload waited, then got a 503."""
    from api.routes import jobs as routes
    from segsvc import images
    from segsvc.services import jobs as job_service
    from segsvc.services.keys import create_key

    with session_scope(settings) as session:
        _, other = create_key(session=session, name="other")
    job = submit(client, auth, png_bytes((64, 48))).get_json()["id"]
    mark_succeeded(settings, job, encode_mask_png(np.ones((48, 64), np.uint8)))
    monkeypatch.setattr(routes, "LARGE_DECODE_PIXELS", 100)  # 64 x 48 counts as large now
    monkeypatch.setattr(images, "LARGE_DECODE_PIXELS", 100)
    monkeypatch.setattr(routes, "LARGE_DECODE_WAIT_S", 1.0)
    real = job_service.read_overlay_png

    def slow(**kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.4)  # a 40 MP overlay takes ~3-7 s: scaled down with the wait
        return real(**kwargs)

    monkeypatch.setattr(job_service, "read_overlay_png", slow)
    stop, hogged = threading.Event(), []

    def hog() -> None:
        own = client.application.test_client()
        while not stop.is_set():
            hogged.append(own.get(f"/v1/jobs/{job}/overlay.png", headers=auth).status_code)

    hogs = [threading.Thread(target=hog) for _ in range(4)]
    for thread in hogs:
        thread.start()
    time.sleep(0.2)
    try:
        theirs = submit(
            client.application.test_client(),
            {"Authorization": f"Bearer {other}"},
            png_bytes((64, 48)),
        )
    finally:
        stop.set()
        for thread in hogs:
            thread.join()
    assert theirs.status_code == 202, theirs.get_json()
    assert set(hogged) == {200}  # its own wait behind each other, none refused


def test_a_keys_large_overlays_asked_for_at_once_are_drawn_one_after_the_other(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four threads of one client fetching its 12 MP overlays (`segsvc submit --overlay`, a
    shared Client): each is drawn in turn, none refused; past the key's queue, a 429."""
    from api.routes import jobs as routes

    job = submit(client, auth, png_bytes((64, 48))).get_json()["id"]
    mark_succeeded(settings, job, encode_mask_png(np.ones((48, 64), np.uint8)))
    monkeypatch.setattr(routes, "LARGE_DECODE_PIXELS", 100)  # 64 x 48 counts as large now
    monkeypatch.setattr(routes, "LARGE_DECODE_WAIT_S", 0.5)  # less than the key's queue takes
    peak = count_overlays_drawn_at_once(monkeypatch)
    codes, threads = ask_for_overlay_from_threads(client, auth, job, routes.KEY_TURN_QUEUE + 1)
    time.sleep(0.05)
    extra = client.get(f"/v1/jobs/{job}/overlay.png", headers=auth)
    for thread in threads:
        thread.join()
    assert codes == [200] * (routes.KEY_TURN_QUEUE + 1)
    assert peak[0] == 1
    assert (extra.status_code, extra.get_json()["error"]) == (429, "large_decodes_pending")


def test_a_large_overlay_draws_outside_the_budget_and_a_keys_uploads_wait_their_turn(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large overlay waited for the pixel budget holding the one large-decode turn; and the
    one-at-a-time rule for a key's large overlays must not refuse its uploads (each is new
    work, paid with a token: it waits its turn)."""
    from api.routes import jobs as routes
    from segsvc import images
    from segsvc.services import jobs as job_service

    job = submit(client, auth, png_bytes((64, 48))).get_json()["id"]
    mark_succeeded(settings, job, encode_mask_png(np.ones((48, 64), np.uint8)))
    monkeypatch.setattr(routes, "LARGE_DECODE_PIXELS", 100)  # 64 x 48 counts as large now
    monkeypatch.setattr(images, "LARGE_DECODE_PIXELS", 100)
    budget = routes.OVERLAY_PIXELS_AT_ONCE
    with budget.hold(budget.total, 1.0):  # small overlays take the whole budget
        drawn = client.get(f"/v1/jobs/{job}/overlay.png", headers=auth)
    assert drawn.status_code == 200  # bounded by the turn, not by the budget
    real = job_service.read_overlay_png

    def slow(**kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.5)
        return real(**kwargs)

    monkeypatch.setattr(job_service, "read_overlay_png", slow)
    drawing = threading.Thread(
        target=lambda: client.application.test_client().get(
            f"/v1/jobs/{job}/overlay.png", headers=auth
        )
    )
    drawing.start()
    time.sleep(0.1)
    try:
        uploaded = submit(client.application.test_client(), auth, png_bytes((64, 48)))
    finally:
        drawing.join()
    assert uploaded.status_code == 202, uploaded.get_json()


def test_the_large_decode_turn_is_given_in_the_order_it_was_asked_for() -> None:
    """A semaphore let a request asking just as the turn was released take it before the
    waiter woken for it: under load, one client's back-to-back large overlays kept another
    client's large upload waiting past its 10 s."""
    from api.routes.jobs import FairTurn

    turn, order = FairTurn(), []
    assert turn.acquire(timeout=1)
    waiters = []
    for name in ("first", "second", "third"):

        def wait(name: str = name) -> None:
            assert turn.acquire(timeout=5)
            order.append(name)
            turn.release()

        waiters.append(threading.Thread(target=wait))
        waiters[-1].start()
        time.sleep(0.05)  # asked in this order
    assert not turn.acquire(timeout=0.05)  # held: a latecomer waits its turn, then gives up
    assert not turn.acquire(blocking=False)
    turn.release()
    for waiter in waiters:
        waiter.join()
    assert order == ["first", "second", "third"]
    assert turn.acquire(timeout=0)  # free again
    turn.release()
