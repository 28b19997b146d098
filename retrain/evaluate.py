"""Evaluate a saved model on a split: metrics at model size and after serving post-processing."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt
from PIL import Image

from retrain.dataset import list_pairs, read_folder, read_trimap
from retrain.metrics import confusion_matrix, mean_iou, summarize
from segsvc.digest import file_sha256
from segsvc.ml import NUM_CLASSES
from segsvc.ml.preprocess import class_map, normalize, postprocess, render_overlay, resize_mask
from segsvc.ml.unet import load_model

SHEET_ROWS = 6
PANEL_HEIGHT = 160
PANEL_WIDTH = 214  # 4:3, the usual photo's


def predict_logits(
    model: keras.Model, images: npt.NDArray[np.uint8], batch_size: int = 16
) -> npt.NDArray[np.float32]:
    """Batched forward pass of uint8 model-size images -> float32 logits."""
    out = np.zeros((len(images), *images.shape[1:3], NUM_CLASSES), np.float32)
    for start in range(0, len(images), batch_size):
        batch = normalize(images[start : start + batch_size])
        out[start : start + batch_size] = np.asarray(model(batch, training=False), np.float32)
    return out


# Faithful (issue 4): on the evaluation images a runtime's masks agree with float32 Keras on at
# least 99.5% of pixels and its mean IoU is at most 0.5 points lower.
FAITHFUL_MIN_AGREEMENT = 0.995
FAITHFUL_MAX_MIOU_DROP = 0.5


def is_faithful(mask_agreement: float, miou_drop_points: float) -> bool:
    """The faithfulness rule, for `runtime_agreement` and `make bench` alike."""
    return mask_agreement >= FAITHFUL_MIN_AGREEMENT and miou_drop_points <= FAITHFUL_MAX_MIOU_DROP


def runtime_agreement(
    model_path: str | Path,
    data_dir: str | Path,
    *,
    kinds: Sequence[str],
    artifact_dir: Path,
    split: str = "all",
    min_images: int = 1,
) -> dict[str, dict[str, Any]]:
    """How close each converted runtime's masks come to float32 Keras on `data_dir`'s images.

    Per kind: `mask_agreement` (share of equal pixels), `miou_drop_points`, `faithful` and, for
    a converted runtime, `converter` (the fingerprint of the converters that built it).
    `SEG_RUNTIME=auto` serves a faster runtime (LiteRT int8) only for a model version whose
    metrics list it under `faithful_runtimes`, so a retrained model is measured like this
    before it is registered. Artifacts are converted into `artifact_dir` at batch size 1 (the
    worker adds the sizes it serves), where the worker will find them. Fewer than `min_images`
    usable pairs raise ValueError before anything is converted.
    """
    from segsvc.ml.convert import CONVERTED_KINDS, converter_fingerprint
    from segsvc.ml.runtime import load_runtime

    data = read_folder(data_dir, split)
    if len(data) < max(min_images, 1):  # a verdict on a handful of images is noise
        raise ValueError(
            f"{len(data)} usable image/trimap pairs in {data_dir} ({split} split); "
            f"at least {max(min_images, 1)} needed"
        )
    reference = predict_logits(load_model(model_path), data.images).argmax(-1)
    keras_miou = mean_iou(confusion_matrix(data.masks, reference))
    sha = file_sha256(model_path)
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        runtime = load_runtime(
            model_path, kind=kind, artifact_dir=artifact_dir, sha256=sha, batch_sizes=(1,)
        )
        pred = np.concatenate(
            [
                runtime.predict(normalize(data.images[i : i + 16])).argmax(-1)
                for i in range(0, len(data), 16)
            ]
        )
        agreement = float((pred == reference).mean())
        drop = (keras_miou - mean_iou(confusion_matrix(data.masks, pred))) * 100.0
        out[kind] = {
            "mask_agreement": round(agreement, 5),
            "miou_drop_points": round(drop, 4),
            "faithful": is_faithful(agreement, drop),
            # What built the measured artifact: a worker with other converters builds another
            # one, and does not take this measure for it (`segsvc.ml.runtime.faithful_runtimes`).
            **({"converter": converter_fingerprint(kind)} if kind in CONVERTED_KINDS else {}),
        }
    return out


def evaluate_model(
    model: keras.Model,
    data_dir: str | Path,
    *,
    split: str = "val",
    val_fraction: float = 0.2,
    batch_size: int = 16,
    keep_predictions: bool = False,
    keep_classes: bool = False,
) -> dict[str, Any]:
    """Metrics at 128x128 and at original resolution (postprocess vs the original trimap).
    `keep_predictions`: the masks at original resolution too (`_predictions`, by name);
    `keep_classes`: the 128x128 class maps (`_classes`, by name), 16 KB an image."""
    data = read_folder(data_dir, split, val_fraction)
    logits = predict_logits(model, data.images, batch_size)
    small = confusion_matrix(data.masks, logits.argmax(-1))
    trimaps = {stem: path for stem, _, path in list_pairs(data_dir)}
    full = np.zeros_like(small)
    predictions: dict[str, npt.NDArray[np.uint8]] = {}
    for name, item in zip(data.names, logits, strict=True):
        truth = read_trimap(trimaps[name])
        pred = postprocess(item, truth.shape[1], truth.shape[0])
        full += confusion_matrix(truth, pred)
        if keep_predictions:
            predictions[name] = pred
    result: dict[str, Any] = {
        "split": split,
        "images": len(data),
        "data": data.stats.to_dict(),
        **summarize(small),
        "original_resolution": summarize(full),
    }
    if keep_predictions:
        result["_predictions"] = predictions
    if keep_classes:
        result["_classes"] = dict(zip(data.names, class_map(logits), strict=True))
    return result


def contact_sheet(
    data_dir: str | Path, names: list[str], predictions: dict[str, npt.NDArray[np.uint8]]
) -> Image.Image:
    """Rows of image | true mask overlay | predicted mask overlay for a person to look at."""
    return _sheet(data_dir, names, [predictions])


def comparison_sheet(
    data_dir: str | Path,
    columns: Sequence[tuple[str, dict[str, npt.NDArray[np.uint8]]]],
    rows: int = SHEET_ROWS,
) -> tuple[Image.Image, list[str]]:
    """Rows of photo | truth | each model's overlay (`columns`: a title and its 128x128 class
    maps by name, as `evaluate_model(keep_classes=True)` gives them, drawn at the photo's size
    as serving post-processes them), under a header naming the columns; the photos where the
    first two models disagree most (share of pixels at model size), evenly spaced picks when
    they agree everywhere. With the names shown."""
    first, second = columns[0][1], columns[1][1]
    names = sorted(first)
    apart = {name: float((first[name] != second[name]).mean()) for name in names}
    picks = sorted((n for n in names if apart[n] > 0), key=lambda n: (-apart[n], n))[:rows]
    if not picks:
        step = max(len(names) / rows, 1.0)
        picks = sorted({names[int(i * step)] for i in range(min(rows, len(names)))})
    sheet = _sheet(data_dir, picks, [classes for _, classes in columns])
    return _with_header(sheet, ["photo", "truth", *(title for title, _ in columns)]), picks


def _sheet(
    data_dir: str | Path, names: list[str], predictions: Sequence[dict[str, npt.NDArray[np.uint8]]]
) -> Image.Image:
    """Rows of image | true mask overlay | one overlay per dict of `predictions` (masks at the
    photo's size, or smaller ones resized to it with nearest-neighbour, as serving does)."""
    paths = {stem: (image, trimap) for stem, image, trimap in list_pairs(data_dir)}
    rows: list[Image.Image] = []
    for name in names:
        image_path, trimap_path = paths[name]
        data = image_path.read_bytes()
        truth = read_trimap(trimap_path)
        height, width = truth.shape
        plain = np.ones_like(truth)  # all background: alpha 0, the bare photo
        shown = [resize_mask(p[name], width, height) for p in predictions]
        masks = [plain, truth, *shown]
        panels = [Image.open(io.BytesIO(render_overlay(data, mask))) for mask in masks]
        # Each panel fitted into the same box, so the columns line up under a header.
        scale = min(PANEL_WIDTH / panels[0].width, PANEL_HEIGHT / panels[0].height)
        size = (max(1, round(panels[0].width * scale)), max(1, round(panels[0].height * scale)))
        at = ((PANEL_WIDTH - size[0]) // 2, (PANEL_HEIGHT - size[1]) // 2)
        row = Image.new("RGB", (len(panels) * PANEL_WIDTH, PANEL_HEIGHT), "white")
        for i, panel in enumerate(panels):
            row.paste(panel.convert("RGB").resize(size), (i * PANEL_WIDTH + at[0], at[1]))
        rows.append(row)
    sheet = Image.new("RGB", (max(r.width for r in rows), PANEL_HEIGHT * len(rows)), "white")
    for i, row in enumerate(rows):
        sheet.paste(row, (0, i * PANEL_HEIGHT))
    return sheet


HEADER_HEIGHT = 24


def _with_header(sheet: Image.Image, titles: list[str]) -> Image.Image:
    """`sheet` under a strip naming its columns (equal widths: the first row's panels)."""
    from PIL import ImageDraw

    out = Image.new("RGB", (sheet.width, sheet.height + HEADER_HEIGHT), "white")
    out.paste(sheet, (0, HEADER_HEIGHT))
    draw = ImageDraw.Draw(out)
    width = sheet.width / len(titles)
    for i, title in enumerate(titles):
        draw.text((i * width + 6, 5), title, fill="black")
    return out


def print_table(result: dict[str, Any], title: str) -> None:
    """A rich table of the metrics at both resolutions."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("128x128", justify="right")
    table.add_column("original", justify="right")
    full = result["original_resolution"]
    rows = [("pixel accuracy", "pixel_accuracy"), ("mean IoU", "mean_iou")]
    for label, key in rows:
        table.add_row(label, f"{result[key]:.4f}", f"{full[key]:.4f}")
    for cls, iou in result["per_class_iou"].items():
        table.add_row(f"IoU {cls}", _iou_text(iou), _iou_text(full["per_class_iou"][cls]))
    Console().print(table)


def _iou_text(iou: float | None) -> str:
    """A class's IoU, or "-" for a class in neither truth nor prediction (no IoU)."""
    return "-" if iou is None else f"{iou:.4f}"


def evaluate(
    *,
    model_path: str | Path,
    data_dir: str | Path,
    split: str = "val",
    out_dir: str | Path,
    val_fraction: float = 0.2,
    print_results: bool = True,
) -> dict[str, Any]:
    """Evaluate, print a table, write `<model>_evaluation.json` and `<model>_contact_sheet.png`."""
    model_path, out = Path(model_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_path)
    result = evaluate_model(
        model, data_dir, split=split, val_fraction=val_fraction, keep_predictions=True
    )
    predictions: dict[str, npt.NDArray[np.uint8]] = result.pop("_predictions")
    names = sorted(predictions)
    # Evenly spaced picks so the rows span the breeds (names sort by breed).
    step = max(len(names) / SHEET_ROWS, 1.0)
    picks = sorted({names[int(i * step)] for i in range(min(SHEET_ROWS, len(names)))})
    result["model"] = str(model_path)
    result["contact_sheet"] = str(out / f"{model_path.stem}_contact_sheet.png")
    result["contact_sheet_images"] = picks
    if picks:
        contact_sheet(data_dir, picks, predictions).save(result["contact_sheet"], optimize=True)
    (out / f"{model_path.stem}_evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    if print_results:
        print_table(result, f"{model_path.name} on {split} ({len(predictions)} images)")
    return result
