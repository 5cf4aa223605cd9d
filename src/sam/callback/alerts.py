"""Alerts (SPEC section 9): conditions watched off the request path, then mailed or logged at ERROR."""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial

from .alert_policy import RETRY_SECONDS, Alert, AlertPolicy
from .alert_texts import (
    AlertKind,
    Occurrence,
    Refusal,
    RefusedForGood,
    Rejected,
    RenderedAlert,
    Unavailable,
    Unmatched,
    render,
)
from .domain import AuthFailure
from .logs import RedactingFilter
from .mail import CLEAR_WITHOUT_STARTTLS, SMTP_TIMEOUT_SECONDS, MailConfig, MailError, PartlyDelivered, compose, send
from .settings import Settings
from .spool import Spool, SpoolError

log = logging.getLogger("sam.callback.alerts")

TICK_SECONDS = 1.0
_EVENT_QUEUE_SIZE = 10_000
_MAIL_QUEUE_SIZE = 100
STOP_WAIT_SECONDS = 5.0

_Event = Callable[[float, float], list[Alert]]


class Alerts:
    """Watches the conditions on one thread and mails on another; callers only enqueue (O(1))."""

    def __init__(
        self,
        settings: Settings,
        *,
        spool: Spool | None = None,
        secrets: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
        timeout: float = SMTP_TIMEOUT_SECONDS,
        stop_seconds: float = STOP_WAIT_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.mail = MailConfig.from_settings(settings)
        self.repeat_seconds = settings.alert_repeat_seconds
        self.policy = AlertPolicy(
            auth_failures=settings.alert_auth_failures,
            database_seconds=settings.alert_database_seconds,
            repeat_seconds=settings.alert_repeat_seconds,
            backlog=self._backlog,
            retry_seconds=retry_seconds,
        )
        self.timeout = timeout
        self.stop_seconds = stop_seconds
        self.host = socket.gethostname()
        self._spool = spool
        self._redact = RedactingFilter(secrets).redact
        self._clock = clock
        self._events: queue.Queue[_Event | None] = queue.Queue(_EVENT_QUEUE_SIZE)
        self._mails: queue.Queue[Alert | None] = queue.Queue(_MAIL_QUEUE_SIZE)
        self._watcher: threading.Thread | None = None
        self._sender: threading.Thread | None = None
        self._dropped = 0
        self._dropped_logged = 0
        # The alert the sender is mailing, and whether stop gave up on the sender; under _lock, so
        # an alert is reported unsent by stop or by the sender, never by both and never by neither.
        self._lock = threading.Lock()
        self._in_flight: Alert | None = None
        self._abandoned = False
        self._warned_clear = False
        # Whether the last mail of each kind reached the mail server (written by the sender only).
        self._delivered: dict[AlertKind, bool] = {}

    # --- what the request path and the writer call: enqueue only ------------------------------

    def refused(self, client: str, status: int, reasons: tuple[AuthFailure, ...]) -> None:
        """A callback refused with 401, 403 or 429 (reasons as logged, never the credential)."""
        if self.policy.auth_failures > 0:
            self._put(partial(self.policy.refusal, Refusal(client, status, reasons)))

    def unavailable(self, deployment_id: str, status: str, request_id: str) -> None:
        """A callback answered 503: neither the database nor the spool could keep it."""
        self._occurred(AlertKind.UNAVAILABLE, Unavailable(deployment_id, status, request_id))

    def refused_for_good(self, deployment_id: str, status: str, error: str, seq: int | None = None) -> None:
        """A callback the database refuses for a reason retrying cannot fix (SPEC section 8)."""
        self._occurred(AlertKind.REFUSED_FOR_GOOD, RefusedForGood(deployment_id, status, error, seq))

    def unmatched(self, deployment_id: str, request_id: str, waited_seconds: float) -> None:
        """A callback whose run never appeared within CALLBACK_MATCH_WINDOW_SECONDS."""
        self._occurred(AlertKind.UNMATCHED, Unmatched(deployment_id, request_id, waited_seconds))

    def rejected(
        self, *, deployment_id: str | None, reason: str, client: str, request_id: str, seq: int | None = None
    ) -> None:
        """An authenticated callback rejected for its body (400, 415) and kept (SPEC section 10)."""
        self._occurred(AlertKind.REJECTED, Rejected(deployment_id, reason, client, request_id, seq))

    def database_down(self, error: str | None) -> None:
        """The database could not be reached (called on every failed try)."""
        self._put(partial(self.policy.database_down, error))

    def database_up(self) -> None:
        """The database answers again after failing."""
        self._put(self.policy.database_up)

    def _occurred(self, kind: AlertKind, what: Occurrence) -> None:
        self._put(partial(self.policy.occurrence, kind, what))

    def _put(self, event: _Event) -> None:
        try:
            self._events.put_nowait(event)
        except queue.Full:
            self._dropped += 1

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the watcher and the sender threads; say where alerts go."""
        if self.mail is None:
            log.info("Alertas sin correo (EMAIL_SMTP_HOST vacío): se registran en el log con nivel ERROR")
        elif self.mail.problems():
            log.error(
                "Alertas por correo desactivadas: %s; se registran en el log con nivel ERROR",
                "; ".join(self.mail.problems()),
            )
        else:
            log.info("Alertas por correo a %s mediante %s", ", ".join(self.mail.recipients), self.mail.describe())
        self._abandoned = False
        self._watcher = threading.Thread(target=self._watch, name="sam-callback-alerts", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="sam-callback-mail", daemon=True)
        self._watcher.start()
        self._sender.start()

    def stop(self) -> None:
        """Mail what is due, log what the repeat interval holds back, stop within `stop_seconds`.

        What could not be mailed in time is logged at ERROR with its text.
        """
        if self._watcher is None or self._sender is None:
            return
        deadline = time.monotonic() + self.stop_seconds
        with contextlib.suppress(queue.Full):
            self._events.put(None, timeout=self.stop_seconds)
        self._watcher.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(queue.Full):
            self._mails.put(None, timeout=max(0.01, deadline - time.monotonic()))
        self._sender.join(max(0.0, deadline - time.monotonic()))
        if self._sender.is_alive():
            self._give_up_on_sender()
        self._watcher = self._sender = None

    def _give_up_on_sender(self) -> None:
        """The mail server did not answer in time: log the alert being sent and every queued one."""
        with self._lock:
            self._abandoned = True
            unsent = [self._in_flight] if self._in_flight is not None else []
            self._in_flight = None
        while True:
            try:
                alert = self._mails.get_nowait()
            except queue.Empty:
                break
            if alert is not None:
                unsent.append(alert)
        # The sender ends once its current try times out, instead of waiting forever on the queue.
        with contextlib.suppress(queue.Full):
            self._mails.put_nowait(None)
        log.error(
            "Se detiene el servicio con %d alertas sin enviar: el servidor de correo no respondió en %g s",
            len(unsent), self.stop_seconds,
        )  # fmt: skip
        for alert in unsent:
            self._log_unsent(alert, "el servidor de correo no respondió antes de detener el servicio")

    def _log_held(self, alert: Alert) -> None:
        if self._delivered.get(alert.kind) is False:
            log.error(
                "Alerta sin enviar al detener el servicio: el último correo de este tipo no se pudo enviar"
                " y el siguiente intento no había llegado. ALERTA %s",
                self._rendered(alert).summary,
            )
            return
        sent = "se envió" if self.mail is not None and not self.mail.problems() else "se registró"
        log.error(
            "Alerta retenida al detener el servicio: ya %s una de este tipo hace menos de"
            " CALLBACK_ALERT_REPEAT_SECONDS (%g s). ALERTA %s",
            sent, self.repeat_seconds, self._rendered(alert).summary,
        )  # fmt: skip

    def _log_unsent(self, alert: Alert, why: str) -> None:
        log.error("Alerta no enviada por correo (%s). ALERTA %s", why, self._rendered(alert).summary)

    # --- the watcher thread -------------------------------------------------------------------

    def _watch(self) -> None:
        next_tick = time.monotonic() + TICK_SECONDS
        while True:
            try:
                event = self._events.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                event = _tick
            now, wall = self._clock(), time.time()
            try:
                if event is None:
                    # What is due still goes by mail; what the repeat interval holds back would be a
                    # second mail for its condition within the interval (SPEC 9): it is logged instead.
                    self._queue_mails(self.policy.tick(now, wall))
                    for alert in self.policy.flush(now, wall):
                        self._log_held(alert)
                    return
                alerts = event(now, wall) if event is not _tick else []
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_SECONDS
                    alerts += self.policy.tick(now, wall)
                    self._note_dropped()
                self._queue_mails(alerts)
            except Exception:
                log.exception("Error inesperado al evaluar las alertas")

    def _queue_mails(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            try:
                self._mails.put_nowait(alert)
            except queue.Full:
                self._log_unsent(alert, "cola de correos llena: el servidor de correo no da abasto")

    def _note_dropped(self) -> None:
        if self._dropped != self._dropped_logged:
            log.error("Se descartaron %d avisos de alerta: la cola estaba llena", self._dropped - self._dropped_logged)
            self._dropped_logged = self._dropped

    def _backlog(self) -> int | None:
        if self._spool is None:
            return None
        try:
            return self._spool.stats().backlog
        except SpoolError:
            return None

    # --- the sender thread --------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            alert = self._mails.get()
            if alert is None:
                return
            with self._lock:
                abandoned = self._abandoned
                if not abandoned:
                    self._in_flight = alert
            if abandoned:
                self._log_unsent(alert, "el servicio se detuvo antes de poder enviarla")
                continue
            try:
                self._deliver(alert)
            except Exception:
                log.exception("Error inesperado al entregar una alerta")
            finally:
                self._finished(alert)

    def _finished(self, alert: Alert) -> bool:
        """Whether `alert` is still the sender's to report (False once stop logged it as unsent)."""
        with self._lock:
            mine = self._in_flight is alert
            if mine:
                self._in_flight = None
            return mine

    def _rendered(self, alert: Alert) -> RenderedAlert:
        text = render(alert, host=self.host, repeat_seconds=self.repeat_seconds)
        return RenderedAlert(
            subject=self._redact(text.subject), body=self._redact(text.body), summary=self._redact(text.summary)
        )

    def _deliver(self, alert: Alert) -> None:
        text = self._rendered(alert)
        if self.mail is None or self.mail.problems():
            log.error("ALERTA %s", text.summary)
            return
        message = compose(self.mail, subject=text.subject, body=text.body, host_name=self.host)
        try:
            security = send(self.mail, message, timeout=self.timeout)
        except PartlyDelivered as exc:
            # The others have it: a retry would mail them again every minute for a typo in one address.
            self._delivered[alert.kind] = True
            self._put(partial(self.policy.delivered, alert.kind))
            log.error(
                "Alerta enviada por correo, pero %s (revise EMAIL_DESTINATARIOS). ALERTA %s",
                self._redact(str(exc)), text.summary,
            )  # fmt: skip
            return
        except MailError as exc:
            self._delivered[alert.kind] = False
            # Queued before the line is logged: whoever reads the line knows the retry is planned.
            self._put(partial(self.policy.not_sent, alert))
            if self._finished(alert):
                log.error(
                    "No se pudo enviar la alerta por correo mediante %s: %s; se reintentará (al cabo de %g s la"
                    " primera vez, el doble cada vez que vuelva a fallar). ALERTA %s",
                    self.mail.describe(), self._redact(str(exc)), self.policy.retry_seconds, text.summary,
                )  # fmt: skip
            return
        self._delivered[alert.kind] = True
        self._put(partial(self.policy.delivered, alert.kind))
        transport = replace(self.mail, negotiated=security).describe()
        log.info(
            "Alerta enviada por correo a %d destinatarios mediante %s: %s",
            len(self.mail.recipients),
            transport,
            text.subject,
        )
        if security == CLEAR_WITHOUT_STARTTLS and not self._warned_clear:
            self._warned_clear = True
            log.warning(
                "EMAIL_TLS_HABILITAR está activo pero %s:%d no ofrece STARTTLS: las alertas viajan sin cifrar",
                self.mail.host, self.mail.port,
            )  # fmt: skip


def _tick(now: float, wall: float) -> list[Alert]:
    return []
