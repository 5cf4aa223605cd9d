"""uvicorn HTTP protocols that bound how long a client may take to send a request's headers, and their size."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import endpoint, recorder
from .responses import envelope, request_id_from

log = logging.getLogger("sam.callback.http")

# uvicorn arms no timer until the first response is sent, and a byte of data cancels the
# keep-alive timer: a client that opens a connection and trickles its headers (or sends none)
# would hold it for ever. Every connection must deliver a complete request head within this
# many seconds of opening, or of the end of its previous response.
HEADER_TIMEOUT_SECONDS = 15.0

# httptools (llhttp) puts no limit on a request head: a 20 MB header is buffered whole (and
# re-concatenated chunk by chunk) before the app sees it. Heads larger than this are refused with
# 431 and a closed connection. The server always runs this httptools protocol (a dependency on
# every platform), so uvicorn's h11 parser is never used.
MAX_HEAD_BYTES = 64 * 1024

# Only the fault-injection tests set this ("header=1.5,body=1.5,submit=2"), so that they can prove the
# timeouts in seconds instead of minutes; operators have no reason to touch it.
TEST_TIMEOUTS_ENV = "SAM_CALLBACK_TEST_TIMEOUTS"

# The event loop's timers have millisecond resolution: one may fire a hair before its time.
_TIMER_SLACK = 0.005


def apply_test_timeouts(environ: dict[str, str] | None = None) -> None:
    """Shorten the header and body timeouts when the tests ask for it through the environment."""
    global HEADER_TIMEOUT_SECONDS
    value = (os.environ if environ is None else environ).get(TEST_TIMEOUTS_ENV, "")
    for part in value.split(","):
        name, _, seconds = part.partition("=")
        if not seconds.strip():
            continue
        if name.strip() == "header":
            HEADER_TIMEOUT_SECONDS = float(seconds)
        elif name.strip() == "body":
            endpoint.BODY_TIMEOUT_SECONDS = float(seconds)
        elif name.strip() == "submit":
            recorder.SUBMIT_TIMEOUT_SECONDS = float(seconds)


class _HeaderDeadline:
    """Closes the connection when a request head does not arrive in time."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any
    app: Any
    timeout_keep_alive: int
    _deadline: asyncio.TimerHandle | None = None
    # Loop time since which a request head is awaited; None while a request is being handled.
    # The timer is armed once per connection and only re-armed when it fires: arming and
    # cancelling one on every request cost more than everything else this class does.
    _head_since: float | None = None
    # How long the head awaited since _head_since may take. After a response it is uvicorn's
    # keep-alive timeout (the connection is idle), until a byte arrives: from then on it is the
    # header timeout, as when uvicorn's keep-alive timer is cancelled by data. Both are counted
    # from the end of the previous response. Set in connection_made.
    _head_limit: float
    # The app's callback path: the app writes its own line for each of those requests.
    _quiet_path: str | None = None

    def _find_quiet_path(self) -> None:
        self._quiet_path = getattr(self.app, "callback_path", None)

    def _quiet_access_log(self) -> None:
        # uvicorn would build an access record for every callback only for logs.py to drop it;
        # switched off per request so that every other path keeps its access line.
        cycle = self.cycle
        if cycle is not None and self._quiet_path is not None and cycle.scope["path"].rstrip("/") == self._quiet_path:
            cycle.access_log = False

    def _idle_limit(self) -> float:
        # The timer never sleeps longer than this, so that a response completed while it is
        # pending still gets its keep-alive deadline on time. With a header timeout shorter than
        # the keep-alive one (the tests), the header deadline closed idle connections first.
        return min(self.timeout_keep_alive, HEADER_TIMEOUT_SECONDS)

    def _await_head(self, limit: float) -> None:
        self._head_since = self.loop.time()
        self._head_limit = limit
        if self._deadline is None:
            self._deadline = self.loop.call_later(self._idle_limit(), self._header_deadline_expired)

    def _head_received(self) -> None:
        self._head_since = None

    def _disarm_header_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_deadline_expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        since, now = self._head_since, self.loop.time()
        period = self._idle_limit()
        if since is None:
            # A request is being handled; its response will start a new wait.
            self._deadline = self.loop.call_later(period, self._header_deadline_expired)
        elif now - since >= self._head_limit - _TIMER_SLACK:
            self.transport.close()
        else:
            due = min(since + self._head_limit, now + period)
            self._deadline = self.loop.call_at(due, self._header_deadline_expired)

    def _waiting_for_head(self) -> bool:
        return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop httptools; uvicorn then calls send_400_response."""


class HttpToolsHeaderTimeoutProtocol(_HeaderDeadline, HttpToolsProtocol):
    """uvicorn's httptools protocol (its default when installed) with a deadline and a size limit on request heads."""

    # Bytes received since the current head began: an upper bound on its size, exact enough to
    # stop a head that never ends; a head that ends is then measured exactly.
    _head_bytes = 0
    _last_chunk = 0
    _in_head = True
    _head_refused = False
    _stopping = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._find_quiet_path()
        # uvicorn arms no keep-alive timer before the first response: only the header timeout.
        self._await_head(HEADER_TIMEOUT_SECONDS)

    def data_received(self, data: bytes) -> None:
        # Data ends the keep-alive wait (uvicorn cancels its timer here); the head now has
        # the header timeout, still counted from the end of the previous response.
        self._head_limit = HEADER_TIMEOUT_SECONDS
        self._last_chunk = len(data)
        if self._in_head:
            self._head_bytes += self._last_chunk
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:
            # The head starts somewhere in the chunk being parsed; count all of it.
            self._in_head = True
            self._head_bytes = self._last_chunk

    def send_400_response(self, msg: str) -> None:
        if self._head_refused:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _refuse_head(self) -> None:
        self._head_refused = True
        log.warning(
            "Petición rechazada (431): línea de petición y cabeceras de más de %d bytes cliente=%s",
            MAX_HEAD_BYTES,
            self.client[0] if self.client else "-",
        )
        status, body = envelope(
            "headers_too_large",
            request_id_from(None),
            message=f"La línea de petición y las cabeceras superan el máximo de {MAX_HEAD_BYTES} bytes",
        )
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.transport.write(
            b"HTTP/1.1 %d Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nx-request-id: %s\r\nconnection: close\r\n\r\n%s"
            % (status, len(payload), body["request_id"].encode(), payload)
        )
        self.transport.close()

    def shutdown(self) -> None:
        """Graceful stop: answer the request of a connection that has not sent one yet, then close it."""
        # uvicorn closes a connection without a request at once. One accepted just before the
        # stop usually has its callback already in the kernel's buffer, unread: closing it then
        # resets the connection and loses a callback A360 never resends. The header deadline
        # still bounds a connection that sends nothing.
        if self.cycle is None and not self.transport.is_closing():
            self._stopping = True
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._head_received()
        self._in_head = False
        if self._head_bytes > MAX_HEAD_BYTES and (
            len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) > MAX_HEAD_BYTES
        ):
            self._head_refused = True
            raise _HeadTooLarge
        self._head_bytes = 0
        cycle = self.cycle
        super().on_headers_complete()
        if self.cycle is not cycle:
            self._quiet_access_log()
            if self._stopping:
                self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # The parser callbacks of one request all run before the next one begins: self.scope is
        # still this request's. The endpoint then reads the body without arming a timeout.
        self.scope[endpoint.BODY_RECEIVED] = True  # type: ignore[literal-required]

    def on_response_complete(self) -> None:
        # uvicorn's own on_response_complete, except that it arms no keep-alive timer: arming one
        # after every response and cancelling it on the next request's data cost about 2 µs of
        # CPU per request (bench/run.py). The header deadline's lazy timer closes the idle
        # connection after the same timeout_keep_alive instead (see _head_limit). Keep in step
        # with uvicorn's HttpToolsProtocol.on_response_complete when upgrading uvicorn.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        if self._waiting_for_head():
            self._await_head(self._idle_limit())
