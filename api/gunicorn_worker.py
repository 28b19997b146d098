"""gunicorn's threaded worker with a clock on reading each request (`worker_class` in
api/gunicorn_conf.py).

gunicorn reads a request's headers and body on one of its threads, with no timeout at all: a
dozen clients sending headers or bodies that never end (or a byte at a time) held every thread
of a process, and with them /healthz and every other client's requests. Here the time a request
waits on its client is bounded, as Apache's mod_reqtimeout does:

- request line and headers: SEG_REQUEST_HEADER_TIMEOUT_SECONDS (10 s) in all;
- body: each wait at most SEG_REQUEST_BODY_TIMEOUT_SECONDS (10 s), and in all that much plus
  one second per SEG_REQUEST_BODY_MIN_RATE (16 KiB) received, so a steady upload of any size
  passes while one trickled a byte at a time ends.

Only time blocked on the client counts: not the application's own work, nor a kept-alive
connection idling between requests (it waits in gunicorn's poller, on no thread). A request out
of time is answered 408 (JSON, as every error) and its connection closed, freeing the thread.
Answers are written against the same limits (`TimedSocket.sendall`; gunicorn_conf turns
sendfile off so that every answer goes through it): a client that stops reading is dropped.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

from gunicorn import util as gunicorn_util
from gunicorn.workers.gthread import ThreadWorker
from werkzeug.exceptions import RequestTimeout

from segsvc.settings import Settings, get_settings

# A connection the server ends (after a 408, a `Connection: close`, an error) is closed on its
# request's thread, waiting this long at most for the client's own close, so the last answer is
# not cut by a reset. gunicorn closes on its main thread, the one that accepts and dispatches
# every connection, waiting up to 2 s: 8 clients that never closed held it for 12 s.
CLOSE_LINGER_S = 0.5


class RequestReadTimeout(RequestTimeout):
    """A request's headers or body did not arrive in time (408: the app answers it as any
    HTTP error when it happens as the app reads the body)."""


@dataclass(frozen=True)
class ReadLimits:
    """How long a request may keep its thread waiting on the client."""

    header_s: float
    body_s: float
    body_min_rate: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ReadLimits:
        """The limits SEG_REQUEST_* set."""
        return cls(
            header_s=settings.request_header_timeout_seconds,
            body_s=settings.request_body_timeout_seconds,
            body_min_rate=settings.request_body_min_rate,
        )


class ReadClock:
    """The time one request has waited on its client, in its current phase."""

    def __init__(self, limits: ReadLimits) -> None:
        self.limits = limits
        self.armed = False
        self.expired = False
        self.in_body = False
        self.waited = 0.0
        self.received = 0

    def start_headers(self) -> None:
        """A request begins: its line and headers are read next."""
        self.armed, self.expired, self.in_body = True, False, False
        self.waited, self.received = 0.0, 0

    def start_body(self) -> None:
        """The headers are in: what is read next is the body (as the app asks for it)."""
        self.in_body, self.waited, self.received = True, 0.0, 0

    def disarm(self) -> None:
        """The request's thread is done with the connection: reads are no longer timed."""
        self.armed = False

    def budget(self) -> float:
        """How long the next read may wait (0: out of time)."""
        limits = self.limits
        if not self.in_body:
            return max(0.0, limits.header_s - self.waited)
        allowance = limits.body_s
        if limits.body_min_rate:
            allowance += self.received / limits.body_min_rate
        else:
            allowance = float("inf")
        return max(0.0, min(limits.body_s, allowance - self.waited))

    def record(self, *, waited: float, received: int) -> None:
        """Count one read: how long it waited and how many bytes it got."""
        self.waited += waited
        self.received += received


