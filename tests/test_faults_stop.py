"""Fault injection: stop signals while requests are in flight, and a restart with a full spool."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.faults_support import FINAL, TcpProxy, callback_body, spool_backlog, spool_rows
from tests.utils import TOKEN, ServerProcess, fetch_run, insert_run, wait_for

pytestmark = pytest.mark.slow

STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT] if sys.platform != "win32" else []


def _start_request_in_flight(server: ServerProcess, raw: bytes) -> socket.socket:
    """Send a callback's headers with `Expect: 100-continue` and wait for the `100 Continue`.

    The server writes `100 Continue` only when the endpoint starts reading the body, so once
    it is here the request is inside the application, waiting for the rest.
    """
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = (
        f"POST /api/callback HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Authorization: {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\nExpect: 100-continue\r\n\r\n"
    )
    sock.sendall(head.encode())
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(4096)
        assert chunk, "el servidor cerró la conexión antes del 100 Continue"
        received += chunk
    assert received.startswith(b"HTTP/1.1 100"), received
    return sock


def _finish_request(sock: socket.socket, raw: bytes) -> bytes:
    sock.sendall(raw)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
        if b"\r\n\r\n" in received and received.split(b"\r\n\r\n", 1)[1].endswith(b"}"):
            break
    sock.close()
    return received


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("stop_signal", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_stop_signal_lets_in_flight_requests_finish_then_exits_0(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, stop_signal: int, workers: str
) -> None:
    """SIGTERM/SIGINT during a request: the request gets its 200, then the process exits 0."""
    server = server_factory(CALLBACK_SERVER_WORKERS=workers).start()
    database = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    insert_run(database, "stop-1")
    raw = callback_body("stop-1", FINAL).encode()
    sock = _start_request_in_flight(server, raw)
    assert server.process is not None
    server.process.send_signal(stop_signal)
    answer = _finish_request(sock, raw)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b'"updated"' in answer
    assert server.process.wait(60) == 0, server.console()[-3000:]
    assert fetch_run(database, "stop-1")["CallbackInfo"] == raw.decode()  # type: ignore[index]
    # Each worker's log ends with its stop, not cut short by the signal uvicorn raises again.
    logged = "".join(path.read_text(encoding="utf-8") for path in sorted((tmp_path / "logs").glob("*.log*")))
    assert logged.count("sam-callback detenido") == int(workers), logged[-3000:]
    assert logged.count("Finished server process") == int(workers), logged[-3000:]


def _request(deployment_id: str) -> bytes:
    raw = callback_body(deployment_id, FINAL).encode()
    head = (
        f"POST /api/callback HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Authorization: {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
    )
    return head.encode() + raw


def _answer(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
        if b"\r\n\r\n" in received and received.split(b"\r\n\r\n", 1)[1].endswith(b"}"):
            break
    return received


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_request_sent_on_an_idle_kept_alive_connection_during_the_stop_is_answered(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, workers: str
) -> None:
    """A client reusing its connection as the stop begins: the callback is answered, then the connection closes.

    Closing idle kept-alive connections at once (uvicorn's way) resets the one request that was
    already on its way, and A360 never sends a callback again.
    """
    server = server_factory(CALLBACK_SERVER_WORKERS=workers).start()
    database = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    for name in ("idle-1", "idle-2"):
        insert_run(database, name)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(_request("idle-1"))
    assert _answer(sock).startswith(b"HTTP/1.1 200")
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: server.console().count("Shutting down") == int(workers), timeout=30, what="el inicio de la parada")
    sock.sendall(_request("idle-2"))
    answer = _answer(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b"connection: close" in answer.lower()
    assert fetch_run(database, "idle-2")["Estado"] == FINAL  # type: ignore[index]
    assert server.process.wait(60) == 0, server.console()[-3000:]


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_once_the_stop_begins_new_connections_are_refused_not_accepted_and_reset(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, workers: str
) -> None:
    """A callback sent on a connection nobody will serve is lost without the client knowing why.

    While a worker finishes a request in flight, the port must already refuse: with several
    workers, uvicorn's supervisor kept its copy of the listening socket open until they had all
    exited, so the kernel accepted connections that were then reset.
    """
    server = server_factory(CALLBACK_SERVER_WORKERS=workers).start()
    database = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    insert_run(database, "stop-refused")
    raw = callback_body("stop-refused", FINAL).encode()
    sock = _start_request_in_flight(server, raw)  # keeps its worker, and so the stop, waiting
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: _refused(server.port), timeout=20, what="el puerto rechaza conexiones nuevas")
    answer = _finish_request(sock, raw)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert server.process.wait(60) == 0, server.console()[-3000:]


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("stop_signal", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_repeated_while_the_process_exits_still_ends_with_0(
    server_factory: Callable[..., ServerProcess], stop_signal: int, workers: str
) -> None:
    """`uv run` passes on the Ctrl+C its process group already got: a late repeat must not change the exit code."""
    server = server_factory(CALLBACK_SERVER_WORKERS=workers).start()
    process = server.process
    assert process is not None
    process.send_signal(stop_signal)
    wait_for(lambda: "sam-callback detenido" in server.console(), timeout=60, what="la parada ordenada")
    # Now the interpreter is on its way out: keep repeating the signal until the process is gone.
    while process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(stop_signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(0.005)
    assert process.returncode == 0, server.console()[-3000:]
    # Every process wrote its last lines: none died of the signal uvicorn raises again at the end.
    assert server.console().count("sam-callback detenido") == int(workers), server.console()[-3000:]


@pytest.mark.skipif(sys.platform != "win32", reason="CTRL_BREAK_EVENT solo existe en Windows")
def test_ctrl_break_on_windows_exits_0(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """The Windows console stop (NSSM sends CTRL_BREAK) is a clean stop too."""
    server = server_factory()
    flags = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
    with (tmp_path / "server-win.out").open("wb") as sink:
        server.process = subprocess.Popen(
            [sys.executable, "-m", "sam.callback"], cwd=server.cwd, env=server.env, stdout=sink, stderr=subprocess.STDOUT,
            creationflags=flags,
        )  # fmt: skip
    wait_for(lambda: _healthy(server), timeout=30, what="arranque del servidor")
    server.process.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
    assert server.process.wait(60) == 0


def _healthy(server: ServerProcess) -> bool:
    try:
        return httpx.get(server.base_url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_restart_replays_a_non_empty_spool(server_factory: Callable[..., ServerProcess], pg_url: str) -> None:
    """Callbacks queued (database down) and waiting for their row survive a stop and are applied."""
    with TcpProxy(5432) as proxy:
        server = server_factory(SAM_DATABASE_URL=proxy.url_for(pg_url)).start()
        headers = {"X-Authorization": TOKEN, "Content-Type": "application/json"}
        early = callback_body("early-1", FINAL)
        response = httpx.post(server.callback_url, content=early, headers=headers, timeout=30)
        assert response.json()["code"] == "pending_match"
        insert_run(pg_url, "queued-1")
        proxy.cut()
        queued = callback_body("queued-1", FINAL)
        response = httpx.post(server.callback_url, content=queued, headers=headers, timeout=30)
        assert (response.status_code, response.json()["code"]) == (202, "queued")
        assert server.stop(signal.SIGTERM) == 0
        assert [row["deployment_id"] for row in spool_rows(server.cwd / "spool" / "spool.db")] == [
            "early-1",
            "queued-1",
        ]

        proxy.restore()
        insert_run(pg_url, "early-1")
        server.start()
        wait_for(lambda: spool_backlog(server.base_url) == 0, timeout=30, what="spool reaplicado tras el reinicio")
        assert fetch_run(pg_url, "early-1")["CallbackInfo"] == early  # type: ignore[index]
        assert fetch_run(pg_url, "queued-1")["CallbackInfo"] == queued  # type: ignore[index]
        assert server.stop() == 0
