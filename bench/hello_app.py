"""A plain "hello" WSGI endpoint: the ceiling for the API's submit throughput."""

from __future__ import annotations

from flask import Flask

app = Flask(__name__)


@app.post("/hello")
def hello() -> dict[str, str]:
    """Read the upload and answer (what any submit must do at least)."""
    from flask import request

    request.files.get("image")
    return {"hello": "world"}
