"""bench/load.py: what the load generator measures."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from bench import load
from tests.live import serve


def test_latency_is_what_the_client_sees_not_the_jobs_completed_at() -> None:
    """The server stamps completed_at 0.25 s before the client holds the finished job (the
    worker's commit, its notice and the answer come after that stamp): the latency counts
    them too."""

    def api(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        stamped = datetime.now(UTC).isoformat()
        time.sleep(0.25)
        job = {
            "id": "j1",
            "status": "succeeded",
            "completed_at": stamped,
            "metrics": {"batch_size": 1},
        }
        start_response("201 CREATED", [("Content-Type", "application/json")])
        return [json.dumps(job).encode()]

    body = load.Multipart((("pet.jpg", b"jpeg"),))
    with serve(api) as url:
        port = int(url.rsplit(":", 1)[1])
        result = load.run_jobs_load(
            port, {}, [body], clients=1, seconds=0.6, poll_s=0.01, wait_s=10
        )
    assert result.done >= 1
    assert min(result.latencies) >= 0.25
