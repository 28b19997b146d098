"""One attempt against a real receiver on 127.0.0.1: classification, pinning, caps."""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from segsvc.settings import Settings
from segsvc.webhooks.delivery import deliver, post
from segsvc.webhooks.ssrf import Target
from tests.segsvc.webhooks.receiver import Received, Receiver, Reply


def target(receiver: Receiver, host: str = "127.0.0.1") -> Target:
    port = receiver.server.server_address[1]
    return Target(url=f"http://{host}:{port}/hook", host=host, port=port, addresses=("127.0.0.1",))


def send(receiver: Receiver, **kw):  # type: ignore[no-untyped-def]
    opts = {"body": "{}", "headers": {"webhook-id": "msg_1"}, "timeout": 2.0, "body_cap": 64}
    return post(target(receiver), **{**opts, **kw})


def test_post_2xx_is_delivered(receiver: Receiver) -> None:
    out = send(receiver, body='{"a":1}')
    assert (out.kind, out.status_code, out.body) == ("delivered", 200, "ok")
    got = receiver.wait_for(1)[0]
    assert got.body == b'{"a":1}'
    assert got.headers["content-type"] == "application/json"
    assert got.headers["webhook-id"] == "msg_1"


def test_post_connects_to_checked_address_with_original_host(receiver: Receiver) -> None:
    # "hooks.example" is never resolved: the connection goes to the pinned address only.
    port = receiver.server.server_address[1]
    out = post(
        target(receiver, host="hooks.example"), body="{}", headers={}, timeout=2.0, body_cap=64
    )
    assert out.kind == "delivered"
    assert receiver.wait_for(1)[0].headers["Host"] == f"hooks.example:{port}"


def test_post_classifies_answers(receiver: Receiver) -> None:
    receiver.script(
        Reply(503, headers={"Retry-After": "7"}),
        Reply(429),
        Reply(408),
        Reply(400),
        Reply(404),
        Reply(401),
        Reply(410),
        Reply(204),
    )
    kinds = [send(receiver) for _ in range(8)]
    # a 404 while the receiver redeploys, a 401 from its proxy, a 400 from a skewed clock:
    # passing, so retried (given up on the first, each notice was lost for good)
    assert [o.kind for o in kinds] == ["retry"] * 6 + ["gone", "delivered"]
    assert kinds[0].retry_after == "7"


def test_post_does_not_follow_redirects(receiver: Receiver) -> None:
    receiver.script(Reply(302, headers={"Location": "/elsewhere"}))
    out = send(receiver)
    assert out.kind == "retry"  # not followed now; tried again later (the receiver may fix it)
    assert "not followed" in (out.error or "")
    time.sleep(0.2)
    assert [r.path for r in receiver.requests] == ["/hook"]


def test_post_times_out_slow_receiver(receiver: Receiver) -> None:
    receiver.script(Reply(200, delay=10.0))
    started = time.monotonic()
    out = send(receiver, timeout=0.3)
    assert time.monotonic() - started < 5  # not the receiver's 10 s
    assert out.kind == "retry"
    assert "timed out" in (out.error or "")


def test_post_caps_response_body(receiver: Receiver) -> None:
    receiver.script(Reply(500, body=b"x" * 100_000))
    out = send(receiver, body_cap=64)
    assert out.body == "x" * 64


def test_deliver_refuses_unlisted_loopback_without_sending(
    receiver: Receiver, settings: Settings
) -> None:
    out = deliver(url=receiver.url, body="{}", headers={}, settings=settings)
    assert out.kind == "failed"
    assert "loopback" in (out.error or "")
    time.sleep(0.2)
    assert receiver.requests == []


def test_deliver_sends_when_allowlisted(receiver: Receiver, hook_settings: Settings) -> None:
    assert deliver(url=receiver.url, body="{}", headers={}, settings=hook_settings).kind == (
        "delivered"
    )


