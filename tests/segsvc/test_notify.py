"""Job-finished notices: one subscription per process that wakes waiters by job id."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from segsvc import notify
from segsvc.settings import Settings


def wait_in_thread(
    url: str, job_id: str, seconds: float, got: list[object] | None = None
) -> tuple[threading.Thread, list[float]]:
    """Wait for one job's notice in a thread; the list gets how long the wait took, and `got`
    what the wait returned. The process's listener has subscribed first, so the wait is on its
    notices, never the fallback of polling that a subscription slower than SUBSCRIBE_WAIT_S
    (a loaded machine) would give."""
    assert notify._listener(url).subscribed.wait(10), "the listener has not subscribed"
    took: list[float] = []
    ready = threading.Event()

    def run() -> None:
        with notify.subscribe(url, job_id) as (subscription, _):
            ready.set()
            started = time.monotonic()
            answer = subscription.wait(seconds)
            took.append(time.monotonic() - started)
            if got is not None:
                got.append(answer)

    thread = threading.Thread(target=run)
    thread.start()
    assert ready.wait(5)
    return thread, took


def test_a_notice_wakes_only_its_own_job(settings: Settings) -> None:
    url = settings.effective_redis_url
    mine, other = str(uuid.uuid4()), str(uuid.uuid4())
    other_got: list[object] = []
    mine_thread, mine_took = wait_in_thread(url, mine, 30)
    other_thread, _ = wait_in_thread(url, other, 30, other_got)
    notify.publish_finished(url, [mine, str(uuid.uuid4())])
    mine_thread.join()
    # The listener handles notices in order: had the first one woken `other`, its wait would
    # have returned on it (without an end state), not on this one.
    notify.publish_finished(url, [other], {other: {"status": "failed"}})
    other_thread.join()
    assert mine_took[0] < 10  # the notice, not the 30 s wait
    assert other_got == [{other: {"status": "failed"}}]  # not woken by another job's notice


def test_the_channel_is_per_redis_database(settings: Settings) -> None:
    assert notify.channel("redis://127.0.0.1:6379/3") != notify.channel("redis://127.0.0.1:6379/4")


def test_the_listener_resubscribes_after_its_connection_drops(settings: Settings) -> None:
    """A Redis restart wakes every waiter (they re-read the job), then notices work again."""
    url = settings.effective_redis_url
    job_id = str(uuid.uuid4())
    thread, took = wait_in_thread(url, job_id, 30)
    listener = notify._listener(url)
    admin = redis.Redis.from_url(url)
    for client in admin.client_list(_type="pubsub"):  # only ours: other test processes listen too
        if client["name"] == listener.client_name:
            admin.client_kill_filter(_id=client["id"])  # what a Redis restart does to it
    thread.join(10)
    assert took, "the waiter was not woken"
    assert took[0] < 10  # woken so it re-reads the job instead of waiting 30 s
    again, again_took = wait_in_thread(url, job_id, 30)  # once subscribed again
    notify.publish_finished(url, [job_id])
    again.join()
    assert again_took[0] < 10  # the notice, not the 30 s wait


def test_without_redis_a_waiter_falls_back_to_polling_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing listens on port 1 of loopback: the connection is refused, the waiter polls at
    once instead of waiting out SUBSCRIBE_WAIT_S (10 s here, well above the bounds below)."""
    monkeypatch.setattr(notify, "SUBSCRIBE_WAIT_S", 10.0)
    url = "redis://127.0.0.1:1/0"
    started = time.monotonic()
    with notify.subscribe(url, uuid.uuid4()) as (subscription, recheck_s):
        assert recheck_s == notify.POLL_WITHOUT_REDIS_S
        subscription.wait(30)  # a poll's pause, not the 30 s
    assert time.monotonic() - started < 5
    again = time.monotonic()
    with notify.subscribe(url, uuid.uuid4()):  # the known outage costs no wait at all
        pass
    assert time.monotonic() - again < 5


