"""The pair reader, split rule and tf.data pipeline on a tiny generated dataset."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrain.dataset import (
    build_dataset,
    decode_samples,
    read_folder,
    split_names,
    tf_normalize,
)
from segsvc.ml.preprocess import normalize

# Class colours for generated images: a model can read the class straight off the pixel.
COLOURS = np.array([[255, 0, 0], [0, 0, 0], [0, 0, 255]], np.uint8)


def make_mask(width: int, height: int, seed: int) -> np.ndarray:
    """A background frame with a rectangular pet bordered by a 3-pixel border band."""
    rng = np.random.default_rng(seed)
    mask = np.ones((height, width), np.uint8)
    x0, y0 = rng.integers(5, width // 3), rng.integers(5, height // 3)
    x1, y1 = rng.integers(2 * width // 3, width - 5), rng.integers(2 * height // 3, height - 5)
    mask[y0:y1, x0:x1] = 2
    mask[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3] = 0
    return mask


def write_pair(root: Path, stem: str, mask: np.ndarray, fmt: str = "png") -> None:
    """An image coloured by class and its Oxford trimap (values 1..3)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    suffix = "jpg" if fmt == "jpeg" else fmt
    Image.fromarray(COLOURS[mask]).save(root / "images" / f"{stem}.{suffix}", format=fmt.upper())
    Image.fromarray(mask + 1, "L").save(root / "annotations" / "trimaps" / f"{stem}.png")


def make_dataset(root: Path, n: int = 8, size: tuple[int, int] = (160, 120)) -> Path:
    """n valid pairs (PNG images, so colours stay exact) in Oxford layout."""
    for i in range(n):
        write_pair(root, f"pet_{i}", make_mask(*size, seed=i))
    return root