class TimedSocket:
    """A client socket whose reads, while its clock is armed, wait no longer than the clock
    allows; everything else passes through to the socket."""

    def __init__(self, sock: socket.socket, limits: ReadLimits) -> None:
        self.sock = sock
        self.clock = ReadClock(limits)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def setblocking(self, flag: bool) -> None:
        """`socket.setblocking`; nothing once `close_now` closed it (gunicorn's own close
        sets it first, and counted the connection twice on the error that raised)."""
        if self.sock.fileno() != -1:
            self.sock.setblocking(flag)

    def close_now(self) -> None:
        """Close gracefully (FIN, then a short wait for the client's), on this thread."""
        self.clock.disarm()
        gunicorn_util.close_graceful(self.sock, timeout=CLOSE_LINGER_S)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """`socket.recv`, raising RequestReadTimeout once the request is out of time."""
        clock = self.clock
        if not clock.armed:
            return self.sock.recv(bufsize, flags)
        budget = clock.budget()
        if budget <= 0:
            raise self._expire()
        outer = self.sock.gettimeout()  # gunicorn's own, e.g. while it drains an unread body
        self.sock.settimeout(budget if outer is None or outer <= 0 else min(outer, budget))
        started = time.monotonic()
        try:
            data = self.sock.recv(bufsize, flags)
        except TimeoutError:
            if outer is not None and 0 < outer <= budget:
                raise  # the caller's own timeout, not the request's
            raise self._expire() from None
        finally:
            clock.record(waited=time.monotonic() - started, received=0)
            self.sock.settimeout(outer)
        clock.record(waited=0.0, received=len(data))
        return data

    def sendall(self, data: Any, flags: int = 0) -> None:
        """`socket.sendall`, where each wait for the client to take more of the answer is at
        most SEG_REQUEST_BODY_TIMEOUT_SECONDS, and the whole answer must go at
        SEG_REQUEST_BODY_MIN_RATE on average (as a body must arrive): a client that asked for
        a large answer (an overlay) and stopped reading it held its thread for good. Out of
        time, a TimeoutError (an OSError: gunicorn drops the connection)."""
        limits = self.clock.limits
        view = memoryview(data).cast("B")
        outer = self.sock.gettimeout()
        started, sent = time.monotonic(), 0
        try:
            while view:
                allowance = limits.body_s
                if limits.body_min_rate:
                    allowance += sent / limits.body_min_rate
                else:
                    allowance = float("inf")
                budget = min(limits.body_s, allowance - (time.monotonic() - started))
                if budget <= 0:
                    raise TimeoutError("the client did not take the answer in time")
                self.sock.settimeout(budget)
                n = self.sock.send(view, flags)
                sent += n
                view = view[n:]
        finally:
            self.sock.settimeout(outer)

    def _expire(self) -> RequestReadTimeout:
        self.clock.expired = True
        what = "body" if self.clock.in_body else "headers"
        return RequestReadTimeout(f"The request's {what} did not arrive in time.")


class TimedThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, reading each request against a ReadClock."""

    read_limits: ReadLimits

    def init_process(self) -> None:
        if self.cfg.is_ssl:  # its sockets would wrap this one's: TLS ends before gunicorn here
            raise RuntimeError("TimedThreadWorker serves plain HTTP only (no certfile)")
        self.read_limits = ReadLimits.from_settings(get_settings())
        super().init_process()

    def enqueue_req(self, conn: Any) -> None:
        # Before the connection's parser is made (on its first request), so it reads through
        # the clock; later requests of a kept-alive connection come back here with it.
        if not isinstance(conn.sock, TimedSocket):
            conn.sock = TimedSocket(conn.sock, self.read_limits)
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        sock: TimedSocket = conn.sock
        sock.clock.start_headers()
        try:
            result = super().handle(conn)
        finally:
            sock.clock.disarm()
        if sock.clock.expired or not result:  # to be closed (not kept alive, nor deferred)
            sock.close_now()
            return False
        return result

    def handle_request(self, req: Any, conn: Any) -> Any:
        conn.sock.clock.start_body()
        return super().handle_request(req, conn)

    def _keepalive_after(self, conn: Any, keepalive: Any) -> bool:
        if conn.sock.clock.expired:  # the app answered 408 after it: the rest will not come
            return False
        try:
            return bool(super()._keepalive_after(conn, keepalive))
        except RequestReadTimeout:  # draining a body the app did not read
            return False

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if not isinstance(exc, RequestReadTimeout):
            super().handle_error(req, client, addr, exc)
            return
        peer = addr[0] if addr else "-"
        self.log.warning("request from %s out of time: %s", peer, exc.description)
        try:
            gunicorn_util.write_error(client, 408, "Request Timeout", exc.description or "")
        except OSError:
            self.log.debug("could not send the 408")
