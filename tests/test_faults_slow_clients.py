"""Fault injection: clients that trickle headers, send nothing, or never send the body."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.faults_support import FINAL, callback_body
from tests.utils import TOKEN, ServerProcess, insert_run, wait_for

pytestmark = pytest.mark.slow

# Short timeouts, so that the test takes seconds.
TIMEOUTS = {"CALLBACK_HEADER_TIMEOUT_SECONDS": "1.5", "CALLBACK_BODY_TIMEOUT_SECONDS": "1.5"}
GIVE_UP_AFTER = 30.0  # a bound on every slow client's loop, far above the timeouts


class SlowClient(threading.Thread):
    """One misbehaving connection; `closed_by_server` is set when the server drops it."""

    def __init__(self, port: int, behaviour: str) -> None:
        super().__init__(daemon=True)
        self.behaviour = behaviour
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.closed_by_server = threading.Event()
        self.received = b""

    def run(self) -> None:
        """Misbehave until the server closes the connection, or give up at the bound."""
        deadline = time.monotonic() + GIVE_UP_AFTER
        head = f"POST /api/callback HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Authorization: {TOKEN}\r\n"
        if self.behaviour == "trickle":
            pending = (head + "X-Padding: " + "a" * 10_000).encode()
        elif self.behaviour == "no-body":
            self.sock.sendall((head + "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{").encode())
            pending = b""
        else:  # "silent": connects and says nothing
            pending = b""
        # recv with a short timeout paces the trickle and notices the server closing.
        self.sock.settimeout(0.1)
        try:
            while time.monotonic() < deadline:
                if pending:
                    self.sock.send(pending[:1])
                    pending = pending[1:]
                try:
                    chunk = self.sock.recv(4096)
                except TimeoutError:
                    continue
                if not chunk:
                    self.closed_by_server.set()
                    return
                self.received += chunk
        except OSError:  # reset by the server
            self.closed_by_server.set()
        finally:
            self.sock.close()


def test_slow_clients_are_dropped_and_valid_callbacks_still_answered(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Slow-loris connections are closed after the timeouts; valid callbacks get their 200s."""
    server = server_factory(**TIMEOUTS).start()
    database = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    slow = [SlowClient(server.port, behaviour) for behaviour in ["trickle"] * 40 + ["silent"] * 20 + ["no-body"] * 20]
    for client in slow:
        client.start()

    headers = {"X-Authorization": TOKEN, "Content-Type": "application/json"}
    with httpx.Client(timeout=30) as http:
        for index in range(30):
            insert_run(database, f"valid-{index}")
            response = http.post(server.callback_url, content=callback_body(f"valid-{index}", FINAL), headers=headers)
            assert (response.status_code, response.json()["code"]) == (200, "updated")

    wait_for(
        lambda: all(client.closed_by_server.is_set() for client in slow),
        timeout=GIVE_UP_AFTER,
        what="el servidor cierra las conexiones lentas",
    )
    for client in slow:
        client.join(5)
        if client.behaviour == "no-body":
            assert client.received.startswith(b"HTTP/1.1 408"), client.received[:200]
        else:
            assert client.received == b""
    # Still serving after all that.
    response = httpx.post(server.callback_url, content=callback_body("valid-0", FINAL), headers=headers, timeout=30)
    assert response.json()["code"] == "already_processed"
    assert server.stop() == 0
