"""Decoding uploads and drawing overlays with Pillow alone: the part of the model's pre- and
post-processing that the API runs.

The API process never imports NumPy (about 20 MB of every API process's RSS, against a budget of
150 MB): it decodes each upload here, keeps the 128x128 model input as raw RGB bytes, and draws
overlays from stored mask PNGs. `preprocess` builds the NumPy side (model inputs as arrays,
masks from logits) on these same functions, so training and serving see identical pixels.
"""

from __future__ import annotations

import io
import logging

from PIL import Image

from segsvc.ml import IMAGE_SIZE, NUM_CLASSES

_log = logging.getLogger(__name__)

# Colours for the overlay and how opaque each class is drawn: pet, background, border.
PALETTE = ((255, 64, 64), (0, 0, 0), (255, 220, 0))
OVERLAY_ALPHA = (0.5, 0.0, 0.6)

# EXIF orientation -> the transpose that shows the image upright (as `ImageOps.exif_transpose`);
# orientations 5-8 swap width and height.
_ORIENTATION_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_ORIENTATION = 0x0112  # the EXIF tag
_XMP_KEYS = ("xmp", "XML:com.adobe.xmp")  # where Pillow keeps an XMP packet (JPEG/WebP; PNG)
# A text chunk where ImageMagick keeps a PNG's EXIF when it has no eXIf chunk; Pillow's
# `getexif` reads it, browsers do not.
_RAW_PROFILE_KEY = "Raw profile type exif"
# Where `getexif` finds an orientation that is not the EXIF block's own.
_NOT_EXIF_BLOCK_KEYS = (*_XMP_KEYS, _RAW_PROFILE_KEY)
_INT_MODES = ("I;16", "I;16B", "I;16L", "I")


def load_rgb(data: bytes, *, legacy: bool = False) -> tuple[Image.Image, int, int]:
    """Decode for the model: RGB, EXIF-oriented, maybe at reduced scale; plus the full size.
    `legacy`: oriented as releases before 2026-11-27 did (`exif_orientation`).

    JPEGs are decoded with `draft` at the smallest DCT scale still >= 2x the model input,
    which is several times faster than a full decode and changes nothing the model sees
    after the bilinear resize (training uses this same function); a side that is not a
    multiple of the scale is resampled to the picture's exact extent first.

    A multi-picture JPEG (MPO) decodes as its first frame, the primary image.
    """
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        orientation = exif_orientation(img, legacy=legacy)
        if orientation in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        drafted = img.draft("RGB", (IMAGE_SIZE * 2, IMAGE_SIZE * 2))
        decoded: Image.Image = img
        if drafted is not None and drafted[1] is not None:
            # At scale 1/n a side that is not a multiple of n decodes to ceil(side / n) pixels,
            # the last one mostly padding: resample to the picture's own extent, or the model
            # input is stretched (an edge up to n - 1 pixels off at the far side, and on the
            # near side once the picture is flipped or turned).
            box = drafted[1]
            extent = (box[2] - box[0], box[3] - box[1])
            if extent != img.size:
                size = (max(1, round(extent[0])), max(1, round(extent[1])))
                decoded = img.resize(size, Image.Resampling.BILINEAR, box=box)
        turn = _ORIENTATION_TRANSPOSES.get(orientation) if orientation is not None else None
        return to_rgb(decoded.transpose(turn) if turn is not None else decoded), width, height


