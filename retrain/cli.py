"""Click commands `train`, `evaluate` and `models check-runtimes`, loaded lazily by `segsvc.cli`."""

from __future__ import annotations

import logging
from pathlib import Path

import click


@click.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--epochs", required=True, type=click.IntRange(min=1))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model .keras path.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", "learning_rate", default=1e-3, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--init-model", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--patience", default=25, show_default=True, type=click.IntRange(min=1))
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None)
@click.option(
    "--encoder-weights",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A local MobileNetV2 weights file for a new model's encoder (not with --init-model) "
    "[default: SEG_ENCODER_WEIGHTS].",
)
def train(
    data_dir: str,
    epochs: int,
    out: str,
    batch_size: int,
    learning_rate: float,
    seed: int,
    init_model: str | None,
    patience: int,
    checkpoint: str | None,
    encoder_weights: str | None,
) -> None:
    """Train the U-Net on an Oxford-layout folder; writes OUT and OUT.json (report)."""
    from retrain.train import train as run_train
    from segsvc.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if init_model is not None and encoder_weights is not None:
        raise click.UsageError("--encoder-weights starts a new model; --init-model continues one")
    if init_model is None and encoder_weights is None:
        setting = get_settings().encoder_weights
        if setting is not None and not Path(setting).is_file():
            raise click.UsageError(f"SEG_ENCODER_WEIGHTS: no file {setting}")
        encoder_weights = str(setting) if setting is not None else None
    if checkpoint is None:
        checkpoint = str(get_settings().var_dir / "train" / f"{Path(out).stem}.best.keras")
    report = run_train(
        data_dir=data_dir,
        epochs=epochs,
        out=out,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        init_model=init_model,
        encoder_weights=encoder_weights,
        patience=patience,
        checkpoint=checkpoint,
    )
    click.echo(
        f"saved {out}: {report.epochs_run} epochs, best epoch {report.best_epoch}, "
        f"val mIoU {report.best_val_miou}, {report.duration_seconds:.0f}s"
    )
    if report.metrics:
        m = report.metrics
        click.echo(
            f"val pixel accuracy {m['pixel_accuracy']:.4f}, mean IoU {m['mean_iou']:.4f} "
            f"(original resolution {m['original_resolution']['pixel_accuracy']:.4f}, "
            f"{m['original_resolution']['mean_iou']:.4f})"
        )


@click.command("evaluate")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="val", show_default=True, type=click.Choice(["val", "all"]))
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False))
def evaluate(model_path: str, data_dir: str, split: str, out_dir: str | None) -> None:
    """Evaluate a model; prints a table, writes JSON and a contact sheet to OUT."""
    from retrain.evaluate import evaluate as run_evaluate

    if out_dir is None:
        from segsvc.settings import get_settings

        out_dir = str(get_settings().var_dir / "eval")
    result = run_evaluate(model_path=model_path, data_dir=data_dir, split=split, out_dir=out_dir)
    click.echo(f"wrote {out_dir} (contact sheet {result['contact_sheet']})")


@click.command("check-runtimes")
@click.option("--version", default=None, help="A registered version [default: production].")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Labelled images: images/*.jpg and annotations/trimaps/*.png.",
)
@click.option("--split", default="val", show_default=True, type=click.Choice(["val", "all"]))
@click.option(
    "--min-images",
    type=click.IntRange(min=1),
    default=None,
    help="Usable image/trimap pairs the split must hold [default: SEG_GATE_MIN_EVAL_IMAGES].",
)
def check_runtimes(version: str | None, data_dir: str, split: str, min_images: int | None) -> None:
    """Measure again whether the faster runtimes stay faithful to a version, with this
    machine's converters, and record it in the registry. Run it after TensorFlow or LiteRT
    changed: until then `SEG_RUNTIME=auto` serves such a version with exact ONNX Runtime.
    Workers use the new measure from their next load of the version (a restart). The fleet
    serves by this verdict, so the split must hold at least --min-images usable pairs."""
    from retrain.dataset import usable_pairs
    from retrain.evaluate import runtime_agreement
    from segsvc.db import session_scope
    from segsvc.errors import SegError
    from segsvc.ml.convert import (
        ConversionError,
        ModelFileMismatchError,
        check_model_file,
        converter_fingerprint,
    )
    from segsvc.ml.runtime import CPU_FASTER
    from segsvc.models import utcnow
    from segsvc.services.registry import (
        get_version,
        production_version,
        record_runtime_agreement,
    )
    from segsvc.settings import get_settings

    cfg = get_settings()
    needed = min_images or cfg.gate_min_eval_images
    try:
        with session_scope(cfg) as session:
            row = (
                get_version(session=session, version=version)
                if version
                else production_version(session=session)
            )
            if row is None:
                raise click.ClickException("no production version; run `segsvc models init`")
            if row.file_deleted_at is not None:
                raise click.ClickException(f"{row.version}'s model file was deleted")
            version, path, sha256 = row.version, row.path, row.sha256
        if not Path(path).is_file():
            raise click.ClickException(
                f"{version}'s model file {path} is not readable here: run this where the "
                "workers run (their image, their volume)"
            )
        try:  # a measure of other weights must not be recorded as this version's
            check_model_file(path, sha256)
        except ModelFileMismatchError as exc:
            raise click.ClickException(f"{version}: {exc}") from None
        try:
            pairs = len(usable_pairs(data_dir, split))
        except ValueError as exc:  # no images/ folder
            raise click.ClickException(str(exc)) from None
        if pairs < needed:  # checked before minutes of conversion, and before any verdict
            raise click.ClickException(
                f"{pairs} usable image/trimap pairs in {data_dir} ({split} split); at least "
                f"{needed} needed (SEG_GATE_MIN_EVAL_IMAGES or --min-images"
                f"{'; --split all uses every image' if split == 'val' else ''})"
            )
        click.echo(
            f"measuring {', '.join(CPU_FASTER)} against float32 Keras for {version} with this "
            f"machine's converters ({', '.join(converter_fingerprint(k) for k in CPU_FASTER)}) ..."
        )
        try:
            agreement = runtime_agreement(
                path,
                data_dir,
                kinds=CPU_FASTER,
                artifact_dir=cfg.artifact_dir,
                split=split,
                min_images=needed,
            )
        except (ConversionError, OSError, ValueError) as exc:
            raise click.ClickException(f"could not measure {version}: {exc}") from exc
        with session_scope(cfg) as session:
            record_runtime_agreement(
                session=session,
                version=version,
                agreement=agreement,
                source=f"segsvc models check-runtimes {utcnow():%Y-%m-%dT%H:%MZ}, {split} split",
            )
    except SegError as exc:
        raise click.ClickException(exc.message) from None
    for kind, result in agreement.items():
        click.echo(
            f"{kind}: masks agree on {result['mask_agreement']:.2%}, mIoU drop "
            f"{result['miou_drop_points']:.2f} points: "
            f"{'faithful' if result['faithful'] else 'NOT faithful'} "
            f"(converters {result.get('converter', '-')})"
        )
    click.echo(f"recorded for {version}; workers use it from their next load of it")


@click.group()
def main() -> None:
    """Training and evaluation commands."""


main.add_command(train)
main.add_command(evaluate)
main.add_command(check_runtimes)

if __name__ == "__main__":
    main()
