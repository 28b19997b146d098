"""One delivery attempt: connect only to the checked address, no redirects, capped body read."""

from __future__ import annotations

import functools
import ssl
import time
import typing
from dataclasses import dataclass, replace
from typing import Literal

import httpcore
import httpx

from segsvc.settings import Settings
from segsvc.webhooks.ssrf import (
    Target,
    UnresolvableHostError,
    UnsafeTargetError,
    check_url,
    parse_networks,
)

Kind = Literal["delivered", "retry", "failed", "gone"]
USER_AGENT = "segsvc-webhooks/1"


@dataclass(frozen=True)
class Outcome:
    """What one attempt did and what should happen to the message next."""

    kind: Kind
    duration_ms: float
    status_code: int | None = None
    error: str | None = None
    body: str | None = None
    retry_after: str | None = None


def time_left(deadline: float, timeout: float | None, error: type[Exception]) -> float:
    """What one network operation may take: its own timeout, within what is left of the
    attempt's `deadline` (time.monotonic()); `error` once nothing is."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the attempt ran out of time")
    return left if timeout is None else min(timeout, left)


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by one deadline for the whole attempt.

    httpx's timeouts bound each network operation, not the request: a receiver that sends its
    response headers a byte every few seconds would hold a delivery thread for as long as it
    liked (and past the message's lease, so a second thread would call it too).
    """

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def _left(self, timeout: float | None, error: type[Exception]) -> float:
        return time_left(self._deadline, timeout, error)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        left = self._left(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(
            self._inner.start_tls(ssl_context, server_hostname, left), self._deadline
        )

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class PinnedBackend(httpcore.NetworkBackend):
    """Opens TCP connections only to the addresses that passed the SSRF check.

    TLS still uses the URL's host name (SNI and certificate checks), and the Host header is
    the URL's, so only the address lookup is replaced: no second DNS answer can be used.
    With a `deadline` (time.monotonic()), the whole attempt ends by it (`DeadlineStream`).
    """

    def __init__(self, target: Target, deadline: float | None = None) -> None:
        self._target = target
        self._deadline = deadline
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        if host.strip("[]").lower() != self._target.host.strip("[]").lower():
            raise httpcore.ConnectError(f"refusing to connect to unchecked host {host!r}")
        error: Exception = httpcore.ConnectError("no address to connect to")
        for address in self._target.addresses:
            # Each address gets the connect timeout, but all of them together only what is left
            # of the attempt: a host of many addresses that drop packets would otherwise hold
            # the attempt past its lease (and another thread would start the message again).
            left = timeout
            if self._deadline is not None:
                left = time_left(self._deadline, timeout, httpcore.ConnectTimeout)
            try:
                stream = self._inner.connect_tcp(
                    address,
                    port,
                    timeout=left,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
                continue
            return stream if self._deadline is None else DeadlineStream(stream, self._deadline)
        raise error

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not webhook targets")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process (loading the CA bundle costs tens of ms)."""
    return httpx.create_ssl_context(trust_env=False)


class PinnedTransport(httpx.HTTPTransport):
    """An httpx transport whose connections go to `target.addresses` only (no proxies)."""

    def __init__(self, target: Target, deadline: float | None = None) -> None:
        super().__init__(verify=tls_context(), trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=tls_context(),
            max_connections=1,
            network_backend=PinnedBackend(target, deadline),
        )


def deliver(*, url: str, body: str, headers: dict[str, str], settings: Settings) -> Outcome:
    """Check the URL again (DNS may have changed since submit), then POST to what was checked."""
    started = time.perf_counter()
    try:
        target = check_url(url, allow=parse_networks(settings.webhook_allow_networks))
    except UnresolvableHostError as exc:
        return Outcome("retry", _ms(started), error=str(exc))
    except UnsafeTargetError as exc:
        return Outcome("failed", _ms(started), error=str(exc))
    outcome = post(
        target,
        body=body,
        headers=headers,
        timeout=settings.webhook_timeout_seconds,
        body_cap=settings.webhook_body_cap_bytes,
        quote_peer=not target.allowlisted,
    )
    if target.allowlisted:
        # The attempt log (GET /v1/jobs/<id>/webhooks) shows the client what the receiver
        # answered: from a private address only the allowlist lets through, that would be
        # an internal service's reply to a request the client chose the URL of (its body, or
        # where it redirects to: internal host names, sign-in URLs).
        error = outcome.error
        if outcome.status_code is not None and 300 <= outcome.status_code < 400:
            error = f"HTTP {outcome.status_code}: redirect not followed"
        outcome = replace(outcome, body=None, error=error)
    return outcome


def post(
    target: Target,
    *,
    body: str,
    headers: dict[str, str],
    timeout: float,
    body_cap: int,
    quote_peer: bool = True,
) -> Outcome:
    """POST the body once and classify the answer (2xx, retryable, permanent, 410).

    `quote_peer=False` keeps what the peer sent out of the error too: an HTTP parser's error
    quotes the line it could not parse ("illegal status line: ..."), which from a service that
    does not speak HTTP is its banner or its first answer."""
    started = time.perf_counter()
    sent = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        # The body is read raw (`_read_capped`: never inflated, no decompression bomb), so ask
        # for it as it is: httpx's default `gzip, deflate` had receivers gzip their error
        # pages, stored as mojibake in the attempt log.
        "accept-encoding": "identity",
        **headers,
    }
    try:
        with (
            httpx.Client(
                transport=PinnedTransport(target, deadline=time.monotonic() + timeout),
                timeout=timeout,
                follow_redirects=False,
                trust_env=False,
            ) as client,
            client.stream("POST", target.url, content=body.encode(), headers=sent) as resp,
        ):
            text = _read_capped(resp, body_cap, deadline=started + timeout)
    except httpx.TimeoutException:
        return Outcome("retry", _ms(started), error=f"timed out after {timeout:g} s")
    except (httpx.ProtocolError, httpx.DecodingError) as exc:
        detail = f": {exc}" if quote_peer else ": the answer was not valid HTTP"
        return Outcome("retry", _ms(started), error=f"{type(exc).__name__}{detail}"[:500])
    except httpx.HTTPError as exc:
        return Outcome("retry", _ms(started), error=f"{type(exc).__name__}: {exc}"[:500])
    return _classify(resp, text, _ms(started))


def _read_capped(resp: httpx.Response, cap: int, *, deadline: float) -> str:
    """At most `cap` bytes of the body; a receiver cannot make us read (or wait) for more.

    The status line has arrived by now, and it is the answer: a body that stalls past the
    attempt's deadline ends the read, not the attempt (a 200 whose body never finished was
    counted a timeout and sent again for days, and such a 410 never disabled anything).

    A body encoded all the same (a receiver that compresses whatever it is asked) is not read
    at all: a note stands in for it, since its raw bytes would be stored as mojibake."""
    encoding = _content_encoding(resp)
    if encoding is not None:
        return f"({encoding}-encoded body not stored)"[:cap]
    data = b""
    try:
        for chunk in resp.iter_raw():
            data += chunk
            if len(data) >= cap or time.perf_counter() > deadline:
                break
    except (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError):
        pass  # what came before the stall (or the cut connection) is kept
    # Postgres text cannot hold NUL, and a binary or compressed answer often has one: storing
    # it as it came failed the attempt's transaction, so the message was sent again for ever.
    return data[:cap].decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def _content_encoding(resp: httpx.Response) -> str | None:
    """The answer's Content-Encoding, if it names any coding but `identity` (shortened, and
    only printable ASCII: it is the receiver's and goes into the attempt log)."""
    value = ",".join(resp.headers.get_list("content-encoding"))
    codings = [part.strip().lower() for part in value.split(",")]
    if all(coding in ("", "identity") for coding in codings):
        return None
    shown = ", ".join(coding for coding in codings if coding not in ("", "identity"))
    return "".join(char for char in shown if " " <= char <= "~")[:40] or "encoded"


def _classify(resp: httpx.Response, text: str, duration_ms: float) -> Outcome:
    code = resp.status_code
    retry_after = resp.headers.get("retry-after")
    if 200 <= code < 300:
        return Outcome("delivered", duration_ms, code, body=text)
    if code == 410:
        return Outcome("gone", duration_ms, code, "410 Gone: endpoint disabled", text)
    # Every other answer is tried again on the schedule, as Standard Webhooks senders do: a 404
    # while the receiver redeploys, a 401 from its auth proxy, a 400 from a receiver whose
    # clock is off, a redirect after a move to https are all passing, and a notice given up
    # on the first of them was lost for good. A receiver that keeps answering them only
    # pauses its own endpoint (`dispatch._endpoint_failed`).
    if 300 <= code < 400:
        location = resp.headers.get("location", "")[:300]
        error = f"HTTP {code}: redirect to {location!r} not followed"
        return Outcome("retry", duration_ms, code, error, text, retry_after)
    return Outcome("retry", duration_ms, code, f"HTTP {code}", text, retry_after)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
