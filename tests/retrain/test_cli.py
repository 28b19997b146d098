"""`segsvc models check-runtimes`: measure a registered version's faster runtimes again with this
machine's converters and record it, so `SEG_RUNTIME=auto` serves them again after an upgrade."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from segsvc.cli import main
from segsvc.db import session_scope
from segsvc.ml.runtime import converter_fingerprint, faithful_runtimes
from segsvc.models import ModelStatus, ModelVersion
from segsvc.services import registry
from segsvc.settings import Settings, get_settings
from tests.retrain.test_dataset import make_dataset
from tests.retrain.test_evaluate import colour_model

UPGRADED_AWAY = {
    "faithful_runtimes": ["onnx", "litert-int8"],
    "runtime_agreement": {"litert-int8": {"converter": "000000000000", "mask_agreement": 0.999}},
    "mean_iou": 0.9,
}


@pytest.fixture
def as_process(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """The CLI's `get_settings()` on the test database, with an artifact cache of its own."""
    monkeypatch.setenv("SEG_DATABASE_URL", settings.database_url or "")
    monkeypatch.setenv("SEG_ARTIFACT_CACHE_DIR", str(tmp_path / "artifacts"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_check_runtimes_records_a_new_measure_with_these_converters(
    settings: Settings, tmp_path: Path, as_process: None
) -> None:
    model = colour_model(tmp_path / "colour.keras")
    data = make_dataset(tmp_path / "data", n=6)
    with session_scope(settings) as session:
        registry.register_version(
            session=session,
            version="v1",
            path=model,
            status=ModelStatus.PRODUCTION,
            metrics=UPGRADED_AWAY,
        )
    with session_scope(settings) as session:  # measured with other converters: not served
        before = session.get(ModelVersion, "v1")
        assert before is not None
        assert faithful_runtimes(before.metrics).stale == ("litert-int8",)

    result = CliRunner().invoke(
        main,
        ["models", "check-runtimes", "--data", str(data), "--split", "all", "--min-images", "6"],
    )

    assert result.exit_code == 0, result.output
    assert "litert-int8: masks agree on" in result.output
    with session_scope(settings) as session:
        row = session.get(ModelVersion, "v1")
        assert row is not None
        metrics = row.metrics
    measured = metrics["runtime_agreement"]["litert-int8"]
    assert measured["converter"] == converter_fingerprint("litert-int8")
    assert metrics["faithful_runtimes"] == ["onnx"] + (
        ["litert-int8"] if measured["faithful"] else []
    )
    assert faithful_runtimes(metrics).stale == ()
    assert metrics["mean_iou"] == 0.9  # the rest stays
    assert measured["source"].startswith("segsvc models check-runtimes")


def test_check_runtimes_says_what_is_wrong_in_one_line(
    settings: Settings, tmp_path: Path, as_process: None
) -> None:
    data = make_dataset(tmp_path / "data", n=2)
    runner = CliRunner()
    missing = runner.invoke(
        main, ["models", "check-runtimes", "--version", "nope", "--data", str(data)]
    )
    assert missing.exit_code == 1
    assert "No model version 'nope'" in missing.output
    none = runner.invoke(main, ["models", "check-runtimes", "--data", str(data)])
    assert none.exit_code == 1
    assert "no production version" in none.output
    with session_scope(settings) as session:  # registered where another machine keeps it
        registry.register_version(
            session=session,
            version="elsewhere",
            path=tmp_path / "on-another-volume.keras",
            status=ModelStatus.PRODUCTION,
            sha256="0" * 64,
        )
    elsewhere = runner.invoke(main, ["models", "check-runtimes", "--data", str(data)])
    assert elsewhere.exit_code == 1
    assert "not readable here: run this where the workers run" in elsewhere.output
    assert "Traceback" not in elsewhere.output


def test_check_runtimes_refuses_too_few_usable_images_before_converting(
    settings: Settings, tmp_path: Path, as_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It had no minimum, yet records a verdict every worker serves by; and a folder with no
    usable pair failed with "need at least one array to concatenate"."""
    from segsvc.ml import runtime

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted")

    monkeypatch.setattr(runtime, "ensure_artifacts", no_conversion)
    model = colour_model(tmp_path / "colour.keras")
    with session_scope(settings) as session:
        registry.register_version(
            session=session, version="v1", path=model, status=ModelStatus.PRODUCTION
        )
    data = make_dataset(tmp_path / "data", n=4)
    for trimap in (data / "annotations" / "trimaps").iterdir():
        trimap.unlink()  # no usable pair at all
    runner = CliRunner()
    empty = runner.invoke(main, ["models", "check-runtimes", "--data", str(data)])
    assert empty.exit_code == 1
    assert "0 usable image/trimap pairs" in empty.output
    assert "at least 20 needed (SEG_GATE_MIN_EVAL_IMAGES or --min-images" in empty.output
    assert "--split all" in empty.output
    few = make_dataset(tmp_path / "few", n=4)
    refused = runner.invoke(
        main, ["models", "check-runtimes", "--data", str(few), "--split", "all"]
    )
    assert refused.exit_code == 1
    assert "4 usable image/trimap pairs" in refused.output
    flat = tmp_path / "flat"
    flat.mkdir()
    no_images = runner.invoke(main, ["models", "check-runtimes", "--data", str(flat)])
    assert no_images.exit_code == 1
    assert "has no images/ folder" in no_images.output
    with session_scope(settings) as session:
        row = session.get(ModelVersion, "v1")
        assert row is not None
        assert "runtime_agreement" not in row.metrics


def test_runtime_agreement_needs_its_minimum_of_decoded_pairs(tmp_path: Path) -> None:
    from retrain.evaluate import runtime_agreement

    data = make_dataset(tmp_path / "data", n=2)
    (data / "images" / "pet_0.png").write_bytes(b"not a png")  # passes the cheap checks only
    with pytest.raises(ValueError, match=r"1 usable image/trimap pairs .* at least 2 needed"):
        runtime_agreement(
            tmp_path / "unused.keras",
            data,
            kinds=("litert-int8",),
            artifact_dir=tmp_path / "a",
            min_images=2,
        )


def test_train_starts_a_new_models_encoder_from_seg_encoder_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`SEG_ENCODER_WEIGHTS` is documented as the weights file for new models, but `segsvc
    train` built every new model's encoder from random weights."""
    import keras
    import numpy as np

    import retrain.train as train_module
    from segsvc.ml import IMAGE_SIZE

    encoder = keras.applications.MobileNetV2(
        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), include_top=False, weights=None
    )
    conv = encoder.get_layer("Conv1")
    marked = np.full_like(conv.get_weights()[0], 0.0123)
    conv.set_weights([marked])
    weights = tmp_path / "mobilenet_v2.weights.h5"
    encoder.save_weights(weights)
    # No fitting: the saved model is the model as built, so its encoder shows where it began.
    monkeypatch.setattr(train_module, "_fit", lambda *args, **kwargs: {"loss": [1.0]})
    monkeypatch.setenv("SEG_ENCODER_WEIGHTS", str(weights))
    monkeypatch.setenv("SEG_VAR_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    data = make_dataset(tmp_path / "data", n=6)
    out = tmp_path / "new.keras"
    base = ["train", "--data", str(data), "--epochs", "1"]
    fine_tune = ["--encoder-weights", str(weights)]
    try:
        result = CliRunner().invoke(main, [*base, "--out", str(out)])
        refused = CliRunner().invoke(  # a fine-tune keeps its own encoder
            main,
            [*base, "--out", str(tmp_path / "x.keras"), "--init-model", str(out), *fine_tune],
        )
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    saved = keras.models.load_model(out, compile=False)
    kernel = saved.get_layer("encoder").get_layer("Conv1").get_weights()[0]
    np.testing.assert_array_equal(kernel, marked)
    assert refused.exit_code == 2
    assert "--init-model continues one" in refused.output


def test_check_runtimes_refuses_a_file_replaced_since_its_version_was_registered(
    settings: Settings, tmp_path: Path, as_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segsvc.ml import runtime

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured other weights for this version")

    monkeypatch.setattr(runtime, "ensure_artifacts", no_conversion)
    model = colour_model(tmp_path / "colour.keras")
    with session_scope(settings) as session:
        registry.register_version(
            session=session, version="v1", path=model, status=ModelStatus.PRODUCTION
        )
    model.write_bytes(model.read_bytes() + b"other bytes")  # replaced at its path
    data = make_dataset(tmp_path / "data", n=6)
    result = CliRunner().invoke(
        main,
        ["models", "check-runtimes", "--data", str(data), "--split", "all", "--min-images", "6"],
    )
    assert result.exit_code == 1
    assert "v1: model file" in result.output
    assert "not the registered" in result.output
    assert "Traceback" not in result.output
