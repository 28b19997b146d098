"""Pre- and post-processing shared by serving, training and evaluation (no TensorFlow).

The NumPy side: model inputs as arrays, class masks from logits, mask PNGs. Decoding and
overlays are Pillow-only, in `imaging` (which the API uses without loading NumPy).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from segsvc.ml import NUM_CLASSES, imaging
from segsvc.ml.imaging import load_rgb


@dataclass(frozen=True)
class Prepared:
    """A model input and the size of the displayed (EXIF-oriented) original."""

    array: npt.NDArray[np.float32]
    width: int
    height: int


def normalize(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Scale uint8 pixels to [0, 1] float32, as the tutorial does (the one place this happens)."""
    return pixels.astype(np.float32) * np.float32(1.0 / 255.0)


def resize_rgb(img: Image.Image) -> npt.NDArray[np.uint8]:
    """Resize an RGB image to the model's square input with bilinear filtering."""
    return np.asarray(imaging.resize_to_model(img), dtype=np.uint8)


def preprocess_bytes(data: bytes) -> Prepared:
    """Encoded image bytes -> model input (128, 128, 3) in [0, 1]; raises on undecodable data."""
    img, width, height = load_rgb(data)
    return Prepared(normalize(resize_rgb(img)), width, height)


def postprocess(logits: npt.NDArray[np.floating], width: int, height: int) -> npt.NDArray[np.uint8]:
    """Logits (128, 128, C) -> class mask (height, width), nearest-neighbour resized."""
    return resize_mask(class_map(logits), width, height)


def class_map(logits: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """Logits (..., H, W, C) -> the class of each pixel (..., H, W): `argmax` over C, the first
    class winning a tie."""
    if logits.shape[-1] != 3:
        winners: npt.NDArray[np.uint8] = np.argmax(logits, axis=-1).astype(np.uint8)
        return winners
    # Two comparisons instead of `argmax`, whose inner loop over an axis of length 3 costs
    # about 2.5x as much; the same answer for finite logits (the tests check ties).
    pet, background, border = logits[..., 0], logits[..., 1], logits[..., 2]
    classes = (background > pet).astype(np.uint8)
    classes[border > np.maximum(pet, background)] = 2
    return classes


def resize_mask(mask: npt.NDArray[np.uint8], width: int, height: int) -> npt.NDArray[np.uint8]:
    """Resize a class mask with nearest-neighbour so no new class values appear."""
    if mask.shape == (height, width):
        return mask
    img = Image.fromarray(mask, "L").resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(img, dtype=np.uint8)


def class_fractions(mask: npt.NDArray[np.uint8]) -> list[float]:
    """Share of pixels in each class."""
    # Pillow's histogram counts uint8 pixels about 3x faster than np.bincount.
    counts = Image.fromarray(np.ascontiguousarray(mask, np.uint8), "L").histogram()[:NUM_CLASSES]
    return [float(c) / float(mask.size) for c in counts]


def resized_class_fractions(classes: npt.NDArray[np.uint8], width: int, height: int) -> list[float]:
    """`class_fractions(resize_mask(classes, width, height))`, without making that mask: with
    nearest-neighbour resizing each source pixel stands for (the output rows it covers) x (the
    output columns it covers) pixels. ~30x faster than counting a 500x375 mask."""
    rows = _nearest_cover(classes.shape[0], height)
    cols = _nearest_cover(classes.shape[1], width)
    total = float(width) * float(height)
    return [
        float(rows @ (classes == c).astype(np.int64) @ cols) / total for c in range(NUM_CLASSES)
    ]


@functools.lru_cache(maxsize=1024)
def _nearest_cover(src: int, dst: int) -> npt.NDArray[np.int64]:
    """How many of `dst` nearest-neighbour samples fall on each of `src` pixels, taken from
    Pillow's own resize of an index row so it matches `resize_mask` exactly."""
    index = Image.fromarray(np.arange(src, dtype=np.int32)[None, :], "I")
    picked = np.asarray(index.resize((dst, 1), Image.Resampling.NEAREST))[0]
    cover = np.bincount(picked, minlength=src).astype(np.int64)
    cover.flags.writeable = False
    return cover


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_NONE, _PNG_FILTER_UP = 0, 2


def encode_mask_png(mask: npt.NDArray[np.uint8]) -> bytes:
    """A single-channel PNG with values 0 pet, 1 background, 2 border (8-bit greyscale).

    Written here rather than by Pillow, which tries all five PNG filters on every row of a
    greyscale image (its adaptive filter cannot be switched off for mode L) and so spends about
    three times as long. A served mask is a nearest-neighbour enlargement of the model's
    128x128 classes, so most rows repeat the one above: the "Up" filter (PNG spec, section 9)
    turns them into zeros, and zlib's run-length strategy packs those about as small as Pillow's
    adaptive choice does. Any PNG reader decodes the result; the tests read it with Pillow.
    """
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"a mask must be a non-empty 2-D array, not shape {mask.shape}")
    height, width = mask.shape
    rows = np.empty((height, width + 1), dtype=np.uint8)  # each row: filter type, then bytes
    rows[0, 0], rows[0, 1:] = _PNG_FILTER_NONE, mask[0]
    rows[1:, 0] = _PNG_FILTER_UP
    np.subtract(mask[1:], mask[:-1], out=rows[1:, 1:])  # uint8 wraps modulo 256, as PNG says
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    data = deflate.compress(rows.data) + deflate.flush()
    # IHDR: width, height, bit depth 8, colour type 0 (greyscale), deflate, filters, no interlace
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", data),
            _png_chunk(b"IEND", b""),
        )
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """Length, type, data, and the CRC-32 of type + data (PNG spec, section 5.3)."""
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def decode_mask_png(data: bytes) -> npt.NDArray[np.uint8]:
    """Read a class mask PNG back to an array of classes (`imaging.mask_classes`)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(imaging.mask_classes(img), dtype=np.uint8)


def render_overlay(image_bytes: bytes, mask: npt.NDArray[np.uint8]) -> bytes:
    """The input (oriented) with the class mask blended on it, as PNG (`imaging.render_overlay`)."""
    return imaging.render_overlay(image_bytes, Image.fromarray(np.asarray(mask, np.uint8), "L"))
