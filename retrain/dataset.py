"""Read image/mask pairs with the serving pre-processing and feed them to Keras via tf.data."""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf
from PIL import Image

from segsvc.ml import IMAGE_SIZE, NUM_CLASSES
from segsvc.ml.imaging import exif_orientation, load_rgb, turned_the_old_way
from segsvc.ml.preprocess import resize_mask, resize_rgb

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
Sample = tuple[bytes, npt.NDArray[np.uint8]]  # (encoded image, class mask 0..2 at full size)


@dataclass
class DatasetStats:
    """How many pairs were found, used and skipped (with the reason for each skip)."""

    found: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, name: str, error: Exception | str) -> None:
        """Count (by reason) and log (with the underlying cause) a skipped pair."""
        reason = str(error)
        cause = getattr(error, "__cause__", None)
        log.warning("skipping %s: %s%s", name, reason, f" ({cause!r})" if cause else "")
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def merge(self, other: DatasetStats) -> DatasetStats:
        """Sum of two stats (e.g. folder samples plus extra samples)."""
        skipped = Counter(self.skipped) + Counter(other.skipped)
        return DatasetStats(self.found + other.found, self.used + other.used, dict(skipped))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"found": self.found, "used": self.used, "skipped": dict(self.skipped)}


@dataclass
class Decoded:
    """Decoded pairs at model size: images (N,128,128,3) uint8, masks (N,128,128) uint8 0..2."""

    images: npt.NDArray[np.uint8]
    masks: npt.NDArray[np.uint8]
    names: list[str]
    stats: DatasetStats

    def __len__(self) -> int:
        return len(self.names)


class DatasetLayoutError(ValueError):
    """A folder that is not in the Oxford layout (no `images/` folder in it)."""


