"""The service's live resources, opened by the lifespan and reached by the handlers."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from .alerts import Alerts
from .auth import Authenticator, FailureThrottle
from .logs import LoggingHandle, RedactingFilter, secrets_of, setup_logging
from .metrics import Metrics
from .network import ClientAddressResolver
from .recorder import Recorder, RecorderEvents
from .rejected import RejectedStore
from .reload import CredentialReloader
from .repository import Repository, display_url, make_engine
from .settings import ConfigError, Settings, env_file_path, load_settings
from .spool import Spool, SpoolError, SpoolStats

log = logging.getLogger("sam.callback")

_active_logging: LoggingHandle | None = None


def ensure_logging(settings: Settings) -> LoggingHandle | None:
    """Configure logging once per process; return the handle when this call made it."""
    global _active_logging
    if _active_logging is not None:
        return None
    _active_logging = setup_logging(settings, secrets_of(settings))
    return _active_logging


def add_log_secrets(values: list[str]) -> None:
    """Mask these values too from now on (credentials reloaded while serving)."""
    if _active_logging is not None:
        _active_logging.add_secrets(values)


def close_logging(handle: LoggingHandle | None) -> None:
    """Undo `ensure_logging` when `handle` is the one it made."""
    global _active_logging
    if handle is not None and handle is _active_logging:
        handle.close()
        _active_logging = None


@dataclass
class Runtime:
    """What a request needs; the parts without I/O exist from `create_app`, the rest from start."""

    settings: Settings
    authenticator: Authenticator
    resolver: ClientAddressResolver
    throttle: FailureThrottle
    spool: Spool
    metrics: Metrics
    alerts: Alerts
    rejected: RejectedStore
    repository: Repository | None = None
    recorder_: Recorder | None = None
    logging_handle: LoggingHandle | None = None
    reloader: CredentialReloader | None = None
    throttled_since_log: dict[str, int] = field(default_factory=dict)
    # How often throttled failures are summed up in the log (SPEC 3: counted, not logged one by one).
    throttle_summary_seconds: float = 60.0
    _throttle_timer: asyncio.TimerHandle | None = None
    _secrets: RedactingFilter = field(default_factory=RedactingFilter)

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        """Parts that validate configuration (keys, networks) but open nothing."""
        spool = Spool(settings.spool_path)
        return cls(
            settings=settings,
            authenticator=Authenticator(settings),
            resolver=ClientAddressResolver(
                allowed=settings.allowed_networks, trusted_proxies=settings.trusted_proxy_networks
            ),
            throttle=FailureThrottle(settings.auth_failures_limit),
            spool=spool,
            metrics=Metrics(spool.stats),
            alerts=Alerts(settings, spool=spool, secrets=secrets_of(settings)),
            rejected=RejectedStore(settings.spool_path, max_entries=settings.rejected_max),
            _secrets=RedactingFilter(secrets_of(settings)),
        )

    def names_a_secret(self, text: str) -> bool:
        """Whether `text` holds a configured credential, or something shaped like one."""
        return self._secrets.redact(text) != text

    @property
    def recorder(self) -> Recorder:
        """The writer; only valid between start and stop."""
        if self.recorder_ is None:
            raise RuntimeError("el servicio no se ha iniciado")
        return self.recorder_

    def start(self) -> None:
        """Open logs, the database engine, the spool and the writer thread."""
        settings = self.settings
        self.logging_handle = ensure_logging(settings)
        engine = make_engine(
            settings.resolved_database_url(),
            pool_size=settings.server_threads,
            connect_timeout=settings.sql_connect_timeout,
        )
        self.repository = Repository(engine, settings.final_state_set)
        if engine.dialect.name == "sqlite":
            # The embedded default must work with no set-up at all.
            try:
                self.repository.create_schema()
            except Exception as exc:
                log.error("No se pudo crear la tabla Ejecuciones en SQLite: %s", exc)
        try:
            self.spool.open()
        except SpoolError as exc:
            # Serving without a spool is still useful while the database answers; /ready says so.
            log.error("%s", exc)
        self.alerts.start()
        events = RecorderEvents(
            on_db_error=lambda where: self.metrics.db_errors.labels(where).inc(),
            on_applied=lambda result: self.metrics.spool_applied.labels(result.value).inc(),
            on_database_down=self.alerts.database_down,
            on_database_up=self.alerts.database_up,
            on_unmatched=lambda entry: self.alerts.unmatched(
                entry.deployment_id, entry.request_id, time.time() - entry.received_at
            ),
            on_refused=self.alerts.refused_for_good,
        )
        self.recorder_ = Recorder(
            self.repository,
            self.spool,
            match_window=settings.match_window_seconds,
            events=events,
            database_timeout=settings.database_timeout_seconds,
        )
        self.recorder_.start()
        if settings.auth_mode == "none":
            log.warning("CALLBACK_AUTH_MODE=none: el endpoint acepta callbacks sin autenticación")
        for warning in self.authenticator.warnings:
            log.warning("%s", warning)
        log.info(
            "sam-callback listo: endpoint=%s modo_auth=%s base_de_datos=%s spool=%s",
            settings.endpoint_path, settings.auth_mode, display_url(engine.url), settings.spool_path,
        )  # fmt: skip

    def watch_credentials(self) -> None:
        """Re-read credentials from .env and the key file while serving (SPEC 11)."""
        self.reloader = CredentialReloader(
            self.settings, load=load_settings, apply=self.apply_credentials, env_file=env_file_path()
        )
        self.reloader.start()

    def apply_credentials(self, settings: Settings) -> None:
        """Swap in the authenticator and allowlist of `settings`; ConfigError leaves the old ones."""
        authenticator = Authenticator(settings)
        if authenticator.warnings and not self.authenticator.warnings:
            # Mode optional starts with an unusable key as a warning; a working key broken by an
            # edit is a broken edit (SPEC 11): the key in force stays, and JWTs are still checked
            # with it (the warning's "JWTs are refused" would not be true here).
            raise ConfigError(authenticator.key_problems)
        resolver = ClientAddressResolver(
            allowed=settings.allowed_networks, trusted_proxies=settings.trusted_proxy_networks
        )
        add_log_secrets(secrets_of(settings))
        self._secrets.add_secrets(secrets_of(settings))
        # Each is one attribute read per request: a request sees the old pair or the new one.
        self.authenticator, self.resolver, self.settings = authenticator, resolver, settings

    def stop(self) -> None:
        """Finish pending writes and close everything."""
        if self.reloader is not None:
            self.reloader.stop()
            self.reloader = None
        if self.recorder_ is not None:
            self.recorder_.stop()
            self.recorder_ = None
        self.log_throttled()
        self.alerts.stop()
        self.spool.close()
        self.rejected.close()
        if self.repository is not None:
            self.repository.dispose()
        log.info("sam-callback detenido")
        close_logging(self.logging_handle)
        self.logging_handle = None

    def warnings(self, stats: SpoolStats | None) -> list[str]:
        """What `/ready` and the operator page warn of: auth mode none, the authenticator's, no spool."""
        warnings = []
        if self.settings.auth_mode == "none":
            warnings.append("CALLBACK_AUTH_MODE=none: el endpoint no exige autenticación")
        # An unusable JWT key in mode optional, for one: the service serves, JWTs are refused.
        warnings.extend(self.authenticator.warnings)
        if stats is None:
            warnings.append("el spool no está disponible: si la base de datos cae, los callbacks se rechazarán con 503")
        return warnings

    def spool_stats(self) -> SpoolStats | None:
        """Spool figures, or None when the spool cannot be read."""
        try:
            return self.spool.stats()
        except SpoolError:
            return None

    def on_rejected(
        self, *, seq: int | None, client: str, reason: str, deployment_id: str | None, request_id: str
    ) -> None:
        """An authenticated callback was refused: say where to read its body (None: it was not kept)."""
        if seq is None:
            log.warning(
                "Callback rechazado NO guardado (CALLBACK_REJECTED_MAX=0 o el almacén falló) cliente=%s "
                "deploymentId=%s motivo=%s",
                client, deployment_id or "-", reason,
            )  # fmt: skip
        else:
            log.warning(
                "Callback rechazado guardado n.º %d cliente=%s deploymentId=%s motivo=%s; véalo con `sam-callback spool show %d`",
                seq, client, deployment_id or "-", reason, seq,
            )  # fmt: skip
        self.alerts.rejected(deployment_id=deployment_id, reason=reason, client=client, request_id=request_id, seq=seq)

    def note_throttled(self, client: str) -> None:
        """Count a throttled failure: the first of a minute is logged at once, the rest summed up when it ends."""
        counts = self.throttled_since_log
        counts[client] = counts.get(client, 0) + 1
        if self._throttle_timer is not None:
            if len(counts) > 1000:  # bounded memory, whatever the number of addresses
                self.log_throttled()
            return
        self.log_throttled()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the event loop: every call logs its own count
            return
        self._throttle_timer = loop.call_later(self.throttle_summary_seconds, self._throttle_minute_over)

    def _throttle_minute_over(self) -> None:
        self._throttle_timer = None
        if self.throttled_since_log:
            # Failures went on during the minute: sum them up, and keep summing while they last.
            self.log_throttled()
            loop = asyncio.get_running_loop()
            self._throttle_timer = loop.call_later(self.throttle_summary_seconds, self._throttle_minute_over)

    def log_throttled(self) -> None:
        """Log the throttled failures counted since the last summary, per address, and start again."""
        counts = self.throttled_since_log
        if not counts:
            return
        shown = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:20]
        summary = ", ".join(f"{address}={count}" for address, count in shown)
        if len(counts) > len(shown):
            summary += f" y {len(counts) - len(shown)} direcciones más"
        log.warning(
            "Fallos de autenticación limitados (429) desde el último resumen: %d; %s", sum(counts.values()), summary
        )
        counts.clear()
