"""Python client for the segsvc HTTP API: submit photos, wait for jobs, fetch masks.

    from segsvc.client import Client
    with Client("http://127.0.0.1:8000", api_key="seg_...") as client:
        job = client.submit("cat.jpg").wait(timeout=60)
        job.mask().save("cat-mask.png")

Needs only httpx, Pillow and standardwebhooks (no Flask, no TensorFlow).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import httpx
from PIL import Image

from segsvc.client_errors import (
    ApiError,
    AuthError,
    ClientError,
    ConflictError,
    InvalidKeyError,
    InvalidRequestError,
    InvalidUrlError,
    NotFoundError,
    RateLimitedError,
    RequestTimeoutError,
    RetriesStoppedError,
    ServerError,
    TransportError,
    WaitStoppedError,
    WaitTimeoutError,
    error_for,
    parse_retry_after,
)
from segsvc.webhooks.verify import WebhookVerificationError, verify_webhook

__all__ = [
    "DEFAULT_URL",
    "TERMINAL",
    "ApiError",
    "AuthError",
    "Client",
    "ClientError",
    "ConflictError",
    "InvalidJobIdError",
    "InvalidRequestError",
    "InvalidUrlError",
    "Job",
    "NotFoundError",
    "RateLimitedError",
    "RequestTimeoutError",
    "RetriesStoppedError",
    "ServerError",
    "TransportError",
    "WaitStoppedError",
    "WaitTimeoutError",
    "WebhookVerificationError",
    "content_key",
    "verify_webhook",
]

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
# 429 and 503 ask for a retry; 502 and 504 are a proxy in front that found no API process (a
# rolling restart); 408 is the server dropping a request whose body stalled on the way (nothing
# stored: a lost connection). Every request may be repeated: see `Client._request`.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
# Seconds one request may spend waiting out 429s (rate_limited, and the `*_pending` ones: this
# key's own earlier requests still being handled) before they count against `retries`.
RATE_WAIT_BUDGET_S = 300.0
# A 409 that asks for a retry: a twin of this keyed submit (an earlier try whose answer was
# lost) is being stored, and the retry replays its job instead of making a second one.
KEY_IN_USE = "idempotency_key_in_use"
ImageInput = str | os.PathLike[str] | bytes | IO[bytes]
T = TypeVar("T")
# Called before each retry with what went wrong (a TransportError for a connection that
# failed or broke, else the ApiError answered) and the pause before the next try.
RetryNotice = Callable[[ClientError, float], None]


class InvalidJobIdError(ClientError, ValueError):
    """A job id that is not a UUID, refused before anything is sent: an id goes into the
    URL's path, where `../models/rollback?` would reach another endpoint."""


def job_id_text(job_id: str | uuid.UUID) -> str:
    """`job_id` in the canonical form a URL may carry (hex digits and dashes only);
    InvalidJobIdError for anything that is not a UUID."""
    raw = str(job_id)
    try:
        if not raw.isascii():  # uuid.UUID would read other scripts' digits
            raise ValueError(raw)
        return str(uuid.UUID(raw))
    except ValueError:
        raise InvalidJobIdError(f"{raw[:80]!r} is not a job id (a UUID).") from None


# Seconds one long-poll request may wait server-side (below the HTTP timeout).
LONG_POLL_S = 10.0
# The same for a wait that may be told to stop (and a held submit of `segsvc submit --wait`):
# a stop ends the wait at once, dropping the request in flight, which then holds a long-poll
# slot of the server this long at most; a Ctrl-C waits for a submit in flight this long.
STOPPABLE_POLL_S = 2.0
# Ids one `GET /v1/jobs?ids=` may ask about (the server's limit).
MAX_IDS_PER_READ = 100
# Beyond a wait's deadline, how long a request of it may still take to bring its answer: each
# request of `Job.wait(timeout)` / `wait_many` times out then, whatever the server does.
WAIT_MARGIN_S = 0.5


# What an API key may hold to travel in a header: printable ASCII without spaces.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


