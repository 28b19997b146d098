"""Closed-loop load: N clients each submit a real photo, poll until done, and repeat."""

from __future__ import annotations

import http.client
import json
import os
import select
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from segsvc.client import LONG_POLL_S
from segsvc.settings import ROOT

# The photos the loads send (`SEG_BENCH_DATA`: an Oxford-layout folder; else the sample beside
# the checkout, else where this machine kind keeps it), at most MAX_PHOTOS of them, and how many
# one batch submit carries.
_BESIDE = ROOT.parent / "shared/data/oxford_pets_sample"
_MACHINE = Path("/work/shared/data/oxford_pets_sample")
DEFAULT_DATA = Path(
    os.environ.get("SEG_BENCH_DATA")
    or (_BESIDE if _BESIDE.is_dir() or not _MACHINE.is_dir() else _MACHINE)
)
MAX_PHOTOS = 200
BATCH_SUBMIT_IMAGES = 16


@dataclass(frozen=True)
class Multipart:
    """A multipart/form-data body with each photo in a field `image`, framed anew with a fresh
    random boundary on every `render()`, as requests, httpx and curl send each request. A
    server's parser builds its boundary patterns per boundary (werkzeug compiles two regular
    expressions, ~0.2 ms of CPU); a body sent again with the same boundary would find them in
    Python's regex cache and make every multipart endpoint look cheaper than clients see it."""

    parts: tuple[tuple[str, bytes], ...]  # (file name, JPEG bytes)

    def render(self) -> tuple[bytes, str]:
        boundary = uuid.uuid4().hex
        chunks = []
        for name, data in self.parts:
            chunks += [
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                f'filename="{name}"\r\nContent-Type: image/jpeg\r\n\r\n'.encode(),
                data,
                b"\r\n",
            ]
        chunks.append(f"--{boundary}--\r\n".encode())
        return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def multipart(*photos: Path) -> Multipart:
    """The photos as one multipart body (read once; framed per request by `render()`)."""
    return Multipart(tuple((photo.name, photo.read_bytes()) for photo in photos))


def sample_photos(folder: Path) -> list[Path]:
    """The first MAX_PHOTOS pet photos of an Oxford-layout folder, by name."""
    return sorted((folder / "images").glob("*.jpg"))[:MAX_PHOTOS]


def batch_multiparts(photos: list[Path], per: int = BATCH_SUBMIT_IMAGES) -> list[Multipart]:
    """The photos `per` to a body, as batch submits send them (cycling, so every body is full)."""
    return [multipart(*(photos * per)[i : i + per]) for i in range(0, len(photos), per)]


@dataclass
class LoadResult:
    """What a run measured."""

    clients: int
    seconds: float = 0.0
    done: int = 0
    errors: int = 0
    retries: int = 0  # requests sent again on a new connection (see `Client`)
    latencies: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies or [float("nan")]) * 1000.0
        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "jobs": self.done,
            "errors": self.errors,
            "retries": self.retries,
            "jobs_per_s": self.done / self.seconds if self.seconds else 0,
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)),
            "mean_batch_size": float(np.mean(self.batch_sizes)) if self.batch_sizes else None,
        }


