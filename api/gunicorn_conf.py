"""gunicorn settings for the API: `gunicorn -c python:api.gunicorn_conf api.wsgi:app`.

prometheus-client picks its multiprocess value store when it is first imported, so the metrics
folder is set here, before anything imports it; every worker inherits it through the fork.
Command-line flags (`--bind`, `--workers`) override the values below.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any

os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="segsvc-prom-"))

from gunicorn import glogging
from gunicorn import util as gunicorn_util

from segsvc import notify
from segsvc.logging_setup import configure_logging
from segsvc.settings import get_settings

M_ARENA_MAX = -8  # glibc's mallopt parameter number


def _cap_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas, as MALLOC_ARENA_MAX would (unless that is set already).

    glibc gives threads their own arenas, up to 8 per core; with a dozen threads per process
    that alone added about 20 MB to each API process's RSS. Set here, in the master before it
    forks, the cap holds in every worker.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    with suppress(OSError, AttributeError):  # not glibc: nothing to cap
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)


_cap_malloc_arenas()


def with_metrics_port(binds: list[str], port: int) -> list[str]:
    """gunicorn's listen addresses plus `SEG_METRICS_PORT` on the first one's host, where
    /metrics answers (and nothing else: `api/metrics.py`)."""
    if not port or not binds:
        return binds
    host, sep, _ = binds[0].rpartition(":")
    if not sep or binds[0].startswith(("unix:", "fd://")):
        host = "0.0.0.0"  # noqa: S104 - a socket file's server has no host of its own
    metrics = f"{host}:{port}"
    return binds if metrics in binds else [*binds, metrics]


# The API's port, and SEG_METRICS_PORT beside it (where only /metrics answers: api/metrics.py).
# Both here, not added at start: a reload (SIGHUP) reads this file again, and a listen address
# that changed makes gunicorn close and reopen its sockets, which its workers still hold: it
# then stopped. A `--bind` on the command line replaces this list: name both ports there.
bind = with_metrics_port(
    [os.environ.get("GUNICORN_BIND", f"0.0.0.0:{get_settings().port}")],
    get_settings().metrics_port,
)
# No control socket (gunicorn 25.1+ opens ~/.gunicorn/gunicorn.ctl by default): one path for
# every gunicorn of the user, each start taking it from the last, and it takes worker and
# shutdown commands; where HOME cannot be written (the images) each start logged a failure.
control_socket_disable = True
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
# A long poll (`GET /v1/jobs/<id>?wait=`) holds a thread while it waits (no CPU, no DB
# connection); SEG_LONG_POLL_MAX_WAITERS (8) caps them per process, so 4 of the 12 threads are
# always free for submits and short reads.
threads = int(os.environ.get("GUNICORN_THREADS", "12"))
# gthread, with a clock on reading each request (SEG_REQUEST_HEADER_TIMEOUT_SECONDS and
# SEG_REQUEST_BODY_*): gunicorn's own waits for a request's bytes for ever, so clients that send
# headers or bodies that never end held every thread (api/gunicorn_worker.py).
worker_class = "api.gunicorn_worker.TimedThreadWorker"
# Every answer through the worker's timed sendall (sendfile would write past it); the files
# the API serves (the web page's) are small.
sendfile = False
# The scheme from X-Forwarded-Proto alone (from peers in FORWARDED_ALLOW_IPS): gunicorn also
# trusts X-Forwarded-Ssl and X-Forwarded-Protocol by default, and a TLS front end that sends
# one of them beside a proxy's X-Forwarded-Proto got every request a 400 ("Contradictory
# scheme headers").
secure_scheme_headers = {"X-FORWARDED-PROTO": "https"}
# In-flight requests get this long after SIGTERM; long polls (up to 30 s) answer at once then
# (`post_worker_init`), so what is left is ordinary requests.
graceful_timeout = 10
timeout = 60
accesslog = None  # api/metrics.py logs one structured line per request instead
worker_tmp_dir = os.environ.get("GUNICORN_WORKER_TMP_DIR") or None  # /dev/shm in containers


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's `util.write_error` (same signature), answering JSON like every other error of
    the API: `{"error": code, "message": text}`, the code from the reason phrase
    ("Request Header Fields Too Large" -> "request_header_fields_too_large").

    gunicorn writes this itself, for what it refuses before the app sees it (a header it cannot
    parse: 400; too many or too long headers: 431; a request line over its limit: 414; a
    request it failed on: 500); it sent a text/html page, which clients of a JSON API cannot
    read. The connection closes after it, as gunicorn's did.
    """
    if status_int >= 500:  # as api/errors.py: a 5xx never shows internals
        code, mesg = "internal_error", "Something went wrong on our side."
    else:
        code = "_".join(reason.lower().split()) or "bad_request"
    body = json.dumps({"error": code, "message": mesg or reason}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    gunicorn_util.write_nonblock(sock, head.encode("latin-1") + body)


# Installed as this file loads, in the master: the workers it forks inherit it (gunicorn's
# worker calls `util.write_error` through the module, so the replacement is what runs).
gunicorn_util.write_error = write_json_error


class Logger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's own messages go through the root logger, so they share the JSON format."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = True
        configure_logging(get_settings(), service="api")


logger_class = Logger


def on_starting(server: Any) -> None:
    """Start from an empty metrics folder: files of a previous run would skew the counters;
    listen on the metrics port too; then step back on the CPU (the workers inherit it through
    the fork)."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    port = get_settings().metrics_port
    if port and not any(b.endswith(f":{port}") for b in server.cfg.bind):
        server.log.warning(
            "SEG_METRICS_PORT is %d but gunicorn listens on %s only: /metrics answers nowhere "
            "(add --bind HOST:%d, or leave the addresses to GUNICORN_BIND)",
            port,
            ",".join(server.cfg.bind),
            port,
        )
    yield_cpu(get_settings().api_nice)


def yield_cpu(nice: int) -> None:
    """Run this process (and what it forks) at `nice`, so on a machine shared with inference
    workers the model gets the CPU first: under overload, finishing accepted jobs beats taking
    more (admission control bounds the backlog). Measured on 2 cores: a burst of 600 single
    submits ran at 69-79 jobs/s with equal shares, 89-90 with the API at nice 10.

    Linux groups a session's processes (autogroup) and shares the CPU between groups before
    nice counts, so a server that leads its own session (started with setsid, as a supervisor
    or the benchmark does) sets its group's nice too. In containers, CPU shares/requests decide
    instead (docker-compose.yml gives the API a lower `cpu_shares`).
    """
    if nice <= 0:
        return
    with suppress(OSError):
        os.nice(max(0, nice - os.nice(0)))  # only ever lower the priority
    if os.getsid(0) == os.getpid():
        with suppress(OSError):
            Path("/proc/self/autogroup").write_text(str(nice))


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges (its counters stay summed)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def post_worker_init(worker: Any) -> None:
    """On SIGTERM (a deploy, a scale-in) long polls answer at once, before gunicorn stops: a
    `POST /v1/jobs?wait=` whose job is already stored answers 202 with its id instead of
    being cut off at `graceful_timeout` (its client would retry and store the job twice)."""
    stop = worker.handle_exit

    def on_term(sig: int, frame: Any) -> None:
        # In a thread: the waking takes locks, which a signal handler must not wait on.
        threading.Thread(target=notify.stop_waiting, name="segsvc-stop-waiting").start()
        stop(sig, frame)

    signal.signal(signal.SIGTERM, on_term)
