"""Hostile and odd input: each gets its documented status code, and the server stays up."""

from __future__ import annotations

import io
import json
import socket
import struct
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from segsvc.db import session_scope
from segsvc.models import Job
from segsvc.settings import Settings
from tests.api.test_batch import submit_batch
from tests.conftest import (
    ROOT,
    encode_image,
    free_port,
    sample_images,
    stop_process,
    wait_http_up,
    worker_env,
)


def submit(client, auth, data: bytes, name: str = "x.png"):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/jobs",
        headers=auth,
        content_type="multipart/form-data",
        data={"image": (io.BytesIO(data), name)},
    )


def stored(settings: Settings, job_id: str) -> Job:
    with session_scope(settings) as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        _ = job.model_input
        session.expunge(job)
        return job


def forged_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming huge dimensions, with a few bytes of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_hostile_empty_body_is_400(client, auth) -> None:  # type: ignore[no-untyped-def]
    assert client.post("/v1/jobs", headers=auth).status_code == 400
    resp = submit(client, auth, b"")
    assert resp.status_code == 400
    assert resp.get_json()["error"] == "bad_request"


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("application/json", b'{"image": "aGVsbG8="}'),
        ("application/json", b'{"image": '),  # malformed JSON
        ("text/plain", b"hello"),
        ("application/x-www-form-urlencoded", b"image=abc"),
        ("multipart/form-data; boundary=zzz", b"--zzz\r\nbroken"),  # malformed multipart
        ("multipart/form-data", b"no boundary at all"),
    ],
)
def test_hostile_wrong_content_type_is_400(client, auth, ctype: str, body: bytes) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/v1/jobs", headers=auth, data=body, content_type=ctype)
    assert resp.status_code == 400
    assert resp.is_json


@pytest.mark.parametrize(
    "data",
    [
        forged_png(65535, 65535),
        forged_png(9000, 9000),
        encode_image(Image.new("1", (20000, 20000)), "PNG"),  # ~50 KB on disk, 400 MP decoded
    ],
    ids=["forged-4G-pixels", "forged-81M-pixels", "real-1bit-400M-pixels"],
)
def test_hostile_png_bomb_is_422(client, auth, settings: Settings, data: bytes) -> None:  # type: ignore[no-untyped-def]
    assert len(data) < 100_000
    resp = submit(client, auth, data, "bomb.png")
    assert resp.status_code == 422
    assert resp.get_json()["error"] == "invalid_image"
    with session_scope(settings) as session:
        assert session.query(Job).count() == 0


@pytest.mark.parametrize("cut", [3, 10, 200, 0.5, 0.95])
def test_hostile_truncated_jpeg_is_422(client, auth, cut: float) -> None:  # type: ignore[no-untyped-def]
    # Regression: a stump whose header Pillow could not read (the first 10 or 200 bytes) was a
    # 415 "unsupported format"; it starts as a JPEG (FF D8 FF), so it is a damaged one.
    data = encode_image(Image.effect_noise((320, 240), 60).convert("RGB"), "JPEG", quality=90)
    end = int(cut if cut >= 1 else len(data) * cut)
    resp = submit(client, auth, data[:end], "cut.jpg")
    assert resp.status_code == 422, resp.get_json()
    assert resp.get_json()["error"] == "invalid_image"


def test_hostile_stump_too_short_for_a_signature_is_415(client, auth) -> None:  # type: ignore[no-untyped-def]
    resp = submit(client, auth, b"\xff\xd8", "cut.jpg")  # a JPEG's signature is 3 bytes
    assert resp.status_code == 415
    assert resp.get_json()["error"] == "unsupported_media_type"


def _crc_flipped_png() -> bytes:
    data = bytearray(encode_image(Image.new("RGB", (50, 50), (9, 99, 199)), "PNG"))
    data[29] ^= 0x01  # the IHDR chunk's CRC: 8 signature + 4 length + 4 type + 13 body
    return bytes(data)


def _damaged_header_uploads() -> list[tuple[str, bytes]]:
    photo = sample_images(1)[0].read_bytes()
    webp = encode_image(Image.new("RGB", (50, 50), (9, 99, 199)), "WEBP")
    return [
        ("photo.jpg", photo[:1000]),  # cut inside its EXIF, before the frame header
        ("crc.png", _crc_flipped_png()),
        ("cut.webp", webp[:20]),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["jpeg-1000-bytes", "png-ihdr-crc", "webp-20"])