def draft_scale(fmt: str | None, width: int, height: int) -> int:
    """The DCT scale `load_rgb` decodes a picture at (Pillow's `draft` rule: the largest of
    8, 4, 2 that keeps both sides >= 2x the model input), 1 for every format but JPEG and MPO
    (a phone's multi-picture JPEG, whose first picture Pillow draft-decodes as a JPEG). A
    JPEG whose short side is under 512 pixels decodes at full size, however long it is."""
    if fmt not in ("JPEG", "MPO"):
        return 1
    fits = min(width // (IMAGE_SIZE * 2), height // (IMAGE_SIZE * 2))
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def load_rgb_full(data: bytes, *, legacy: bool = False) -> Image.Image:
    """Decode at full resolution (no draft scaling), oriented, RGB."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        orientation = exif_orientation(img, legacy=legacy)
        turn = _ORIENTATION_TRANSPOSES.get(orientation) if orientation is not None else None
        return to_rgb(img.transpose(turn) if turn is not None else img)


def exif_orientation(img: Image.Image, *, legacy: bool = False) -> int | None:
    """The EXIF orientation (2-8) that turns or flips the image; None when there is none to apply
    or the EXIF block cannot be read, and for WebP, whose orientation tag browsers ignore (a
    mask turned by it did not line up with the photo as its owner sees it; JPEG's and PNG's
    tags they apply, as here). Only the EXIF block's tag counts (a PNG's `eXIf` chunk), never an
    XMP packet's or the one in a PNG text chunk that ImageMagick writes ("Raw profile type
    exif"), which browsers ignore too.

    The pixels are turned here with `Image.transpose` rather than `ImageOps.exif_transpose`,
    which also rewrites the EXIF block and raises (`struct.error` and others) on entries that
    phones and cameras write malformed. A block too broken to read leaves the image as stored.

    `legacy`: the rule before 2026-11-27, when a WebP's orientation tag and an XMP packet's
    (Pillow reads it where the EXIF block has none) counted too, as a PNG text chunk's did
    until 2026-11-28: the masks of jobs stored then are at that rule's size, and
    `turned_the_old_way` tells when to decode their photos so again.
    """
    if img.format == "WEBP" and not legacy:
        return None
    try:
        # getexif loads a PNG first (its eXIf chunk may follow the pixels), so after it
        # `info` holds the EXIF block wherever the file keeps it.
        value = img.getexif().get(_ORIENTATION)
        if value is not None and not legacy and any(k in img.info for k in _NOT_EXIF_BLOCK_KEYS):
            value = _exif_block_orientation(img.info.get("exif"))
    except Exception as exc:  # Pillow raises many types for a broken EXIF block
        _log.debug("ignoring an unreadable EXIF block: %r", exc)
        return None
    return value if isinstance(value, int) and value in _ORIENTATION_TRANSPOSES else None


def _exif_block_orientation(block: bytes | None) -> object:
    """The orientation tag of an EXIF block alone (None without one). `getexif` fills a tag
    the block lacks from the XMP packet's `tiff:Orientation`, which browsers do not apply: a
    JPEG whose only orientation was in XMP shows as stored, and turned here its mask did not
    line up with it."""
    if not block:
        return None
    exif = Image.Exif()
    exif.load(block)
    return exif.get(_ORIENTATION)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode (16-bit, CMYK, palette, alpha) to 8-bit RGB; alpha composites on white.

    16- and 32-bit grey is scaled by 255 / its maximum when that exceeds 255 (truncating, then
    clipped to 0-255), so a 16-bit scan keeps its contrast instead of saturating."""
    if img.mode in _INT_MODES:
        wide = img.convert("I")
        high = wide.getextrema()[1]
        if isinstance(high, int | float) and high > 255:
            scale = 255.0 / float(high)
            wide = wide.point(lambda v: v * scale)  # Pillow truncates to int, as a cast does
        img = wide.convert("L")  # clips to 0-255
    # A transparent colour (a tRNS chunk) on grey, RGB or palette pixels is alpha too: it came
    # out in its stored colour (black, usually) where the same picture as RGBA is white.
    if img.mode in ("RGBA", "LA", "PA") or (
        img.mode in ("P", "L", "RGB", "1") and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_to_model(img: Image.Image) -> Image.Image:
    """An RGB image resized to the model's square input with bilinear filtering. Its `tobytes()`
    is the model input as stored: 128x128x3 uint8, row-major."""
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)


def turned_the_old_way(data: bytes, decoded: tuple[int, int], wanted: tuple[int, int]) -> bool:
    """Whether a picture decoded at `decoded` (width, height) but stored with a mask of size
    `wanted`, its transpose, was turned by the rule before 2026-11-27 (a WebP's orientation
    tag, or one found only in the XMP packet or, until 2026-11-28, in a PNG text chunk, counted
    then), at whose size that job's mask (or
    label) was made. Only a turn by 90 degrees shows in the size: a flip, a half turn or a
    square photo stored then is drawn and trained as the browser shows it now."""
    if decoded == wanted or decoded[::-1] != wanted:
        return False
    with Image.open(io.BytesIO(data)) as img:
        return exif_orientation(img, legacy=True) in _TRANSPOSED_ORIENTATIONS


def render_overlay(image_bytes: bytes, mask: Image.Image) -> bytes:
    """The input (oriented) with the class mask (mode L, values 0-2, the input's size) blended
    on it, as PNG: each class's colour at its opacity, the background left as it is."""
    if mask.mode != "L":
        raise ValueError(f"a class mask is a mode L image, not {mask.mode}")
    base = load_rgb_full(image_bytes)
    if turned_the_old_way(image_bytes, base.size, mask.size):  # a job stored before the change
        base = load_rgb_full(image_bytes, legacy=True)
    if mask.size != base.size:
        raise ValueError(f"the mask is {mask.size}, the image {base.size}")
    colours = mask.copy()
    colours.putpalette([channel for colour in PALETTE for channel in colour])
    opacity = [round(alpha * 255) for alpha in OVERLAY_ALPHA]
    alpha = mask.point(opacity + [0] * (256 - len(opacity)))
    blended = Image.composite(colours.convert("RGB"), base, alpha)
    buf = io.BytesIO()
    blended.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def render_overlay_png(image_bytes: bytes, mask_png: bytes) -> bytes:
    """`render_overlay` for a stored mask PNG."""
    with Image.open(io.BytesIO(mask_png)) as mask:
        mask.load()
        return render_overlay(image_bytes, mask)


def mask_classes(img: Image.Image) -> Image.Image:
    """A decoded class mask as its classes: the image itself, but a palette mask whose used
    colours are all greys of class values (0, 1, 2) is read through its palette. An editor
    or optimiser that saves the served grey mask as a palette PNG may reorder the palette (one
    seen: index 0 shows grey 2), so its indices no longer are the classes its colours show,
    and read by index pet and border swapped. A palette of other colours keeps meaning its
    indices (colours chosen for display)."""
    if img.mode != "P":
        return img
    palette = img.getpalette() or []
    used = [index for index, count in enumerate(img.histogram()) if count]
    greys = []
    for index in used:
        rgb = palette[3 * index : 3 * index + 3]
        if len(rgb) != 3 or not rgb[0] == rgb[1] == rgb[2] or rgb[0] >= NUM_CLASSES:
            return img
        greys.append(rgb[0])
    if greys == used:
        return img  # indices and colours agree
    return img.convert("L")
