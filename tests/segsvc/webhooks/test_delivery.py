"""One attempt against a real receiver on 127.0.0.1: classification, pinning, caps."""

from __future__ import annotations

import time

from segsvc.settings import Settings
from segsvc.webhooks.delivery import deliver, post
from segsvc.webhooks.ssrf import Target
from tests.segsvc.webhooks.receiver import Receiver, Reply


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
        Reply(503, headers={"Retry-After": "7"}), Reply(429), Reply(408), Reply(400), Reply(410)
    )
    kinds = [send(receiver) for _ in range(5)]
    assert [o.kind for o in kinds] == ["retry", "retry", "retry", "failed", "gone"]
    assert kinds[0].retry_after == "7"


def test_post_does_not_follow_redirects(receiver: Receiver) -> None:
    receiver.script(Reply(302, headers={"Location": "/elsewhere"}))
    out = send(receiver)
    assert out.kind == "failed"
    assert "not followed" in (out.error or "")
    time.sleep(0.2)
    assert [r.path for r in receiver.requests] == ["/hook"]


def test_post_times_out_slow_receiver(receiver: Receiver) -> None:
    receiver.script(Reply(200, delay=2.0))
    started = time.monotonic()
    out = send(receiver, timeout=0.3)
    assert time.monotonic() - started < 1.5
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
