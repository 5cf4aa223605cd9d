"""Socket activation: the service serves on the socket systemd passes, and a restart refuses nothing."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from sam.callback.listen import systemd_listener
from sam.callback.repository import ejecuciones, make_engine, metadata
from sam.callback.settings import ConfigError, Settings
from tests.faults_support import FINAL, callback_body
from tests.utils import OUR_PREFIXES, TOKEN, ServerProcess, auth_headers, free_port, insert_run, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="la activación por socket es de systemd (Linux)"),
]

# What systemd does between fork and exec: the socket becomes descriptor 3 and LISTEN_PID is
# the pid of the process that will run the service (exec keeps it).
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="sam-callback.socket")
os.execv(sys.executable, [sys.executable, "-m", "sam.callback", "serve"])
"""


def _settings_env(tmp_path: Path, port: int, **env: str) -> dict[str, str]:
    """The service's own settings, kept under `tmp_path`."""
    return {
        "CALLBACK_SERVER_HOST": "127.0.0.1",
        "CALLBACK_SERVER_PORT": str(port),
        "CALLBACK_TOKEN": TOKEN,
        "SAM_DATABASE_URL": f"sqlite:///{(tmp_path / 'sam.db').as_posix()}",
        "CALLBACK_SPOOL_PATH": str(tmp_path / "spool" / "spool.db"),
        "LOG_DIRECTORY": str(tmp_path / "logs"),
        "PYTHONUNBUFFERED": "1",
    } | env


def _service_env(tmp_path: Path, port: int, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(OUR_PREFIXES) and not k.startswith("LISTEN_")}
    return base | _settings_env(tmp_path, port, **env)


def _activate_command(tool: str, *ports: int, env: dict[str, str]) -> list[str]:
    """systemd-socket-activate listening on `ports` and starting the service with `env` only."""
    listen = [f"--listen={port}" for port in ports]
    return [
        tool,
        *listen,
        *(f"--setenv={k}={v}" for k, v in env.items()),
        sys.executable,
        "-m",
        "sam.callback",
        "serve",
    ]


@dataclass
class ActivatedService:
    """The service started again and again on one listening socket the test owns, as systemd does."""

    listener: socket.socket
    env: dict[str, str]
    cwd: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def port(self) -> int:
        """The port of the listening socket."""
        return int(self.listener.getsockname()[1])

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT of the listening socket."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def current(self) -> subprocess.Popen[bytes]:
        """The process started last."""
        return self.processes[-1]

    def start(self) -> None:
        """Start a service process on the socket (it does not wait for it to be ready)."""
        fd = self.listener.fileno()
        with (self.cwd / f"service-{len(self.processes)}.out").open("wb") as sink:
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", ACTIVATE, str(fd)],
                    cwd=self.cwd,
                    env=self.env,
                    pass_fds=(fd,),
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )

    def stop(self) -> int:
        """SIGTERM, as `systemctl stop` sends it; the exit code."""
        self.current.send_signal(signal.SIGTERM)
        return self.current.wait(60)

    def console(self) -> str:
        """What every process printed."""
        return "\n".join(path.read_text(errors="replace") for path in sorted(self.cwd.glob("service-*.out")))

    def ready(self) -> bool:
        """The current process is up and answers on the socket."""
        if self.current.poll() is not None:
            pytest.fail(f"el servicio terminó (código {self.current.returncode}):\n{self.console()[-3000:]}")
        try:
            return httpx.get(self.base_url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture
def activated(tmp_path: Path) -> Iterator[Callable[..., ActivatedService]]:
    """Build an ActivatedService on a fresh listening socket; processes are killed at the end."""
    services: list[ActivatedService] = []

    def build(**env: str) -> ActivatedService:
        listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        port = listener.getsockname()[1]
        service = ActivatedService(listener=listener, env=_service_env(tmp_path, port, **env), cwd=tmp_path)
        services.append(service)
        return service

    yield build
    for service in services:
        for process in service.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        service.listener.close()


class Sender:
    """Clients that keep sending callbacks, each for its own row and on a new connection."""

    def __init__(self, base_url: str, database: str, *, clients: int, per_client: int) -> None:
        self.url = base_url + "/api/callback"
        self.ids = [f"act-{c}-{n}" for c in range(clients) for n in range(per_client)]
        _insert_runs(database, self.ids)
        self.answers: dict[str, int | str] = {}
        self.finish = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._send, args=(self.ids[c * per_client : (c + 1) * per_client],), daemon=True)
            for c in range(clients)
        ]

    def __enter__(self) -> Sender:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish.set()
        for thread in self._threads:
            thread.join(160)

    def acknowledged(self) -> int:
        """How many callbacks got an answer so far."""
        with self._lock:
            return len(self.answers)

    def _send(self, ids: list[str]) -> None:
        for deployment_id in ids:
            if self.finish.is_set():
                return
            try:
                # A fresh connection each time, as A360 does; it must wait out a whole restart.
                response = httpx.post(
                    self.url, content=callback_body(deployment_id, FINAL), headers=auth_headers(), timeout=150
                )
                answer: int | str = response.status_code
            except httpx.HTTPError as exc:
                answer = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.answers[deployment_id] = answer


