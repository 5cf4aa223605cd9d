"""The HTTP protocol: head deadline, keep-alive, pipelining and the 431 limit, on a fake transport and clock.

As uvicorn tests its own protocols (tests/protocols/test_http.py): the protocol is built the way
uvicorn's server builds it, from the server's real options, and fed bytes by hand; its timers run
on a loop whose clock the test moves, so no test waits on the wall clock. Requests reach the
real app, with its lifespan, its SQLite database and its writer thread.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import select
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from sam.callback.app import create_app
from sam.callback.protocols import CYCLE_ATTRIBUTES, UVICORN_ATTRIBUTES, UVICORN_CONTRACT, HeadLimitedProtocol
from sam.callback.server import MAX_HEAD_BYTES, uvicorn_options
from sam.callback.settings import Settings
from tests.faults_support import FINAL, callback_body
from tests.utils import TOKEN, ServerProcess, fetch_run, insert_run

KEEP_ALIVE = 5.0  # server.KEEP_ALIVE_SECONDS
HEADER_TIMEOUT = 15.0  # the default CALLBACK_HEADER_TIMEOUT_SECONDS


class FakeTransport:
    """What the protocol writes, and whether it closed the connection."""

    def __init__(self) -> None:
        self.buffer = b""
        self.writes: list[bytes] = []
        self.closed = False
        self.read_paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8008), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.buffer += data
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        self.read_paused = False

    def set_protocol(self, protocol: Any) -> None:
        pass

    def take(self) -> bytes:
        data, self.buffer = self.buffer, b""
        return data


class FakeTimer:
    def __init__(self, when: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.when, self.callback, self.args, self.cancelled = when, callback, args, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTask:
    def add_done_callback(self, callback: Callable[..., None]) -> None:
        pass


class FakeLoop:
    """The protocol's loop: a clock the test moves, timers run in order, request tasks kept for the test to run."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[FakeTimer] = []
        self.tasks: list[Coroutine[Any, Any, None]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> FakeTimer:
        timer = FakeTimer(when, callback, args)
        self.timers.append(timer)
        return timer

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> FakeTimer:
        return self.call_at(self.now + delay, callback, *args)

    def create_task(self, coroutine: Coroutine[Any, Any, None], **_: Any) -> FakeTask:
        self.tasks.append(coroutine)
        return FakeTask()

    def advance(self, seconds: float) -> None:
        """Move the clock, running every timer that falls due on the way, in order."""
        target = self.now + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.when <= target]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            self.now = max(self.now, timer.when)
            timer.callback(*timer.args)
        self.now = target

    async def run_requests(self) -> None:
        """Run the requests the protocol started (pipelined ones start as earlier ones finish)."""
        while self.tasks:
            await self.tasks.pop(0)


def connect(app: Any, settings: Settings, loop: FakeLoop) -> tuple[HttpToolsProtocol, FakeTransport]:
    """A connection to the protocol the server would run, built as uvicorn's server builds it."""
    config = uvicorn.Config(app, **uvicorn_options(settings))
    config.load()
    protocol = config.http_protocol_class(  # type: ignore[call-arg]
        config=config, server_state=ServerState(), app_state={}, _loop=loop
    )
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    assert isinstance(protocol, HeadLimitedProtocol)
    return protocol, transport


Scenario = Callable[[HttpToolsProtocol, FakeTransport, FakeLoop], Awaitable[None]]


def run(settings: Settings, scenario: Scenario) -> None:
    """Start the real app's lifespan, connect once and play `scenario`."""
    app = create_app(settings)

    async def main() -> None:
        async with app.api.router.lifespan_context(app.api):
            loop = FakeLoop()
            protocol, transport = connect(app, settings, loop)
            await scenario(protocol, transport, loop)

    asyncio.run(main())


def request(deployment_id: str, *, extra: bytes = b"", path: str = "/api/callback", padding: int = 0) -> bytes:
    """A complete callback request for `deployment_id`: head padded with `extra`, body with `padding` bytes."""
    body = callback_body(deployment_id, FINAL, **({"relleno": "a" * padding} if padding else {})).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Authorization: {TOKEN}\r\n"
        f"Content-Type: application/json\r\nX-Request-ID: req-{deployment_id}\r\nContent-Length: {len(body)}\r\n"
    ).encode()
    return head + extra + b"\r\n" + body


