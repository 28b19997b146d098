"""Pillow-only decoding and overlays (what the API runs), checked against NumPy formulas."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from segsvc.ml import IMAGE_SIZE
from segsvc.ml.imaging import (
    OVERLAY_ALPHA,
    PALETTE,
    draft_scale,
    exif_orientation,
    load_rgb,
    load_rgb_full,
    render_overlay,
    render_overlay_png,
    resize_to_model,
    to_rgb,
    turned_the_old_way,
)
from segsvc.ml.preprocess import encode_mask_png
from tests.conftest import encode_image


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "L", "P", "I;16", "LA"])
def test_load_rgb_converts_any_mode_to_rgb(mode: str) -> None:
    img = Image.new(mode, (40, 30))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    rgb, width, height = load_rgb(encode_image(img, fmt))
    assert rgb.mode == "RGB"
    assert (width, height) == (40, 30)


@pytest.mark.parametrize("high", [200, 255, 256, 4095, 65535])
def test_wide_grey_is_scaled_like_the_numpy_formula(high: int) -> None:
    rng = np.random.default_rng(high)
    arr = rng.integers(0, high + 1, (31, 17)).astype(np.uint16)
    arr[0, 0] = high
    got = np.asarray(to_rgb(Image.fromarray(arr)))
    scale = 255.0 / max(float(arr.max()), 1.0) if arr.max() > 255 else 1.0
    want = np.clip(arr.astype(np.float64) * scale, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=2))


def test_negative_32_bit_grey_clips_to_black() -> None:
    img = Image.fromarray(np.array([[-5, 0, 100, 300]], np.int32), "I")
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 0, 85, 255]


def test_model_input_bytes_are_the_row_major_rgb_array() -> None:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (90, 70, 3)).astype(np.uint8), "RGB")
    resized = resize_to_model(img)
    assert resized.tobytes() == np.asarray(resized).tobytes()
    assert len(resized.tobytes()) == 128 * 128 * 3


def test_overlay_blends_each_class_colour_at_its_opacity() -> None:
    rng = np.random.default_rng(5)
    photo = rng.integers(0, 256, (40, 60, 3)).astype(np.uint8)
    mask = rng.integers(0, 3, (40, 60)).astype(np.uint8)
    data = encode_image(Image.fromarray(photo, "RGB"))
    out = np.asarray(Image.open(io.BytesIO(render_overlay_png(data, encode_mask_png(mask)))))
    alpha = np.array(OVERLAY_ALPHA)[mask][..., None]
    want = photo * (1.0 - alpha) + np.array(PALETTE)[mask] * alpha
    assert out.shape == (40, 60, 3)
    assert np.abs(out.astype(np.float64) - want).max() <= 1.0  # integer rounding only
    np.testing.assert_array_equal(out[mask == 1], photo[mask == 1])  # background untouched


def test_overlay_refuses_a_mask_that_does_not_fit() -> None:
    data = encode_image(Image.new("RGB", (60, 40)))
    with pytest.raises(ValueError, match="mode L"):
        render_overlay(data, Image.new("RGB", (60, 40)))
    with pytest.raises(ValueError, match="mask is"):
        render_overlay(data, Image.new("L", (61, 40)))


def _oriented_jpeg(orientation: int, *extra_entries: tuple[int, int, int, bytes]) -> bytes:
    """A 60x40 JPEG with no symmetry whose EXIF block (written verbatim, so it may be malformed)
    holds the orientation and any extra (tag, type, count, 4-byte value) entries."""
    rng = np.random.default_rng(orientation)
    photo = Image.fromarray(rng.integers(0, 256, (40, 60, 3)).astype(np.uint8), "RGB")
    entries = sorted([*extra_entries, (0x0112, 3, 1, struct.pack("<HH", orientation, 0))])
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHI", tag, typ, n) + value for tag, typ, n, value in entries)
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)
    return encode_image(photo, "JPEG", exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_applied_as_exif_transpose_does(orientation: int) -> None:
    data = _oriented_jpeg(orientation)
    with Image.open(io.BytesIO(data)) as img:
        want = ImageOps.exif_transpose(img).convert("RGB")
    assert load_rgb_full(data).tobytes() == want.tobytes()
    rgb, width, height = load_rgb(data)
    assert (width, height) == want.size
    assert rgb.size == want.size  # a 60x40 JPEG is not draft-scaled


def test_malformed_exif_still_orients_and_the_overlay_fits() -> None:
    # ImageWidth stored as ASCII: ImageOps.exif_transpose raises struct.error on this file.
    data = _oriented_jpeg(6, (0x0100, 2, 4, b"Cam\x00"))
    rgb, width, height = load_rgb(data)
    assert (width, height) == rgb.size == (40, 60)
    assert load_rgb_full(data).tobytes() == load_rgb_full(_oriented_jpeg(6)).tobytes()
    mask = Image.new("L", (width, height), 0)
    overlay = Image.open(io.BytesIO(render_overlay(data, mask)))
    assert overlay.size == (40, 60)


def test_a_multi_picture_jpeg_decodes_as_its_first_frame() -> None:
    first = Image.fromarray(np.random.default_rng(9).integers(0, 256, (30, 50, 3), np.uint8))
    data = encode_image(first, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    rgb, width, height = load_rgb(data)
    assert (width, height) == (50, 30)
    assert rgb.tobytes() == load_rgb(encode_image(first, "JPEG"))[0].tobytes()


def _edge_column(model_input: Image.Image) -> float:
    """Where, in model pixels, a dark-to-bright vertical edge crosses half way (sub-pixel)."""
    row = np.asarray(model_input.convert("L"), np.float64).mean(axis=0)
    half = (row.min() + row.max()) / 2
    i = int(np.argmax(row > half))
    return i - 1 + (half - row[i - 1]) / (row[i] - row[i - 1])


@pytest.mark.parametrize("at", [0.1, 0.9])
@pytest.mark.parametrize("orientation", [1, 2, 3, 6])
def test_a_draft_decoded_jpeg_is_not_stretched_by_its_padding_blocks(
    orientation: int, at: float
) -> None:
    """2049 px is not a multiple of the DCT scale (8) a draft decode uses: the decoded image
    has 257 columns, one of them mostly padding (the last, or the first once the picture is
    flipped or turned). The model input must place an edge where a full decode puts it, not up
    to 7 original pixels (0.44 model pixels) off."""
    pixels = np.zeros((2049, 2049, 3), np.uint8)
    pixels[:, int(2049 * at) :] = 255  # an edge at 10% or 90% of the width
    photo = Image.fromarray(pixels, "RGB")
    if orientation != 1:  # stored turned, with the EXIF tag that turns it back
        undo = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180}
        undo[6] = Image.Transpose.ROTATE_90
        photo = photo.transpose(undo[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode_image(photo, "JPEG", quality=95, exif=exif.tobytes())
    drafted, width, height = load_rgb(data)
    assert (width, height) == (2049, 2049)
    assert drafted.size[0] < 2049  # decoded at a reduced scale
    served = _edge_column(resize_to_model(drafted))
    full = _edge_column(resize_to_model(load_rgb_full(data)))
    assert abs(served - full) < 0.1, (served, full)


def mpo_bytes(size: tuple[int, int]) -> bytes:
    """A multi-picture JPEG (as phones write): two pictures, the first the one shown."""
    out = io.BytesIO()
    first, second = Image.new("RGB", size, (10, 200, 30)), Image.new("RGB", size, (200, 20, 30))
    first.save(out, "MPO", save_all=True, append_images=[second])
    return out.getvalue()


@pytest.mark.parametrize("size", [(2000, 2000), (1100, 700), (513, 4000), (300, 300)])
def test_draft_scale_of_an_mpo_is_the_scale_pillow_decodes_it_at(size: tuple[int, int]) -> None:
    # Regression: only "JPEG" counted as draft-decodable, so a phone's MPO was charged as a
    # full-size decode (a large-decode turn it did not need).
    data = mpo_bytes(size)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "MPO"
        img.draft("RGB", (IMAGE_SIZE * 2, IMAGE_SIZE * 2))
        img.load()
        decoded = img.size
    scale = draft_scale("MPO", *size)
    assert decoded == (-(-size[0] // scale), -(-size[1] // scale))
    assert draft_scale("MPO", *size) == draft_scale("JPEG", *size)
    rgb, width, height = load_rgb(data)
    assert (width, height) == size
    assert rgb.getpixel((0, 0)) == pytest.approx((10, 200, 30), abs=3)


def _oriented_webp(orientation: int) -> bytes:
    rng = np.random.default_rng(orientation)
    photo = Image.fromarray(rng.integers(0, 256, (40, 60, 3)).astype(np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode_image(photo, "WEBP", lossless=True, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [3, 6])
def test_a_webp_is_used_as_stored_whatever_its_orientation_tag(orientation: int) -> None:
    """Browsers ignore a WebP's EXIF orientation: turned by it here, the mask and overlay of a
    60x40 photo came back 40x60 beside the 60x40 photo its owner sees."""
    data = _oriented_webp(orientation)
    with Image.open(io.BytesIO(data)) as img:
        assert img.getexif().get(0x0112) == orientation  # the tag is there
        stored = img.convert("RGB")
    rgb, width, height = load_rgb(data)
    assert (width, height) == rgb.size == (60, 40)
    assert load_rgb_full(data).tobytes() == stored.tobytes()


XMP_ORIENTATION_6 = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
    b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def _with_xmp_orientation(fmt: str, exif: Image.Exif | None = None) -> tuple[bytes, Image.Image]:
    """A 300x200 JPEG or PNG whose XMP packet says orientation 6 (and its EXIF block, if any,
    what `exif` holds); plus its pixels as stored."""
    rng = np.random.default_rng(6)
    photo = Image.fromarray(rng.integers(0, 256, (200, 300, 3)).astype(np.uint8), "RGB")
    options: dict[str, object] = {} if exif is None else {"exif": exif.tobytes()}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", XMP_ORIENTATION_6.decode())
        options["pnginfo"] = info
    else:
        options.update(xmp=XMP_ORIENTATION_6, quality=95)
    data = encode_image(photo, fmt, **options)
    with Image.open(io.BytesIO(data)) as img:
        return data, img.convert("RGB")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("exif_tags", [None, {}, {0x010F: "Cam"}])
def test_an_orientation_only_in_xmp_is_not_applied(
    fmt: str, exif_tags: dict[int, str] | None
) -> None:
    """Browsers turn a photo by its EXIF block's orientation only: a 300x200 photo whose
    orientation is in its XMP packet alone (no EXIF block, or one without the tag) shows 300
    wide, as stored. Read through Pillow's `getexif`, which fills the tag from XMP, it was
    turned, and its mask came back 200x300."""
    exif = None
    if exif_tags is not None:
        exif = Image.Exif()
        exif.update(exif_tags)
    data, stored = _with_xmp_orientation(fmt, exif)
    with Image.open(io.BytesIO(data)) as img:
        assert img.getexif().get(0x0112) == 6  # Pillow reads the XMP tag into its EXIF view
    rgb, width, height = load_rgb(data)
    assert (width, height) == rgb.size == (300, 200)
    assert load_rgb_full(data).tobytes() == stored.tobytes()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_exif_orientation_beside_an_xmp_one_is_applied(fmt: str) -> None:
    """The EXIF block's tag (a PNG's eXIf chunk) is the one browsers apply, whatever the XMP
    packet says."""
    exif = Image.Exif()
    exif[0x0112] = 3
    data, stored = _with_xmp_orientation(fmt, exif)
    rgb, width, height = load_rgb(data)
    assert (width, height) == rgb.size == (300, 200)
    assert load_rgb_full(data).tobytes() == stored.transpose(Image.Transpose.ROTATE_180).tobytes()


@pytest.mark.parametrize("orientation", [3, 6])
def test_a_png_exif_chunk_orientation_is_applied(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), np.uint8))
    data = encode_image(photo, "PNG", exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as img:
        want = ImageOps.exif_transpose(img).convert("RGB")
    assert load_rgb_full(data).tobytes() == want.tobytes()
    rgb, width, height = load_rgb(data)
    assert (width, height) == rgb.size == want.size


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_transparent_colour_is_white_like_alpha(mode: str) -> None:
    """A grey or RGB PNG with a transparent colour (tRNS) kept that colour (black) where the
    same picture as RGBA is white: the model saw two different pictures."""
    img = Image.new(mode, (4, 3), 0)
    img.putpixel((1, 1), 200 if mode == "L" else (200, 10, 10))
    data = encode_image(img, "PNG", transparency=0 if mode == "L" else (0, 0, 0))
    with Image.open(io.BytesIO(data)) as decoded:
        assert "transparency" in decoded.info
    rgb = load_rgb_full(data)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 1)) == ((200, 200, 200) if mode == "L" else (200, 10, 10))
    assert load_rgb(data)[0].tobytes() == rgb.tobytes()


def _with_raw_profile_orientation(exif_block: Image.Exif | None = None) -> bytes:
    """A 300x200 PNG whose orientation 6 is in the text chunk ImageMagick writes ("Raw profile
    type exif", Pillow's `getexif` reads it), with an eXIf chunk of `exif_block` if given."""
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = exif.tobytes().removeprefix(b"Exif\x00\x00").hex()
    text = f"\nexif\n{len(raw) // 2:8d}\n" + "\n".join(
        raw[i : i + 72] for i in range(0, len(raw), 72)
    )
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", text, zip=True)
    options: dict[str, object] = {"pnginfo": info}
    if exif_block is not None:
        options["exif"] = exif_block.tobytes()
    return encode_image(Image.new("RGB", (300, 200), (200, 40, 40)), "PNG", **options)


def test_a_png_orientation_only_in_a_raw_profile_text_chunk_is_not_applied() -> None:
    """ImageMagick keeps a PNG's EXIF in a text chunk when it writes no eXIf chunk (a phone
    JPEG converted without auto-orienting): browsers show that PNG as stored, 300 wide. Read
    through `getexif`, it was turned and its mask came back 200x300."""
    data = _with_raw_profile_orientation()
    with Image.open(io.BytesIO(data)) as img:
        assert img.getexif().get(0x0112) == 6  # Pillow reads the text chunk's tag
        assert exif_orientation(img) is None
    with Image.open(io.BytesIO(data)) as img:
        assert exif_orientation(img, legacy=True) == 6  # as jobs stored until now were turned
    rgb, width, height = load_rgb(data)
    assert (width, height) == rgb.size == (300, 200)
    assert turned_the_old_way(data, (300, 200), (200, 300))


def test_a_png_exif_chunk_orientation_beside_a_raw_profile_one_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 3
    data = _with_raw_profile_orientation(exif)
    with Image.open(io.BytesIO(data)) as img:
        assert exif_orientation(img) == 3