def test_hostile_damaged_header_is_422_not_415(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, index: int
) -> None:
    """Regression: bytes that start as a JPEG, PNG or WebP but whose header Pillow cannot read
    were a 415 ("Unsupported image format unknown"), as if another format had been sent."""
    name, data = _damaged_header_uploads()[index]
    resp = submit(client, auth, data, name)
    assert resp.status_code == 422, resp.get_json()
    assert resp.get_json()["error"] == "invalid_image"
    assert "damaged or cut short" in resp.get_json()["message"]
    batch = submit_batch(client, auth, [encode_image(Image.new("RGB", (32, 24))), data])
    assert batch.status_code == 422, batch.get_json()
    assert batch.get_json()["error"] == "invalid_image"
    assert batch.get_json()["message"].startswith("Image 1 (pet1.png): The image is damaged")
    with session_scope(settings) as session:
        assert session.query(Job).count() == 0


@pytest.mark.parametrize(
    "data",
    [
        encode_image(Image.new("RGB", (32, 32), "red"), "GIF"),
        encode_image(Image.new("RGB", (32, 32), "red"), "TIFF"),
        encode_image(Image.new("RGB", (32, 32), "red"), "BMP"),
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10"/></svg>',
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    ],
    ids=["gif", "tiff", "bmp", "svg", "pdf"],
)
def test_hostile_other_formats_are_415(client, auth, data: bytes) -> None:  # type: ignore[no-untyped-def]
    resp = submit(client, auth, data, "renamed.png")  # the name lies; the bytes decide
    assert resp.status_code == 415
    assert resp.get_json()["error"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "img_fmt",
    [
        (Image.fromarray((np.arange(64 * 48, dtype=np.uint16) * 20).reshape(48, 64)), "PNG"),
        (Image.new("CMYK", (64, 48), (10, 200, 30, 0)), "JPEG"),
        (Image.new("RGBA", (64, 48), (10, 200, 30, 0)), "PNG"),
        (Image.new("LA", (64, 48), (100, 128)), "PNG"),
        (Image.new("P", (64, 48), 3), "PNG"),
        (Image.new("L", (64, 48), 90), "JPEG"),
        (Image.new("RGBA", (64, 48), (10, 200, 30, 255)), "WEBP"),
    ],
    ids=["png-16bit", "jpeg-cmyk", "png-rgba", "png-la", "png-palette", "jpeg-gray", "webp-alpha"],
)
def test_hostile_unusual_modes_are_accepted(client, auth, settings: Settings, img_fmt) -> None:  # type: ignore[no-untyped-def]
    img, fmt = img_fmt
    resp = submit(client, auth, encode_image(img, fmt), f"x.{fmt.lower()}")
    assert resp.status_code == 202, resp.get_json()
    job = stored(settings, resp.get_json()["id"])
    assert (job.input_width, job.input_height) == (64, 48)
    assert job.model_input is not None
    assert len(job.model_input) == 128 * 128 * 3


