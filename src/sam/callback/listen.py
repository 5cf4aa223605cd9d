"""The listening socket systemd hands over at start (socket activation), when there is one."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import MutableMapping

from .settings import ConfigError, Settings

log = logging.getLogger("sam.callback")

# sd_listen_fds(3): the first passed descriptor is always 3, the rest follow it.
SD_LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def systemd_listener(settings: Settings, environ: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The TCP socket systemd passed to this process, or None to bind our own.

    Follows sd_listen_fds(3): the variables count only when LISTEN_PID is this process, and
    they are removed either way, so the worker processes and anything they start never take
    them for their own.
    """
    environ = os.environ if environ is None else environ
    if sys.platform == "win32":
        return None
    values = {name: environ.pop(name, None) for name in _LISTEN_VARIABLES}
    pid, count = values["LISTEN_PID"], values["LISTEN_FDS"]
    if pid is None or count is None:
        return None
    if not pid.strip().isdigit():
        raise ConfigError([f"LISTEN_PID={pid!r} no es un número de proceso (activación por socket de systemd)"])
    if int(pid) != os.getpid():
        # Usually an ExecStart= that goes through a shell without `exec`: the port is then
        # systemd's, and binding it ourselves would fail with "address already in use".
        log.warning(
            "LISTEN_PID=%s no es este proceso (%d): se ignora el socket de systemd y se abre el puerto "
            "propio; si ExecStart= pasa por un shell, use exec",
            pid.strip(),
            os.getpid(),
        )
        return None
    if not count.strip().isdigit() or int(count) < 1:
        raise ConfigError(
            [f"LISTEN_FDS={count!r} no es un número de sockets válido (activación por socket de systemd)"]
        )
    if int(count) > 1:
        raise ConfigError(
            [
                f"systemd pasó {int(count)} sockets (LISTEN_FDS) y sam-callback usa uno: deje un solo "
                "ListenStream= en sam-callback.socket"
            ]
        )
    listener = _inherited_socket(SD_LISTEN_FDS_START)
    _log_listener(listener, settings)
    return listener


def _inherited_socket(fd: int) -> socket.socket:
    try:
        # Without a family, Python asks the kernel: AF_INET or AF_INET6 as systemd created it.
        # (uvicorn's fd= option assumes AF_UNIX, and accepted TCP connections would lose TCP_NODELAY.)
        listener = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(
            [f"el descriptor {fd} que anuncia LISTEN_FDS no es un socket ({exc.strerror or exc})"]
        ) from None
    listening = listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if listener.family not in (socket.AF_INET, socket.AF_INET6) or listener.type != socket.SOCK_STREAM or not listening:
        kind = f"{getattr(listener.family, 'name', listener.family)}/{getattr(listener.type, 'name', listener.type)}{'' if listening else ', sin escuchar'}"
        listener.detach()  # not ours to close: the process exits with the configuration error
        raise ConfigError(
            [f"el socket de systemd (descriptor {fd}) no es un socket TCP en escucha ({kind}): use ListenStream=PUERTO"]
        )
    # Only uvicorn's workers may share it, and they receive it explicitly; a program this
    # process starts must not keep the port's queue alive behind systemd's back.
    listener.set_inheritable(False)
    return listener


def _log_listener(listener: socket.socket, settings: Settings) -> None:
    host, port = listener.getsockname()[:2]
    address = f"[{host}]:{port}" if listener.family == socket.AF_INET6 else f"{host}:{port}"
    scheme = "https" if settings.ssl_certfile and settings.ssl_keyfile else "http"
    log.info(
        "Socket de escucha recibido de systemd (activación por socket): %s://%s, %d proceso(s); durante un "
        "reinicio las conexiones esperan en la cola del socket",
        scheme,
        address,
        settings.server_workers,
    )
    if port != settings.server_port:
        log.warning(
            "el socket de systemd escucha en el puerto %d y CALLBACK_SERVER_PORT es %d: `sam-callback status` "
            "usa el segundo; iguale ListenStream= y CALLBACK_SERVER_PORT",
            port,
            settings.server_port,
        )
