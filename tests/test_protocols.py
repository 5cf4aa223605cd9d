"""The HTTP protocol on a real server: bodies that arrive late, kept-alive connections, idle ones."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

from tests.faults_support import FINAL, callback_body
from tests.utils import TOKEN, ServerProcess, insert_run


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


def test_body_in_pieces_then_whole_on_one_connection_then_idle_close(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A late body is still read (the timed path), a whole one too; an idle connection is then closed."""
    server = server_factory(SAM_CALLBACK_TEST_TIMEOUTS="header=1.5,body=1.5").start()
    database = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    for name in ("trozos", "entero"):
        insert_run(database, name)
    late, whole = callback_body("trozos", FINAL).encode(), callback_body("entero", FINAL).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_head(len(late), "req-trozos") + late[:10])
        time.sleep(0.5)
        sock.sendall(late[10:])
        first = _answer(sock)
        sock.sendall(_head(len(whole), "req-entero") + whole)
        second = _answer(sock)
        started = time.monotonic()
        assert sock.recv(1) == b""  # the header deadline closes the idle kept-alive connection
        waited = time.monotonic() - started
    assert first.startswith(b"HTTP/1.1 200") and b'"code": "updated"' in first, first
    assert b"x-request-id: req-trozos" in first
    assert second.startswith(b"HTTP/1.1 200") and b'"request_id": "req-entero"' in second, second
    assert 1.0 < waited < 5.0
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
        deadline = time.monotonic() + 12.0
        closed = False
        while not closed and time.monotonic() < deadline:
            ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
            closed = bool(ready) and sock.recv(1) == b""
    assert closed, "the server left an idle kept-alive connection open past its keep-alive timeout"
    assert server.stop() == 0
