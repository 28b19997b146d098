"""Upload validation: format allowlist, size and pixel limits, full decode for the model."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from PIL import Image

from segsvc.errors import (
    BadRequestError,
    InvalidImageError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from segsvc.ml.imaging import draft_scale, load_rgb, resize_to_model

# Pillow's format name -> the content type stored. "MPO" is a multi-picture JPEG (phones and
# cameras write them): a JPEG whose first frame is the primary image, which is what decodes.
ALLOWED_FORMATS = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
}


@dataclass(frozen=True)
class ValidatedImage:
    """An accepted upload and the model input made from it."""

    data: bytes
    sha256: str
    content_type: str
    width: int
    height: int
    model_input: bytes  # 128x128x3 uint8, row-major


# A picture over this many pixels decoded takes ~10 bytes of memory per pixel at its peak
# (~420 MB at 40 MP): a server bounds how many of those run at once (`large_decode`). JPEGs
# count the pixels of their reduced DCT scale (`draft_scale`): a square 40 MP photo decodes
# at 1/8, 0.6 MP, but a 65000 x 500 strip at full size; and so does one libjpeg decodes
# through a full-size coefficient buffer whatever the scale (`whole_image_jpeg`: 3-6 bytes a
# pixel, 233 MB for one 3.3 MB progressive 40 MP upload).
LARGE_DECODE_PIXELS = 4_000_000
_PROGRESSIVE_SOFS = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})  # TEM, RSTn, SOI, EOI: no length


def whole_image_jpeg(data: bytes, progressive: bool = False) -> bool:
    """Whether libjpeg decodes this JPEG through coefficient buffers of the whole image at
    full size, whatever the draft scale: a progressive one (`progressive`: Pillow's header
    says so, or its start-of-frame marker does), or one of several scans (an SOS marker
    after the first scan and before the picture's end, EOI: an MPO's second picture, after
    that end, is not one). The segments before the first scan are stepped over by length, so
    an EXIF thumbnail's own scan is not counted, and stray bytes between them are skipped as
    Pillow and libjpeg skip them. A walk that finds no scan says yes: a wait, not a refusal."""
    if progressive:
        return True
    i, end = 2, len(data)
    while i + 1 < end:
        if data[i] != 0xFF:  # junk between segments
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xFF, 0x00):  # a fill byte; a stray FF00
            i += 1 if marker == 0xFF else 2
        elif marker in _PROGRESSIVE_SOFS:
            return True
        elif marker == 0xDA:  # the first scan: in scan data 0xFF is followed by 0 or RSTn
            last = data.find(b"\xff\xd9", i + 2)
            return data.find(b"\xff\xda", i + 2, last if last != -1 else end) != -1
        elif marker in _STANDALONE_MARKERS:
            i += 2
        elif i + 4 <= end:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        else:
            break
    return True


def validate_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    large_decode: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> ValidatedImage:
    """Check an upload and decode it once; raise a `SegError` subclass saying what is wrong.

    No other exception escapes, whatever the bytes: Pillow raises many types for damaged
    files, and any failure to decode the pixels is an `InvalidImageError`. Metadata that
    cannot be read (a malformed EXIF block) does not fail an image whose pixels decode.
    A decode at full size of over LARGE_DECODE_PIXELS runs inside `large_decode()`.
    """
    if not data:
        raise BadRequestError("The uploaded file is empty.")
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"The image is larger than the limit of {max_bytes} bytes.")
    fmt = _sniff_format(data)
    if fmt not in ALLOWED_FORMATS:
        raise UnsupportedMediaTypeError(
            f"Unsupported image format {fmt or 'unknown'}; send JPEG, PNG or WebP."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                progressive = bool(img.info.get("progressive") or img.info.get("progression"))
    except Exception as exc:  # _sniff_format opened these bytes, so this should not happen
        raise InvalidImageError(f"The image could not be decoded: {exc}") from exc
    pixels = width * height
    if pixels > max_pixels:
        raise InvalidImageError(
            f"The image has {pixels} pixels, more than the limit of {max_pixels}."
        )
    whole = fmt in ("JPEG", "MPO") and whole_image_jpeg(data, progressive)
    scale = 1 if whole else draft_scale(fmt, width, height)
    large = pixels / scale**2 > LARGE_DECODE_PIXELS
    with large_decode() if large else nullcontext():
        try:
            with warnings.catch_warnings():
                # Pillow's other warnings (odd EXIF, say) are noise here, and must not turn
                # into errors where a warnings filter says "error" (as the test suite's does).
                warnings.simplefilter("ignore")
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                decoded, width, height = load_rgb(data)
                model_input = resize_to_model(decoded).tobytes()
        except Exception as exc:  # OSError, SyntaxError, ValueError, struct.error, the bomb
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
    """The format Pillow identifies from the header, without decoding pixels; None for bytes
    that are no image Pillow knows.

    Bytes that start with the signature of a format we take but that Pillow cannot open (a
    JPEG cut short before its frame header, a PNG whose IHDR checksum is wrong, a WebP cut
    to its RIFF header) are a damaged image of that format: `InvalidImageError` (422), not
    the 415 that says to send another format."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return img.format
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"The image is too large to decode safely: {exc}") from exc
    except Exception as exc:  # UnidentifiedImageError, OSError, ...: a damaged header raises many
        signed = _signature_format(data)
        if signed is not None:
            # Pillow's own message names a BytesIO object's address, not what is wrong.
            raise InvalidImageError(
                f"The image is damaged or cut short: it starts as a {signed} file, but its "
                "header could not be read."
            ) from exc
        return None


def _signature_format(data: bytes) -> str | None:
    """The allowed format whose signature (magic bytes) `data` starts with, else None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None