def list_pairs(data_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """(stem, image path, trimap path) for every image in an Oxford-layout folder, sorted."""
    root = Path(data_dir)
    folder = root / "images"
    if not folder.is_dir():
        raise DatasetLayoutError(
            f"{root} has no images/ folder (the Oxford layout: images/*.jpg and "
            "annotations/trimaps/*.png)"
        )
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    return [(p.stem, p, root / "annotations" / "trimaps" / f"{p.stem}.png") for p in images]


MISSING_TRIMAP = "missing trimap"
# Served images are turned upright by their EXIF orientation; a folder's trimap may have been
# drawn on the upright picture or on the stored pixels: paired the wrong way it would teach (or
# score) masks turned against their images.
EXIF_ROTATED = "EXIF-rotated image: which way its trimap was drawn is unknown"


def pair_problem(image: bytes | Path, trimap_path: Path) -> str | None:
    """Why `read_folder` skips a pair before decoding it (None: it does not): the trimap is not
    a file, or the image is EXIF-rotated (its header read, not its pixels). A pair that passes
    may still be skipped later if a file does not decode."""
    if not trimap_path.is_file():
        return MISSING_TRIMAP
    if exif_rotated(image):
        return EXIF_ROTATED
    return None


def usable_pairs(
    data_dir: str | Path, split: str = "all", val_fraction: float = 0.2
) -> list[tuple[str, Path, Path]]:
    """The pairs of a split that `read_folder` would try to decode (`pair_problem` finds none):
    a count of them checks a folder in seconds, before hours of training."""
    pairs = list_pairs(data_dir)
    wanted = _split_stems([stem for stem, _, _ in pairs], split, val_fraction)
    return [p for p in pairs if p[0] in wanted and pair_problem(p[1], p[2]) is None]


def _split_stems(stems: list[str], split: str, val_fraction: float) -> set[str]:
    if split not in ("train", "val", "all"):
        raise ValueError(f"unknown split {split!r}")
    train, val = split_names(stems, val_fraction)
    return set({"train": train, "val": val, "all": train + val}[split])


def folder_overlap(
    train_dir: str | Path,
    eval_dir: str | Path,
    eval_digests: set[str] | None = None,
    eval_index: NearDuplicateIndex | None = None,
) -> str | None:
    """Why training on `train_dir` would leak `eval_dir`'s images into the model the gate then
    scores on them (the same or a nested folder, or identical image files); None when they are
    apart. Shared names alone are only logged: two folders may name different pictures alike.
    `eval_digests`: `image_digests(eval_dir)`, and `eval_index`:
    `NearDuplicateIndex.of_folder(eval_dir)`, when the caller has them already."""
    train, held_out = Path(train_dir).resolve(), Path(eval_dir).resolve()
    if train == held_out or train in held_out.parents or held_out in train.parents:
        return f"training folder {train} and evaluation folder {held_out} are the same or nested"
    if eval_digests is None:
        eval_digests = image_digests(held_out)
    copies = image_digests(train) & eval_digests
    if copies:
        return f"{len(copies)} identical images are in both folders"
    if eval_index is None:  # not `or`: an index of no telling photos is empty, not absent
        eval_index = NearDuplicateIndex.of_folder(held_out)
    near = near_duplicates(list_pairs(train), eval_index)
    if near:
        pairs = ", ".join(f"{a} ~ {b}" for a, b in near[:3])
        return (
            f"{len(near)} training images are resized, re-encoded, mirrored or cropped copies "
            f"of evaluation images (e.g. {pairs})"
        )
    names = {pair[0] for pair in list_pairs(train)} & {pair[0] for pair in list_pairs(held_out)}
    if names:
        log.warning(
            "%d image names are in both the training and the evaluation folder (e.g. %s): "
            "if they are the same pictures, the gate scores the candidate on images it saw",
            len(names),
            sorted(names)[0],
        )
    return None


# Near-duplicates by a 16x16 difference hash (256 bits): on the Oxford sample the same photo
# at another size or JPEG quality differs by 9-26 bits, different photos by 42 or more.
NEAR_DUPLICATE_BITS = 32
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
MIN_HASH_BITS = 48
# An indexed photo is also hashed cropped: each side cut by 0, 5 or 10% of its length, every
# combination (81 crops, each as it is and mirrored). A copy cropped to 64-100% of the area
# (training augments with 40-100% crops) then lies within NEAR_DUPLICATE_BITS of one of them.
# On the Oxford sample: 5% and 10% per side 238/239, random crops of 80-95% of the area
# anywhere in the photo 94-97%, a 10% cut off one side 238/239; the other photos of the
# sample (whole, cropped) match none, their nearest hash 49 bits away or more.
CROP_CUTS = (0.0, 0.05, 0.1)
_CROPS = tuple(itertools.product(CROP_CUTS, repeat=4))  # (left, top, right, bottom)


def difference_hash(image: Path | bytes) -> npt.NDArray[np.uint8] | None:
    """256-bit difference hash of an image file or its bytes (None if it does not decode):
    each bit says whether a pixel of its 17x16 greyscale thumbnail is brighter than its left
    neighbour."""
    hashes = difference_hashes(image)
    return None if hashes is None else hashes[0]


def difference_hashes(
    image: Path | bytes,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]] | None:
    """`difference_hash` of the image and of its mirror image (one decode): a mirrored copy
    (a selfie camera's, an editor's flip) is as near a copy to training, whose augmentation
    flips half the pictures, as a resized one, but its hash is far from the original's."""
    small = _decoded_grey(image, (68, 64))
    if small is None:
        return None
    return _dhash(small), _dhash(small.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def cropped_difference_hashes(image: Path | bytes) -> list[npt.NDArray[np.uint8]] | None:
    """`difference_hashes` of the image at each of its `_CROPS` (the first two: uncropped),
    from one decode; None if it does not decode."""
    grey = _decoded_grey(image, (136, 128))  # pixels enough for a 5% cut to tell
    if grey is None:
        return None
    width, height = grey.size
    hashes = []
    for left, top, right, bottom in _CROPS:
        box = (
            round(width * left),
            round(height * top),
            round(width * (1 - right)),
            round(height * (1 - bottom)),
        )
        crop = grey.crop(box)
        hashes += [_dhash(crop), _dhash(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT))]
    return hashes


# Hashes are cut from a greyscale copy at most this long a side: a 17x16 hash (of a crop cut
# 5% in, `_CROPS`) needs no more, and a 12-megapixel PNG (which `draft` does not shrink) cut
# and resized 162 times at full size took 2.9 s to index instead of 0.25 s.
HASH_SOURCE_SIDE = 300


def _decoded_grey(image: Path | bytes, draft: tuple[int, int]) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
            img.draft("L", draft)  # JPEG: decoded at a fraction of its size
            grey = img.convert("L")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    width, height = grey.size
    scale = HASH_SOURCE_SIDE / max(width, height)
    if scale >= 1:  # as `draft` leaves most JPEGs
        return grey
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return grey.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def _dhash(grey: Image.Image) -> npt.NDArray[np.uint8]:
    pixels = np.asarray(grey.resize((17, 16), Image.Resampling.BILINEAR), dtype=np.int16)
    return np.packbits((pixels[:, 1:] > pixels[:, :-1]).ravel())