def _send_raw(port: int, deployment_id: str) -> socket.socket:
    """Connect and send one whole callback, without waiting for the answer."""
    body = callback_body(deployment_id, FINAL).encode()
    head = (
        f"POST /api/callback HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Authorization: {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=150)
    sock.sendall(head.encode() + body)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends on `sock` until it closes the connection."""
    received = b""
    with sock:
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _read_status(sock: socket.socket) -> int:
    """The status code of the answer on `sock` (read to the end: the request said Connection: close)."""
    received = _read_all(sock)
    assert received.startswith(b"HTTP/1.1 "), received
    return int(received.split(b" ", 2)[1])


def _insert_runs(database: str, ids: list[str]) -> None:
    """Insert RUNNING rows the way SAM's launcher does, in one transaction."""
    engine = make_engine(database)
    try:
        metadata.create_all(engine, checkfirst=True)
        with engine.begin() as conn:
            conn.execute(sa.insert(ejecuciones), [{"DeploymentId": i, "Estado": "RUNNING"} for i in ids])
    finally:
        engine.dispose()


def _recorded(database: str) -> set[str]:
    engine = make_engine(database)
    try:
        with engine.connect() as conn:
            query = sa.select(ejecuciones.c.DeploymentId).where(ejecuciones.c.Estado == FINAL)
            return {row[0] for row in conn.execute(query)}
    finally:
        engine.dispose()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_restart_on_the_systemd_socket_refuses_no_callback(
    activated: Callable[..., ActivatedService], workers: str
) -> None:
    """Stop and start the service while clients keep sending: every callback is acknowledged and recorded."""
    service = activated(CALLBACK_SERVER_WORKERS=workers)
    database = service.env["SAM_DATABASE_URL"]
    service.start()
    wait_for(service.ready, timeout=120, what="arranque del servicio sobre el socket")

    with Sender(service.base_url, database, clients=3, per_client=400) as sender:
        wait_for(lambda: sender.acknowledged() >= 20, timeout=120, what="callbacks antes de la parada")
        assert service.stop() == 0, service.console()[-3000:]
        # No process serves the port now: a new connection is still accepted by the kernel, and
        # the callback waits in the socket's queue for the next process.
        insert_run(database, "act-while-down")
        while_down = _send_raw(service.port, "act-while-down")
        service.start()
        before = sender.acknowledged()
        wait_for(lambda: sender.acknowledged() >= before + 20, timeout=120, what="callbacks tras el arranque")
        assert _read_status(while_down) == 200
    assert service.stop() == 0, service.console()[-3000:]

    answered = dict(sender.answers)
    refused = {key: value for key, value in answered.items() if not (isinstance(value, int) and 200 <= value < 300)}
    assert refused == {}, service.console()[-3000:]
    assert _recorded(database) == set(answered) | {"act-while-down"}
    console = service.console()
    assert console.count("Socket de escucha recibido de systemd") == 2
    assert "Traceback" not in console


def test_systemd_socket_activate_starts_the_service_on_its_socket(tmp_path: Path) -> None:
    """`systemd-socket-activate` (systemd's tool) opens the port as the unit does; the first callback waits and is recorded."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate no está instalado")
    port = free_port()
    # A bare port, as in sam-callback.socket: one IPv6 socket that takes IPv4 too. The allowlist
    # still matches the IPv4 client, which arrives as ::ffff:127.0.0.1.
    env = _settings_env(tmp_path, port, CALLBACK_ALLOWED_IPS="127.0.0.1/32")
    insert_run(env["SAM_DATABASE_URL"], "sa-1")
    with (tmp_path / "activate.out").open("wb") as sink:
        process = subprocess.Popen(
            _activate_command(tool, port, env=env), cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        # The tool starts the service on the first connection: this callback waits in the queue.
        wait_for(lambda: _connects(port), timeout=30, what="puerto abierto por systemd-socket-activate")
        response = httpx.post(
            f"http://127.0.0.1:{port}/api/callback",
            content=callback_body("sa-1", FINAL),
            headers=auth_headers(),
            timeout=120,
        )
        assert response.status_code == 200, response.text
        assert _recorded(env["SAM_DATABASE_URL"]) == {"sa-1"}
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    console = (tmp_path / "activate.out").read_text(errors="replace")
    assert f"Socket de escucha recibido de systemd (activación por socket): http://[::]:{port}" in console
    assert "Traceback" not in console


def test_more_than_one_socket_is_a_configuration_error(tmp_path: Path) -> None:
    """Two ListenStream= (two descriptors) stop the start with one clear line and exit code 2."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate no está instalado")
    first, second = free_port(), free_port()
    with (tmp_path / "activate.out").open("wb") as sink:
        process = subprocess.Popen(
            _activate_command(tool, first, second, env=_settings_env(tmp_path, first)),
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: _connects(first), timeout=30, what="puerto abierto por systemd-socket-activate")
        assert process.wait(120) == 2
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    console = (tmp_path / "activate.out").read_text(errors="replace")
    assert "Error de configuración: systemd pasó 2 sockets (LISTEN_FDS) y sam-callback usa uno" in console
    assert "Traceback" not in console


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def test_variables_of_another_process_are_ignored_and_removed(make_settings: Callable[..., Settings]) -> None:
    """LISTEN_PID of another process: no socket taken, and no LISTEN_* left for the workers."""
    settings = make_settings()
    environ = {"LISTEN_PID": str(os.getppid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "kept"}
    assert systemd_listener(settings, environ) is None
    assert environ == {"OTHER": "kept"}
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "tres"}
    with pytest.raises(ConfigError, match="LISTEN_FDS='tres'"):
        systemd_listener(settings, environ)
    assert environ == {}