def test_a_notice_hands_each_waiter_its_own_jobs_end_state(settings: Settings) -> None:
    url = settings.effective_redis_url
    mine, other = str(uuid.uuid4()), str(uuid.uuid4())
    got: list[object] = []
    thread, took = wait_in_thread(url, mine, 30, got)
    notify.publish_finished(
        url, [mine, other], {mine: {"status": "succeeded"}, other: {"status": "failed"}}
    )
    thread.join()
    assert took[0] < 10  # the notice, not the 30 s wait
    assert got == [{mine: {"status": "succeeded"}}]


@pytest.mark.parametrize(
    "message",
    [b"{id}", b'{{"{id}":null}}'],
    ids=["bare-ids-of-an-older-release", "no-state"],
)
def test_a_notice_without_an_end_state_asks_for_a_read(settings: Settings, message: bytes) -> None:
    url = settings.effective_redis_url
    job_id = str(uuid.uuid4())
    got: list[object] = []
    thread, took = wait_in_thread(url, job_id, 30, got)
    redis.Redis.from_url(url).publish(notify.channel(url), message.decode().format(id=job_id))
    thread.join()
    assert took[0] < 10  # the notice, not the 30 s wait
    assert got == [None]  # woken, and told to read the job


def test_a_wait_that_runs_out_asks_for_a_read(settings: Settings) -> None:
    got: list[object] = []
    thread, _ = wait_in_thread(settings.effective_redis_url, str(uuid.uuid4()), 0.2, got)
    thread.join()
    assert got == [None]


def test_a_malformed_notice_is_ignored_and_the_listener_goes_on(settings: Settings) -> None:
    url = settings.effective_redis_url
    job_id = str(uuid.uuid4())
    got: list[object] = []
    thread, took = wait_in_thread(url, job_id, 30, got)
    redis.Redis.from_url(url).publish(notify.channel(url), b"{not json")
    notify.publish_finished(url, [job_id], {job_id: {"status": "failed"}})
    thread.join()
    assert took[0] < 10  # the notice, not the 30 s wait
    assert got == [{job_id: {"status": "failed"}}]


class FreezingProxy:
    """A loopback TCP proxy to Redis that can go silent without closing anything, as a NAT
    that dropped the connection's state or a Redis failed over without a word does."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        import socket

        self.upstream = upstream
        self.frozen = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[object] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                conn, _ = self.server.accept()
                up = socket.create_connection(self.upstream)
            except OSError:
                return
            self.sockets += [conn, up]
            for src, dst in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: object, dst: object) -> None:
        # Every socket error ends the pump quietly: the test closes the sockets under it (an
        # exception left in a thread would be reported against whichever test runs next).
        while True:
            try:
                data = src.recv(65536)  # type: ignore[attr-defined]
                if not data:
                    return
                if not self.frozen.is_set():  # frozen: read and drop, never answer, never close
                    dst.sendall(data)  # type: ignore[attr-defined]
            except OSError:
                return

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()  # type: ignore[attr-defined]


def test_a_connection_gone_silent_is_noticed_and_replaced(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pubsub.listen() blocked on a read without a timeout: a connection that a NAT or a
    failover dropped without a word was waited on until TCP keepalive (2 hours here) while
    every notice was lost. A quiet subscription now PINGs and reconnects unanswered."""
    monkeypatch.setattr(notify, "QUIET_PING_S", 0.5)
    monkeypatch.setattr(notify, "PONG_TIMEOUT_S", 1.0)
    real = redis.connection.parse_url(settings.effective_redis_url)
    proxy = FreezingProxy(("127.0.0.1", int(real.get("port", 6379))))
    url = f"redis://127.0.0.1:{proxy.port}/{real.get('db', 0)}"
    listener = notify._Listener(url)
    try:
        assert listener.subscribed.wait(10)
        proxy.frozen.set()
        deadline = time.monotonic() + 15
        while listener.subscribed.is_set():  # noticed: waiters are woken to re-read
            assert time.monotonic() < deadline, "a silent connection was waited on"
            time.sleep(0.1)
        proxy.frozen.clear()
        assert listener.subscribed.wait(15)  # a new connection, and notices again
        job_id = str(uuid.uuid4())
        notice = listener.add([job_id])
        notify.publish_finished(url, [job_id], {job_id: {"status": "succeeded"}})
        assert notice.wait(10) == {job_id: {"status": "succeeded"}}
    finally:
        listener.close()
        proxy.close()
