"""Evaluation end to end with a hand-wired model that reads the class off the pixel colour."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from retrain.cli import evaluate as evaluate_cmd
from retrain.evaluate import evaluate, runtime_agreement
from segsvc.ml.convert import converter_fingerprint
from tests.retrain.test_dataset import make_dataset


def colour_model(path: Path) -> Path:
    """1x1 conv: red -> pet, blue -> border, dark -> background (the test images' colours)."""
    inputs = keras.Input((128, 128, 3))
    conv = keras.layers.Conv2D(3, 1)
    model = keras.Model(inputs, conv(inputs))
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    kernel[0, 0, 0, 0] = 10.0  # R -> pet
    kernel[0, 0, 2, 2] = 10.0  # B -> border
    conv.set_weights([kernel, np.array([0.0, 5.0, 0.0], np.float32)])
    model.save(path)
    return path


def test_evaluate_scores_a_perfect_model(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=8)
    model = colour_model(tmp_path / "colour.keras")
    result = evaluate(model_path=model, data_dir=data, split="all", out_dir=tmp_path / "out")

    assert result["images"] == 8
    # Bilinear resizing blurs class edges a little at 128x128; nearest upsizing does too.
    assert result["pixel_accuracy"] > 0.98
    assert result["mean_iou"] > 0.9
    full = result["original_resolution"]
    assert full["pixels"] == 8 * 160 * 120
    assert full["pixel_accuracy"] > 0.97
    assert full["mean_iou"] > 0.85
    saved = json.loads((tmp_path / "out" / "colour_evaluation.json").read_text())
    assert saved["mean_iou"] == pytest.approx(result["mean_iou"])
    with Image.open(tmp_path / "out" / "colour_contact_sheet.png") as sheet:
        assert sheet.height == 6 * 160
        assert sheet.width >= 3 * 160


def test_evaluate_cli(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=12)
    model = colour_model(tmp_path / "colour.keras")
    result = CliRunner().invoke(
        evaluate_cmd,
        ["--model", str(model), "--data", str(data), "--split", "val", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert "mean IoU" in result.output
    saved = json.loads((tmp_path / "colour_evaluation.json").read_text())
    assert saved["split"] == "val"
    assert saved["images"] < 12


def test_runtime_agreement_measures_converted_runtimes_against_keras(tmp_path: Path) -> None:
    """What the retraining pipeline records as a candidate's `faithful_runtimes`."""
    data = make_dataset(tmp_path / "data", n=6)
    model = colour_model(tmp_path / "colour.keras")
    artifacts = tmp_path / "artifacts"
    result = runtime_agreement(model, data, kinds=("onnx", "litert-int8"), artifact_dir=artifacts)

    assert set(result) == {"onnx", "litert-int8"}
    onnx = result["onnx"]
    assert onnx["mask_agreement"] >= 0.999  # float32 ONNX Runtime: the same masks
    assert abs(onnx["miou_drop_points"]) < 0.1
    assert onnx["faithful"] is True
    for kind, r in result.items():
        assert 0.0 <= r["mask_agreement"] <= 1.0
        assert r["faithful"] == (r["mask_agreement"] >= 0.995 and r["miou_drop_points"] <= 0.5)
        # What built the measured artifact, so a worker with other converters does not trust it.
        assert r["converter"] == converter_fingerprint(kind)
        # Converted where the worker looks for them (keyed by the model's sha256).
        assert list(artifacts.glob(f"*/{kind}-*/*"))


def test_a_comparison_sheet_shows_where_two_models_disagree_most(tmp_path: Path) -> None:
    from retrain.evaluate import HEADER_HEIGHT, PANEL_HEIGHT, PANEL_WIDTH, comparison_sheet

    data = make_dataset(tmp_path / "data", n=6)
    names = sorted(p.stem for p in (data / "images").iterdir())
    production = {name: np.ones((128, 128), np.uint8) for name in names}
    candidate = {name: mask.copy() for name, mask in production.items()}
    candidate[names[4]][:64] = 0  # half its pixels differ
    candidate[names[1]][:8] = 2  # a sixteenth
    sheet, shown = comparison_sheet(data, [("production", production), ("candidate", candidate)])
    assert shown == [names[4], names[1]]  # most apart first; those that agree are not shown
    assert sheet.size == (4 * PANEL_WIDTH, HEADER_HEIGHT + 2 * PANEL_HEIGHT)
    # Models that agree everywhere: photos evenly spaced instead, a row for each up to six.
    _, alike = comparison_sheet(data, [("a", production), ("b", production)], rows=3)
    assert alike == [names[0], names[2], names[4]]
