"""The listening sockets: the one systemd hands over at start (socket activation), or our own, bound before serving."""

from __future__ import annotations

import errno
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
    port = listener.getsockname()[1]
    scheme, address = _scheme(settings), _where(listener)
    log.info(
        "Socket de escucha recibido de systemd (activación por socket): %s://%s, %d proceso(s); durante un "
        "reinicio las conexiones esperan en la cola del socket",
        scheme,
        address,
        settings.server_workers,
    )
    if port != settings.server_port:
        log.warning(
            "el socket de systemd escucha en el puerto %d y CALLBACK_PUERTO (o CALLBACK_SERVER_PORT) es %d: "
            "`sam-callback status` usa el segundo; iguale ListenStream= y ese puerto",
            port,
            settings.server_port,
        )


# uvicorn's default backlog: connections that wait while the loop is busy.
BACKLOG = 2048


class PortInUse(Exception):
    """Another process holds the port: worth retrying later (the old instance may be stopping)."""


def bind_listeners(settings: Settings) -> list[socket.socket]:
    """Listening sockets on CALLBACK_HOST:CALLBACK_PUERTO, bound before anything starts.

    Bound here rather than by uvicorn, which binds after the application has started (and
    said it was ready): a bad address stops the start as a configuration error, exit code 2,
    before a single line claims the service is up.
    """
    host, port = settings.server_host, settings.server_port
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        problem = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            [
                f"CALLBACK_HOST/CALLBACK_SERVER_HOST: '{host}' no es una dirección ni un nombre que se pueda resolver ({problem})"
            ]
        ) from None
    listeners: list[socket.socket] = []
    seen: set[tuple[int, tuple[str, int]]] = set()
    try:
        for family, _type, _proto, _name, address in found:
            key = (int(family), (str(address[0]), int(address[1])))
            if key in seen or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            seen.add(key)
            listeners.append(_bind(family, key[1], host, port))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    # uvicorn says where it listens only when it binds itself: say it here instead.
    for listener in listeners:
        log.info("Escuchando en %s://%s (%d proceso(s))", _scheme(settings), _where(listener), settings.server_workers)
    return listeners


def _scheme(settings: Settings) -> str:
    return "https" if settings.ssl_certfile and settings.ssl_keyfile else "http"


def _where(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"[{host}]:{port}" if listener.family == socket.AF_INET6 else f"{host}:{port}"


def _bind(family: socket.AddressFamily, address: tuple[str, int], host: str, port: int) -> socket.socket:
    try:
        # As asyncio binds: SO_REUSEADDR on POSIX only (on Windows it would let a second
        # process take the same port), IPv6 sockets for IPv6 only.
        listener = socket.create_server(address, family=family, backlog=BACKLOG)
    except OSError as exc:
        where = f"{host}:{port}" if family == socket.AF_INET else f"[{host}]:{port}"
        if exc.errno == errno.EADDRINUSE or getattr(exc, "winerror", None) == 10048:
            raise PortInUse(f"No se puede escuchar en {where}: el puerto ya está en uso por otro proceso") from None
        raise ConfigError(
            [
                f"CALLBACK_HOST/CALLBACK_PUERTO: no se puede escuchar en {where} ({_reason(exc)}); "
                "use una dirección de esta máquina (o 0.0.0.0) y un puerto libre"
            ]
        ) from None
    listener.set_inheritable(False)
    return listener


def _reason(exc: OSError) -> str:
    # socket.create_server appends "(while attempting to bind on address ...)": the line names it already.
    return str(exc.strerror or exc).split(" (while attempting", 1)[0]
