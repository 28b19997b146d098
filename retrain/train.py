"""Train (or fine-tune) the U-Net on an Oxford-layout folder plus optional in-memory samples."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from retrain.dataset import Decoded, Sample, build_dataset, concat, decode_samples, read_folder
from segsvc.files import replace_atomically, write_atomically
from segsvc.ml import NUM_CLASSES
from segsvc.ml.unet import build_unet

log = logging.getLogger(__name__)

# MobileNetV2 ships BatchNorm momentum 0.999 (tuned for ImageNet-length runs). With ~25 steps
# an epoch the moving statistics would lag the from-scratch weights by dozens of epochs and
# validation (inference-mode BN) would look far worse than training; 0.9 tracks them.
BN_MOMENTUM = 0.9


@dataclass
class TrainReport:
    """What a training run did; written as JSON next to the model."""

    model_path: str
    epochs_requested: int
    epochs_run: int
    best_epoch: int
    best_val_miou: float | None
    history: dict[str, list[float]]
    data: dict[str, Any]
    duration_seconds: float
    hardware: str
    tf_version: str
    keras_version: str
    mixed_precision: bool
    args: dict[str, Any]
    command: list[str] = field(default_factory=lambda: list(sys.argv))
    metrics: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)

    def write(self, path: str | Path) -> None:
        """Write the report as indented JSON (whole or not at all)."""
        write_atomically(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())


def save_model_atomically(model: keras.Model, out: Path) -> None:
    """Save into a file of its own beside `out`, fsync it, then rename it over `out`: a worker
    (re)loading `out` meanwhile reads the old model or the new one, never a half-written zip,
    and a crash leaves no truncated file under the registered name. Keras picks the format by
    the temporary file's suffix."""
    replace_atomically(out, lambda tmp: model.save(str(tmp)), suffix=out.suffix)


def hardware_string() -> str:
    """CPU model, core count and GPUs, for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return f"{cpu} x{os.cpu_count()} cores" + (f"; GPUs: {', '.join(gpus)}" if gpus else "")


def mean_iou_metric() -> keras.metrics.Metric:
    """Mean IoU over the 3 classes on argmax of the logits."""
    return keras.metrics.MeanIoU(num_classes=NUM_CLASSES, sparse_y_pred=False, name="miou")


def set_bn_momentum(model: keras.Model, momentum: float = BN_MOMENTUM) -> None:
    """Set every (nested) BatchNormalization layer's momentum."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def _build(init_model: str | Path | None, encoder_weights: str | Path | None = None) -> keras.Model:
    """The U-Net to train: `init_model`'s weights when given (fine-tuning), else a new model
    whose encoder starts from `encoder_weights` (a local MobileNetV2 file; None: random)."""
    model = build_unet(encoder_weights=None if init_model is not None else encoder_weights)
    if init_model is not None:
        # Copy weights rather than training the loaded object, so the dtype policy in force
        # (mixed on GPU) applies and a float32 model can be rebuilt after training.
        source = keras.models.load_model(str(init_model), compile=False)
        model.set_weights(source.get_weights())
    set_bn_momentum(model)
    return model