def answers(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    """Status and JSON body of each response in `data`, in order."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        found.append((status, json.loads(rest[:length])))
        data = rest[length:]
    return found


def assert_refused_431(transport: FakeTransport) -> None:
    """One 431 answer with the service's envelope, then a closed connection."""
    data = transport.take()
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]
    assert b"\r\nconnection: close\r\n" in data
    [(status, body)] = answers(data)
    assert (status, body["code"]) == (431, "headers_too_large")
    assert str(MAX_HEAD_BYTES) in body["message"]
    assert transport.closed


# Head deadline and keep-alive


def test_a_silent_connection_is_closed_at_the_header_deadline(make_settings: Callable[..., Settings]) -> None:
    """A client that connects and says nothing is dropped after 15 s, not before, with no answer."""

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        loop.advance(HEADER_TIMEOUT - 0.1)
        assert not transport.closed
        loop.advance(0.1)
        assert transport.closed and transport.buffer == b""

    run(make_settings(), scenario)


def test_a_trickled_head_is_closed_at_the_header_deadline(make_settings: Callable[..., Settings]) -> None:
    """A byte a second keeps no connection open past the header deadline (uvicorn alone waits for ever)."""
    trickle = request("goteo")

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        for second in range(int(HEADER_TIMEOUT)):
            assert not transport.closed, second
            protocol.data_received(trickle[second : second + 1])
            loop.advance(1)
        assert transport.closed and transport.buffer == b""

    run(make_settings(), scenario)


def test_the_header_timeout_is_the_operators_setting(make_settings: Callable[..., Settings]) -> None:
    """CALLBACK_HEADER_TIMEOUT_SECONDS moves the deadline."""

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        loop.advance(3.9)
        assert not transport.closed
        loop.advance(0.1)
        assert transport.closed

    run(make_settings(header_timeout_seconds=4), scenario)


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """After a response the connection stays open for the next request, and is closed once idle 5 s."""
    settings = make_settings()
    insert_run(settings.resolved_database_url(), "ocioso")

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(request("ocioso"))
        await loop.run_requests()
        [(status, body)] = answers(transport.take())
        assert (status, body["code"]) == (200, "updated")
        assert not transport.closed
        loop.advance(KEEP_ALIVE - 0.1)
        assert not transport.closed
        loop.advance(0.1)
        assert transport.closed

    run(settings, scenario)


def test_at_the_stop_an_idle_kept_alive_connection_still_answers_a_request_then_closes(
    make_settings: Callable[..., Settings],
) -> None:
    """The stop does not reset a connection between requests: a callback on its way is answered."""
    settings = make_settings()
    for name in ("antes", "durante"):
        insert_run(settings.resolved_database_url(), name)

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(request("antes"))
        await loop.run_requests()
        assert answers(transport.take())[0][0] == 200
        protocol.shutdown()
        assert not transport.closed
        protocol.data_received(request("durante"))
        await loop.run_requests()
        data = transport.take()
        assert [(status, body["code"]) for status, body in answers(data)] == [(200, "updated")]
        assert b"\r\nconnection: close\r\n" in data.lower()
        assert transport.closed

    run(settings, scenario)