def _telling(h: npt.NDArray[np.uint8] | None) -> bool:
    """Whether a hash has edges enough to tell a copy from a look-alike: a picture of flat
    areas (a drawing, a blank frame) does not (the sample's photos set 66-181 of the 256 bits;
    flat drawings of one rectangle, 28-41, and two different ones may differ by 4)."""
    return h is not None and MIN_HASH_BITS <= int(_POPCOUNT[h].sum()) <= 256 - MIN_HASH_BITS


class NearDuplicateIndex:
    """Difference hashes of named images, to find which one a picture is a resized,
    re-encoded, mirrored or slightly cropped copy of (`NEAR_DUPLICATE_BITS`), which byte
    digests do not see. Each image is indexed at each of its `_CROPS`, as it is and mirrored
    (`cropped_difference_hashes`)."""

    def __init__(self, named: Iterable[tuple[str, Path | bytes]]) -> None:
        names: list[str] = []
        kept: list[npt.NDArray[np.uint8]] = []
        self.images = 0
        for name, image in named:
            hashes = cropped_difference_hashes(image)
            if hashes is None or not _telling(hashes[0]):
                continue
            self.images += 1
            telling = [h for h in hashes if _telling(h)]  # a flat corner tells nothing
            names += [name] * len(telling)
            kept += telling
        self.names = names
        # Word w of every hash in one contiguous row: a query XORs and counts whole rows, and
        # only the hashes within NEAR_DUPLICATE_BITS on their first 128 bits are read further
        # (13x faster than per-hash rows on a 5,000-photo index, the same matches).
        stacked = np.stack(kept) if kept else np.zeros((0, 32), np.uint8)
        self.words = np.ascontiguousarray(stacked.view(np.uint64).T)

    @classmethod
    def of_folder(cls, data_dir: str | Path) -> NearDuplicateIndex:
        """The images of an Oxford-layout folder, by name."""
        return cls((name, path) for name, path, _ in list_pairs(data_dir))

    def __len__(self) -> int:
        """How many images are indexed."""
        return self.images

    def copy_of(self, image: Path | bytes | npt.NDArray[np.uint8] | None) -> str | None:
        """The name of the indexed image that `image` (a file, its bytes, or its hash) is a
        near-identical copy of, as it is, mirrored or slightly cropped; None when it is none's
        (or has too few edges to tell)."""
        h = image if isinstance(image, np.ndarray) or image is None else difference_hash(image)
        if h is None or not len(self.names) or not _telling(h):
            return None
        query = np.ascontiguousarray(h, np.uint8).view(np.uint64)
        # A distance is at least that of its first half: 128 bits fit the uint8 counts.
        half = _bit_count(self.words[0] ^ query[0])
        half += _bit_count(self.words[1] ^ query[1])
        near = np.flatnonzero(half <= NEAR_DUPLICATE_BITS)
        if not len(near):
            return None
        distances = half[near].astype(np.int32)
        for w in (2, 3):
            distances += _bit_count(self.words[w, near] ^ query[w])
        best = int(np.argmin(distances))  # the first of equals, as over all the hashes
        return self.names[near[best]] if distances[best] <= NEAR_DUPLICATE_BITS else None


