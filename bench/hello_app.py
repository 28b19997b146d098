""" "Hello" WSGI endpoints: the ceiling for the API's submit throughput.

`/hello` is the issue's plain endpoint: it answers without looking at the request (gunicorn
still receives the whole body). `/hello-upload` also parses the multipart upload, the least any
submit must do; the report shows the ratio to both.
"""

from __future__ import annotations

from flask import Flask, request

app = Flask(__name__)


@app.post("/hello")
def hello() -> dict[str, str]:
    return {"hello": "world"}


@app.post("/hello-upload")
def hello_upload() -> dict[str, str]:
    request.files.get("image")
    return {"hello": "world"}
