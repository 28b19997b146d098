"""The TensorFlow tutorial U-Net: MobileNetV2 encoder at 128x128, pix2pix-style decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tensorflow as tf

from segsvc.ml import IMAGE_SIZE, NUM_CLASSES

SKIP_LAYERS = (
    "block_1_expand_relu",  # 64x64
    "block_3_expand_relu",  # 32x32
    "block_6_expand_relu",  # 16x16
    "block_13_expand_relu",  # 8x8
    "block_16_project",  # 4x4
)
DECODER_FILTERS = (512, 256, 128, 64)


def upsample(filters: int, name: str) -> tf.keras.Sequential:
    """Conv2DTranspose 3x3 stride 2 + BatchNorm + ReLU (the tutorial's pix2pix.upsample)."""
    init = tf.random_normal_initializer(0.0, 0.02)
    return tf.keras.Sequential(
        [
            tf.keras.layers.Conv2DTranspose(
                filters, 3, strides=2, padding="same", kernel_initializer=init, use_bias=False
            ),
            tf.keras.layers.BatchNormalization(),
            tf.keras.layers.ReLU(),
        ],
        name=name,
    )


def build_encoder(weights: str | Path | None = None) -> tf.keras.Model:
    """MobileNetV2 down to 4x4, returning the five skip activations."""
    base = tf.keras.applications.MobileNetV2(
        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
        include_top=False,
        weights=str(weights) if weights else None,
    )
    outputs = [base.get_layer(name).output for name in SKIP_LAYERS]
    return tf.keras.Model(inputs=base.input, outputs=outputs, name="encoder")


def build_unet(
    *, encoder_weights: str | Path | None = None, decoder_filters: tuple[int, ...] = DECODER_FILTERS
) -> tf.keras.Model:
    """The full U-Net: (N, 128, 128, 3) in [0, 1] -> (N, 128, 128, 3) logits.

    The tutorial feeds [0, 1] images to MobileNetV2 (whose ImageNet weights expect [-1, 1]);
    we keep that so a tutorial-trained model serves unchanged.
    """
    inputs = tf.keras.layers.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    skips = build_encoder(encoder_weights)(inputs)
    x = skips[-1]
    for i, (filters, skip) in enumerate(zip(decoder_filters, reversed(skips[:-1]), strict=True)):
        x = upsample(filters, name=f"up_{i}")(x)
        x = tf.keras.layers.Concatenate(name=f"concat_{i}")([x, skip])
    logits = tf.keras.layers.Conv2DTranspose(
        NUM_CLASSES, 3, strides=2, padding="same", name="logits"
    )(x)
    return tf.keras.Model(inputs=inputs, outputs=logits, name="unet")


def load_model(path: str | Path) -> tf.keras.Model:
    """Load a saved `.keras` U-Net for inference (float32 compute)."""
    model: Any = tf.keras.models.load_model(str(path), compile=False)
    return model
