"""Helpers shared by the tests: keys, rows, a CLI runner, a real server process, polling."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sam.callback.repository import ejecuciones, make_engine, metadata

TOKEN = "token-de-pruebas-0123456789-abcdefghij"

# The PostgreSQL server the tests use; each test gets its own database on it.
PG_ADMIN_URL = os.environ.get("SAM_TEST_POSTGRES_URL") or os.environ.get(
    "SAM_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

# Settings must not come from the developer's environment or a stray .env file.
OUR_PREFIXES = (
    "CALLBACK_",
    "SAM_DATABASE_URL",
    "SQL_SAM_",
    "JWT_",
    "API_GATEWAY_",
    "APIGW_",
    "LOG_",
    "APP_LOG_",
    "EMAIL_",
)


@dataclass
class Keys:
    """An RSA key pair for signing test JWTs like the gateway does."""

    private: rsa.RSAPrivateKey
    public_pem: str

    def token(
        self, *, expires_in: float = 300, headers: dict[str, Any] | None = None, key: Any = None, **claims: Any
    ) -> str:
        """A JWT signed with RS256 (or with `key`), expiring in `expires_in` seconds."""
        now = int(time.time())
        payload = {"iat": now, "exp": now + int(expires_in), "sub": "gateway"} | claims
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key or self.private, algorithm="RS256", headers=headers)


def new_keys() -> Keys:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return Keys(private=private, public_pem=pem.decode())


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """Settings that keep a CLI run's database, spool, logs and port inside `tmp_path`."""
    return {
        "SAM_DATABASE_URL": f"sqlite:///{(tmp_path / 'sam.db').as_posix()}",
        "CALLBACK_SPOOL_PATH": str(tmp_path / "spool.db"),
        "LOG_DIRECTORY": str(tmp_path / "logs"),
        "CALLBACK_SERVER_HOST": "127.0.0.1",
        "CALLBACK_SERVER_PORT": "0",
    }


def run_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m sam.callback ARGS` in `cwd` with only the given settings of ours."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(OUR_PREFIXES)}
    return subprocess.run(
        [sys.executable, "-m", "sam.callback", *args],
        cwd=cwd,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def run_cli_in_terminal(cwd: Path, *args: str, answer: str, **env: str) -> tuple[int, str]:
    """`run_cli` on a pseudo-terminal, as an operator types it, answering `answer` to any question."""
    if sys.platform == "win32":
        pytest.skip("sin pseudo-terminales en Windows")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(OUR_PREFIXES)}
    controller, terminal = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "sam.callback", *args],
            cwd=cwd,
            env=clean | env,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
        )
        os.close(terminal)
        terminal = -1
        os.write(controller, answer.encode() + b"\n")
        code = process.wait(timeout=60)
        output = b""
        with contextlib.suppress(OSError):  # EIO once the terminal has no writer left
            while chunk := os.read(controller, 65536):
                output += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    return code, output.decode(errors="replace")


def auth_headers(token: str = TOKEN) -> dict[str, str]:
    """Headers A360 sends with a static token."""
    return {"X-Authorization": token, "Content-Type": "application/json"}


def insert_run(url_or_engine: str | sa.Engine, deployment_id: str, estado: str = "RUNNING", **columns: Any) -> None:
    """Insert a row the way SAM's launcher does."""
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    metadata.create_all(engine, checkfirst=True)
    with engine.begin() as conn:
        conn.execute(sa.insert(ejecuciones).values(DeploymentId=deployment_id, Estado=estado, **columns))
    if isinstance(url_or_engine, str):
        engine.dispose()


def fetch_run(url_or_engine: str | sa.Engine, deployment_id: str) -> dict[str, Any] | None:
    """The row of one run, as a dict, or None."""
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        with engine.connect() as conn:
            row = (
                conn.execute(sa.select(ejecuciones).where(ejecuciones.c.DeploymentId == deployment_id))
                .mappings()
                .first()
            )
            return dict(row) if row else None
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()


def wait_for(
    predicate: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.05, what: str = "condición"
) -> Any:
    """Poll until `predicate()` is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"no se cumplió a tiempo: {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """`python -m sam.callback` running as a real process on 127.0.0.1."""

    env: dict[str, str]
    cwd: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    # One process group per start: killing a parent with SIGKILL leaves its workers running.
    groups: list[int] = field(default_factory=list)
    output: list[Path] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    @property
    def callback_url(self) -> str:
        """The callback endpoint."""
        return self.base_url + self.env.get("CALLBACK_ENDPOINT_PATH", "/api/callback")

    def start(self, *, wait: bool = True) -> ServerProcess:
        """Start and wait for /health."""
        log = self.cwd / f"server-{len(self.output)}.out"
        self.output.append(log)
        with log.open("wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sam.callback"],
                cwd=self.cwd,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.groups.append(self.process.pid)
        if wait:
            wait_for(self._healthy, timeout=90, what=f"arranque del servidor en {self.base_url}")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"el servidor terminó al arrancar (código {self.process.returncode}):\n{self.console()}")
        try:
            return httpx.get(self.base_url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def console(self) -> str:
        """Everything the processes printed."""
        return "\n".join(path.read_text(errors="replace") for path in self.output if path.exists())

    def stop(self, sig: int | None = None, timeout: float = 40) -> int:
        """Send `sig` (SIGTERM by default) and wait; return the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig if sig is not None else signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def kill_server(server: ServerProcess) -> None:
    """Kill everything `server` started, worker processes included, and reap the parent."""
    killpg = getattr(os, "killpg", None)
    for group in server.groups if killpg is not None else ():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            killpg(group, signal.SIGKILL)
    if server.process is not None and server.process.poll() is None:
        server.process.kill()
    if server.process is not None:
        server.process.wait(10)


def require_service(what: str, reason: str) -> None:
    """Skip with `reason` when a real service is missing; under CI it must be there, so fail."""
    message = f"{what} no disponible: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI instala y arranca lo que necesitan las pruebas)")
    pytest.skip(message)