def train(
    *,
    data_dir: str | Path,
    epochs: int,
    out: str | Path,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    init_model: str | Path | None = None,
    encoder_weights: str | Path | None = None,
    extra_samples: Decoded | Sequence[Sample] | None = None,
    progress: bool = True,
    val_fraction: float = 0.2,
    patience: int = 25,
    weight_decay: float = 1e-4,
    steps_per_epoch: int | None = None,
    checkpoint: str | Path | None = None,
    evaluate_after: bool = True,
) -> TrainReport:
    """Fit, keep the best validation-mIoU weights, save a float32 `.keras` and a JSON report."""
    args = {k: str(v) if isinstance(v, Path) else v for k, v in locals().items()}
    started = time.monotonic()
    args.pop("extra_samples")
    args["extra_samples"] = len(extra_samples or [])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = Path(checkpoint) if checkpoint else out.with_name(f".{out.stem}.best.keras")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)

    train_data = read_folder(data_dir, "train", val_fraction)
    val_data = read_folder(data_dir, "val", val_fraction)
    if extra_samples is not None and len(extra_samples):
        extra = (
            extra_samples
            if isinstance(extra_samples, Decoded)  # decoded already (retraining's labels)
            else decode_samples(extra_samples, prefix="extra")
        )
        train_data = concat(train_data, extra)
    if len(train_data) == 0:
        raise ValueError(f"no usable training pairs in {data_dir}")
    data = _data_summary(train_data, val_data)
    log.info("data: %s", data)

    mixed = bool(tf.config.list_physical_devices("GPU"))
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        model = _build(init_model, encoder_weights)
        history = _fit(
            model, train_data, val_data, ckpt,
            epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
            weight_decay=weight_decay, patience=patience, steps_per_epoch=steps_per_epoch,
            verbose=(1 if sys.stdout.isatty() else 2) if progress else 0,
        )  # fmt: skip
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # Rebuild under float32 and copy the best weights: the saved model computes float32
    # logits on any device, whatever policy training used.
    best = keras.models.load_model(str(ckpt), compile=False) if ckpt.exists() else model
    final = build_unet()
    final.set_weights(best.get_weights())
    set_bn_momentum(final)
    save_model_atomically(final, out)
    ckpt.unlink(missing_ok=True)

    scores = history.get("val_miou", []) if len(val_data) else []
    epochs_run = len(history.get("loss", []))
    # The epoch whose weights were kept: the best on held-out images, else the last.
    best_epoch = max(range(len(scores)), key=scores.__getitem__) + 1 if scores else epochs_run
    report = TrainReport(
        model_path=str(out),
        epochs_requested=epochs,
        epochs_run=epochs_run,
        best_epoch=best_epoch,
        best_val_miou=scores[best_epoch - 1] if scores and len(val_data) else None,
        history=history,
        data=data,
        duration_seconds=round(time.monotonic() - started, 1),
        hardware=hardware_string(),
        tf_version=tf.__version__,
        keras_version=keras.__version__,
        mixed_precision=mixed,
        args=args,
    )
    if evaluate_after and len(val_data):
        from retrain.evaluate import evaluate_model

        report.metrics = evaluate_model(final, data_dir, split="val", val_fraction=val_fraction)
        report.duration_seconds = round(time.monotonic() - started, 1)
    report.write(out.with_suffix(".json"))
    return report


def _data_summary(train_data: Decoded, val_data: Decoded) -> dict[str, Any]:
    return {
        "train": train_data.stats.to_dict(),
        "val": val_data.stats.to_dict(),
        "train_used": len(train_data),
        "val_used": len(val_data),
        "skipped_total": sum(train_data.stats.skipped.values())
        + sum(val_data.stats.skipped.values()),
    }


class EpochLog(keras.callbacks.Callback):  # type: ignore[misc]
    """One log line per epoch (loss, mIoU, time), whatever Keras' own progress display: a
    scheduled run shows it has not hung, in the worker's log and the run's captured log."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self._epochs = epochs
        self._started = time.monotonic()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        shown = ", ".join(f"{k} {float(v):.4f}" for k, v in sorted((logs or {}).items()))
        took = time.monotonic() - self._started
        log.info("epoch %d/%d (%.0f s): %s", epoch + 1, self._epochs, took, shown)


def _fit(
    model: keras.Model,
    train_data: Decoded,
    val_data: Decoded,
    ckpt: Path,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    weight_decay: float,
    patience: int,
    steps_per_epoch: int | None,
    verbose: int,
) -> dict[str, list[float]]:
    train_ds = build_dataset(train_data, batch_size=batch_size, training=True, seed=seed)
    val_ds = build_dataset(val_data, batch_size=batch_size) if len(val_data) else None
    if steps_per_epoch is not None:
        train_ds = train_ds.repeat().take(steps_per_epoch)
    steps = steps_per_epoch or max(len(train_data) // batch_size, 1)
    total = max(epochs * steps, 1)
    # Short linear warm-up then cosine decay: from-scratch BatchNorm nets are unstable at
    # full learning rate in the first updates.
    warmup = min(2 * steps, total // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate * (0.1 if warmup else 1.0),
        decay_steps=max(total - warmup, 1),
        alpha=0.02,
        warmup_target=learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", mean_iou_metric()],
    )
    if val_ds is not None:  # the epoch that scores best on held-out images is kept
        callbacks: list[keras.callbacks.Callback] = [
            keras.callbacks.ModelCheckpoint(
                str(ckpt), monitor="val_miou", mode="max", save_best_only=True, verbose=0
            ),
            keras.callbacks.EarlyStopping(
                monitor="val_miou", mode="max", patience=patience, restore_best_weights=True
            ),
            EpochLog(epochs),
        ]
    else:
        # No held-out images (retraining on labels alone): the last epoch is kept. Chosen by
        # the mIoU of its own augmented training batches, the first epoch often won and the
        # later fine-tuning was thrown away for noise; the gate judges the result anyway.
        callbacks = [keras.callbacks.ModelCheckpoint(str(ckpt), verbose=0), EpochLog(epochs)]
    fit = model.fit(
        train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks, verbose=verbose
    )
    return {k: [round(float(v), 5) for v in vals] for k, vals in fit.history.items()}