def test_reader_skips_and_counts_broken_pairs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_dataset(tmp_path, n=4)
    write_pair(root, "jpeg_ok", make_mask(150, 100, seed=9), fmt="jpeg")
    (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    Image.new("L", (1, 1), 1).save(root / "annotations" / "trimaps" / "corrupt.png")
    write_pair(root, "truncated", make_mask(150, 100, seed=8), fmt="jpeg")
    jpeg = root / "images" / "truncated.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    write_pair(root, "broken", make_mask(160, 120, seed=5))
    (root / "annotations" / "trimaps" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n junk")
    write_pair(root, "mismatch", make_mask(160, 120, seed=1))
    Image.new("L", (80, 60), 2).save(root / "annotations" / "trimaps" / "mismatch.png")
    write_pair(root, "badvalues", make_mask(160, 120, seed=2))
    Image.new("L", (160, 120), 7).save(root / "annotations" / "trimaps" / "badvalues.png")
    write_pair(root, "orphan", make_mask(160, 120, seed=3))
    (root / "annotations" / "trimaps" / "orphan.png").unlink()

    with caplog.at_level(logging.WARNING, logger="retrain.dataset"):
        data = read_folder(root, "all")

    assert data.stats.found == 11
    assert data.stats.used == len(data) == 5
    assert data.stats.skipped == {
        "undecodable image": 2,
        "undecodable trimap": 1,
        "mask size does not match image": 1,
        "trimap values outside 1..3": 1,
        "missing trimap": 1,
    }
    assert sorted(data.names) == ["jpeg_ok", "pet_0", "pet_1", "pet_2", "pet_3"]
    assert data.images.shape == (5, 128, 128, 3)
    assert data.images.dtype == np.uint8
    assert data.masks.shape == (5, 128, 128)
    assert set(np.unique(data.masks)) == {0, 1, 2}
    assert len([r for r in caplog.records if "skipping" in r.message]) == 6


def test_split_is_deterministic_and_disjoint() -> None:
    names = [f"Breed_{i}" for i in range(1000)]
    train, val = split_names(names)
    assert split_names(list(reversed(names))) == (train, val)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(names)
    assert 150 < len(val) < 250
    # Adding images never moves an existing one across the split.
    train2, val2 = split_names([*names, "New_1", "New_2"])
    assert set(val) <= set(val2)
    assert set(train) <= set(train2)


def test_folder_split_partitions_the_pairs(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, n=12)
    train, val = read_folder(root, "train"), read_folder(root, "val")
    assert sorted(train.names + val.names) == sorted(read_folder(root, "all").names)
    assert set(train.names).isdisjoint(val.names)


def test_tf_normalize_matches_serving_normalize() -> None:
    pixels = np.arange(256 * 3, dtype=np.int64).astype(np.uint8).reshape(16, 16, 3)
    np.testing.assert_array_equal(tf_normalize(pixels).numpy(), normalize(pixels))


def test_validation_pipeline_is_plain_normalized_data(tmp_path: Path) -> None:
    data = read_folder(make_dataset(tmp_path, n=5), "all")
    batches = list(build_dataset(data, batch_size=2))
    assert [len(x) for x, _ in batches] == [2, 2, 1]
    images = np.concatenate([x.numpy() for x, _ in batches])
    masks = np.concatenate([y.numpy() for _, y in batches])
    np.testing.assert_array_equal(images, normalize(data.images))
    np.testing.assert_array_equal(masks, data.masks)


def test_training_augmentation_keeps_image_and_mask_aligned(tmp_path: Path) -> None:
    data = read_folder(make_dataset(tmp_path, n=8), "all")
    ds = build_dataset(data, batch_size=4, training=True, seed=3)
    for images, masks in ds.take(2):
        x, y = images.numpy(), masks.numpy()
        assert x.shape == (4, 128, 128, 3)
        assert x.min() >= 0.0
        assert x.max() <= 1.0
        # Red pixels are the pet class: colour jitter and resampling keep them identifiable.
        red = (x[..., 0] > x[..., 2] + 0.3) & (x[..., 0] > 0.4)
        assert np.mean(red == (y == 0)) > 0.97
    # Same seed, same batches.
    first = [b[0].numpy() for b in build_dataset(data, batch_size=4, training=True, seed=3)]
    again = [b[0].numpy() for b in build_dataset(data, batch_size=4, training=True, seed=3)]
    np.testing.assert_array_equal(first[0], again[0])


def test_in_memory_samples(tmp_path: Path) -> None:
    mask = make_mask(90, 70, seed=4)
    buf = io.BytesIO()
    Image.fromarray(COLOURS[mask]).save(buf, format="PNG")
    good = (buf.getvalue(), mask)
    wrong_size = (buf.getvalue(), mask[:10])
    bad_values = (buf.getvalue(), mask + 5)
    garbage = (b"not an image", mask)
    data = decode_samples([good, wrong_size, bad_values, garbage])
    assert data.stats.to_dict() == {
        "found": 4,
        "used": 1,
        "skipped": {
            "mask size does not match image": 1,
            "mask values outside 0..2": 1,
            "undecodable image": 1,
        },
    }
    batches = list(build_dataset([good, good, good], batch_size=2, training=True))
    assert [len(x) for x, _ in batches] == [2]  # training drops the partial batch


def test_folder_overlap_catches_evaluation_images_in_the_training_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from retrain.dataset import folder_overlap

    train = make_dataset(tmp_path / "train", n=3)
    held_out = make_dataset(tmp_path / "eval", n=2, size=(96, 80))  # pet_0, pet_1 again
    assert folder_overlap(train, held_out) is None  # same names, other pictures: only logged
    assert "2 image names are in both" in caplog.text
    assert "same or nested" in (folder_overlap(train, train) or "")
    assert "same or nested" in (folder_overlap(tmp_path, held_out) or "")
    copy = (train / "images" / "pet_2.png").read_bytes()
    (held_out / "images" / "renamed.png").write_bytes(copy)  # the same file, another name
    assert folder_overlap(train, held_out) == "1 identical images are in both folders"


def test_reader_skips_exif_rotated_images(tmp_path: Path) -> None:
    """A trimap may be drawn on the upright picture or on the stored pixels: unknown, so left
    out rather than paired turned against its image."""
    root = make_dataset(tmp_path, n=2)
    write_pair(root, "turned", make_mask(160, 120, seed=4), fmt="jpeg")
    jpeg = root / "images" / "turned.jpg"
    with Image.open(jpeg) as img:
        exif = img.getexif()
        exif[0x0112] = 3  # rotated 180 degrees
        img.save(jpeg, format="JPEG", exif=exif.tobytes())
    decoded = read_folder(root, "all")
    assert decoded.names == ["pet_0", "pet_1"]
    assert decoded.stats.skipped == {
        "EXIF-rotated image: which way its trimap was drawn is unknown": 1
    }


def test_folder_overlap_sees_a_resized_copy_of_a_training_photo(tmp_path: Path) -> None:
    """Oxford-IIIT Pet holds the same photo at two sizes (Abyssinian_99 at 450x299 and
    Abyssinian_151 at 350x233 in the sample): byte digests miss it, and an evaluation folder
    carved from the same data let the gate score a candidate on a photo it trained on."""
    from retrain.dataset import folder_overlap
    from tests.conftest import _sample_dir

    sample = _sample_dir()
    if not (sample / "images" / "Abyssinian_151.jpg").is_file():
        pytest.skip("the Oxford pets sample is not available")
    for folder, names in (
        ("train", ["Abyssinian_99", "Abyssinian_1"]),
        ("eval", ["Abyssinian_151"]),
    ):
        for sub in ("images", "annotations/trimaps"):
            (tmp_path / folder / sub).mkdir(parents=True)
        for name in names:
            (tmp_path / folder / "images" / f"{name}.jpg").write_bytes(
                (sample / "images" / f"{name}.jpg").read_bytes()
            )
            (tmp_path / folder / "annotations" / "trimaps" / f"{name}.png").write_bytes(
                (sample / "annotations" / "trimaps" / f"{name}.png").read_bytes()
            )
    found = folder_overlap(tmp_path / "train", tmp_path / "eval")
    assert found is not None
    assert "Abyssinian_151 ~ Abyssinian_99" in found
    # Different photos of the same breed are not copies.
    (tmp_path / "train" / "images" / "Abyssinian_99.jpg").unlink()
    assert folder_overlap(tmp_path / "train", tmp_path / "eval") is None


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_a_label_made_when_webp_and_xmp_orientations_counted_still_pairs_with_its_photo(
    fmt: str,
) -> None:
    """A job stored before WebP and XMP orientations stopped counting was masked (and
    corrected) at its photo turned by one: retraining dropped its label, 'mask size does not
    match image'."""
    from retrain.dataset import decode_pair
    from tests.api.test_hostile_input import turned_the_old_way

    buf = io.BytesIO(turned_the_old_way(fmt))
    old_label = np.zeros((300, 200), np.uint8)  # 200 wide, 300 high: the turned photo's size
    pixels, mask = decode_pair(buf.getvalue(), old_label)
    assert pixels.shape == (128, 128, 3)
    assert mask.shape == (128, 128)
    new_label = np.zeros((200, 300), np.uint8)  # as the photo is shown now
    assert decode_pair(buf.getvalue(), new_label)[1].shape == (128, 128)
    with pytest.raises(ValueError, match="mask size does not match image"):
        decode_pair(buf.getvalue(), np.zeros((100, 100), np.uint8))


def jpeg_of(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def cropped(path: Path, per_side: float, *, mirror: bool = False) -> bytes:
    """The photo at `path` with `per_side` of its width and height cut off each side."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    dx, dy = round(w * per_side), round(h * per_side)
    crop = rgb.crop((dx, dy, w - dx, h - dy))
    return jpeg_of(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else crop)


@pytest.mark.timeout(300)
def test_a_slightly_cropped_copy_of_an_evaluation_photo_is_recognised_and_no_other_photo() -> None:
    """Training augments with 40-100% crops: a label of an evaluation photo cropped a little
    leaks as surely as a resized copy. Distinct photos of the sample must match none."""
    from retrain.dataset import (
        NEAR_DUPLICATE_BITS,
        NearDuplicateIndex,
        difference_hash,
        list_pairs,
    )
    from tests.conftest import _sample_dir

    pairs = list_pairs(_sample_dir())
    if len(pairs) < 400:
        pytest.skip("the Oxford pets sample is not available")
    held_out, others = pairs[:40], pairs[40:]
    index = NearDuplicateIndex((name, path) for name, path, _ in held_out)
    missed = [
        (name, per_side, mirror)
        for name, path, _ in held_out
        for per_side, mirror in ((0.05, False), (0.1, False), (0.1, True))
        if index.copy_of(cropped(path, per_side, mirror=mirror)) != name
    ]
    assert not missed, f"{len(missed)} of {3 * len(held_out)} cropped copies not recognised"
    # Oxford-IIIT Pet's own copies (the same photo at two sizes, as Abyssinian_11 and
    # Abyssinian_177 in the sample) are not distinct: the whole-photo hash pairs them already.
    whole = np.stack([difference_hash(path) for _, path, _ in held_out])
    distinct = [
        (name, path)
        for name, path, _ in others
        if np.unpackbits(whole ^ difference_hash(path), axis=1).sum(axis=1).min()
        > NEAR_DUPLICATE_BITS
    ]
    assert len(distinct) >= len(others) - 5
    matched = [
        name
        for name, path in distinct
        for image in (path, cropped(path, 0.05))
        if index.copy_of(image) is not None
    ]
    assert not matched, f"distinct photos taken for evaluation photos: {matched}"


def test_folder_overlap_sees_a_cropped_copy_of_an_evaluation_photo(tmp_path: Path) -> None:
    from retrain.dataset import folder_overlap, list_pairs
    from tests.conftest import _sample_dir

    pairs = list_pairs(_sample_dir())
    if len(pairs) < 4:
        pytest.skip("the Oxford pets sample is not available")
    for folder in ("train", "eval"):
        for sub in ("images", "annotations/trimaps"):
            (tmp_path / folder / sub).mkdir(parents=True)
    (name, path, trimap), (other, other_path, other_trimap) = pairs[0], pairs[1]
    (tmp_path / "eval" / "images" / f"{name}.jpg").write_bytes(path.read_bytes())
    (tmp_path / "eval" / "annotations" / "trimaps" / f"{name}.png").write_bytes(trimap.read_bytes())
    (tmp_path / "train" / "images" / "crop.jpg").write_bytes(cropped(path, 0.1))
    (tmp_path / "train" / "images" / f"{other}.jpg").write_bytes(other_path.read_bytes())
    for stem, source in (("crop", trimap), (other, other_trimap)):
        (tmp_path / "train" / "annotations" / "trimaps" / f"{stem}.png").write_bytes(
            source.read_bytes()
        )
    found = folder_overlap(tmp_path / "train", tmp_path / "eval")
    assert found is not None
    assert f"{name} ~ crop" in found


def textured(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like picture: smooth random shading with edges enough to hash."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 18, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.Resampling.BICUBIC)


def test_a_large_png_evaluation_photo_is_indexed_quickly_and_its_crop_still_matched(
    tmp_path: Path,
) -> None:
    """`draft` shrinks only JPEGs: a 3000x2000 PNG was cut and resized 162 times at full size
    (1.4 s a photo, hours for a folder of them) before it was reduced once."""
    import time

    from retrain.dataset import NearDuplicateIndex

    photo = textured(3000, 2000, seed=1)
    path = tmp_path / "big.png"
    photo.save(path, "PNG")
    started = time.perf_counter()
    index = NearDuplicateIndex([("big", path)])
    assert time.perf_counter() - started < 5.0  # ~0.3 s here; unreduced it took far longer
    assert len(index) == 1
    assert index.copy_of(path) == "big"
    dx, dy = 150, 100  # 5% of each side cut off, re-encoded smaller
    copy = photo.crop((dx, dy, 3000 - dx, 2000 - dy)).resize((900, 600))
    assert index.copy_of(jpeg_of(copy)) == "big"
    assert index.copy_of(jpeg_of(textured(900, 600, seed=2))) is None


def test_folder_overlap_uses_the_given_evaluation_index_without_hashing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline indexes the evaluation folder once, for the labels and the folder check."""
    import retrain.dataset as dataset

    for folder in ("train", "eval"):
        for sub in ("images", "annotations/trimaps"):
            (tmp_path / folder / sub).mkdir(parents=True)
    photo = textured(400, 300, seed=3)
    photo.save(tmp_path / "eval" / "images" / "pet.png")
    (tmp_path / "train" / "images" / "crop.jpg").write_bytes(
        jpeg_of(photo.crop((20, 15, 380, 285)))
    )
    index = dataset.NearDuplicateIndex.of_folder(tmp_path / "eval")
    indexed: list[object] = []
    real = dataset.cropped_difference_hashes

    def counted(image: Path | bytes) -> object:
        indexed.append(image)
        return real(image)

    monkeypatch.setattr(dataset, "cropped_difference_hashes", counted)
    found = dataset.folder_overlap(tmp_path / "train", tmp_path / "eval", eval_index=index)
    assert found is not None
    assert "pet ~ crop" in found
    assert indexed == []  # not hashed again
    assert dataset.folder_overlap(tmp_path / "train", tmp_path / "eval") == found
    assert len(indexed) == 1  # without an index, it builds its own


def test_near_duplicate_index_works_without_numpy_bitwise_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pyproject allows NumPy 1.26, which has no `np.bitwise_count`: the same matches."""
    from retrain.dataset import NearDuplicateIndex

    photos = [(f"p{i}", jpeg_of(textured(300, 200, seed=10 + i))) for i in range(3)]
    index = NearDuplicateIndex(photos)
    queries = [data for _, data in photos] + [jpeg_of(textured(300, 200, seed=20))]
    expected = [index.copy_of(q) for q in queries]
    assert expected == ["p0", "p1", "p2", None]
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert [index.copy_of(q) for q in queries] == expected


def test_near_duplicate_index_finds_what_comparing_every_hash_finds() -> None:
    """Only hashes near on their first 128 bits are compared further: the nearest within
    `NEAR_DUPLICATE_BITS`, the first of equals, as a comparison with every hash gives."""
    from retrain.dataset import NEAR_DUPLICATE_BITS, NearDuplicateIndex

    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2, (400, 256), dtype=np.uint8)
    bits[200:] = bits[:200]  # equals: the first must win
    bits[200:, :40] ^= 1  # ...unless nearer
    index = NearDuplicateIndex([])
    index.names = [f"h{i}" for i in range(len(bits))]
    index.images = len(bits)
    index.words = np.ascontiguousarray(np.packbits(bits, axis=1).view(np.uint64).T)
    for i in range(300):
        query = bits[i % 200].copy()
        flips = rng.choice(256, size=rng.integers(25, 40), replace=False)
        query[flips] ^= 1
        distances = np.abs(bits.astype(np.int16) - query).sum(axis=1)
        best = int(np.argmin(distances))
        expected = f"h{best}" if distances[best] <= NEAR_DUPLICATE_BITS else None
        assert index.copy_of(np.packbits(query)) == expected
