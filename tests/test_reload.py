"""Credentials reload from .env and the key file under a running server, with no restart (SPEC 11)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.utils import OUR_PREFIXES, Keys, ServerProcess, free_port, insert_run, kill_server, wait_for

OLD = "token-anterior-de-pruebas-000000000000"
NEW = "token-nuevo-de-pruebas-1111111111111111"


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Real servers whose credentials come only from `tmp_path/.env`; killed at the end."""
    servers: list[ServerProcess] = []

    def build(dotenv: str, **env: str) -> ServerProcess:
        server = _server(tmp_path, dotenv, **env)
        servers.append(server)
        return server

    yield build
    for server in servers:
        kill_server(server)


def _server(tmp_path: Path, dotenv: str, **env: str) -> ServerProcess:
    """A real server whose credentials come only from `tmp_path/.env` (the environment would win)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(OUR_PREFIXES)}
    port = free_port()
    values = {
        "CALLBACK_SERVER_HOST": "127.0.0.1",
        "CALLBACK_SERVER_PORT": str(port),
        "SAM_DATABASE_URL": f"sqlite:///{(tmp_path / 'sam.db').as_posix()}",
        "CALLBACK_SPOOL_PATH": str(tmp_path / "spool" / "spool.db"),
        "LOG_DIRECTORY": str(tmp_path / "logs"),
    } | env
    (tmp_path / ".env").write_text(dotenv, encoding="utf-8")
    return ServerProcess(env=base | values, cwd=tmp_path, port=port)


def _post(server: ServerProcess, deployment_id: str, headers: dict[str, str]) -> int:
    body = {"deploymentId": deployment_id, "status": "RUN_COMPLETED"}
    return httpx.post(server.callback_url, json=body, headers=headers, timeout=10).status_code


def _token(token: str) -> dict[str, str]:
    return {"X-Authorization": token}


def _edit(path: Path, text: str) -> None:
    # Written whole and renamed into place, as editors do: the service never reads half a file.
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _log(tmp_path: Path) -> str:
    path = tmp_path / "logs" / "sam_callback_server.log"
    return path.read_text(encoding="utf-8") if path.exists() else ""


@pytest.fixture
def running(make_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A server started with the old token in .env."""
    return make_server(f"CALLBACK_TOKEN={OLD}\n").start()


def test_a_new_token_in_env_is_taken_without_a_restart(running: ServerProcess, tmp_path: Path) -> None:
    pid = running.process.pid if running.process else None
    assert _post(running, "dep-before", _token(OLD)) == 202
    _edit(tmp_path / ".env", f"CALLBACK_TOKEN={NEW}\n")
    wait_for(lambda: _post(running, "dep-after", _token(NEW)) == 202, timeout=15, what="el token nuevo se acepta")
    assert _post(running, "dep-old", _token(OLD)) == 401
    assert running.process is not None and running.process.pid == pid and running.process.poll() is None
    log = _log(tmp_path)
    assert "Credenciales recargadas sin reiniciar" in log and "CALLBACK_TOKEN" in log
    assert NEW not in log and OLD not in log


def test_a_broken_edit_keeps_the_credentials_in_force(running: ServerProcess, tmp_path: Path) -> None:
    _edit(tmp_path / ".env", f"CALLBACK_TOKEN={NEW}\nCALLBACK_ALLOWED_IPS=esto-no-es-una-ip\n")
    wait_for(lambda: "se mantienen las credenciales vigentes" in _log(tmp_path), timeout=15, what="el error de recarga")
    assert "CALLBACK_ALLOWED_IPS" in _log(tmp_path)
    assert _post(running, "dep-kept", _token(OLD)) == 202
    assert _post(running, "dep-not-yet", _token(NEW)) == 401
    # Once the edit is fixed, it is applied.
    _edit(tmp_path / ".env", f"CALLBACK_TOKEN={NEW}\n")
    wait_for(lambda: _post(running, "dep-fixed", _token(NEW)) == 202, timeout=15, what="el token corregido se acepta")


