"""uvicorn's httptools protocol with a deadline and a size limit on request heads; imports nothing from the app.

Kept small on purpose: every uvicorn name this module relies on is listed in
`UVICORN_CONTRACT` and checked by tests/test_protocols.py, so that an upgrade that moves one
fails a test that says which, instead of a slow client holding connections again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("sam.callback.http")

# Set to True in a request's scope once its whole body has arrived (the parser has seen the end
# of the message): the app can then read the body without arming a timeout.
BODY_RECEIVED = "sam.body_received"

# What the protocol needs from the app for a refused head: given the limit in bytes, the
# request id and the JSON body of the 431 answer.
HeadTooLargeAnswer = Callable[[int], tuple[str, bytes]]
# The request id and JSON body of the 400 answer to a request the HTTP parser cannot read.
BadRequestAnswer = Callable[[], tuple[str, bytes]]

# Every name of uvicorn's HttpToolsProtocol this module overrides, calls or reads, with the
# parameters it relies on. tests/test_protocols.py fails with "re-sync protocols.py" when one moves.
UVICORN_CONTRACT: dict[str, tuple[str, ...]] = {
    "__init__": ("config", "server_state", "app_state", "_loop"),
    "connection_made": ("transport",),
    "connection_lost": ("exc",),
    "data_received": ("data",),
    "on_message_begin": (),
    "on_headers_complete": (),
    "on_message_complete": (),
    "on_response_complete": (),
    "send_400_response": ("msg",),
    "shutdown": (),
}
# Instance attributes read or written: transport, loop, client, url, headers, scope, cycle
# (and the cycle's `scope`, `response_complete`, `access_log`, `keep_alive`).
UVICORN_ATTRIBUTES = ("transport", "loop", "client", "url", "headers", "scope", "cycle")
CYCLE_ATTRIBUTES = ("scope", "response_complete", "access_log", "keep_alive")

# The event loop's timers have millisecond resolution: one may fire a hair before its time.
_TIMER_SLACK = 0.005


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop httptools; uvicorn then calls send_400_response."""