@pytest.mark.parametrize("status", [200, 500, 410])
def test_deliver_keeps_no_answer_from_an_allowlisted_private_receiver(
    receiver: Receiver, hook_settings: Settings, status: int
) -> None:
    """The attempt log shows its client what the receiver answered. A client may name any URL
    on a network the allowlist opens (an internal service), so what such a receiver says is
    not kept; its status is."""
    receiver.script(Reply(status, body=b"internal secrets"))
    out = deliver(url=receiver.url, body="{}", headers={}, settings=hook_settings)
    assert out.status_code == status
    assert out.body is None


def test_deliver_keeps_no_redirect_target_of_an_allowlisted_private_receiver(
    receiver: Receiver, hook_settings: Settings
) -> None:
    """Where an internal service redirects to (internal host names, sign-in URLs) is its
    answer too: the attempt's error says a redirect was not followed, not where to."""
    receiver.script(Reply(302, headers={"Location": "https://sso.internal.example/login"}))
    out = deliver(url=receiver.url, body="{}", headers={}, settings=hook_settings)
    assert (out.kind, out.status_code) == ("retry", 302)
    assert out.error == "HTTP 302: redirect not followed"


def test_deliver_quotes_nothing_a_non_http_allowlisted_service_sent(
    hook_settings: Settings,
) -> None:
    """An HTTP parser's error quotes the line it choked on: a service on an allowlisted network
    that does not speak HTTP would have its banner (or a first answer with a password in it)
    shown to whoever named it as their webhook URL."""

    def banner(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"INTERNAL-ADMIN v2 db=postgres://svc:hunter2@10.20.0.7/prod\r\n\r\n")
        stop.wait(2)

    with raw_server(banner) as port:
        url = f"http://127.0.0.1:{port}/hook"
        out = deliver(url=url, body="{}", headers={}, settings=hook_settings)
    assert out.kind == "retry"
    assert out.error == "RemoteProtocolError: the answer was not valid HTTP"
    with raw_server(banner) as port:  # a public receiver's own error stays for its client
        quoted = post(
            Target(f"http://a.example:{port}/hook", "a.example", port, ("127.0.0.1",)),
            body="{}",
            headers={},
            timeout=2.0,
            body_cap=64,
        )
    assert "INTERNAL-ADMIN" in (quoted.error or "")


@contextmanager
def raw_server(answer: Callable[[socket.socket, threading.Event], None]) -> Iterator[int]:
    """A loopback server that reads each request and leaves the connection to `answer(conn,
    stop)`; yields its port, and stops it (setting `stop`) at the end."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                answer(conn, stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        thread.join(5)


def loopback(port: int) -> Target:
    """The checked target of a server on this machine's loopback."""
    return Target(
        url=f"http://127.0.0.1:{port}/hook", host="127.0.0.1", port=port, addresses=("127.0.0.1",)
    )


def trickle(conn: socket.socket, stop: threading.Event) -> None:
    """The status line one byte at a time, 0.1 s apart, for ever: each read completes well
    within a per-read timeout."""
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
        if stop.is_set():
            break
        try:
            conn.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)


@pytest.mark.timeout(30)
def test_post_ends_by_its_timeout_even_when_every_read_is_quick() -> None:
    with raw_server(trickle) as port:
        started = time.monotonic()
        out = post(loopback(port), body="{}", headers={}, timeout=0.6, body_cap=64)
        assert time.monotonic() - started < 5  # the trickle would go on for 1000 s
    assert out.kind == "retry"
    assert "timed out" in (out.error or "")


def test_post_keeps_no_nul_byte_of_the_answer(receiver: Receiver) -> None:
    """A compressed or binary answer holds NUL bytes, which Postgres text refuses."""
    receiver.script(Reply(200, body=b"\x1f\x8b\x08\x00gz\x00"))
    out = send(receiver)
    assert out.kind == "delivered"
    assert "\x00" not in (out.body or "")
    assert out.body == "\x1f\ufffd\x08\ufffdgz\ufffd"