RECONNECT_EVERY = 32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Client:
    """One keep-alive HTTP connection to a loopback server, reopened every RECONNECT_EVERY
    requests: gunicorn's processes each keep the connections they accepted, so 16 connections
    opened once can land 12 on one process (one GIL, one core) and 4 on the other; reopening
    evens the spread out during a run, as a client pool or load balancer recycling does.

    A connection the server has closed is not reused, as urllib3's pool checks: gunicorn closes
    one after answering a request whose body the app left unread past 64 KiB (the plain hello),
    without saying so in its answer. When a reused connection still turns out dead before any
    answer, the request is sent again on a new one, once (`retries` counts them), as a client
    pool does; only a request that fails on a fresh connection is an error."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers = headers
        self.sent = 0
        self.retries = 0
        self.last_headers: dict[str, str] = {}  # of the last answer, names in lower case

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        accept: str | None = None,
    ) -> tuple[int, bytes]:
        headers = dict(self.headers)
        if content_type:
            headers["Content-Type"] = content_type
        if accept:
            headers["Accept"] = accept
        self.sent += 1
        if self.sent % RECONNECT_EVERY == 0 or self._closed_by_server():
            self.conn.close()  # the next request connects again
        reused = self.conn.sock is not None
        try:
            return self._send(method, path, body, headers)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.conn.close()
            if not reused:
                return 0, b""
        except (OSError, http.client.HTTPException):
            self.conn.close()  # reconnects on the next request
            return 0, b""
        self.retries += 1
        try:
            return self._send(method, path, body, headers)
        except (OSError, http.client.HTTPException):
            self.conn.close()
            return 0, b""

    def _send(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        self.last_headers = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, resp.read()

    def _closed_by_server(self) -> bool:
        """An idle keep-alive connection is readable only once the server closed (or reset) it."""
        sock = self.conn.sock
        if sock is None:
            return False
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)


# A burst's submit answered 429 or 503 (one key's batch submits past the few a process lets
# wait: `429 batches_pending`) is sent again after its Retry-After, as `segsvc.client` does,
# this many times at most; `retries` counts them. Only one still refused is an error.
SUBMIT_RETRIES = 10


def _retry_after(headers: dict[str, str]) -> float:
    """The answer's Retry-After in seconds (1 when absent or not a number), at most 10."""
    try:
        return min(10.0, max(0.0, float(headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def run_jobs_load(
    port: int,
    headers: dict[str, str],
    bodies: list[Multipart],
    *,
    clients: int,
    seconds: float,
    poll_s: float,
    max_poll_s: float | None = None,
    wait_s: float = 0.0,
) -> LoadResult:
    """Submit + poll against the segsvc API, then fetch the mask; latency is what the client
    sees: from sending the submit to holding the mask's bytes (not the job's `completed_at`,
    which the worker stamps before it has even committed the result). The naive baseline
    answers with the mask PNG, so the system's clients get theirs too (`GET .../mask.png`).

    With `wait_s` the submit itself waits (`POST /v1/jobs?wait=` with `Accept: image/png`: 201
    with the mask itself when the job succeeds in time, one round trip as the naive baseline's)
    and any poll after it is a long poll, as `segsvc.client` does with `submit(wait=)` and
    `Job.wait`; a poll the server declines to hold is followed by a `poll_s` pause. The batch
    sizes of jobs answered with their mask are read after the run, off the clock."""
    result, lock = LoadResult(clients), threading.Lock()
    stop_at = time.monotonic() + seconds
    submit_path = "/v1/jobs" + (f"?wait={wait_s:g}" if wait_s > 0 else "")
    accept = "image/png" if wait_s > 0 else None
    answered_with_mask: list[str] = []

    def client_loop(index: int) -> None:
        client, n = Client(port, headers), index
        while time.monotonic() < stop_at:
            body, ctype = bodies[n % len(bodies)].render()
            n += clients
            sent = time.time()
            status, raw = client.request("POST", submit_path, body, ctype, accept=accept)
            if status not in (201, 202):
                with lock:
                    result.errors += 1
                time.sleep(0.05)
                continue
            if client.last_headers.get("content-type", "").startswith("image/png"):
                received = time.time()
                with lock:
                    if not raw.startswith(PNG_MAGIC):
                        result.errors += 1
                        continue
                    result.done += 1
                    result.latencies.append(received - sent)
                    answered_with_mask.append(client.last_headers["x-job-id"])
                continue
            job = json.loads(raw)
            if status == 202:
                job = _poll(client, job["id"], poll_s, stop_at + 60, max_poll_s, wait_s)
            mask = 0
            if job is not None and job["status"] == "succeeded":
                mask, png = client.request("GET", f"/v1/jobs/{job['id']}/mask.png")
                mask = mask if png.startswith(PNG_MAGIC) else 0
            received = time.time()
            with lock:
                if job is None or job["status"] != "succeeded" or mask != 200:
                    result.errors += 1
                    continue
                result.done += 1
                result.latencies.append(received - sent)
                result.batch_sizes.append(int(job["metrics"]["batch_size"] or 1))

    result.seconds = _run_threads(client_loop, clients)
    # Off the clock: the jobs answered with their mask have ended, so each chunk comes back
    # at once.
    for job in _poll_many(Client(port, headers), answered_with_mask):
        if job is not None:
            result.batch_sizes.append(int(job["metrics"]["batch_size"] or 1))
    return result


def _poll(
    client: Client,
    job_id: str,
    poll_s: float,
    give_up: float,
    max_poll_s: float | None = None,
    wait_s: float = 0.0,
) -> dict[str, Any] | None:
    """Poll until the job ends: every `poll_s`, backing off x2 up to `max_poll_s`; with `wait_s`
    each request long-polls and only a request answered at once is followed by a pause."""
    delay = poll_s
    path = f"/v1/jobs/{job_id}" + (f"?wait={wait_s:g}" if wait_s > 0 else "")
    while time.monotonic() < give_up:
        asked = time.monotonic()
        status, raw = client.request("GET", path)
        if status == 200:
            job: dict[str, Any] = json.loads(raw)
            if job["status"] in ("succeeded", "failed", "canceled"):
                return job
        if wait_s > 0 and time.monotonic() - asked > 0.05:
            continue  # the server held the request: ask again at once
        time.sleep(delay)
        delay = min(delay * 2, max_poll_s or poll_s)
    return None


def run_burst(
    port: int,
    headers: dict[str, str],
    bodies: list[Multipart],
    *,
    jobs: int,
    clients: int,
    per_request: int = 1,
) -> LoadResult:
    """Capacity: `clients` submit `jobs` as fast as they can while the worker runs them; jobs/s
    = jobs / (last completed_at - first submit). One poller then reads jobs in submit order
    with long polls (as `segsvc.client` waits), so it asks about each job about once.

    With `per_request` > 1 every request is a batch submit of that many photos (`bodies` then
    hold that many each) and the poller long-polls up to 100 jobs per request
    (`GET /v1/jobs?ids=`), as `Client.submit_batch` and `Client.get_many` do."""
    result, lock = LoadResult(clients), threading.Lock()
    submitted: list[tuple[float, str]] = []
    requests = -(-jobs // per_request)
    per_client = [range(i, requests, clients) for i in range(clients)]
    path = "/v1/jobs" if per_request == 1 else "/v1/jobs/batch"

    def submitter(index: int) -> None:
        client = Client(port, headers)
        for n in per_client[index]:
            body, ctype = bodies[n % len(bodies)].render()
            sent = time.time()
            status, raw = client.request("POST", path, body, ctype)
            for _ in range(SUBMIT_RETRIES):
                if status not in (429, 503):
                    break
                with lock:
                    result.retries += 1
                time.sleep(_retry_after(client.last_headers))
                status, raw = client.request("POST", path, body, ctype)
            with lock:
                if status == 202:
                    answer = json.loads(raw)
                    for job in answer["jobs"] if per_request > 1 else [answer]:
                        submitted.append((sent, job["id"]))
                else:
                    result.errors += per_request

    start = time.time()
    _run_threads(submitter, clients)
    poller, last = Client(port, headers), start
    sent_at = {job_id: sent for sent, job_id in submitted}
    ids = [job_id for _, job_id in sorted(submitted)]
    if per_request == 1:
        polled = [_poll(poller, i, 0.02, time.monotonic() + 300, wait_s=LONG_POLL_S) for i in ids]
    else:
        polled = list(_poll_many(poller, ids))
    for job in polled:
        if job is None or job["status"] != "succeeded":
            result.errors += 1
            continue
        done_at = _ts(job["completed_at"])
        last = max(last, done_at)
        result.done += 1
        result.latencies.append(done_at - sent_at[job["id"]])
        result.batch_sizes.append(int(job["metrics"]["batch_size"] or 1))
    result.errors += len(ids) - len(polled)  # jobs the batched poll gave up on
    result.seconds = last - start
    return result


def _poll_many(client: Client, ids: list[str], chunk: int = 100) -> list[dict[str, Any] | None]:
    """Long-poll `GET /v1/jobs?ids=` a chunk at a time until every job has ended (or 300 s)."""
    out: list[dict[str, Any] | None] = []
    give_up = time.monotonic() + 300
    for i in range(0, len(ids), chunk):
        query = f"/v1/jobs?ids={','.join(ids[i : i + chunk])}&wait={LONG_POLL_S:g}"
        while time.monotonic() < give_up:
            asked = time.monotonic()
            status, raw = client.request("GET", query)
            jobs = json.loads(raw)["jobs"] if status == 200 else []
            if jobs and all(j["status"] in ("succeeded", "failed", "canceled") for j in jobs):
                out += jobs
                break
            if time.monotonic() - asked < 0.05:  # answered at once (waiter cap, error): pause
                time.sleep(0.05)
    return out


def run_request_load(
    port: int,
    path: str,
    headers: dict[str, str],
    bodies: list[Multipart],
    *,
    clients: int,
    seconds: float,
    expect: int,
) -> LoadResult:
    """Requests/s of one synchronous endpoint (latency = the request itself)."""
    result, lock = LoadResult(clients), threading.Lock()
    stop_at = time.monotonic() + seconds

    def client_loop(index: int) -> None:
        client, n = Client(port, headers), index
        while time.monotonic() < stop_at:
            body, ctype = bodies[n % len(bodies)].render()
            n += clients
            sent = time.perf_counter()
            status, _ = client.request("POST", path, body, ctype)
            with lock:
                if status == expect:
                    result.done += 1
                    result.latencies.append(time.perf_counter() - sent)
                else:
                    result.errors += 1
        with lock:
            result.retries += client.retries

    result.seconds = _run_threads(client_loop, clients)
    return result


def _run_threads(target: Any, clients: int) -> float:
    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - start