class HeldHeadTransport(asyncio.Transport):
    """The connection's transport, able to hold a response head until its body is written.

    uvicorn writes a response's head and its body with two `write` calls, two `send` system
    calls. For the callback path, whose body always follows at once, the head waits for it and
    both leave in one. Everything else passes straight through; a held head is written before
    anything else happens to the connection (close, end of the response).
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self.transport = transport
        self.hold_next_head = False
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write `data`, after the held head if there is one; hold it if it is the head to hold."""
        if self._held is not None:
            data, self._held = self._held + data, None
        elif self.hold_next_head and isinstance(data, bytes) and not data.startswith(b"HTTP/1.1 100 "):
            # "100 Continue" is not the head: the client waits for it before sending the body.
            self.hold_next_head = False
            self._held = bytes(data)
            return
        self.transport.write(data)

    def flush(self) -> None:
        """Write the held head now."""
        if self._held is not None:
            held, self._held = self._held, None
            self.transport.write(held)

    def writelines(self, list_of_data: Any) -> None:
        """Write the pieces as one."""
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        """Flush, then half-close."""
        self.flush()
        self.transport.write_eof()

    def can_write_eof(self) -> bool:
        """As the real transport."""
        return self.transport.can_write_eof()

    def close(self) -> None:
        """Flush, then close."""
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping what is held."""
        self._held = None
        self.transport.abort()

    def is_closing(self) -> bool:
        """As the real transport."""
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """As the real transport (peer and socket addresses, TLS)."""
        return self.transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """As the real transport."""
        self.transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """As the real transport."""
        return self.transport.get_protocol()

    def pause_reading(self) -> None:
        """As the real transport."""
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        """As the real transport."""
        self.transport.resume_reading()

    def is_reading(self) -> bool:
        """As the real transport."""
        return self.transport.is_reading()

    def get_write_buffer_size(self) -> int:
        """The real transport's buffer plus the held head."""
        return self.transport.get_write_buffer_size() + (len(self._held) if self._held is not None else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """As the real transport."""
        return self.transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """As the real transport."""
        self.transport.set_write_buffer_limits(high, low)


class HeadLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size limit on request heads.

    uvicorn arms no timer until the first response is sent, and a byte of data cancels its
    keep-alive timer: a client that opens a connection and trickles its headers (or sends none)
    would hold it for ever. Here every connection must deliver a complete request head within
    `header_timeout` seconds of opening, or of the end of its previous response. httptools puts
    no limit on a head's size either: heads over `max_head_bytes` get a 431 and a closed
    connection. Requests to `quiet_path` get no uvicorn access line (the app logs them itself).

    uvicorn builds the protocol itself, so the limits come bound with `functools.partial`
    (see `protocol_factory`), which also survives the pickling of worker processes.
    """

    def __init__(
        self,
        *args: Any,
        header_timeout: float,
        max_head_bytes: int,
        head_too_large: HeadTooLargeAnswer,
        bad_request: BadRequestAnswer | None = None,
        quiet_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_head_bytes = max_head_bytes
        self.head_too_large = head_too_large
        self.bad_request = bad_request
        self.quiet_path = quiet_path.rstrip("/") if quiet_path else None
        # The paths the app routes to its callback endpoint (one trailing slash tolerated).
        self._quiet_paths = (self.quiet_path, self.quiet_path + "/") if self.quiet_path else ()
        self._deadline: asyncio.TimerHandle | None = None
        # Loop time since which a request head is awaited; None while a request is handled.
        # One timer per connection, re-armed only when it fires: arming and cancelling one on
        # every request cost more than everything else this class does.
        self._head_since: float | None = None
        # Bytes received since the current head began: an upper bound on its size, exact enough
        # to stop a head that never ends; a head that ends is then measured exactly.
        self._head_bytes = 0
        self._last_chunk = 0
        self._in_head = True
        # The head began inside the chunk being parsed, after other bytes: the chunk's size
        # overstates it, so it is judged from the next chunk on (or exactly when it ends).
        self._head_began_mid_chunk = False
        self._head_refused = False
        # Set by a graceful stop that found this connection waiting for its first request.
        self._stopping = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the header deadline with the connection; uvicorn writes through `HeldHeadTransport`."""
        super().connection_made(HeldHeadTransport(transport))  # type: ignore[arg-type]
        self._head_since = self.loop.time()
        self._deadline = self.loop.call_later(self.header_timeout, self._header_deadline_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        """Disarm the header deadline."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Count the bytes of the head being received; refuse it once it exceeds the limit."""
        self._last_chunk = len(data)
        self._head_began_mid_chunk = False
        if self._in_head:
            self._head_bytes += self._last_chunk
        super().data_received(data)
        if (
            self._in_head
            and not self._head_began_mid_chunk
            and self._head_bytes > self.max_head_bytes
            and not self.transport.is_closing()
        ):
            self._refuse_head()

    def on_message_begin(self) -> None:
        """A new head starts somewhere in the chunk being parsed; count all of the chunk."""
        super().on_message_begin()
        if not self._in_head:
            self._in_head = True
            self._head_bytes = self._last_chunk
            self._head_began_mid_chunk = True

    def on_headers_complete(self) -> None:
        """Stop the header deadline; measure the head exactly when the count says it may be too large."""
        self._head_since = None
        self._in_head = False
        if self._head_bytes > self.max_head_bytes and (
            len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) > self.max_head_bytes
        ):
            self._head_refused = True
            raise _HeadTooLarge
        self._head_bytes = 0
        cycle = self.cycle
        super().on_headers_complete()
        # uvicorn would build an access record for every callback only for the log configuration
        # to drop it; switched off per request, so every other path keeps its line.
        if self.cycle is not cycle:
            if self.cycle.scope["path"] in self._quiet_paths:
                self.cycle.access_log = False
                self.transport.hold_next_head = True  # type: ignore[attr-defined]
            if self._stopping:
                # The service is stopping: answer this request, then close the connection.
                self.cycle.keep_alive = False

    def shutdown(self) -> None:
        """Graceful stop: a connection waiting for its next request answers it if it comes, then closes."""
        # uvicorn closes a connection that is between requests at once. One accepted just before
        # the stop, or a kept-alive one whose client is reusing it, usually has its callback
        # already on its way or in the kernel's buffer, unread: closing it then resets the
        # connection and loses a callback A360 never resends. Such a connection still closes
        # after uvicorn's keep-alive time or the header deadline if nothing comes.
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
            self._stopping = True
            return
        super().shutdown()

    def on_message_complete(self) -> None:
        """Mark the request's scope: its whole body is here."""
        super().on_message_complete()
        # The parser callbacks of one request all run before the next one begins: self.scope is
        # still this request's.
        self.scope[BODY_RECEIVED] = True  # type: ignore[literal-required]

    def on_response_complete(self) -> None:
        """uvicorn's own handling, then the next head is awaited from now."""
        # A response without a body write (HEAD) leaves its head held: it goes now.
        self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()
        cycle = self.cycle
        if not self.transport.is_closing() and (cycle is None or cycle.response_complete):
            self._head_since = self.loop.time()

    def send_400_response(self, msg: str) -> None:
        """The answer to a request the parser cannot read: 431 when this class stopped it, else a JSON 400."""
        if self._head_refused:
            self._refuse_head()
        elif self.bad_request is None:
            super().send_400_response(msg)
        else:
            # Every answer of the service is its JSON envelope, this one too (uvicorn's is text).
            self._answer_and_close(b"400 Bad Request", *self.bad_request())

    def _refuse_head(self) -> None:
        self._head_refused = True
        log.warning(
            "Petición rechazada (431): línea de petición y cabeceras de más de %d bytes cliente=%s",
            self.max_head_bytes,
            self.client[0] if self.client else "-",
        )
        self._answer_and_close(b"431 Request Header Fields Too Large", *self.head_too_large(self.max_head_bytes))

    def _answer_and_close(self, status: bytes, request_id: str, payload: bytes) -> None:
        # Written whole, before uvicorn has a request cycle to answer through; then the connection ends.
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nx-request-id: %s\r\nconnection: close\r\n\r\n%s"
            % (status, len(payload), request_id.encode(), payload)
        )
        self.transport.close()

    def _header_deadline_expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        since, now = self._head_since, self.loop.time()
        if since is None:
            # A request is being handled; its response will start a new wait.
            self._deadline = self.loop.call_later(self.header_timeout, self._header_deadline_expired)
        elif now - since >= self.header_timeout - _TIMER_SLACK:
            self.transport.close()
        else:
            self._deadline = self.loop.call_at(since + self.header_timeout, self._header_deadline_expired)


def protocol_factory(
    *,
    header_timeout: float,
    max_head_bytes: int,
    head_too_large: HeadTooLargeAnswer,
    bad_request: BadRequestAnswer | None = None,
    quiet_path: str | None = None,
) -> Callable[..., HeadLimitedProtocol]:
    """The value for uvicorn's `http` option: `HeadLimitedProtocol` with these limits bound."""
    return functools.partial(
        HeadLimitedProtocol,
        header_timeout=header_timeout,
        max_head_bytes=max_head_bytes,
        head_too_large=head_too_large,
        bad_request=bad_request,
        quiet_path=quiet_path,
    )