ERROR_PAGE = b'{"error":"invalid signature: check your whsec_ secret"}'


def _header(got: Received, name: str) -> str | None:
    return next((v for k, v in got.headers.items() if k.lower() == name), None)


def _gzips_when_asked(got: Received) -> Reply:
    if "gzip" in (_header(got, "accept-encoding") or ""):
        return Reply(400, headers={"Content-Encoding": "gzip"}, body=gzip.compress(ERROR_PAGE))
    return Reply(400, body=ERROR_PAGE)


def test_post_asks_for_the_answer_unencoded(receiver: Receiver) -> None:
    """The body is read raw (never inflated): asked for gzip (httpx's default), a receiver
    gzipped its error page, which the attempt log showed as mojibake."""
    receiver.answer = _gzips_when_asked
    out = send(receiver, body_cap=4096)
    assert _header(receiver.wait_for(1)[0], "accept-encoding") == "identity"
    assert (out.kind, out.status_code, out.body) == ("retry", 400, ERROR_PAGE.decode())


@pytest.mark.parametrize(
    ("encoding", "note"),
    [
        ("gzip", "(gzip-encoded body not stored)"),
        ("br, identity", "(br-encoded body not stored)"),
        ("identity", ERROR_PAGE.decode()),
    ],
)
def test_post_keeps_no_encoded_body_a_receiver_sends_unasked(
    receiver: Receiver, encoding: str, note: str
) -> None:
    """A receiver that compresses whatever it is asked: its answer counts by its status, and a
    note stands in for the bytes that could only be stored as mojibake."""
    body = ERROR_PAGE if encoding == "identity" else gzip.compress(ERROR_PAGE)
    receiver.script(Reply(400, headers={"Content-Encoding": encoding}, body=body))
    out = send(receiver, body_cap=4096)
    assert (out.kind, out.status_code, out.body) == ("retry", 400, note)


def test_connecting_to_many_silent_addresses_ends_by_the_attempts_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host whose eight addresses all drop packets: each would get the full connect timeout,
    so the attempt would outlive its lease; all of them get what is left of the attempt."""
    import httpcore

    from segsvc.webhooks.delivery import PinnedBackend

    def silent(self: object, host: str, port: int, timeout: float | None = None, **_: object):  # type: ignore[no-untyped-def]
        time.sleep(timeout or 0)
        raise httpcore.ConnectTimeout(f"{host} did not answer")

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", silent)
    addresses = tuple(f"127.0.0.{i}" for i in range(2, 10))  # never contacted: faked above
    target = Target("https://hooks.example/", "hooks.example", 443, addresses)
    started = time.monotonic()
    with pytest.raises(httpcore.ConnectTimeout):
        PinnedBackend(target, deadline=started + 0.6).connect_tcp("hooks.example", 443, timeout=5)
    assert time.monotonic() - started < 3  # not 8 x 5 s, nor even one address's 5 s


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("status", "kind"), [(b"200 OK", "delivered"), (b"410 Gone", "gone")])
def test_an_answer_whose_body_stalls_counts_by_its_status(status: bytes, kind: str) -> None:
    """A 200 whose body never finished was a timeout, sent again for days; such a 410 never
    disabled the endpoint. The status line is the answer; the body read just stops."""

    def stall(conn: socket.socket, stop: threading.Event) -> None:
        """`status` with a Content-Length of 100, 5 body bytes, then nothing."""
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 100\r\n\r\nhello")
        stop.wait(20)

    with raw_server(stall) as port:
        started = time.monotonic()
        out = post(loopback(port), body="{}", headers={}, timeout=0.6, body_cap=64)
        assert time.monotonic() - started < 5  # not the stalled body's 20 s
    assert out.kind == kind, out
    assert out.body == "hello"
