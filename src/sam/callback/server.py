"""Running the app under uvicorn: one process or several, HTTP or HTTPS, with a clean stop."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from .app import create_app
from .auth import Authenticator
from .domain import ResultCode
from .listen import PortInUse, bind_listeners, systemd_listener
from .protocols import protocol_factory
from .repository import driver_problem
from .responses import envelope, request_id_from
from .runtime import close_logging, ensure_logging
from .sam_env import name_warnings
from .settings import ConfigError, Settings, env_file_path

log = logging.getLogger("sam.callback")

GRACEFUL_SHUTDOWN_SECONDS = 30
KEEP_ALIVE_SECONDS = 5
# uvicorn kills a worker that does not answer its supervisor's ping within this time, then
# starts another. Its default (5 s) is shorter than a worker's start on a busy machine: the
# workers were replaced one after another and none ever served.
WORKER_HEALTHCHECK_SECONDS = 60
# httptools (llhttp) puts no limit on a request head: a 20 MB header is buffered whole (and
# re-concatenated chunk by chunk) before the app sees it. Larger heads are refused with 431.
MAX_HEAD_BYTES = 64 * 1024


def _answer(code: ResultCode, message: str | None = None) -> tuple[str, bytes]:
    _status, body = envelope(code, request_id_from(None), message=message)
    return body["request_id"], json.dumps(body, ensure_ascii=False).encode("utf-8")


def head_too_large_answer(limit: int) -> tuple[str, bytes]:
    """Request id and JSON body of the 431 answer to a request head over `limit` bytes."""
    return _answer(
        ResultCode.HEADERS_TOO_LARGE, f"La línea de petición y las cabeceras superan el máximo de {limit} bytes"
    )


def bad_request_answer() -> tuple[str, bytes]:
    """Request id and JSON body of the 400 answer to a request the HTTP parser cannot read."""
    return _answer(ResultCode.BAD_REQUEST)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Options shared by the single-process and multi-process modes."""
    options: dict[str, Any] = {
        "host": settings.server_host,
        "port": settings.server_port,
        "log_config": None,
        "proxy_headers": False,  # X-Forwarded-For is handled by CALLBACK_TRUSTED_PROXIES, and only there
        "server_header": False,
        "date_header": True,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
        # uvicorn's own protocol waits for ever for a request's headers (slow clients) and
        # buffers heads of any size. The server always runs this httptools protocol (a
        # dependency on every platform), so uvicorn's h11 parser is never used.
        "http": protocol_factory(
            header_timeout=settings.header_timeout_seconds,
            max_head_bytes=MAX_HEAD_BYTES,
            head_too_large=head_too_large_answer,
            bad_request=bad_request_answer,
            quiet_path=settings.endpoint_path,
        ),
    }
    if settings.ssl_certfile and settings.ssl_keyfile:
        options |= {
            "ssl_certfile": str(settings.ssl_certfile),
            "ssl_keyfile": str(settings.ssl_keyfile),
            "ssl_version": ssl.PROTOCOL_TLS_SERVER,
        }
    return options


def _ignore_stop_signals(*, until_exit: bool = False) -> None:
    # uvicorn re-raises the stop signal once it has shut down cleanly; with the default
    # handlers that would turn a graceful stop into exit code 143 or a KeyboardInterrupt.
    # While serving, a Python no-op: SIG_IGN would be inherited by the worker processes. Once
    # served, SIG_IGN: Python puts its own handlers back to the default while the interpreter
    # exits, and a stop signal repeated then (a launcher such as `uv run` passes on the Ctrl+C
    # its process group already got) would end a clean stop with exit code 130 or 143.
    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN if until_exit else (lambda *_: None))


