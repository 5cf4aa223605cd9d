"""uvicorn HTTP protocols that bound how long a client may take to send a request's headers."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import endpoint

# uvicorn arms no timer until the first response is sent, and a byte of data cancels the
# keep-alive timer: a client that opens a connection and trickles its headers (or sends none)
# would hold it for ever. Every connection must deliver a complete request head within this
# many seconds of opening, or of the end of its previous response.
HEADER_TIMEOUT_SECONDS = 15.0

# Only the fault-injection tests set this ("header=1.5,body=1.5"), so that they can prove the
# timeouts in seconds instead of minutes; operators have no reason to touch it.
TEST_TIMEOUTS_ENV = "SAM_CALLBACK_TEST_TIMEOUTS"


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


class _HeaderDeadline:
    """Closes the connection when a request head does not arrive in time."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any
    _deadline: asyncio.TimerHandle | None = None
    _cycle_at_arm: Any = None

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._cycle_at_arm = self.cycle
        self._deadline = self.loop.call_later(HEADER_TIMEOUT_SECONDS, self._header_deadline_expired)

    def _disarm_header_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_deadline_expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def _waiting_for_head(self) -> bool:
        return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)


class H11HeaderTimeoutProtocol(_HeaderDeadline, H11Protocol):
    """uvicorn's h11 protocol with a deadline on request heads."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        # A new cycle means h11 parsed a complete request head.
        if self._deadline is not None and self.cycle is not None and self.cycle is not self._cycle_at_arm:
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._waiting_for_head():
            self._arm_header_deadline()


class HttpToolsHeaderTimeoutProtocol(_HeaderDeadline, HttpToolsProtocol):
    """uvicorn's httptools protocol (its default when installed) with a deadline on request heads."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._waiting_for_head():
            self._arm_header_deadline()
