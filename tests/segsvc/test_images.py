from __future__ import annotations

import pytest
from PIL import Image

from segsvc.errors import (
    BadRequestError,
    InvalidImageError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from segsvc.images import validate_image
from tests.conftest import encode_image

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


def test_validate_image_rejects_too_many_pixels() -> None:
    data = encode_image(Image.new("L", (3000, 2000)), "PNG")  # 6 MP, tiny file
    with pytest.raises(InvalidImageError, match="pixels"):
        validate_image(data, **LIMITS)