def checked_url(url: str) -> str:
    """`url` (without a trailing slash) if it can be a server's base URL: http or https, a
    host, and a port from 1 to 65535 if any; else InvalidUrlError, before anything is sent
    (`localhost:8000` would otherwise be retried as a lost connection, `http://[::1` or
    `http://host:8o00` end in a traceback)."""
    example = "e.g. http://127.0.0.1:8000"
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number from 0 to 65535
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise InvalidUrlError(f"{url!r} is not a server URL ({exc}; {example})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidUrlError(
            f"{url!r} is not a server URL (it needs http:// or https://, {example})"
        )
    if not parts.hostname:
        raise InvalidUrlError(f"{url!r} is not a server URL (no host name; {example})")
    if port == 0:
        raise InvalidUrlError(f"{url!r} is not a server URL (port 0; {example})")
    return url.rstrip("/")


def _unless_stopped(call: Callable[[], T], stop: threading.Event) -> T:
    """`call()` (a request of a wait) in a thread of its own, while this one watches `stop`:
    WaitStoppedError as soon as it is set, however long the server takes to answer (the
    request then ends on its own, its answer dropped; `stop` also ends its retries)."""
    result: list[T] = []
    error: list[BaseException] = []
    finished = threading.Event()

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # handed to the waiting thread
            error.append(exc)
        finally:
            finished.set()

    threading.Thread(target=run, name="segsvc-wait", daemon=True).start()
    while not finished.wait(0.05):
        if stop.is_set():
            raise WaitStoppedError("the wait was stopped before the jobs ended")
    if error:
        raise error[0]
    return result[0]


def _long_poll(
    done: Callable[[], bool],
    ask: Callable[[float], Callable[[], bool]],
    deadline: float | None,
    poll_interval: float,
    timed_out: Callable[[], str],
    stop: threading.Event | None = None,
) -> None:
    """Until `done()`: `ask(seconds)` with a server-side wait of up to LONG_POLL_S; it returns
    a function that applies the answer and says whether what it asked about has ended.
    Against a server that answered at once without that, pause `poll_interval`, backing off
    to 2 s. WaitTimeoutError at `deadline` (time.monotonic()), each request bounded by it (see
    `Client._request`); WaitStoppedError once `stop` is set, at once even while a request is
    in flight (see `_unless_stopped`)."""
    interval = poll_interval
    hold = LONG_POLL_S if stop is None else STOPPABLE_POLL_S
    while not done():
        if stop is not None and stop.is_set():
            raise WaitStoppedError("the wait was stopped before the jobs ended")
        left = hold if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeoutError(timed_out())
        asked, wait = time.monotonic(), min(hold, left)
        apply = ask(wait) if stop is None else _unless_stopped(functools.partial(ask, wait), stop)
        # Not ended, and answered well before the wait it was asked for: the server did not
        # hold the request (its long-poll slots are full, it is shutting down, or it does not
        # long-poll), however long the network round trip took.
        if not apply() and time.monotonic() - asked < max(0.05, wait / 2):
            (stop or threading.Event()).wait(max(0.0, min(interval, left)))
            interval = min(interval * 1.5, 2.0)