def _bit_count(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """Set bits of each word: `np.bitwise_count` (NumPy 2), else by a byte table."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).astype(np.uint8, copy=False)
    return _table_bit_count(words)


def _table_bit_count(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    octets = np.ascontiguousarray(words).view(np.uint8).reshape(len(words), 8)
    counts: npt.NDArray[np.uint8] = _POPCOUNT[octets].sum(axis=1, dtype=np.uint8)
    return counts


def near_duplicates(
    train: Sequence[tuple[str, Path, Path]],
    held_out: Sequence[tuple[str, Path, Path]] | NearDuplicateIndex,
) -> list[tuple[str, str]]:
    """(held-out name, training name) of the training images that are near-identical copies
    of a held-out image: resized, re-encoded, mirrored or slightly cropped
    (`NearDuplicateIndex`), which byte digests do not see. `held_out`: the pairs, or their
    index when the caller has built it already."""
    index = (
        held_out
        if isinstance(held_out, NearDuplicateIndex)
        else NearDuplicateIndex((name, path) for name, path, _ in held_out)
    )
    out = []
    for name, path, _ in train:
        if not len(index):
            break
        copied = index.copy_of(path)
        if copied is not None:
            out.append((copied, name))
    return out


def image_digests(data_dir: str | Path) -> set[str]:
    """sha256 of every image file of an Oxford-layout folder (an upload of the same file has
    the same digest as its job's `input_sha256`)."""
    return set(image_digests_by_path(data_dir).values())


def image_digests_by_path(data_dir: str | Path) -> dict[Path, str]:
    """`image_digests`, each by its file's path (as `list_pairs` names it)."""
    return {
        path: hashlib.sha256(path.read_bytes()).hexdigest() for _, path, _ in list_pairs(data_dir)
    }


def evaluation_set_id(pairs: Iterable[tuple[str, Path, Path]], digests: Mapping[Path, str]) -> str:
    """The identity of an evaluation set: sha256 over each usable pair's name, image digest
    (from `digests`, `image_digests_by_path` of its folder: the images are hashed once)
    and trimap digest (`usable_pairs`). mIoUs compare across runs only on the same set, and a
    corrected or added trimap changes the set as surely as a changed photo does."""
    lines = sorted(
        f"{name} {digests[image]} {hashlib.sha256(trimap.read_bytes()).hexdigest()}"
        for name, image, trimap in pairs
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def is_validation(name: str, val_fraction: float = 0.2) -> bool:
    """Stable split rule: the first 32 bits of sha256(stem) as a fraction of 2**32."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < val_fraction


def split_names(names: Iterable[str], val_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Deterministic (train, validation) split by name, independent of order and folder size."""
    ordered = sorted(set(names))
    val = [n for n in ordered if is_validation(n, val_fraction)]
    train = [n for n in ordered if not is_validation(n, val_fraction)]
    return train, val


def read_trimap(path: Path) -> npt.NDArray[np.uint8]:
    """An Oxford trimap (1 pet, 2 background, 3 border) as classes 0..2; raises if invalid."""
    try:
        with Image.open(path) as img:
            raw = np.asarray(img)
    except Exception as exc:  # PIL raises many types for broken PNGs
        raise ValueError("undecodable trimap") from exc
    if raw.ndim != 2:
        raise ValueError(f"trimap is not single-channel (shape {raw.shape})")
    if raw.size == 0 or raw.min() < 1 or raw.max() > NUM_CLASSES:
        raise ValueError("trimap values outside 1..3")
    return (raw.astype(np.int16) - 1).astype(np.uint8)


def decode_pair(
    image_bytes: bytes, mask: npt.NDArray[np.uint8]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Image bytes + full-size class mask -> model-size (image, mask); raises ValueError if bad."""
    mask = np.asarray(mask)
    try:
        img, width, height = load_rgb(image_bytes)
        if mask.ndim == 2 and turned_the_old_way(image_bytes, (width, height), mask.shape[::-1]):
            # A label of a job stored before WebP and XMP orientations stopped counting: its
            # mask was made (and corrected) at the photo's size turned by one.
            img, width, height = load_rgb(image_bytes, legacy=True)
        pixels = resize_rgb(img)
    except Exception as exc:  # PIL raises many types for truncated/garbage files
        raise ValueError("undecodable image") from exc
    if mask.shape != (height, width):
        raise ValueError("mask size does not match image")
    if mask.max(initial=0) >= NUM_CLASSES:
        raise ValueError("mask values outside 0..2")
    return pixels, resize_mask(mask.astype(np.uint8), IMAGE_SIZE, IMAGE_SIZE)


def _stack(
    pairs: list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]],
    names: list[str],
    stats: DatasetStats,
) -> Decoded:
    images = np.zeros((len(pairs), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    masks = np.zeros((len(pairs), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i, (image, mask) in enumerate(pairs):
        images[i], masks[i] = image, mask
    stats.used = len(pairs)
    return Decoded(images, masks, names, stats)


def read_folder(data_dir: str | Path, split: str = "all", val_fraction: float = 0.2) -> Decoded:
    """Decode the pairs of one split ("train", "val" or "all"), skipping broken ones."""
    pairs = list_pairs(data_dir)
    wanted = _split_stems([stem for stem, _, _ in pairs], split, val_fraction)
    stats = DatasetStats()
    decoded: list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]] = []
    names: list[str] = []
    for stem, image_path, trimap_path in pairs:
        if stem not in wanted:
            continue
        stats.found += 1
        data = image_path.read_bytes()
        problem = pair_problem(data, trimap_path)  # the rules `usable_pairs` counts by
        if problem is not None:
            stats.skip(stem, problem)
            continue
        try:
            decoded.append(decode_pair(data, read_trimap(trimap_path)))
        except ValueError as exc:
            stats.skip(stem, exc)
            continue
        names.append(stem)
    return _stack(decoded, names, stats)


def exif_rotated(image: bytes | Path) -> bool:
    """True when an image's EXIF orientation turns or mirrors it (values 2-8); a file is read
    only as far as its header."""
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
            return exif_orientation(img) is not None  # as serving applies it
    except Exception:  # undecodable: decode_pair says so
        return False


def decode_samples(samples: Iterable[Sample], prefix: str = "sample") -> Decoded:
    """Decode in-memory (image bytes, class mask) samples, e.g. user-corrected masks."""
    stats = DatasetStats()
    decoded: list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]] = []
    names: list[str] = []
    for i, (image_bytes, mask) in enumerate(samples):
        stats.found += 1
        try:
            decoded.append(decode_pair(image_bytes, mask))
        except ValueError as exc:
            stats.skip(f"{prefix}-{i}", exc)
            continue
        names.append(f"{prefix}-{i}")
    return _stack(decoded, names, stats)


def concat(a: Decoded, b: Decoded) -> Decoded:
    """Both sets of decoded pairs in one."""
    return Decoded(
        np.concatenate([a.images, b.images]),
        np.concatenate([a.masks, b.masks]),
        a.names + b.names,
        a.stats.merge(b.stats),
    )


def encode_png(pixels: npt.NDArray[np.uint8]) -> bytes:
    """PNG bytes of an array (test helper and sample builder)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# --- tf.data -------------------------------------------------------------------------------


def tf_normalize(pixels: tf.Tensor) -> tf.Tensor:
    """TF twin of `segsvc.ml.preprocess.normalize` (same float32 multiply, bit-identical)."""
    return tf.cast(pixels, tf.float32) * tf.constant(1.0 / 255.0, tf.float32)


def augment(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Random resized crop + horizontal flip (same for image and mask) + mild colour jitter."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=8)
    size = tf.constant([IMAGE_SIZE, IMAGE_SIZE], tf.int32)
    x = tf_normalize(image)[None]
    y = tf.cast(mask, tf.float32)[None, :, :, None]
    # Crop 40-100% of the area with aspect 3:4..4:3; keep the full frame 20% of the time so
    # whole-image framing (what serving sees) stays common.
    area = tf.random.stateless_uniform([], seeds[0], 0.4, 1.0)
    log_ratio = tf.random.stateless_uniform([], seeds[1], -0.288, 0.288)
    ratio = tf.exp(log_ratio)
    h = tf.minimum(tf.sqrt(area / ratio), 1.0)
    w = tf.minimum(tf.sqrt(area * ratio), 1.0)
    top = tf.random.stateless_uniform([], seeds[2], 0.0, 1.0) * (1.0 - h)
    left = tf.random.stateless_uniform([], seeds[3], 0.0, 1.0) * (1.0 - w)
    full = tf.random.stateless_uniform([], seeds[4]) < 0.2
    box = tf.where(
        full, tf.constant([0.0, 0.0, 1.0, 1.0]), tf.stack([top, left, top + h, left + w])
    )
    flip = tf.random.stateless_uniform([], seeds[5]) < 0.5
    # Flipping the crop box's x coordinates mirrors the crop in the same resampling call.
    box = tf.where(flip, tf.stack([box[0], box[3], box[2], box[1]]), box)
    boxes, index = box[None], tf.zeros([1], tf.int32)
    x = tf.image.crop_and_resize(x, boxes, index, size, method="bilinear")[0]
    y = tf.image.crop_and_resize(y, boxes, index, size, method="nearest")[0, :, :, 0]
    x = tf.image.stateless_random_brightness(x, 0.1, seeds[6])
    x = tf.image.stateless_random_contrast(x, 0.8, 1.2, seeds[7])
    x = tf.image.stateless_random_saturation(x, 0.8, 1.2, seeds[6] + 1)
    return tf.clip_by_value(x, 0.0, 1.0), tf.cast(y, tf.int32)


def build_dataset(
    samples: Decoded | Sequence[Sample],
    *,
    batch_size: int = 16,
    training: bool = False,
    seed: int = 0,
) -> tf.data.Dataset:
    """A batched (image float32 [0,1], mask int32) dataset; shuffled and augmented if training."""
    data = samples if isinstance(samples, Decoded) else decode_samples(samples)
    ds = tf.data.Dataset.from_tensor_slices((data.images, data.masks)).cache()
    if training:
        # Reshuffle every epoch but from a fixed seed; per-element seeds for stateless ops
        # make the augmentation reproducible regardless of parallelism.
        ds = ds.shuffle(max(len(data), 1), seed=seed, reshuffle_each_iteration=True)
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda pair, s: augment(pair[0], pair[1], s),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    else:
        ds = ds.map(lambda x, y: (tf_normalize(x), tf.cast(y, tf.int32)))
    # Full batches only while training: a 1-image batch would wreck BatchNorm statistics.
    drop = training and len(data) >= batch_size
    return ds.batch(batch_size, drop_remainder=drop).prefetch(tf.data.AUTOTUNE)