def test_other_settings_are_reported_as_needing_a_restart(running: ServerProcess, tmp_path: Path) -> None:
    _edit(tmp_path / ".env", f"CALLBACK_TOKEN={OLD}\nCALLBACK_MAX_BODY_BYTES=2048\n")
    wait_for(lambda: "solo se aplican al reiniciar" in _log(tmp_path), timeout=15, what="el aviso de reinicio")
    assert "CALLBACK_MAX_BODY_BYTES" in _log(tmp_path)
    # Not applied: a 4 KiB body is still accepted.
    big = {"deploymentId": "dep-big", "status": "RUN_COMPLETED", "relleno": "x" * 4096}
    answer = httpx.post(running.callback_url, json=big, headers=_token(OLD), timeout=10)
    assert answer.status_code == 202


@pytest.mark.skipif(sys.platform == "win32", reason="Windows no tiene SIGHUP")
def test_sighup_reloads_at_once(running: ServerProcess, tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    before = dotenv.stat()
    # Same size and the old modification time: only SIGHUP can tell the service to look.
    same_size = OLD[:-4] + "9999"
    dotenv.write_text(f"CALLBACK_TOKEN={same_size}\n", encoding="utf-8")
    os.utime(dotenv, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert dotenv.stat().st_size == before.st_size
    assert running.process is not None
    running.process.send_signal(signal.SIGHUP)
    wait_for(lambda: _post(running, "dep-hup", _token(same_size)) == 202, timeout=15, what="recarga por SIGHUP")
    assert running.process.poll() is None


def test_a_new_key_file_is_taken_and_no_callback_is_refused_meanwhile(
    tmp_path: Path, make_server: Callable[..., ServerProcess], keys: Keys, other_keys: Keys
) -> None:
    key_file = tmp_path / "gateway.pem"
    key_file.write_text(keys.public_pem, encoding="utf-8")
    server = make_server(f"CALLBACK_TOKEN={OLD}\nJWT_PUBLIC_KEY={key_file}\n", CALLBACK_AUTH_FAILURES_LIMIT="0").start()
    insert_run(server.env["SAM_DATABASE_URL"], "dep-jwt")
    assert _post(server, "dep-jwt", {"Authorization": f"Bearer {keys.token()}"}) == 200
    refused: list[int] = []
    stop = threading.Event()

    def keep_sending() -> None:
        # A callback carrying the static token must never be refused while the key changes.
        number = 0
        while not stop.is_set() and number < 2000:
            status = _post(server, f"dep-flow-{number}", _token(OLD))
            if status != 202:
                refused.append(status)
            number += 1

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        _edit(key_file, other_keys.public_pem)
        wait_for(
            lambda: _post(server, "dep-jwt-2", {"Authorization": f"Bearer {other_keys.token()}"}) == 202,
            timeout=15,
            what="la clave nueva se acepta",
        )
    finally:
        stop.set()
        sender.join(30)
    assert refused == []
    assert _post(server, "dep-jwt-3", {"Authorization": f"Bearer {keys.token()}"}) == 401
    assert "JWT_CLAVE_PUBLICA" in _log(tmp_path)


def test_a_key_file_broken_by_an_edit_keeps_the_key_in_force(
    tmp_path: Path, make_server: Callable[..., ServerProcess], keys: Keys
) -> None:
    """Mode optional with a token starts on an unusable key; a working key broken later is a broken edit."""
    key_file = tmp_path / "gateway.pem"
    key_file.write_text(keys.public_pem, encoding="utf-8")
    server = make_server(f"CALLBACK_TOKEN={OLD}\nJWT_PUBLIC_KEY={key_file}\n").start()
    insert_run(server.env["SAM_DATABASE_URL"], "dep-key-1")
    insert_run(server.env["SAM_DATABASE_URL"], "dep-key-2")
    assert _post(server, "dep-key-1", {"Authorization": f"Bearer {keys.token()}"}) == 200
    _edit(key_file, "esto no es una clave\n")
    wait_for(lambda: "se mantienen las vigentes" in _log(tmp_path), timeout=15, what="el error de la clave rota")
    line = next(line for line in _log(tmp_path).splitlines() if "se mantienen las vigentes" in line)
    assert "ERROR" in line
    # The key in force still checks JWTs: the line must not say they are refused.
    assert "se rechazan" not in line
    assert _post(server, "dep-key-2", {"Authorization": f"Bearer {keys.token()}"}) == 200
    assert "Credenciales recargadas" not in _log(tmp_path)


def test_the_file_named_by_callback_env_file_is_read_and_watched(
    tmp_path: Path, make_server: Callable[..., ServerProcess]
) -> None:
    """As deploy/linux sets it up: the configuration lives outside the working folder and still reloads."""
    config = tmp_path / "etc" / "sam-callback.env"
    config.parent.mkdir()
    config.write_text(f"CALLBACK_TOKEN={OLD}\n", encoding="utf-8")
    server = make_server("", CALLBACK_ENV_FILE=str(config)).start()
    assert _post(server, "dep-env-1", _token(OLD)) == 202
    _edit(config, f"CALLBACK_TOKEN={NEW}\n")
    wait_for(lambda: _post(server, "dep-env-2", _token(NEW)) == 202, timeout=15, what="el token nuevo se acepta")
    assert _post(server, "dep-env-3", _token(OLD)) == 401


def test_every_worker_takes_the_new_token(tmp_path: Path, make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(f"CALLBACK_TOKEN={OLD}\n", CALLBACK_SERVER_WORKERS="2").start()
    _edit(tmp_path / ".env", f"CALLBACK_TOKEN={NEW}\n")

    def all_accept() -> bool:
        # New connections are spread over both workers; twenty in a row must all accept.
        return all(_post(server, f"dep-w-{n}", _token(NEW)) == 202 for n in range(20))

    wait_for(all_accept, timeout=20, what="los dos procesos aceptan el token nuevo")
    assert all(_post(server, f"dep-o-{n}", _token(OLD)) == 401 for n in range(10))


@pytest.mark.skipif(sys.platform == "win32", reason="Windows no tiene SIGHUP")
def test_sighup_to_the_parent_reloads_every_worker_without_restarting_them(
    tmp_path: Path, make_server: Callable[..., ServerProcess]
) -> None:
    server = make_server(f"CALLBACK_TOKEN={OLD}\n", CALLBACK_SERVER_WORKERS="2").start()
    wait_for(lambda: _log(tmp_path).count("Application startup complete") == 2, timeout=60, what="dos workers")
    dotenv = tmp_path / ".env"
    before = dotenv.stat()
    same_size = OLD[:-4] + "7777"
    # Same size and modification time: polling cannot see it, only the signal can.
    dotenv.write_text(f"CALLBACK_TOKEN={same_size}\n", encoding="utf-8")
    os.utime(dotenv, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)

    def all_accept() -> bool:
        return all(_post(server, f"dep-hup-{n}", _token(same_size)) == 202 for n in range(20))

    wait_for(all_accept, timeout=20, what="los dos procesos aceptan el token nuevo tras SIGHUP")
    log = _log(tmp_path)
    assert "los procesos releen las credenciales" in log
    assert "restarting processes" not in log
    assert log.count("Application startup complete") == 2  # no worker was replaced


def test_the_supervisor_names_the_reload_relies_on_still_exist() -> None:
    """uvicorn's supervisor: handle_hup, terminate_all, sockets, processes, Process.pid (re-sync server.py if this fails)."""
    from uvicorn.supervisors.multiprocess import Multiprocess, Process

    assert callable(getattr(Multiprocess, "handle_hup", None)), "re-sync server.py: Multiprocess.handle_hup moved"
    assert callable(getattr(Multiprocess, "terminate_all", None)), "re-sync server.py: terminate_all moved"
    assert "self.sockets" in __import__("inspect").getsource(Multiprocess.__init__), (
        "re-sync server.py: Multiprocess.sockets moved"
    )
    assert isinstance(getattr(Process, "pid", None), property), "re-sync server.py: Process.pid moved"
    assert "self.processes" in __import__("inspect").getsource(Multiprocess.__init__), (
        "re-sync server.py: Multiprocess.processes moved"
    )