@pytest.mark.parametrize("kind", ["udp", "not-listening"])
def test_a_descriptor_that_is_not_a_listening_tcp_socket_is_refused(tmp_path: Path, kind: str) -> None:
    """Descriptor 3 must be a TCP socket in listen state (ListenStream=): else one clear line, exit code 2."""
    wrong = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    wrong.bind(("127.0.0.1", 0))
    service = ActivatedService(listener=wrong, env=_service_env(tmp_path, free_port()), cwd=tmp_path)
    try:
        service.start()
        assert service.current.wait(60) == 2
    finally:
        wrong.close()
    console = service.console()
    assert "Error de configuración: el socket de systemd (descriptor 3) no es un socket TCP en escucha" in console
    assert "Traceback" not in console


def test_a_connection_accepted_before_the_stop_gets_its_answer(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """SIGTERM between a client's connect and its request: the request is answered, not reset."""
    server = server_factory().start()
    database = server.env["SAM_DATABASE_URL"]
    insert_run(database, "antes-de-parar")
    early = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    # Connections are accepted in order: once a later one is answered, the server holds `early`.
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "Shutting down" in server.console(), timeout=30, what="inicio de la parada")
    body = callback_body("antes-de-parar", FINAL).encode()
    head = (
        f"POST /api/callback HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Authorization: {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    early.sendall(head.encode() + body)
    answer = _read_all(early)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b"connection: close" in answer.lower()
    assert server.process.wait(60) == 0
    assert _recorded(database) == {"antes-de-parar"}
