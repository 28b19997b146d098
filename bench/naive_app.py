"""The naive baseline: one Flask process that calls `model.predict` inside the request.

`SEG_BENCH_MODEL=path gunicorn -w 1 bench.naive_app:app` (gunicorn's defaults: one sync
worker, one request at a time, as a first deployment would run it); POST /predict with
multipart `image` returns the mask PNG.
"""

from __future__ import annotations

import os

import numpy as np
from flask import Flask, Response, request

from segsvc.ml.preprocess import encode_mask_png, postprocess, preprocess_bytes
from segsvc.ml.unet import load_model

app = Flask(__name__)
model = load_model(os.environ["SEG_BENCH_MODEL"])


@app.post("/predict")
def predict() -> Response:
    """Decode, run the model on this one image, encode the mask."""
    prepared = preprocess_bytes(request.files["image"].read())
    logits = model.predict(prepared.array[np.newaxis], verbose=0)[0]
    mask = postprocess(logits, prepared.width, prepared.height)
    return Response(encode_mask_png(mask), mimetype="image/png")