def serve(settings: Settings) -> int:
    """Serve until stopped; return the process exit code."""
    _check_database_driver(settings)
    # Parse the JWT keys before anything else: a key that does not parse must stop the start with
    # exit code 2 and its one line, before the port is bound or anything is logged (and, with
    # several workers, before every worker crashes on it while the parent waits for ever).
    Authenticator(settings)
    handle = ensure_logging(settings)
    # Under a service manager nobody runs `check`: the log says which of two names won.
    for warning in name_warnings(env_file_path()):
        log.warning("%s", warning)
    listeners: list[socket.socket] = []
    try:
        # With a socket from systemd, connections that arrive while we restart wait in its
        # queue instead of being refused; closing our copy on exit leaves systemd's open.
        listener = systemd_listener(settings)
        try:
            listeners = [listener] if listener is not None else bind_listeners(settings)
        except PortInUse as exc:
            log.error("%s; se sale con código 1 para que el servicio lo reintente", exc)
            return 1
        if settings.server_workers > 1:
            return _serve_workers(settings, listeners)
        config = uvicorn.Config(create_app(settings, watch_credentials=True), **uvicorn_options(settings))
        server = uvicorn.Server(config)
        _ignore_stop_signals()
        server.run(sockets=listeners)
        return 0 if server.started or not server.should_exit else 1
    finally:
        _ignore_stop_signals(until_exit=True)
        for listener in listeners:
            listener.close()
        close_logging(handle)


def _check_database_driver(settings: Settings) -> None:
    # A driver that cannot load would otherwise surface as a traceback from the lifespan.
    problem = driver_problem(settings.resolved_database_url())
    if problem is not None:
        source = (
            "SAM_DATABASE_URL"
            if settings.database_url
            else ("SQL_SAM_DRIVER" if settings.sql_host else "base de datos")
        )
        raise ConfigError([f"{source}: {problem}"])


class CredentialReloadingSupervisor(Multiprocess):
    """uvicorn's worker supervisor, except that SIGHUP reloads credentials instead of restarting workers.

    uvicorn answers SIGHUP by replacing every worker; SPEC 11 asks for credentials re-read at
    once with no restart. Each worker re-reads them on its own SIGHUP (app.py), so the signal is
    passed on. At the stop it lets go of the port before waiting for the workers. `handle_hup`,
    `terminate_all`, `sockets`, `processes` and `Process.pid` are public names of uvicorn's
    supervisor, checked by tests/test_reload.py against the pinned uvicorn.
    """

    def terminate_all(self) -> None:
        """Stop listening in this process, then stop the workers."""
        # The supervisor's copy of the listening socket kept the port open until the last worker
        # had finished: the kernel accepted connections nobody would serve and reset them at
        # exit (the client sent its callback and read an error). Closed now, a client is refused
        # as soon as the workers stop listening. systemd's own socket stays open (docs/linux.md).
        for listener in self.sockets:
            with contextlib.suppress(OSError):
                listener.close()
        super().terminate_all()

    def handle_hup(self) -> None:
        """Pass SIGHUP on to every worker."""
        log.info("SIGHUP: los procesos releen las credenciales (sin reiniciarse)")
        hangup = getattr(signal, "SIGHUP", None)
        if hangup is None:
            return
        for process in self.processes:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, hangup)


def _serve_workers(settings: Settings, listeners: list[socket.socket]) -> int:
    # Each worker is a fresh interpreter that re-reads the same environment and .env; the
    # metrics of all of them are summed through files in PROMETHEUS_MULTIPROC_DIR.
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="sam-callback-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    else:
        # An operator-chosen folder outlives the process: files left by the previous run would
        # be summed into this run's counters ("since start" would include yesterday).
        folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink(missing_ok=True)
    try:
        _ignore_stop_signals()
        config = uvicorn.Config(
            "sam.callback.app:app_from_environment",
            factory=True,
            workers=settings.server_workers,
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS,
            **uvicorn_options(settings),
        )
        # The supervisor hands the listening sockets to every worker: systemd's, or our own.
        CredentialReloadingSupervisor(config, sockets=listeners).run()
        return 0
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)