class Job:
    """A job as the API last described it; `refresh()` and `wait()` update it."""

    def __init__(
        self, client: Client, data: dict[str, Any], *, mask_png: bytes | None = None
    ) -> None:
        self._client = client
        self.data = data
        self._mask_png = mask_png  # the mask when the submit answered with it (`segment`)

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, status={self.status!r})"

    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def status(self) -> str:
        return str(self.data["status"])

    @property
    def done(self) -> bool:
        """True once the job can no longer change."""
        return self.status in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def error(self) -> dict[str, Any] | None:
        """`{"code", "message"}` of a failed job, else None."""
        value: dict[str, Any] | None = self.data.get("error")
        return value

    @property
    def model_version(self) -> str | None:
        value: str | None = self.data.get("model_version")
        return value

    @property
    def metrics(self) -> dict[str, Any]:
        value: dict[str, Any] = self.data.get("metrics") or {}
        return value

    def refresh(self) -> Job:
        """Reload the job's state from the API."""
        self.data = self._client.get(self.id).data
        return self

    def wait(
        self,
        timeout: float | None = 300.0,
        *,
        poll_interval: float = 0.25,
        stop: threading.Event | None = None,
        since: float | None = None,
    ) -> Job:
        """Long-poll until the job is succeeded, failed or canceled; WaitTimeoutError after timeout.

        Each request waits server-side (`?wait=`) for up to LONG_POLL_S; against a server that
        answers at once, it falls back to polling every `poll_interval` (backing off to 2 s).
        Each request is bounded by the timeout (plus WAIT_MARGIN_S), so a server that stalls
        cannot stretch it. Setting `stop` (from another thread: Ctrl-C) ends the wait with
        WaitStoppedError at once, even while a request is in flight. `since`
        (time.monotonic()): when the timeout began, if before this call (`segsvc get
        --timeout` counts its first read of the job too); by default, now.
        """

        start = time.monotonic() if since is None else since
        deadline = None if timeout is None else start + timeout

        def ask(seconds: float) -> Callable[[], bool]:
            data = self._client.get(self.id, wait=seconds, deadline=deadline, stop=stop).data

            def apply() -> bool:
                self.data = data
                return self.done

            return apply

        _long_poll(
            lambda: self.done,
            ask,
            deadline,
            poll_interval,
            lambda: f"job {self.id} still {self.status} after {timeout}s",
            stop,
        )
        return self

    def cancel(self) -> Job:
        """Cancel the job; once it has ended, its state as it ended (see `Client.cancel`)."""
        self.data = self._client.cancel(self.id).data
        return self

    def mask_png(self) -> bytes:
        """The mask as PNG bytes (values 0 pet, 1 background, 2 border)."""
        if self._mask_png is not None:
            return self._mask_png
        return self._client.result_png(self.id, "mask")

    def overlay_png(self) -> bytes:
        """The input with the mask blended on it, as PNG bytes."""
        return self._client.result_png(self.id, "overlay")

    def mask(self) -> Image.Image:
        """The mask as a single-channel PIL image of the input's size."""
        return _open_png(self.mask_png())

    def overlay(self) -> Image.Image:
        """The overlay as an RGB PIL image."""
        return _open_png(self.overlay_png())