def test_hostile_exif_rotated_photo_is_displayed_way_up(client, auth, settings) -> None:  # type: ignore[no-untyped-def]
    raw = np.zeros((100, 200, 3), np.uint8)  # stored 200 wide, 100 high
    raw[:, :100] = (255, 0, 0)  # left half red
    raw[:, 100:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 100 wide, 200 high, red on top
    data = encode_image(Image.fromarray(raw), "JPEG", quality=95, exif=exif)
    job = stored(settings, submit(client, auth, data, "phone.jpg").get_json()["id"])
    assert (job.input_width, job.input_height) == (100, 200)  # the mask is made at this size
    pixels = np.frombuffer(job.model_input or b"", np.uint8).reshape(128, 128, 3)
    top, bottom = pixels[:50].mean(axis=(0, 1)), pixels[-50:].mean(axis=(0, 1))
    assert top[0] > 200 > top[2]  # red where the viewer sees red
    assert bottom[2] > 200 > bottom[0]


XMP_TURNED = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
    b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def test_hostile_xmp_only_orientation_is_not_applied(client, auth, settings) -> None:  # type: ignore[no-untyped-def]
    """Browsers apply the EXIF block's orientation only: a JPEG with `tiff:Orientation="6"` in
    its XMP packet and no EXIF block shows 300 wide and 200 high, as stored. It was turned."""
    data = encode_image(Image.new("RGB", (300, 200), (200, 40, 40)), "JPEG", xmp=XMP_TURNED)
    assert "exif" not in Image.open(io.BytesIO(data)).info
    job = stored(settings, submit(client, auth, data, "x.jpg").get_json()["id"])
    assert (job.input_width, job.input_height) == (300, 200)


def turned_the_old_way(fmt: str) -> bytes:
    """A 300x200 photo that an earlier rule turned to 200x300: a JPEG by its XMP packet's
    orientation, a WebP by its EXIF block's (until 2026-11-27), a PNG by the EXIF in the text
    chunk ImageMagick writes (until 2026-11-28); none counts now."""
    photo = Image.new("RGB", (300, 200), (200, 40, 40))
    if fmt == "JPEG":
        return encode_image(photo, "JPEG", xmp=XMP_TURNED)
    if fmt == "PNG":
        from tests.segsvc.ml.test_imaging import _with_raw_profile_orientation

        return _with_raw_profile_orientation()
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode_image(photo, "WEBP", exif=exif.tobytes())


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_the_overlay_of_a_job_stored_when_webp_and_xmp_orientations_counted_draws(  # type: ignore[no-untyped-def]
    client, auth, settings, fmt: str
) -> None:
    """A job stored before WebP and XMP orientations stopped counting has its mask at the
    turned size (200 wide, 300 high): its overlay answered 500 (mask and photo sizes differ)."""
    from segsvc.ml.preprocess import encode_mask_png
    from tests.api.test_long_poll import finish_next_job

    data = turned_the_old_way(fmt)
    worker = finish_next_job(settings, mask_png=encode_mask_png(np.zeros((300, 200), np.uint8)))
    job_id = submit(client, auth, data, f"x.{fmt.lower()}").get_json()["id"]
    worker.join()
    overlay = client.get(f"/v1/jobs/{job_id}/overlay.png", headers=auth)
    assert overlay.status_code == 200, overlay.get_json()
    with Image.open(io.BytesIO(overlay.data)) as drawn:
        assert drawn.size == (200, 300)  # the photo turned the old way, under its mask


@pytest.mark.parametrize(
    "disposition",
    [
        b"form-data",
        b'form-data; filename="a.jpg"',
    ],
)
def test_hostile_nameless_multipart_part_is_400(  # type: ignore[no-untyped-def]
    settings: Settings, client, auth, disposition: bytes
) -> None:
    tiny_jpeg = encode_image(Image.new("RGB", (32, 24), (200, 80, 40)), "JPEG")
    # Regression (found by the OpenAPI fuzz test): a part without a name reached the
    # idempotency fingerprint as a None key, and sorting it was a 500.
    body = (
        b"--b\r\nContent-Disposition: " + disposition + b"\r\n\r\nvalue\r\n"
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + tiny_jpeg + b"\r\n--b--\r\n"
    )
    resp = client.post(
        "/v1/jobs",
        headers={**auth, "Idempotency-Key": "k1"},
        data=body,
        content_type="multipart/form-data; boundary=b",
    )
    assert resp.status_code == 400
    assert resp.get_json()["error"] == "bad_request"
    with session_scope(settings) as session:
        assert session.query(Job).count() == 0


def test_hostile_oversized_multipart_is_413(settings: Settings, auth) -> None:  # type: ignore[no-untyped-def]
    from api.app import create_app

    client = create_app(settings.model_copy(update={"max_upload_bytes": 50_000})).test_client()
    resp = submit(client, auth, b"\xff\xd8" + b"\0" * 400_000, "big.jpg")
    assert resp.status_code == 413
    assert resp.get_json()["error"] == "payload_too_large"


def test_hostile_large_real_photo_is_not_413(client, auth) -> None:  # type: ignore[no-untyped-def]
    # Regression: werkzeug applied MAX_FORM_MEMORY_SIZE (64 KiB) to its parse buffer, so some
    # ordinary photos over ~64 KiB were refused.
    for seed in range(5):
        noise = np.random.default_rng(seed).integers(0, 255, (400, 600, 3), np.uint8)
        data = encode_image(Image.fromarray(noise), "JPEG", quality=95)
        assert len(data) > 200_000
        assert submit(client, auth, data, "photo.jpg").status_code == 202


@pytest.mark.parametrize(
    "raw",
    [
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "....//....//etc/passwd",
        "00000000-0000-0000-0000-000000000000%00",
        "%00",
        "' OR '1'='1",
        "a" * 2000,
    ],
)
def test_hostile_path_traversal_ids_are_404(client, auth, raw: str) -> None:  # type: ignore[no-untyped-def]
    for suffix in ("", "/mask.png", "/overlay.png"):
        resp = client.get(f"/v1/jobs/{raw}{suffix}", headers=auth)
        assert resp.status_code == 404, (raw, suffix)
        assert resp.is_json
    assert client.post(f"/v1/jobs/{raw}/cancel", headers=auth).status_code == 404


@pytest.mark.parametrize(
    "header", ["Bearer", "Bearer ", "Basic abc", "Bearer " + "x" * 5000, "bearer\tseg_x"]
)
def test_hostile_bad_authorization_is_401(client, header: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.get(f"/v1/jobs/{uuid.uuid4()}", headers={"Authorization": header})
    assert resp.status_code == 401
    assert resp.get_json()["error"] == "unauthorized"


@pytest.mark.timeout(90)
def test_hostile_headers_and_bodies_on_real_gunicorn(
    settings: Settings, api_key: str, tmp_path: Path
) -> None:
    """What only a real server shows: header limits, a huge body, a chunked body framed badly;
    each answered in JSON like every other error, and the server stays up.

    Regressions: what gunicorn refuses itself (a header it cannot parse, 431, 414) came as its
    text/html page; a bad chunk size, raised by gunicorn while the app read the form, was a
    500 `internal_error` logged with a traceback."""
    port = free_port()
    log_path = tmp_path / "gunicorn.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "python:api.gunicorn_conf",  # as deployed: its error pages are JSON
            "api.wsgi:app",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--threads",
            "2",
        ],
        cwd=ROOT,
        env=worker_env(settings, SEG_MAX_UPLOAD_BYTES="1000000", SEG_METRICS_PORT="0"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {api_key}"}
    part = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n"
        + encode_image(Image.new("RGB", (32, 24), (200, 80, 40)), "JPEG")
        + b"\r\n--b--\r\n"
    )
    chunked = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {api_key}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    try:
        wait_http_up(base, proc, log_path)
        with httpx.Client(base_url=base, timeout=20) as http:
            long_header = http.get("/healthz", headers={"X-Long": "a" * 20_000})
            many_headers = http.get("/healthz", headers={f"X-H{i}": "v" for i in range(150)})
            long_url = http.get("/v1/jobs/" + "a" * 10_000, headers=auth)
            huge = _post_huge_body(port, api_key)
            bad_name = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n")
            framed = _raw(port, chunked + b"%x\r\n" % len(part) + part + b"\r\n0\r\n\r\n")
            bad_size = _raw(port, chunked + b"zz\r\n" + part + b"\r\n0\r\n\r\n")
            bad_end = _raw(port, chunked + b"%x\r\n" % len(part) + part + b"XX0\r\n\r\n")
            _raw(port, chunked + b"%x\r\n" % len(part) + part[:100])  # the client goes away
            ok = http.get("/healthz")
    finally:
        stop_process(proc)
        log.close()
    print(
        f"\nlong header={long_header.status_code} many headers={many_headers.status_code} "
        f"long url={long_url.status_code} huge body={huge[:12]!r} bad name={bad_name[:12]!r} "
        f"bad chunk size={bad_size[:12]!r} bad chunk end={bad_end[:12]!r}"
    )
    for refused, status, code in [
        (long_header, 431, "request_header_fields_too_large"),  # limit_request_field_size 8190
        (many_headers, 431, "request_header_fields_too_large"),  # limit_request_fields 100
        (long_url, 414, "uri_too_long"),  # a request line over limit_request_line (4094)
    ]:
        assert refused.status_code == status
        assert refused.headers["Content-Type"] == "application/json"
        assert refused.json()["error"] == code, refused.text
        assert refused.json()["message"]
    status, headers, body = _parse(bad_name)  # gunicorn's own 400
    assert (status, headers["content-type"], headers["connection"]) == (
        400,
        "application/json",
        "close",
    )
    assert json.loads(body)["error"] == "bad_request"
    assert "Bad Header" in json.loads(body)["message"]
    assert huge.startswith(b"HTTP/1.1 413")  # answered from the headers, body not read
    assert b'"payload_too_large"' in huge
    assert _parse(framed)[0] == 202
    for answer in (bad_size, bad_end):
        status, headers, body = _parse(answer)
        assert (status, headers["content-type"]) == (400, "application/json"), answer[:300]
        assert json.loads(body)["error"] == "bad_request"
        assert json.loads(body)["message"].startswith("The request body's chunked framing")
    assert ok.status_code == 200
    logged = log_path.read_text()
    assert "Traceback" not in logged, logged[-3000:]
    assert "unhandled error" not in logged, logged[-3000:]
    assert "malformed request body (InvalidChunkSize)" in logged


def _raw(port: int, request: bytes) -> bytes:
    """Send `request` as it is, and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """An HTTP/1.1 answer's status, headers (lower-cased names) and body."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body


def _post_huge_body(port: int, key: str) -> bytes:
    """Announce a 3 MB multipart body, send only its start, and read the answer."""
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 3000000\r\n\r\n"
    )
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head.encode() + part + b"\0" * 65536)
        answer = b""
        while b"\r\n\r\n{" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def test_hostile_nul_in_any_path_segment_is_404(  # type: ignore[no-untyped-def]
    client, auth, admin_key: str, settings: Settings
) -> None:
    # Regression: a NUL in a segment not parsed as a UUID reached Postgres (which refuses NUL in
    # text) and was a 500.
    job_id = submit(client, auth, encode_image(Image.new("RGB", (32, 24)))).get_json()["id"]
    admin = {"Authorization": f"Bearer {admin_key}"}
    for method, path, headers in [
        ("POST", f"/v1/jobs/{job_id}/webhooks/%00/redeliver", auth),
        ("POST", f"/v1/jobs/{job_id}/webhooks/msg%00x/redeliver", auth),
        ("GET", f"/v1/jobs/{job_id}%00/webhooks", auth),
        ("POST", "/v1/models/a%00b/promote", admin),
        ("POST", "/v1/models/%00/promote", admin),
        ("GET", "/v1/jobs/%00", {}),  # before authentication (which reads the database)
    ]:
        resp = client.open(path, method=method, headers=headers)
        assert resp.status_code == 404, (method, path, resp.get_json())
        assert resp.get_json()["error"] == "not_found"
    assert stored(settings, job_id).status == "queued"


