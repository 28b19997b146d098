"""The shipped baseline loads and segments real validation photos well enough to serve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrain.dataset import list_pairs, read_trimap, split_names
from retrain.metrics import confusion_matrix, pixel_accuracy
from segsvc.ml.preprocess import postprocess, preprocess_bytes
from segsvc.ml.unet import load_model
from tests.conftest import SAMPLE_DIR

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "baseline.keras"
SAMPLE = SAMPLE_DIR  # SEG_TEST_SAMPLE_DIR, else beside the checkout (tests/conftest.py)


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load_model(MODEL)


def test_baseline_loads_and_outputs_float32_logits(model) -> None:  # type: ignore[no-untyped-def]
    assert MODEL.stat().st_size < 30 * 1024 * 1024
    logits = np.asarray(model(np.zeros((2, 128, 128, 3), np.float32), training=False))
    assert logits.shape == (2, 128, 128, 3)
    assert logits.dtype == np.float32


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="Oxford pets sample not present")
def test_baseline_segments_validation_photos(model) -> None:  # type: ignore[no-untyped-def]
    pairs = {stem: (image, trimap) for stem, image, trimap in list_pairs(SAMPLE)}
    _, val = split_names(pairs)
    picks = val[:: max(len(val) // 6, 1)][:6]  # spread over the three breeds
    prepared = [preprocess_bytes(pairs[name][0].read_bytes()) for name in picks]
    logits = np.asarray(model(np.stack([p.array for p in prepared]), training=False))
    cm = sum(
        confusion_matrix(read_trimap(pairs[name][1]), postprocess(lg, p.width, p.height))
        for name, p, lg in zip(picks, prepared, logits, strict=True)
    )
    assert pixel_accuracy(cm) > 0.75  # type: ignore[arg-type]