class Client:
    """A connection to one segsvc API; thread-safe, so share it across threads."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        max_retry_wait: float = 60.0,
        rate_wait_budget: float = RATE_WAIT_BUDGET_S,
        transport: httpx.BaseTransport | None = None,
        on_retry: RetryNotice | None = None,
    ) -> None:
        """InvalidUrlError (a ValueError) for a URL that cannot be a server's (see
        `checked_url`). A 429 is waited out (its Retry-After, with jitter) without using up
        `retries` while the pauses of the request add up to less than `rate_wait_budget`
        seconds: many requests in flight share one key's rate, and wait their turns.
        `on_retry(error, pause_s)` is called before each retry (from the thread that sent the
        request; what it raises is ignored): the CLI says there that it is
        retrying a lost connection."""
        # Stripped: a key read from its file (`var/local_api_key`), a secret or a .env ends in
        # a newline, which no header can carry; a URL pasted with a space before it was sent
        # as it was (httpx keeps it), and each was retried as a lost connection.
        self.url = checked_url((url or os.environ.get("SEG_URL") or DEFAULT_URL).strip())
        self.on_retry = on_retry
        key = api_key if api_key is not None else os.environ.get("SEG_API_KEY")
        key = key.strip() if key else key
        if key and not _HEADER_SAFE.fullmatch(key):
            raise InvalidKeyError(
                "the API key has characters no HTTP header can carry (spaces, control characters "
                "or letters outside plain ASCII, often pasted along with it); copy it again"
            )
        headers = {"User-Agent": "segsvc-client/0.1"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self.rate_wait_budget = rate_wait_budget
        self._retries_stopped = threading.Event()
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def submit(
        self,
        image: ImageInput,
        *,
        webhook: str | None = None,
        webhook_events: list[str] | None = None,
        filename: str | None = None,
        wait: float = 0.0,
        idempotency_key: str | None = None,
    ) -> Job:
        """Upload a photo (path, bytes or binary file) and return the queued job.

        With `wait` (seconds, capped at LONG_POLL_S to stay below the HTTP timeout) the server
        holds its answer until the job ends, so a fast job comes back finished from this one
        request; otherwise it is still queued or running. `idempotency_key` (default: a new
        one per call): the same key and body within 24 h give back the job stored first (see
        `content_key`); the same key with another body is refused (422).
        """
        form: dict[str, Any] = {}
        if webhook:
            form["webhook"] = webhook
        if webhook_events:
            form["webhook_events"] = ",".join(webhook_events)
        resp = self._post_job(image, filename, form=form, wait=wait, key=idempotency_key)
        return Job(self, _json(resp))

    def segment(
        self, image: ImageInput, *, filename: str | None = None, wait: float = LONG_POLL_S
    ) -> Job:
        """Photo in, mask out, in one request when the job ends within `wait`: the server
        answers `Accept: image/png` with the mask itself, which the returned job then holds
        (`mask()` reads no further; `refresh()` fetches the rest of the job). A job that
        failed, or is not done in time, comes back as `submit` returns it: `wait()` on it."""
        resp = self._post_job(image, filename, wait=wait, accept="image/png")
        if resp.headers.get("content-type", "").startswith("image/png"):
            job_id = resp.headers["X-Job-Id"]
            return Job(self, {"id": job_id, "status": "succeeded"}, mask_png=resp.content)
        return Job(self, _json(resp))

    def _post_job(
        self,
        image: ImageInput,
        filename: str | None,
        *,
        form: dict[str, Any] | None = None,
        wait: float = 0.0,
        accept: str | None = None,
        key: str | None = None,
    ) -> httpx.Response:
        """`POST /v1/jobs` of one photo; with `wait` (seconds, capped at LONG_POLL_S to stay
        below the HTTP timeout) the server holds its answer until the job ends."""
        name, data = _read_image(image, filename)
        # Same key on every retry of this call, so the server may treat them as one submission.
        headers = {"Idempotency-Key": key or str(uuid.uuid4())}
        if accept:
            headers["Accept"] = accept
        wait = min(max(wait, 0.0), LONG_POLL_S)
        return self._request(
            "POST",
            "/v1/jobs",
            files={"image": (name, data)},
            data=form or {},
            headers=headers,
            params={"wait": f"{wait:.3f}"} if wait > 0 else None,
            held=wait,  # as `get`: the server holds the answer, so the read may take as long
        )

    def submit_batch(
        self,
        images: Sequence[ImageInput],
        *,
        webhook: str | None = None,
        webhook_events: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> list[Job]:
        """Upload several photos in one request (`POST /v1/jobs/batch`, up to the server's
        `batch_submit_max_images`); all are accepted or none is. One queued job per photo, in
        order; follow them together with `get_many`. `idempotency_key`: as for `submit`."""
        form: dict[str, Any] = {}
        if webhook:
            form["webhook"] = webhook
        if webhook_events:
            form["webhook_events"] = ",".join(webhook_events)
        files = [("image", _read_image(image, None)) for image in images]
        # retries store the batch once
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        resp = self._request("POST", "/v1/jobs/batch", files=files, data=form, headers=headers)
        return [Job(self, body) for body in _json(resp)["jobs"]]

    def get_many(
        self,
        job_ids: Sequence[str],
        *,
        wait: float = 0.0,
        deadline: float | None = None,
        stop: threading.Event | None = None,
    ) -> list[Job]:
        """Several jobs in one request (up to 100 different ids), in the order given (an id
        given twice gets the same Job twice); with `wait` (capped at LONG_POLL_S) the server
        holds the answer until every one has ended. Unknown ids raise NotFoundError, ids that
        are not UUIDs InvalidJobIdError. `deadline` and `stop` bound the request and its
        retries: see `_request`."""
        ids = [job_id_text(job_id) for job_id in job_ids]
        unique = list(dict.fromkeys(ids))  # the server answers each id once
        params = {"ids": ",".join(unique)}
        wait = min(wait, LONG_POLL_S)
        if wait > 0:
            params["wait"] = f"{wait:.3f}"
        body = _json(
            self._request("GET", "/v1/jobs", params=params, deadline=deadline, stop=stop, held=wait)
        )
        if body["not_found"]:
            raise NotFoundError(404, "not_found", f"No such jobs: {', '.join(body['not_found'])}.")
        found = {str(job["id"]): Job(self, job) for job in body["jobs"]}
        missing = [job_id for job_id in unique if job_id not in found]
        if missing:
            raise ServerError(
                200, "invalid_response", f"The server did not answer for {', '.join(missing)}."
            )
        return [found[job_id] for job_id in ids]

    def wait_many(
        self,
        jobs: Sequence[Job],
        timeout: float | None = 300.0,
        *,
        poll_interval: float = 0.25,
        stop: threading.Event | None = None,
    ) -> list[Job]:
        """Long-poll until every job has ended (`Job.wait` for many: one `GET /v1/jobs?ids=`
        per 100 jobs still running); updates the jobs in place and returns them.
        WaitTimeoutError after `timeout` (WaitStoppedError once `stop` is set), with the jobs
        that ended by then already updated; as in `Job.wait`, each request is bounded by the
        timeout and a set `stop` ends the wait at once."""

        deadline = None if timeout is None else time.monotonic() + timeout

        def ask(seconds: float) -> Callable[[], bool]:
            running: dict[str, list[Job]] = {}  # an id given twice is asked about once
            for job in jobs:
                if not job.done:
                    running.setdefault(job_id_text(job.id), []).append(job)
            chunk = list(running)[:MAX_IDS_PER_READ]
            fresh = self.get_many(chunk, wait=seconds, deadline=deadline, stop=stop)

            def apply() -> bool:
                for job_id, new in zip(chunk, fresh, strict=True):
                    for job in running[job_id]:
                        job.data = new.data
                return all(new.done for new in fresh)

            return apply

        _long_poll(
            lambda: all(job.done for job in jobs),
            ask,
            deadline,
            poll_interval,
            lambda: f"{sum(not job.done for job in jobs)} jobs not finished after {timeout}s",
            stop,
        )
        return list(jobs)

    def get(
        self,
        job_id: str,
        *,
        wait: float = 0.0,
        deadline: float | None = None,
        stop: threading.Event | None = None,
    ) -> Job:
        """The job's state; with `wait` (capped at LONG_POLL_S), the server holds the answer
        until it ends. `deadline` (time.monotonic()) and `stop` bound the request and its
        retries: see `_request`."""
        path = f"/v1/jobs/{job_id_text(job_id)}"
        wait = min(wait, LONG_POLL_S)
        params = {"wait": f"{wait:.3f}"} if wait > 0 else None
        resp = self._request("GET", path, params=params, deadline=deadline, stop=stop, held=wait)
        return Job(self, _json(resp))

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job. A job that has already ended is returned as it
        ended (`status` says whether it was canceled): so a retried cancel whose first try
        went through, or a cancel racing the job's end, is not an error."""
        job_id = job_id_text(job_id)
        try:
            return Job(self, _json(self._request("POST", f"/v1/jobs/{job_id}/cancel")))
        except ConflictError as exc:  # the server's answer for a job that has ended
            job = self.get(job_id)
            if job.done:
                return job
            raise exc from None

    def result_png(
        self, job_id: str, kind: str = "mask", *, deadline: float | None = None
    ) -> bytes:
        """A finished job's `mask` or `overlay` PNG; ConflictError while it is not done.
        `deadline` (time.monotonic()) bounds the request and its retries: see `_request`."""
        if kind not in ("mask", "overlay"):
            raise ValueError("kind must be 'mask' or 'overlay'")
        path = f"/v1/jobs/{job_id_text(job_id)}/{kind}.png"
        return self._request("GET", path, deadline=deadline).content

    def models_body(self) -> Any:
        """GET /v1/models as the API sent it: the versions and the training runs (admin)."""
        return _json(self._request("GET", "/v1/models"))

    def models(self) -> list[dict[str, Any]]:
        """Registered model versions with status and traffic share (GET /v1/models, admin)."""
        body = self.models_body()
        if isinstance(body, dict):
            body = body.get("versions", body.get("models", []))
        rows: list[dict[str, Any]] = body
        return rows

    def _request(
        self,
        method: str,
        path: str,
        *,
        deadline: float | None = None,
        stop: threading.Event | None = None,
        held: float = 0.0,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send with retries on 429/503 (honouring Retry-After), on 408 and on network errors;
        a 429 uses up no retry while its pauses fit `rate_wait_budget` (see `__init__`).

        Every call may be repeated safely: reads are idempotent, a repeated cancel returns the
        job as it ended (`cancel`), and a submission carries one Idempotency-Key across its
        retries, so the server stores it only once. `stop_retries()` (Ctrl-C) ends the pauses
        between tries with RetriesStoppedError.
        `held`: seconds the server may hold the answer (a long poll), added to the read
        timeout. `deadline` (time.monotonic()): a wait's end; each try times out by then (and
        WAIT_MARGIN_S), and a try that failed then, or a retry that would pause past it,
        raises WaitTimeoutError, so `Job.wait(timeout)` keeps its timeout however the server
        behaves. `stop` (a wait's event) also ends the pauses before retries.
        """
        t = self._http.timeout
        base = t
        if held > 0:  # the read may take as long as the server holds the answer, and more
            read = None if t.read is None else t.read + held
            base = httpx.Timeout(connect=t.connect, read=read, write=t.write, pool=t.pool)
        attempt, rate_waited = 0, 0.0
        while True:
            last = attempt >= self.retries
            timeout = base if deadline is None else _bounded(base, deadline)
            try:
                resp = self._http.request(method, path, timeout=timeout, **kwargs)
            except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
                # Refused here before sending, and so every time: not a lost connection. The
                # message names the request's parts, never its headers (the key).
                raise ClientError(
                    f"the request to {self.url} could not be sent: {type(exc).__name__}"
                ) from None
            except httpx.TransportError as exc:
                what = "cannot connect to" if isinstance(exc, httpx.ConnectError) else "lost"
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeoutError(
                        f"the wait ran out while {self.url} did not answer ({exc!r})"
                    ) from exc
                failure = TransportError(f"{what} {self.url}: {exc!r}")
                if last:
                    raise failure from exc
                self._pause(_backoff(attempt), deadline, f"{exc!r}", failure, stop)
                attempt += 1
                continue
            if resp.status_code == 429:
                # Waiting its turn (the key's rate, or its own earlier requests): within the
                # budget this uses up no retry, and the jitter keeps the waiters told the same
                # Retry-After from all waking at once (one wins, the others wait again).
                delay = _jittered(self._retry_delay(resp, attempt))
                if rate_waited + delay <= self.rate_wait_budget:
                    rate_waited += delay
                    self._pause(delay, deadline, "HTTP 429", error_for(resp), stop)
                    continue
            if _retryable(resp) and not last:
                delay = self._retry_delay(resp, attempt)
                self._pause(delay, deadline, f"HTTP {resp.status_code}", error_for(resp), stop)
                attempt += 1
                continue
            if resp.is_success:
                return resp
            raise error_for(resp)

    def stop_retries(self) -> None:
        """From any thread: pauses before retries end at once with RetriesStoppedError, and
        no request is retried after this (a request in flight still gets its answer)."""
        self._retries_stopped.set()

    def _pause(
        self,
        seconds: float,
        deadline: float | None,
        why: str,
        cause: ClientError,
        stop: threading.Event | None = None,
    ) -> None:
        """Sleep before a retry, unless that would pass the caller's deadline; `on_retry`
        hears of it first. RetriesStoppedError once `stop_retries()` is called or `stop` set."""
        if deadline is not None and time.monotonic() + seconds >= deadline:
            raise WaitTimeoutError(f"the wait ran out while the server answered {why}")
        if self.on_retry is not None:
            # a notice that cannot be given (stderr closed) stops nothing
            with contextlib.suppress(Exception):
                self.on_retry(cause, seconds)
        if stop is None:
            stopped = self._retries_stopped.wait(seconds)
        else:  # either event ends the pause
            end = time.monotonic() + seconds
            stopped = stop.is_set()
            while not stopped and (left := end - time.monotonic()) > 0:
                stopped = self._retries_stopped.wait(min(left, 0.05)) or stop.is_set()
        if stopped:
            raise RetriesStoppedError(f"not retried (the server answered {why}): stopped")

    def _retry_delay(self, resp: httpx.Response, attempt: int) -> float:
        hinted = parse_retry_after(resp.headers.get("Retry-After"))
        return min(self.max_retry_wait, hinted if hinted is not None else _backoff(attempt))


def _bounded(timeout: httpx.Timeout, deadline: float) -> httpx.Timeout:
    """`timeout` with each of its limits cut to the time left before `deadline` (and
    WAIT_MARGIN_S for the answer to arrive)."""
    left = max(0.01, deadline - time.monotonic() + WAIT_MARGIN_S)

    def cut(limit: float | None) -> float:
        return left if limit is None else min(limit, left)

    return httpx.Timeout(
        connect=cut(timeout.connect),
        read=cut(timeout.read),
        write=cut(timeout.write),
        pool=cut(timeout.pool),
    )


def _retryable(resp: httpx.Response) -> bool:
    """An answer to send the same request again for: 429, 503, or a keyed twin in progress."""
    if resp.status_code in RETRY_STATUSES:
        return True
    return resp.status_code == 409 and error_for(resp).code == KEY_IN_USE


def _jittered(seconds: float) -> float:
    """A pause told by Retry-After, lengthened by up to a quarter of it (and 0.25 s), so that
    the requests told the same pause spread out."""
    return seconds + random.uniform(0.0, 0.25 + seconds / 4)


def content_key(
    images: Sequence[tuple[str, bytes]],
    *,
    batch: bool,
    webhook: str | None = None,
    webhook_events: list[str] | None = None,
) -> str:
    """An Idempotency-Key derived from what a submit sends: each image's name and the sha256
    of its bytes (in order), whether it is a batch, and the form fields. Sending the same
    files again (a rerun of an interrupted `segsvc submit`) within the server's 24 h window
    gives back the jobs stored the first time instead of new ones; any change of a photo or
    of an option gives another key (the same key with another body would be a 422)."""
    digest = hashlib.sha256(b"segsvc-submit-v1\n" + (b"batch\n" if batch else b"single\n"))
    for name, data in images:
        digest.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    digest.update(f"webhook={webhook or ''}\n".encode())
    digest.update(f"events={','.join(webhook_events or [])}\n".encode())
    return f"segsvc-{digest.hexdigest()}"


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter: about 0.5 s, 1 s, 2 s, ... capped at 10 s."""
    return random.uniform(0.5, 1.0) * min(10.0, 0.5 * 2.0**attempt)


def _json(resp: httpx.Response) -> Any:
    """A success's JSON body; one that is not JSON (a proxy's page) is a ServerError."""
    try:
        return resp.json()
    except ValueError:
        raise ServerError(
            resp.status_code,
            "invalid_response",
            f"The server answered {resp.status_code} with a body that is not JSON "
            f"({resp.headers.get('Content-Type') or 'no Content-Type'}): is SEG_URL the API?",
        ) from None


def _read_image(image: ImageInput, filename: str | None) -> tuple[str, bytes]:
    if isinstance(image, bytes):
        return utf8_name(filename or "image"), image
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return utf8_name(filename or path.name), path.read_bytes()
    data = image.read()
    return utf8_name(filename or Path(str(getattr(image, "name", "image"))).name), data


def utf8_name(name: str | os.PathLike[str]) -> str:
    """A file name as text a multipart form (or a terminal) can carry: a name that is not
    UTF-8 on disk (Linux keeps its bytes as surrogates) gets U+FFFD for the bytes that are
    not."""
    return os.fsencode(name).decode("utf-8", errors="replace")


def _open_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
