"""Upload validation: format allowlist, size and pixel limits, full decode for the model."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from segsvc.errors import (
    BadRequestError,
    InvalidImageError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from segsvc.ml.imaging import load_rgb, resize_to_model

ALLOWED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


@dataclass(frozen=True)
class ValidatedImage:
    """An accepted upload and the model input made from it."""

    data: bytes
    sha256: str
    content_type: str
    width: int
    height: int
    model_input: bytes  # 128x128x3 uint8, row-major


def validate_image(data: bytes, *, max_bytes: int, max_pixels: int) -> ValidatedImage:
    """Check an upload and decode it once; raise a `SegError` subclass saying what is wrong."""
    if not data:
        raise BadRequestError("The uploaded file is empty.")
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"The image is larger than the limit of {max_bytes} bytes.")
    fmt = _sniff_format(data)
    if fmt not in ALLOWED_FORMATS:
        raise UnsupportedMediaTypeError(
            f"Unsupported image format {fmt or 'unknown'}; send JPEG, PNG or WebP."
        )
    with Image.open(io.BytesIO(data)) as img:
        pixels = img.width * img.height
    if pixels > max_pixels:
        raise InvalidImageError(
            f"The image has {pixels} pixels, more than the limit of {max_pixels}."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            decoded, width, height = load_rgb(data)
            model_input = resize_to_model(decoded).tobytes()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"The image could not be decoded: {exc}") from exc
    return ValidatedImage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        content_type=ALLOWED_FORMATS[fmt],
        width=width,
        height=height,
        model_input=model_input,
    )


def _sniff_format(data: bytes) -> str | None:
    """The format Pillow identifies from the header, without decoding pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return img.format
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"The image is too large to decode safely: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None
