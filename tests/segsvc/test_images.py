from __future__ import annotations

import io
import random
import struct
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import pytest
from PIL import Image

from segsvc.errors import (
    BadRequestError,
    InvalidImageError,
    PayloadTooLargeError,
    SegError,
    UnsupportedMediaTypeError,
)
from segsvc.images import validate_image
from tests.conftest import encode_image, sample_images

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 4_000_000}


@pytest.mark.parametrize(
    ("fmt", "ctype"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")]
)
def test_validate_image_accepts_allowed_formats(fmt: str, ctype: str) -> None:
    out = validate_image(encode_image(Image.new("RGB", (90, 60)), fmt), **LIMITS)
    assert out.content_type == ctype
    assert (out.width, out.height) == (90, 60)
    assert len(out.model_input) == 128 * 128 * 3
    assert len(out.sha256) == 64


def test_validate_image_rejects_empty() -> None:
    with pytest.raises(BadRequestError):
        validate_image(b"", **LIMITS)


def test_validate_image_rejects_oversized_bytes() -> None:
    with pytest.raises(PayloadTooLargeError):
        validate_image(b"x" * 1_000_001, **LIMITS)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "BMP"])
def test_validate_image_rejects_other_formats(fmt: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError):
        validate_image(encode_image(Image.new("RGB", (10, 10)), fmt), **LIMITS)