def test_at_the_stop_an_idle_kept_alive_connection_that_stays_silent_closes_at_the_keep_alive_time(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    insert_run(settings.resolved_database_url(), "antes")

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(request("antes"))
        await loop.run_requests()
        transport.take()
        protocol.shutdown()
        loop.advance(KEEP_ALIVE - 0.1)
        assert not transport.closed
        loop.advance(0.1)
        assert transport.closed

    run(settings, scenario)


def test_the_next_head_has_its_deadline_from_the_previous_response(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """A kept-alive connection that starts a new head and stalls is closed 15 s after the previous response."""
    settings = make_settings()
    insert_run(settings.resolved_database_url(), "primero")

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        loop.advance(10)  # the first head's wait must not count against the second one
        protocol.data_received(request("primero"))
        await loop.run_requests()
        assert answers(transport.take())[0][0] == 200
        loop.advance(1)
        protocol.data_received(b"POST /api/callback HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # ends the keep-alive wait
        loop.advance(HEADER_TIMEOUT - 1 - 0.1)
        assert not transport.closed
        loop.advance(0.1)
        assert transport.closed and transport.buffer == b""

    run(settings, scenario)


def test_a_slow_request_does_not_count_against_the_next_head(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """The deadline is for heads only: time spent on a request (a body that comes late) is not counted."""
    settings = make_settings()
    for name in ("lento", "siguiente"):
        insert_run(settings.resolved_database_url(), name)
    slow = request("lento")
    head, _, body = slow.partition(b"\r\n\r\n")

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(head + b"\r\n\r\n")
        loop.advance(HEADER_TIMEOUT + 5)  # within the body timeout (30 s)
        assert not transport.closed
        protocol.data_received(body)
        protocol.data_received(request("siguiente"))
        await loop.run_requests()
        assert [(s, b["deploymentId"]) for s, b in answers(transport.take())] == [(200, "lento"), (200, "siguiente")]

    run(settings, scenario)


# Pipelining


def test_pipelined_requests_are_answered_in_order(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """Two callbacks in one packet: both recorded, both answered, in the order they were sent."""
    settings = make_settings()
    for name in ("uno", "dos"):
        insert_run(settings.resolved_database_url(), name)

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(request("uno") + request("dos"))
        await loop.run_requests()
        got = [(status, body["code"], body["request_id"]) for status, body in answers(transport.take())]
        assert got == [(200, "updated", "req-uno"), (200, "updated", "req-dos")]
        assert not transport.closed
        loop.advance(KEEP_ALIVE)
        assert transport.closed  # idle after the last answer: keep-alive as uvicorn does it

    run(settings, scenario)
    for name in ("uno", "dos"):
        assert fetch_run(settings.resolved_database_url(), name)["Estado"] == FINAL  # type: ignore[index]


def test_a_pipelined_head_after_a_large_body_is_not_taken_for_a_large_head(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """A 100 KB body followed in the same packet by the start of the next head: both requests are answered."""
    settings = make_settings()
    for name in ("grande", "detras"):
        insert_run(settings.resolved_database_url(), name)
    first = request("grande", padding=100_000)
    second = request("detras")

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(first + second[:20])
        protocol.data_received(second[20:])
        await loop.run_requests()
        got = [(status, body["code"]) for status, body in answers(transport.take())]
        assert got == [(200, "updated"), (200, "updated")]

    run(settings, scenario)


# One send per callback answer


def test_a_callback_answer_leaves_in_one_write(make_settings: Callable[..., Settings]) -> None:
    """Head and body of a callback's answer go out together: one send() instead of two."""
    settings = make_settings()
    insert_run(settings.resolved_database_url(), "junto")

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(request("junto"))
        await loop.run_requests()
        assert len(transport.writes) == 1
        assert [(status, body["code"]) for status, body in answers(transport.take())] == [(200, "updated")]

    run(settings, scenario)


def test_a_bodiless_answer_and_other_paths_are_not_held(make_settings: Callable[..., Settings]) -> None:
    """HEAD on the callback path (no body is written) and other paths still get their whole answer."""
    settings = make_settings()
    head = b"HEAD /api/callback HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(head)
        await loop.run_requests()
        answer = transport.take()
        assert answer.startswith(b"HTTP/1.1 405 ") and answer.endswith(b"\r\n\r\n")
        protocol.data_received(health)
        await loop.run_requests()
        assert answers(transport.take())[0][0] == 200

    run(settings, scenario)


def test_100_continue_is_not_held_back(make_settings: Callable[..., Settings]) -> None:
    """A client that waits for "100 Continue" gets it before it sends the body; the answer follows."""
    settings = make_settings()
    insert_run(settings.resolved_database_url(), "espera")
    head, _, body = request("espera", extra=b"Expect: 100-continue\r\n").partition(b"\r\n\r\n")

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(head + b"\r\n\r\n")
        task = asyncio.ensure_future(loop.run_requests())
        await wait_until(lambda: transport.buffer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"))
        transport.take()
        protocol.data_received(body)
        await task
        assert [(status, body["code"]) for status, body in answers(transport.take())] == [(200, "updated")]

    run(settings, scenario)


async def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Let the event loop run until `condition` holds (fails after `seconds`)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "no llegó a cumplirse"
        await asyncio.sleep(0)


# Oversized heads: every case gets its 431

OVERSIZED = {
    "100 KB header": b"X-Grande: " + b"a" * 100_000 + b"\r\n",
    "1 MB header": b"X-Grande: " + b"a" * 1_000_000 + b"\r\n",
    "10 000 small headers": b"".join(b"X-H%d: v\r\n" % n for n in range(10_000)),
    "100 KB Authorization": b"Authorization: Bearer " + b"a" * 100_000 + b"\r\n",
}


@pytest.mark.parametrize("extra", OVERSIZED.values(), ids=OVERSIZED.keys())
def test_an_oversized_head_in_one_chunk_gets_431(make_settings: Callable[..., Settings], extra: bytes) -> None:
    """The whole request arrives at once."""

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(request("grande", extra=extra))
        assert_refused_431(transport)
        assert loop.tasks == []  # the app never saw it

    run(make_settings(), scenario)


@pytest.mark.parametrize("extra", OVERSIZED.values(), ids=OVERSIZED.keys())
def test_an_oversized_head_across_chunks_gets_431(make_settings: Callable[..., Settings], extra: bytes) -> None:
    """The request arrives in 16 KiB pieces; the answer comes as soon as the head is over the limit."""
    data = request("grande", extra=extra)

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        for start in range(0, len(data), 16_384):
            protocol.data_received(data[start : start + 16_384])
            if transport.closed:
                break
        assert_refused_431(transport)
        assert loop.tasks == []

    run(make_settings(), scenario)


def test_a_head_that_never_ends_gets_431_once_over_the_limit(make_settings: Callable[..., Settings]) -> None:
    """A header value that keeps coming is cut as soon as the head passes the limit, not buffered on."""

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(b"POST /api/callback HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sin-Fin: ")
        sent = 0
        while not transport.closed and sent < 10 * MAX_HEAD_BYTES:
            protocol.data_received(b"a" * 4096)
            sent += 4096
        assert sent <= MAX_HEAD_BYTES + 4096
        assert_refused_431(transport)

    run(make_settings(), scenario)


def test_a_long_url_gets_431(make_settings: Callable[..., Settings]) -> None:
    """The request line counts towards the limit."""

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(request("url", path="/api/callback?q=" + "a" * 200_000))
        assert_refused_431(transport)

    run(make_settings(), scenario)


def test_an_oversized_head_on_a_kept_alive_connection_gets_431(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """The second request's head is measured on its own, and refused; the first was answered."""
    settings = make_settings()
    insert_run(settings.resolved_database_url(), "antes")

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(request("antes"))
        await loop.run_requests()
        assert answers(transport.take())[0][0] == 200
        protocol.data_received(request("grande", extra=OVERSIZED["100 KB header"]))
        assert_refused_431(transport)

    run(settings, scenario)


def test_a_head_just_under_the_limit_is_served(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """The limit refuses nothing below it, in one chunk or in many."""
    settings = make_settings()
    for name in ("justo", "justo-trozos"):
        insert_run(settings.resolved_database_url(), name)
    padding = b"X-Relleno: " + b"a" * (MAX_HEAD_BYTES - 1024) + b"\r\n"

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(request("justo", extra=padding))
        await loop.run_requests()
        data = request("justo-trozos", extra=padding)
        for start in range(0, len(data), 1000):
            protocol.data_received(data[start : start + 1000])
        await loop.run_requests()
        got = [(status, body["code"]) for status, body in answers(transport.take())]
        assert got == [(200, "updated"), (200, "updated")]

    run(settings, scenario)


# Access log


def test_callbacks_get_no_uvicorn_access_line_and_other_paths_do(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """The endpoint writes its own line for each callback; uvicorn's access line stays for every other path."""
    settings = make_settings()
    insert_run(settings.resolved_database_url(), "silencioso")

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(request("silencioso") + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await loop.run_requests()
        assert [status for status, _ in answers(transport.take())] == [200, 200]

    run(settings, scenario)
    lines = settings.log_file.read_text(encoding="utf-8").splitlines()
    assert any("deploymentId=silencioso" in line for line in lines)
    access = [line for line in lines if "uvicorn.access" in line]
    assert len(access) == 1 and '"GET /health HTTP/1.1" 200' in access[0], access


# The uvicorn names the shim relies on


def test_uvicorn_still_has_every_name_protocols_py_relies_on(make_settings: Callable[..., Settings]) -> None:
    """Fails with a re-sync message naming what moved when an uvicorn upgrade renames a method or attribute."""
    resync = f"re-sync src/sam/callback/protocols.py with uvicorn {uvicorn.__version__}"
    for name, parameters in UVICORN_CONTRACT.items():
        method = getattr(HttpToolsProtocol, name, None)
        assert callable(method), f"{resync}: HttpToolsProtocol.{name} no longer exists"
        actual = list(inspect.signature(method).parameters)[1:]
        assert actual == list(parameters), f"{resync}: HttpToolsProtocol.{name}{tuple(actual)}, expected {parameters}"
    cycle_parameters = inspect.signature(RequestResponseCycle).parameters
    assert "on_response" in cycle_parameters, f"{resync}: RequestResponseCycle no longer takes on_response"

    async def scenario(protocol: HttpToolsProtocol, transport: FakeTransport, loop: FakeLoop) -> None:
        protocol.data_received(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for name in UVICORN_ATTRIBUTES:
            assert hasattr(protocol, name), f"{resync}: HttpToolsProtocol has no attribute {name!r}"
        cycle = protocol.cycle
        for name in CYCLE_ATTRIBUTES:
            assert hasattr(cycle, name), f"{resync}: RequestResponseCycle has no attribute {name!r}"
        assert cycle.on_response == protocol.on_response_complete, (
            f"{resync}: responses no longer end through on_response_complete"
        )
        await loop.run_requests()

    run(make_settings(), scenario)


# The same limits on a real server, from the operator's settings


def _head(length: int, request_id: str) -> bytes:
    return (
        f"POST /api/callback HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Authorization: {TOKEN}\r\n"
        f"Content-Type: application/json\r\nX-Request-ID: {request_id}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _answer(sock: socket.socket) -> bytes:
    received = b""
    while b"\r\n\r\n" not in received or not received.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if ready and sock.recv(1) == b"":
            return True
    return False


def test_a_real_server_reads_a_late_body_then_closes_on_its_header_timeout(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A body sent in two parts is still read; a silent connection is closed by CALLBACK_HEADER_TIMEOUT_SECONDS."""
    server = server_factory(CALLBACK_HEADER_TIMEOUT_SECONDS="1.5", CALLBACK_BODY_TIMEOUT_SECONDS="10").start()
    insert_run(f"sqlite:///{(tmp_path / 'sam.db').as_posix()}", "trozos")
    late = callback_body("trozos", FINAL).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_head(len(late), "req-trozos") + late[:10])
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # no answer while the body is incomplete
        sock.settimeout(10)
        sock.sendall(late[10:])
        first = _answer(sock)
    assert first.startswith(b"HTTP/1.1 200") and b'"code": "updated"' in first, first
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
        assert _closed_by_server(silent, within=12.0), "a silent connection outlived the 1.5 s header timeout"
    assert server.stop() == 0


def test_idle_kept_alive_connection_is_closed_by_the_keep_alive_timeout(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """With the real timeouts, a connection left idle after a response is closed by the server.

    The keep-alive timeout (5 s) closes it, well before the header timeout (15 s) would.
    """
    server = server_factory().start()
    insert_run(f"sqlite:///{(tmp_path / 'sam.db').as_posix()}", "ocioso")
    body = callback_body("ocioso", FINAL).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_head(len(body), "req-ocioso") + body)
        answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        closed = _closed_by_server(sock, within=12.0)
    assert closed, "the server left an idle kept-alive connection open past its keep-alive timeout"
    assert server.stop() == 0
