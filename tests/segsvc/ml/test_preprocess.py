from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from segsvc.ml.preprocess import (
    class_fractions,
    class_map,
    decode_mask_png,
    encode_mask_png,
    normalize,
    postprocess,
    preprocess_bytes,
    render_overlay,
    resize_mask,
    resized_class_fractions,
)
from tests.conftest import encode_image


def test_normalize_scales_to_unit_interval() -> None:
    out = normalize(np.array([[0, 128, 255]], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 128 / 255, 1.0]], rtol=1e-6)


def test_preprocess_bytes_shape_and_original_size() -> None:
    img = Image.new("RGB", (300, 200), (255, 0, 0))
    prepared = preprocess_bytes(encode_image(img, "JPEG"))
    assert prepared.array.shape == (128, 128, 3)
    assert (prepared.width, prepared.height) == (300, 200)
    assert prepared.array[..., 0].mean() > 0.9


def test_preprocess_applies_exif_orientation() -> None:
    img = Image.new("RGB", (300, 200), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 150, 200))  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    prepared = preprocess_bytes(encode_image(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert (prepared.width, prepared.height) == (200, 300)
    top, bottom = prepared.array[:40].mean(), prepared.array[-40:].mean()
    assert top > 0.8
    assert bottom < 0.2


def test_postprocess_argmax_and_nearest_resize() -> None:
    logits = np.zeros((128, 128, 3), np.float32)
    logits[:64, :, 0] = 5.0  # top half pet
    logits[64:, :, 2] = 5.0  # bottom half border
    mask = postprocess(logits, 50, 30)
    assert mask.shape == (30, 50)
    assert set(np.unique(mask)) == {0, 2}
    assert (mask[:15] == 0).all()
    assert (mask[15:] == 2).all()


@pytest.mark.parametrize("classes", [3, 4])
def test_class_map_is_argmax_with_the_first_class_winning_ties(classes: int) -> None:
    rng = np.random.default_rng(classes)
    logits = rng.integers(-2, 3, (2, 33, 17, classes)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(class_map(logits), np.argmax(logits, axis=-1))
    assert class_map(logits).dtype == np.uint8


def test_resize_mask_introduces_no_new_values() -> None:
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, (128, 128)).astype(np.uint8)
    out = resize_mask(mask, 333, 77)
    assert out.shape == (77, 333)
    assert set(np.unique(out)) <= {0, 1, 2}


def test_mask_png_roundtrip_and_fractions() -> None:
    mask = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    data = encode_mask_png(mask)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "L"
    np.testing.assert_array_equal(decode_mask_png(data), mask)
    assert class_fractions(mask) == [0.25, 0.25, 0.5]


@pytest.mark.parametrize("shape", [(1, 1), (1, 517), (300, 1), (375, 500), (77, 333)])
def test_mask_png_is_a_valid_greyscale_png_of_any_values(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    mask = rng.integers(0, 256, shape).astype(np.uint8)  # every byte value, so the filter wraps
    data = encode_mask_png(mask)
    with Image.open(io.BytesIO(data)) as img:
        img.verify()  # chunk CRCs and structure
    with Image.open(io.BytesIO(data)) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "L", (shape[1], shape[0]))
        np.testing.assert_array_equal(np.asarray(img), mask)


def test_mask_png_of_a_served_mask_is_small() -> None:
    rng = np.random.default_rng(1)
    classes = np.repeat(rng.integers(0, 3, (16, 1)), 128, axis=1).astype(np.uint8)
    classes = np.repeat(classes, 8, axis=0)  # 128x128 in bands, like a segmentation
    mask = resize_mask(classes, 500, 375)
    data = encode_mask_png(mask)
    np.testing.assert_array_equal(decode_mask_png(data), mask)
    assert len(data) < 2_000  # the repeated rows filter to zeros


def test_mask_png_refuses_what_is_not_a_mask() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_mask_png(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        encode_mask_png(np.zeros((0, 4), np.uint8))


def test_render_overlay_matches_input_size() -> None:
    data = encode_image(Image.new("RGB", (64, 48), (10, 200, 10)))
    out = render_overlay(data, np.zeros((48, 64), np.uint8))
    with Image.open(io.BytesIO(out)) as img:
        assert img.size == (64, 48)
        assert img.mode == "RGB"


def test_class_fractions_of_a_full_size_mask() -> None:
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 3, (375, 500)).astype(np.uint8)
    expected = [float(np.mean(mask == c)) for c in range(3)]
    assert class_fractions(mask) == pytest.approx(expected, abs=1e-12)
    assert class_fractions(mask[:, ::2]) == pytest.approx(  # a non-contiguous view
        [float(np.mean(mask[:, ::2] == c)) for c in range(3)], abs=1e-12
    )


@pytest.mark.parametrize(
    "size", [(500, 375), (375, 500), (128, 128), (64, 48), (1, 1), (2999, 7), (129, 127)]
)
def test_resized_class_fractions_equal_counting_the_resized_mask(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(size[0] * 7 + size[1])
    noise = rng.integers(0, 3, (128, 128)).astype(np.uint8)
    blobs = np.repeat(np.repeat(rng.integers(0, 3, (8, 8)), 16, 0), 16, 1).astype(np.uint8)
    for classes in (noise, blobs):
        mask = resize_mask(classes, *size)
        assert resized_class_fractions(classes, *size) == class_fractions(mask)  # exactly