def test_validate_image_rejects_non_images() -> None:
    with pytest.raises(UnsupportedMediaTypeError):
        validate_image(b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", **LIMITS)


def test_validate_image_rejects_truncated_jpeg() -> None:
    data = encode_image(Image.effect_noise((400, 300), 64).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImageError):
        validate_image(data[: len(data) // 2], **LIMITS)


def _flip_png_ihdr_crc(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[29] ^= 0x01  # the IHDR chunk's CRC: 8 signature + 4 length + 4 type + 13 body
    return bytes(damaged)


@pytest.mark.parametrize(
    ("fmt", "damage"),
    [
        ("JPEG", lambda data: data[:3]),  # the signature alone
        ("JPEG", lambda data: data[:20]),  # cut inside the JFIF segment
        ("PNG", _flip_png_ihdr_crc),
        ("PNG", lambda data: data[:8]),  # the signature alone
        ("PNG", lambda data: data[:20]),  # cut inside IHDR
        ("WEBP", lambda data: data[:12]),  # RIFF....WEBP alone
        ("WEBP", lambda data: data[:20]),
    ],
    ids=["jpeg-3", "jpeg-20", "png-ihdr-crc", "png-8", "png-20", "webp-12", "webp-20"],
)
def test_validate_image_calls_an_unreadable_header_after_a_known_signature_invalid(
    fmt: str, damage: Callable[[bytes], bytes]
) -> None:
    """Regression: bytes that start as an allowed format but whose header Pillow cannot read
    were an `UnsupportedMediaTypeError` (415, "format unknown"): they are a damaged image."""
    data = damage(encode_image(Image.new("RGB", (50, 50), (9, 99, 199)), fmt))
    with pytest.raises(InvalidImageError, match="damaged or cut short"):
        validate_image(data, **LIMITS)


def test_validate_image_calls_a_real_photo_cut_inside_its_exif_invalid() -> None:
    photo = sample_images(1)[0].read_bytes()
    with pytest.raises(InvalidImageError, match="starts as a JPEG file"):
        validate_image(photo[:1000], **LIMITS)


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8",  # too short for a JPEG's 3-byte signature
        b"\x89PNG\r\n\x1a",  # 7 of a PNG's 8
        b"RIFF\x00\x00\x00\x00WEB",  # 11 of a WebP's 12
        b"RIFF\x00\x00\x00\x00WAVEfmt ",  # a RIFF file, not a WebP
        b"GIF89a",  # a damaged format we do not take
        b"\x00\xff\xd8\xff",  # a JPEG signature, but not at the start
    ],
)
def test_validate_image_calls_bytes_without_an_allowed_signature_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedMediaTypeError, match="unknown"):
        validate_image(data, **LIMITS)


def test_validate_image_rejects_too_many_pixels() -> None:
    data = encode_image(Image.new("L", (3000, 2000)), "PNG")  # 6 MP, tiny file
    with pytest.raises(InvalidImageError, match="pixels"):
        validate_image(data, **LIMITS)


def _exif_block(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A little-endian EXIF block (APP1 payload) of one IFD written verbatim: (tag, type,
    count, 4-byte value) each. Pillow's own writer refuses malformed entries, phones do not."""
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(
        struct.pack("<HHI", tag, typ, count) + value for tag, typ, count, value in entries
    )
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


ORIENTATION_6 = (0x0112, 3, 1, struct.pack("<HH", 6, 0))  # SHORT 6: turn 90 degrees clockwise
WIDTH_AS_TEXT = (0x0100, 2, 4, b"Cam\x00")  # ImageWidth as ASCII: Pillow cannot write it back


def _photo(size: tuple[int, int] = (120, 80)) -> Image.Image:
    """A photo-like image with no symmetry, so a turn or flip changes every row."""
    return Image.merge(
        "RGB",
        (
            Image.linear_gradient("L").resize(size),
            Image.effect_noise(size, 40).convert("L"),
            Image.linear_gradient("L").rotate(90).resize(size),
        ),
    )


def test_validate_image_accepts_a_jpeg_whose_exif_is_malformed() -> None:
    photo = _photo()
    broken = encode_image(photo, "JPEG", exif=_exif_block([WIDTH_AS_TEXT, ORIENTATION_6]))
    clean = encode_image(photo, "JPEG", exif=_exif_block([ORIENTATION_6]))
    plain = encode_image(photo, "JPEG")
    out = validate_image(broken, **LIMITS)
    assert out.content_type == "image/jpeg"
    # The orientation tag itself is readable, so it is applied, as for the well-formed twin.
    assert (out.width, out.height) == (80, 120)
    assert out.model_input == validate_image(clean, **LIMITS).model_input
    assert out.model_input != validate_image(plain, **LIMITS).model_input


def test_validate_image_ignores_an_exif_block_that_cannot_be_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    photo = _photo()
    data = encode_image(photo, "JPEG", exif=_exif_block([ORIENTATION_6]))
    plain = encode_image(photo, "JPEG")

    def unreadable(self: Image.Image) -> Image.Exif:
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(Image.Image, "getexif", unreadable)
    out = validate_image(data, **LIMITS)
    assert (out.width, out.height) == (120, 80)  # as stored, not turned
    assert out.model_input == validate_image(plain, **LIMITS).model_input


def test_validate_image_rejects_a_jpeg_whose_scan_is_garbage() -> None:
    data = encode_image(_photo(), "JPEG", exif=_exif_block([WIDTH_AS_TEXT, ORIENTATION_6]))
    scan = data.index(b"\xff\xda")  # start of scan: the header before it stays intact
    with pytest.raises(InvalidImageError):
        validate_image(data[: scan + 40] + bytes(range(7, 250, 13)), **LIMITS)


def test_validate_image_maps_any_decoder_failure_to_invalid_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(data: bytes) -> tuple[Image.Image, int, int]:
        raise KeyError("an exception type no one expected")

    monkeypatch.setattr("segsvc.images.load_rgb", broken)
    with pytest.raises(InvalidImageError):
        validate_image(encode_image(_photo(), "JPEG"), **LIMITS)


def test_validate_image_accepts_a_multi_picture_jpeg_as_its_first_frame() -> None:
    first, second = _photo((90, 60)), Image.new("RGB", (40, 30), "red")
    data = encode_image(first, "MPO", save_all=True, append_images=[second])
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "MPO"
    out = validate_image(data, **LIMITS)
    assert out.content_type == "image/jpeg"
    assert (out.width, out.height) == (90, 60)
    # Pillow writes the first frame as the same JPEG it writes on its own.
    assert out.model_input == validate_image(encode_image(first, "JPEG"), **LIMITS).model_input


def test_validate_image_raises_only_seg_errors_on_damaged_bytes() -> None:
    rng = random.Random(20240611)
    exif = _exif_block([WIDTH_AS_TEXT, ORIENTATION_6, (0x8769, 4, 1, struct.pack("<I", 38))])
    data = encode_image(_photo((64, 48)), "JPEG", exif=exif)
    scan = data.index(b"\xff\xda")
    outcomes: Counter[str] = Counter()
    for i in range(400):
        damaged = bytearray(data)
        start, stop = (2, scan + 12) if i % 2 == 0 else (scan + 12, len(data))
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(start, stop)] = rng.randrange(256)
        if i % 10 == 0:
            del damaged[rng.randrange(scan, len(data)) :]
        try:
            validate_image(bytes(damaged), **LIMITS)
        except SegError as exc:
            outcomes[type(exc).__name__] += 1
        else:
            outcomes["accepted"] += 1
    # Most damage still decodes (JPEG is forgiving); the rest must be refused cleanly.
    assert outcomes["accepted"] > 0
    assert sum(outcomes.values()) == 400


@pytest.mark.parametrize("size", [(6000, 300), (2000, 2000), (1100, 700), (513, 4000), (300, 300)])
def test_draft_scale_is_the_scale_pillow_decodes_a_jpeg_at(size: tuple[int, int]) -> None:
    from segsvc.ml.imaging import IMAGE_SIZE, draft_scale

    data = encode_image(Image.new("RGB", size, (10, 200, 30)), "JPEG")
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (IMAGE_SIZE * 2, IMAGE_SIZE * 2))
        img.load()
        decoded = img.size
    scale = draft_scale("JPEG", *size)
    assert decoded == (-(-size[0] // scale), -(-size[1] // scale))
    assert draft_scale("PNG", *size) == 1


def test_a_jpeg_strip_that_decodes_at_full_size_takes_a_large_decode_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A JPEG whose short side is under 512 pixels decodes at full size (65000 x 500 took
    +250 MB): it waits for its turn like a PNG; a square JPEG of more pixels does not."""
    from segsvc import images

    monkeypatch.setattr(images, "LARGE_DECODE_PIXELS", 1_000_000)
    turns: list[int] = []

    def turn() -> AbstractContextManager[object]:
        turns.append(1)
        return nullcontext()

    strip = encode_image(Image.new("RGB", (6000, 300), (10, 200, 30)), "JPEG")  # 1.8 MP, 1/1
    square = encode_image(Image.new("RGB", (2048, 2048), (10, 200, 30)), "JPEG")  # 4.2 MP, 1/8
    for data in (strip, square):
        images.validate_image(data, max_bytes=10**8, max_pixels=10**8, large_decode=turn)
    assert turns == [1]


def test_a_progressive_jpeg_takes_a_large_decode_turn_whatever_its_draft_scale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libjpeg decodes a progressive JPEG through coefficient buffers of the whole picture at
    full size, whatever the draft scale: one 3.3 MB 40 MP upload took +233 MB, 24 at once
    4.1 GB in one API pod (limit 1536Mi), none of them waiting for the large-decode turn."""
    from segsvc import images

    monkeypatch.setattr(images, "LARGE_DECODE_PIXELS", 1_000_000)
    turns: list[int] = []

    def turn() -> AbstractContextManager[object]:
        turns.append(1)
        return nullcontext()

    photo = Image.new("RGB", (2048, 2048), (10, 200, 30))  # 4.2 MP; 1/8 when baseline
    baseline = encode_image(photo, "JPEG")
    progressive = encode_image(photo, "JPEG", progressive=True, subsampling=0)
    for data in (baseline, progressive):
        images.validate_image(data, max_bytes=10**8, max_pixels=10**8, large_decode=turn)
    assert turns == [1]


def test_whole_image_jpegs_are_told_by_their_markers() -> None:
    """Progressive, or more than one scan in the main picture; an EXIF thumbnail (a JPEG of
    its own, with its own scan, inside APP1) is stepped over."""
    from segsvc.images import whole_image_jpeg

    photo = Image.new("RGB", (300, 200), (200, 40, 40))
    baseline = encode_image(photo, "JPEG")
    thumbnail = encode_image(photo.resize((30, 20)), "JPEG")
    app1 = b"Exif\x00\x00" + thumbnail  # where cameras keep one (a stand-in for its TIFF)
    with_thumbnail = baseline[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    with_thumbnail += baseline[2:]
    assert Image.open(io.BytesIO(with_thumbnail)).size == (300, 200)
    assert not whole_image_jpeg(baseline)
    assert not whole_image_jpeg(with_thumbnail)
    assert whole_image_jpeg(encode_image(photo, "JPEG", progressive=True))


@pytest.mark.parametrize("junk", [b"\x00", b"\xff\x00", b"\x12\x34"])
def test_a_progressive_jpeg_with_junk_between_segments_still_takes_the_turn(
    junk: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow and libjpeg skip stray bytes between segments; the marker walk stopped at them,
    and one inserted byte let a progressive JPEG decode without the large-decode turn."""
    from segsvc import images

    monkeypatch.setattr(images, "LARGE_DECODE_PIXELS", 1_000_000)
    turns: list[int] = []

    def turn() -> AbstractContextManager[object]:
        turns.append(1)
        return nullcontext()

    photo = Image.new("RGB", (2048, 2048), (10, 200, 30))
    progressive = encode_image(photo, "JPEG", progressive=True, subsampling=0)
    app0_end = 4 + int.from_bytes(progressive[4:6], "big")  # SOI, then APP0 and its length
    tampered = progressive[:app0_end] + junk + progressive[app0_end:]
    images.validate_image(tampered, max_bytes=10**8, max_pixels=10**8, large_decode=turn)
    assert turns == [1]


def test_a_phone_photo_with_a_second_picture_appended_decodes_at_its_scale() -> None:
    """An MPO (a phone's photo with a depth or gain map after it) counted its second picture's
    scan as the first's: every 12 MP phone photo took the one large-decode turn."""
    from segsvc.images import whole_image_jpeg

    photo = Image.new("RGB", (300, 200), (200, 40, 40))
    baseline = encode_image(photo, "JPEG")
    assert not whole_image_jpeg(baseline + encode_image(photo.resize((30, 20)), "JPEG"))
    assert whole_image_jpeg(baseline[:20])  # no scan found: a wait, not a refusal
