"""Credentials re-read from `.env` and the key file while serving, with no restart (SPEC 11)."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .sam_env import env_name
from .settings import CREDENTIAL_FIELDS, ConfigError, Settings

log = logging.getLogger("sam.callback.reload")

# Noticed within 5 seconds (SPEC 11); a stat of two files every second costs nothing.
POLL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the files looked like at the last check: (mtime_ns, size) of each, or None when absent."""

    env_file: tuple[int, int] | None
    key_file: tuple[int, int] | None


def _stat(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def key_file_of(settings: Settings) -> Path | None:
    """The file JWT_CLAVE_PUBLICA names, when it names one rather than holding the key itself."""
    value = (settings.jwt_public_key or "").strip()
    if not value or value.startswith(("-----", "{")):
        return None
    return Path(value)


def _key_digest(settings: Settings) -> str:
    path = key_file_of(settings)
    if path is None:
        return ""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


class CredentialReloader:
    """Watches `.env` and the key file; applies changed credentials, keeps them when an edit is broken."""

    def __init__(
        self,
        settings: Settings,
        *,
        load: Callable[[], Settings],
        apply: Callable[[Settings], None],
        env_file: Path = Path(".env"),
    ) -> None:
        self.current = settings
        self.load = load
        self.apply = apply
        self.env_file = env_file
        self._key_digest = _key_digest(settings)
        # Nothing seen yet, so the first poll re-reads the files: `settings` were read before this
        # watcher started (a worker reads them when it imports the app), and an edit in between
        # would otherwise never be noticed.
        self._seen: _Seen | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _look(self) -> _Seen:
        return _Seen(env_file=_stat(self.env_file), key_file=_stat(key_file_of(self.current)))

    def start(self) -> None:
        """Poll in a daemon thread until `stop()`."""
        self._thread = threading.Thread(target=self._run, name="sam-callback-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.check()
            except Exception:
                log.exception("Error inesperado al comprobar cambios de credenciales; se reintentará")

    def check(self, *, force: bool = False) -> bool:
        """Reload when the files changed (or always, with `force`: SIGHUP); True when credentials changed."""
        with self._lock:
            seen = self._look()
            if not force and seen == self._seen:
                return False
            self._seen = seen
            return self._reload(reason="SIGHUP" if force else "cambio en .env o en el fichero de clave")

    def _reload(self, *, reason: str) -> bool:
        try:
            fresh = self.load()
        except ConfigError as exc:
            log.error(
                "Configuración nueva no válida (%s); se mantienen las credenciales vigentes: %s",
                reason, " | ".join(exc.problems),
            )  # fmt: skip
            return False
        fields = sorted(CREDENTIAL_FIELDS)
        changed = [name for name in fields if getattr(fresh, name) != getattr(self.current, name)]
        digest = _key_digest(fresh)
        if digest != self._key_digest and "jwt_public_key" not in changed:
            changed.append("jwt_public_key")
        restart = sorted(
            name
            for name in type(self.current).model_fields
            if name not in CREDENTIAL_FIELDS and getattr(fresh, name) != getattr(self.current, name)
        )
        if restart:
            log.warning(
                "Cambios de configuración que solo se aplican al reiniciar el servicio: %s",
                ", ".join(env_name(name) for name in restart),
            )
        if not changed:
            return False
        merged = self.current.model_copy(update={name: getattr(fresh, name) for name in fields})
        try:
            self.apply(merged)
        except ConfigError as exc:
            log.error(
                "Credenciales nuevas no utilizables (%s); se mantienen las vigentes: %s",
                reason, " | ".join(exc.problems),
            )  # fmt: skip
            return False
        self.current = merged
        self._key_digest = digest
        log.warning(
            "Credenciales recargadas sin reiniciar (%s): %s",
            reason, ", ".join(env_name(name) for name in changed),
        )  # fmt: skip
        return True