def test_hostile_nul_in_a_query_is_422(client, auth) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, auth, encode_image(Image.new("RGB", (32, 24)))).get_json()["id"]
    assert client.get(f"/v1/jobs/{job_id}?note=x", headers=auth).status_code == 200
    for path in (
        f"/v1/jobs/{job_id}?note=%00",  # passed before: an unused parameter
        f"/v1/jobs/{job_id}?n%00te=x",
        f"/v1/jobs/{job_id}?wait=1%00",
        f"/v1/jobs?ids={job_id}%00",
    ):
        resp = client.get(path, headers=auth)
        assert resp.status_code == 422, path
        assert resp.get_json()["error"] == "validation_error"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1//jobs?ids=x"),
        ("POST", "/v1//jobs/batch"),
        ("POST", "/v1/jobs//batch"),
        ("POST", "/v1//jobs"),
        ("POST", "/v1/jobs/{job_id}//cancel"),
        ("GET", "/v1//models"),
        ("GET", "/v1/jobs/{job_id}//mask.png"),
        ("GET", "/v1/jobs/{job_id}///overlay.png"),
        ("GET", "/ui//config.json"),
    ],
)
def test_hostile_doubled_slash_is_404_json_not_a_redirect(  # type: ignore[no-untyped-def]
    client, auth, settings: Settings, method: str, path: str
) -> None:
    """Regression: werkzeug merged doubled slashes with a 308 (an HTML body, which Flask sends
    itself, past the JSON error handlers) to the merged path, and a client that followed it
    sent its batch again."""
    job_id = str(uuid.uuid4())
    resp = client.open(
        path.format(job_id=job_id),
        method=method,
        headers=auth,
        content_type="multipart/form-data",
        data={"image": (io.BytesIO(encode_image(Image.new("RGB", (32, 24)))), "a.png")}
        if method == "POST"
        else None,
    )
    assert resp.status_code == 404, (path, resp.status_code, resp.data[:200])
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.get_json()["error"] == "not_found"
    assert "Location" not in resp.headers
    with session_scope(settings) as session:
        assert session.query(Job).count() == 0


def test_no_route_can_answer_with_a_routing_redirect(app) -> None:  # type: ignore[no-untyped-def]
    """Flask answers werkzeug's routing redirects itself, in HTML, past the JSON error handlers:
    no rule may give one. A rule ending in a slash redirects the path without it
    (strict_slashes), one with defaults redirects to its shorter form (redirect_defaults), and
    a doubled slash was merged (merge_slashes)."""
    assert app.url_map.merge_slashes is False
    for rule in app.url_map.iter_rules():
        assert rule.merge_slashes is False, rule.rule
        assert rule.rule == "/" or not rule.rule.endswith("/"), rule.rule
        assert not rule.defaults, rule.rule
        assert rule.redirect_to is None, rule.rule
