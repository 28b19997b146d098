"""A short real training run on a tiny generated dataset."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from retrain.train import BN_MOMENTUM, _build, train
from segsvc.ml.unet import load_model
from tests.retrain.test_dataset import COLOURS, make_dataset, make_mask


@pytest.mark.slow
def test_short_run_saves_a_loadable_model_and_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="retrain")
    data = make_dataset(tmp_path / "data", n=10)
    (data / "images" / "broken.jpg").write_bytes(b"garbage")
    mask = make_mask(64, 48, seed=11)
    from retrain.dataset import encode_png

    extra = [(encode_png(COLOURS[mask]), mask), (b"junk", mask)]
    out = tmp_path / "model" / "tiny.keras"
    report = train(
        data_dir=data,
        epochs=1,
        out=out,
        batch_size=2,
        steps_per_epoch=2,
        extra_samples=extra,
        progress=False,
        checkpoint=tmp_path / "ckpt" / "best.keras",
    )

    assert out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.json", "tiny.keras"]  # no temp
    assert not (tmp_path / "ckpt" / "best.keras").exists()  # scratch checkpoint cleaned up
    # without Keras' progress display (a scheduled run), each epoch is still logged
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epochs) == 1
    assert epochs[0].startswith("epoch 1/1 (")
    assert "miou" in epochs[0]
    model = load_model(out)
    logits = np.asarray(model(np.zeros((1, 128, 128, 3), np.float32), training=False))
    assert logits.shape == (1, 128, 128, 3)
    assert logits.dtype == np.float32

    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["epochs_run"] == report.epochs_run == 1
    assert saved["best_epoch"] == 1
    assert set(saved["history"]) >= {"loss", "accuracy", "miou", "val_loss", "val_miou"}
    counts = saved["data"]
    assert counts["train"]["found"] + counts["val"]["found"] == 13  # 11 in folder + 2 extra
    assert counts["train_used"] + counts["val_used"] == 11  # 10 folder pairs + 1 extra sample
    assert counts["skipped_total"] == 2
    assert saved["args"]["extra_samples"] == 2
    assert saved["tf_version"]
    assert saved["hardware"]
    assert saved["duration_seconds"] > 0
    assert 0.0 <= saved["metrics"]["pixel_accuracy"] <= 1.0
    assert "original_resolution" in saved["metrics"]


@pytest.mark.slow
def test_init_model_weights_are_copied(tmp_path: Path) -> None:
    import keras

    keras.utils.set_random_seed(1)
    source = _build(None)
    path = tmp_path / "init.keras"
    source.save(path)
    keras.utils.set_random_seed(2)
    model = _build(path)
    for a, b in zip(source.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    momenta = {
        layer.momentum
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert momenta == {BN_MOMENTUM}


def test_a_model_save_that_fails_leaves_the_old_file_whole(tmp_path: Path) -> None:
    """`train --out` may name the file a registered version serves: it is replaced whole or
    not at all (a worker loading it mid-write read a truncated zip)."""
    from retrain.train import save_model_atomically

    out = tmp_path / "baseline.keras"
    out.write_bytes(b"the registered model")

    class Failing:
        def save(self, path: str) -> None:
            Path(path).write_bytes(b"half a zi")
            raise OSError("disk full")

    class Saving:
        def save(self, path: str) -> None:
            assert path.endswith(".keras")  # Keras picks the format by the suffix
            Path(path).write_bytes(b"the new model")

    with pytest.raises(OSError, match="disk full"):
        save_model_atomically(Failing(), out)  # type: ignore[arg-type]
    assert out.read_bytes() == b"the registered model"
    assert [p.name for p in tmp_path.iterdir()] == ["baseline.keras"]
    save_model_atomically(Saving(), out)  # type: ignore[arg-type]
    assert out.read_bytes() == b"the new model"
    assert [p.name for p in tmp_path.iterdir()] == ["baseline.keras"]


def test_labels_alone_keep_the_last_epochs_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no held-out images (retraining on labels alone) the checkpoint was the epoch with
    the best mIoU on its own augmented batches, often the first: later fine-tuning was thrown
    away for noise. The last epoch's weights are kept."""
    import retrain.train as train_module
    from retrain.dataset import encode_png

    epoch_weights: list[list[np.ndarray]] = []

    class Recording(train_module.EpochLog):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            super().on_epoch_end(epoch, logs)
            epoch_weights.append([np.array(w) for w in self.model.get_weights()])

    monkeypatch.setattr(train_module, "EpochLog", Recording)
    empty = tmp_path / "none"
    (empty / "images").mkdir(parents=True)
    masks = [make_mask(64, 48, seed=seed) for seed in range(4)]
    out = tmp_path / "ft.keras"
    report = train(
        data_dir=empty,
        epochs=3,
        out=out,
        batch_size=2,
        steps_per_epoch=1,
        learning_rate=1e-2,
        extra_samples=[(encode_png(COLOURS[m]), m) for m in masks],
        progress=False,
        checkpoint=tmp_path / "ckpt" / "best.keras",
        evaluate_after=False,
    )
    assert (report.epochs_run, report.best_epoch, report.best_val_miou) == (3, 3, None)
    saved = load_model(out).get_weights()
    assert len(epoch_weights) == 3
    assert all(np.allclose(a, b) for a, b in zip(saved, epoch_weights[-1], strict=True))
