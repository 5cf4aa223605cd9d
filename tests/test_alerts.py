"""Alerts (SPEC section 9): real mail through a real SMTP server (aiosmtpd), and the ERROR lines without one."""

from __future__ import annotations

import email
import email.policy
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from fastapi.testclient import TestClient

from sam.callback.alert_policy import AlertPolicy
from sam.callback.alert_texts import AlertKind, Unavailable
from sam.callback.alerts import Alerts
from sam.callback.app import create_app
from sam.callback.domain import AuthFailure
from sam.callback.settings import Settings
from sam.callback.spool import Spool
from tests.faults_support import TcpProxy
from tests.utils import TOKEN, Keys, auth_headers, free_port, insert_run, isolated_env, run_cli, wait_for

MAIL_USER = "alertas-sam"
MAIL_PASSWORD = "clave-de-correo-7f3e9a2b"
CLIENT_ID = "id-de-cliente-apigw-5c1d8e"
WRONG_TOKEN = "token-equivocado-del-lanzador-4411"
RECIPIENTS = "operaciones@example.test; guardia@example.test"
RECIPIENT_LIST = ["operaciones@example.test", "guardia@example.test"]
SENDER = "sam-callback@example.test"


@dataclass
class Received:
    """One message as the SMTP server got it."""

    sender: str
    recipients: list[str]
    raw: bytes
    login: str | None
    tls: bool

    @property
    def message(self) -> EmailMessage:
        """The parsed message."""
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def subject(self) -> str:
        """The decoded subject."""
        return str(self.message["Subject"])

    @property
    def body(self) -> str:
        """The decoded plain-text body."""
        part = self.message.get_body(("plain",))
        assert part is not None
        return str(part.get_content())


class Inbox:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps every message it accepts."""

    def __init__(self, **smtp_options: Any) -> None:
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, **smtp_options)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """aiosmtpd's hook: keep the message."""
        auth = session.auth_data
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        raw = envelope.original_content or b""
        with self._lock:
            self.received.append(
                Received(str(envelope.mail_from), list(envelope.rcpt_tos), raw, login, session.ssl is not None)
            )
        return "250 Mensaje aceptado"

    def messages(self) -> list[Received]:
        """What arrived so far."""
        with self._lock:
            return list(self.received)

    def wait(self, count: int, *, timeout: float = 30) -> list[Received]:
        """Poll until `count` messages have arrived."""
        return wait_for(
            lambda: self.messages() if len(self.messages()) >= count else None,
            timeout=timeout,
            what=f"{count} correos en el servidor SMTP",
        )

    def env(self, **extra: str) -> dict[str, str]:
        """SAM's EMAIL_* lines for this server, with no TLS and no login."""
        return mail_env(self.port, **extra)


def mail_env(port: int, **extra: str) -> dict[str, str]:
    """SAM's EMAIL_* lines as its .env.example writes them, for a server on 127.0.0.1:port."""
    return {
        "EMAIL_SMTP_HOST": "127.0.0.1",
        "EMAIL_SMTP_PUERTO": str(port),
        "EMAIL_REMITENTE": SENDER,
        "EMAIL_DESTINATARIOS": RECIPIENTS,
        "EMAIL_TLS_HABILITAR": "False",
        "EMAIL_USUARIO": "",
        "EMAIL_PASSWORD": "",
    } | extra


class SilentServer:
    """Accepts TCP connections and never says a word: a mail server that hangs."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections.append(conn)

    def accepted(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return len(self.connections)

    def client_still_waiting(self) -> bool:
        """True while the first client keeps its connection open (it has not given up yet)."""
        with self._lock:
            conn = self.connections[0]
        conn.setblocking(False)
        try:
            return conn.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self.listener.close()
        with self._lock:
            for conn in self.connections:
                conn.close()


@pytest.fixture
def make_inbox() -> Iterator[Callable[..., Inbox]]:
    """Start SMTP servers with the given aiosmtpd options; all stop at the end."""
    started: list[Inbox] = []

    def build(**options: Any) -> Inbox:
        inbox = Inbox(**options)
        inbox.controller.start()
        started.append(inbox)
        return inbox

    yield build
    for inbox in started:
        inbox.controller.stop()


@pytest.fixture
def inbox(make_inbox: Callable[..., Inbox]) -> Inbox:
    """A plain SMTP server with no TLS and no login."""
    return make_inbox()


@pytest.fixture
def tls_ca(tmp_path: Path) -> trustme.CA:
    """A private certificate authority; its certificate is written to tmp_path/ca.pem."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return ca


def _tls_inbox(make_inbox: Callable[..., Inbox], ca: trustme.CA) -> Inbox:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)

    def check_login(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login == MAIL_USER.encode()
            and data.password == MAIL_PASSWORD.encode()
        )
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    return make_inbox(tls_context=context, require_starttls=True, auth_required=True, authenticator=check_login)


def mail_settings(make_settings: Callable[..., Settings], inbox: Inbox, **overrides: Any) -> Settings:
    """Test settings that mail `inbox`."""
    values: dict[str, Any] = {
        "email_smtp_host": "127.0.0.1",
        "email_smtp_port": inbox.port,
        "email_from": SENDER,
        "email_recipients": RECIPIENTS,
        "email_use_tls": False,
    }
    return make_settings(**(values | overrides))


def log_text(settings: Settings) -> str:
    """The service's log file so far."""
    return settings.log_file.read_text(encoding="utf-8") if settings.log_file.exists() else ""


def assert_no_secret(received: Received, *secrets: str) -> None:
    """No credential in the raw message, whatever its encoding."""
    raw = received.raw.decode("utf-8", "replace")
    text = raw + received.subject + received.body
    for secret in (TOKEN, MAIL_PASSWORD, CLIENT_ID, *secrets):
        assert secret not in text
    assert "eyJ" not in text


def unusable_storage(tmp_path: Path) -> dict[str, Any]:
    """A database that cannot be opened and a spool that cannot be created: every callback gets 503."""
    (tmp_path / "un-fichero").write_text("no es una carpeta")
    return {
        "database_url": f"sqlite:///{(tmp_path / 'no-existe' / 'sam.db').as_posix()}",
        "spool_path": tmp_path / "un-fichero" / "spool.db",
    }


# --- settings ------------------------------------------------------------------------------------


def test_email_settings_read_sams_names_first_then_the_older_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMAIL_SMTP_HOST", "correo.example.test")
    monkeypatch.setenv("EMAIL_SMTP_SERVER", "antiguo.example.test")
    monkeypatch.setenv("EMAIL_SMTP_PORT", "2525")
    monkeypatch.setenv("EMAIL_FROM", "sam@example.test")
    monkeypatch.setenv("EMAIL_DESTINATARIOS", "a@example.test;b@example.test, c@example.test")
    monkeypatch.setenv("EMAIL_TLS_HABILITAR", "False")
    monkeypatch.setenv("EMAIL_USUARIO", "")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.email_smtp_host == "correo.example.test"
    assert settings.email_smtp_port == 2525
    assert settings.email_from == "sam@example.test"
    assert settings.email_recipient_list == ["a@example.test", "b@example.test", "c@example.test"]
    assert settings.email_use_tls is False
    assert settings.email_user is None
    assert (settings.alert_auth_failures, settings.alert_database_seconds, settings.alert_repeat_seconds) == (
        5,
        300,
        3600,
    )


def test_email_defaults_are_sams_port_587_with_starttls() -> None:
    settings = Settings(_env_file=None, EMAIL_SMTP_PUERTO="", EMAIL_TLS_HABILITAR="")  # type: ignore[call-arg]
    assert settings.email_smtp_host is None
    assert settings.email_smtp_port == 587
    assert settings.email_use_tls is True


# --- mail over HTTP ------------------------------------------------------------------------------


def test_a_503_is_mailed_at_once_in_spanish_to_every_recipient(
    make_settings: Callable[..., Settings], inbox: Inbox, tmp_path: Path
) -> None:
    settings = mail_settings(make_settings, inbox, **unusable_storage(tmp_path), email_password=MAIL_PASSWORD)
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/api/callback", json={"deploymentId": "dep-perdido-1", "status": "RUN_FAILED"}, headers=auth_headers()
        )
        assert answer.status_code == 503
        (mail,) = inbox.wait(1)
    assert mail.sender == SENDER
    assert mail.recipients == RECIPIENT_LIST
    assert mail.login is None  # no EMAIL_USUARIO: no login, even with a password set
    assert "Callback perdido: respuesta 503" in mail.subject
    assert "dep-perdido-1" in mail.body and "RUN_FAILED" in mail.body
    assert "no lo reintenta" in mail.body  # what it costs
    assert "CALLBACK_SPOOL_PATH" in mail.body  # what to check
    assert_no_secret(mail)


def test_refused_callbacks_past_the_threshold_send_one_mail_naming_addresses_and_reasons(
    server_factory: Callable[..., Any], inbox: Inbox, keys: Keys
) -> None:
    server = server_factory(
        **inbox.env(),
        CALLBACK_ALERT_AUTH_FAILURES="3",
        JWT_PUBLIC_KEY=keys.public_pem,
        API_GATEWAY_CLIENT_ID=CLIENT_ID,
    ).start()
    expired = keys.token(expires_in=-3600)
    body = {"deploymentId": "dep-rechazado", "status": "RUN_COMPLETED"}
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        assert http.post("/api/callback", json=body, headers=auth_headers(WRONG_TOKEN)).status_code == 401
        assert http.post("/api/callback", json=body, headers=auth_headers(WRONG_TOKEN)).status_code == 401
        jwt_headers = {"Authorization": f"Bearer {expired}", "x-ibm-client-id": CLIENT_ID}
        assert http.post("/api/callback", json=body, headers=jwt_headers).status_code == 401
        (mail,) = inbox.wait(1)
        # After the mail, within the repeat interval: counted; at stop it is logged, not mailed a second time.
        assert http.post("/api/callback", json=body, headers=auth_headers(WRONG_TOKEN)).status_code == 401
    assert "Callbacks rechazados por autenticación" in mail.subject
    assert mail.recipients == RECIPIENT_LIST
    assert "3 callbacks rechazados" in mail.body
    assert "2 × 401 desde 127.0.0.1: token: token estático incorrecto" in mail.body
    assert "1 × 401 desde 127.0.0.1: jwt: token caducado" in mail.body
    assert "CALLBACK_TOKEN" in mail.body and "lanzador de SAM" in mail.body
    assert "no lo reintenta" in mail.body
    assert_no_secret(mail, WRONG_TOKEN, expired)
    assert server.stop() == 0
    # SPEC 9: one mail per condition per CALLBACK_ALERT_REPEAT_SECONDS, stop included.
    assert [m.raw for m in inbox.messages()] == [mail.raw]
    (held,) = [line for line in server.console().splitlines() if "Alerta retenida al detener el servicio" in line]
    assert " - ERROR - " in held or '"level": "ERROR"' in held
    assert "1 callback rechazado desde el correo anterior" in held
    assert "1 × 401 desde 127.0.0.1: token: token estático incorrecto" in held
    assert WRONG_TOKEN not in held and expired not in held


def test_database_unreachable_is_mailed_with_the_backlog_then_again_when_it_answers(
    server_factory: Callable[..., Any], inbox: Inbox, pg_url: str
) -> None:
    insert_run(pg_url, "dep-durante-caida")
    with TcpProxy(5432) as proxy:
        server = server_factory(
            **inbox.env(), SAM_DATABASE_URL=proxy.url_for(pg_url), CALLBACK_ALERT_DATABASE_SECONDS="1"
        ).start()
        proxy.cut()
        answer = httpx.post(
            server.callback_url,
            json={"deploymentId": "dep-durante-caida", "status": "RUN_COMPLETED"},
            headers=auth_headers(),
            timeout=30,
        )
        assert answer.status_code == 202 and answer.json()["code"] == "queued"
        (down,) = inbox.wait(1)
        assert "Base de datos de SAM inaccesible" in down.subject
        assert "callbacks guardados en el spool a la espera: 1" in down.body
        assert "Cuando vuelva a responder llegará otro correo" in down.body
        assert_no_secret(down)
        proxy.restore()
        _, back = inbox.wait(2, timeout=60)
    assert "Base de datos de SAM disponible de nuevo" in back.subject
    assert "responde de nuevo tras" in back.body
    server.stop()


# --- the mail server fails, hangs, or is protected ------------------------------------------------


def test_a_mail_server_that_is_down_costs_the_callback_nothing_and_is_logged(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    closed_port = free_port()
    settings = make_settings(
        email_smtp_host="127.0.0.1",
        email_smtp_port=closed_port,
        email_from=SENDER,
        email_recipients=RECIPIENTS,
        email_use_tls=False,
        alert_auth_failures=1,
    )
    insert_run(settings.resolved_database_url(), "dep-correo-caido")
    with TestClient(create_app(settings)) as client:
        refused = client.post(
            "/api/callback", json={"deploymentId": "x", "status": "RUN_FAILED"}, headers=auth_headers("mal")
        )
        assert refused.status_code == 401
        answer = client.post(
            "/api/callback",
            json={"deploymentId": "dep-correo-caido", "status": "RUN_COMPLETED"},
            headers=auth_headers(),
        )
        assert answer.status_code == 200 and answer.json()["code"] == "updated"
        wait_for(lambda: "conexión rechazada" in log_text(settings), what="el error del correo en el log")
    line = next(line for line in log_text(settings).splitlines() if "conexión rechazada" in line)
    assert " - ERROR - " in line and "No se pudo enviar la alerta por correo" in line
    assert "Callbacks rechazados por autenticación" in line  # the alert itself is not lost
    assert TOKEN not in log_text(settings)


def _mail_through(make_settings: Callable[..., Settings], port: int, **extra: Any) -> Settings:
    """Settings that mail SENDER -> RECIPIENTS through a server on 127.0.0.1:port."""
    return make_settings(
        email_smtp_host="127.0.0.1", email_smtp_port=port, email_from=SENDER, email_recipients=RECIPIENTS, **extra
    )


@pytest.mark.slow
def test_a_mail_server_that_hangs_does_not_delay_callbacks(make_settings: Callable[..., Settings]) -> None:
    silent = SilentServer()
    settings = _mail_through(make_settings, silent.port, alert_auth_failures=1)
    insert_run(settings.resolved_database_url(), "dep-correo-colgado")
    try:
        with TestClient(create_app(settings)) as client:
            refused = client.post(
                "/api/callback", json={"deploymentId": "x", "status": "X"}, headers=auth_headers("mal")
            )
            assert refused.status_code == 401
            wait_for(lambda: silent.accepted() >= 1, what="el envío del correo conectado al servidor mudo")
            answer = client.post(
                "/api/callback",
                json={"deploymentId": "dep-correo-colgado", "status": "RUN_COMPLETED"},
                headers=auth_headers(),
            )
            assert answer.status_code == 200 and answer.json()["code"] == "updated"
            # The answer came while the mail was still stuck waiting for the server's greeting.
            assert silent.client_still_waiting()
            wait_for(lambda: "no respondió en 10 s" in log_text(settings), timeout=60, what="el timeout SMTP en el log")
        line = next(line for line in log_text(settings).splitlines() if "no respondió en 10 s" in line)
        assert " - ERROR - " in line
    finally:
        silent.close()


@pytest.mark.slow
def test_at_sigterm_alerts_a_hanging_mail_server_keeps_reach_the_log_with_their_text(
    server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    silent = SilentServer()
    try:
        server = server_factory(
            **mail_env(silent.port, EMAIL_PASSWORD=MAIL_PASSWORD), CALLBACK_ALERT_AUTH_FAILURES="1"
        ).start()
        body = {"deploymentId": "dep-rechazado", "status": "RUN_COMPLETED"}
        with httpx.Client(base_url=server.base_url, timeout=10) as http:
            assert http.post("/api/callback", json=body, headers=auth_headers(WRONG_TOKEN)).status_code == 401
            wait_for(lambda: silent.accepted() >= 1, what="el primer correo conectado al servidor mudo")
            # Counted after the first alert, within its interval: logged at stop.
            assert http.post("/api/callback", json=body, headers=auth_headers(WRONG_TOKEN)).status_code == 401
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 30
    finally:
        silent.close()
    logged = "".join(path.read_text(encoding="utf-8") for path in sorted((tmp_path / "logs").glob("*.log*")))
    unsent = [line for line in logged.splitlines() if "Alerta no enviada por correo" in line]
    held = [line for line in logged.splitlines() if "Alerta retenida al detener el servicio" in line]
    assert len(unsent) == 1 and len(held) == 1, logged[-3000:]
    assert all(" - ERROR - " in line and "Callbacks rechazados por autenticación" in line for line in unsent + held)
    assert "1 callback rechazado desde el correo anterior" in held[0]
    assert "1 alertas sin enviar" in logged
    for secret in (TOKEN, WRONG_TOKEN, MAIL_PASSWORD):
        assert secret not in logged


def test_test_mail_uses_starttls_and_login_and_prints_no_password(
    make_inbox: Callable[..., Inbox], tls_ca: trustme.CA, tmp_path: Path
) -> None:
    inbox = _tls_inbox(make_inbox, tls_ca)
    env = inbox.env(EMAIL_TLS_HABILITAR="True", EMAIL_USUARIO=MAIL_USER, EMAIL_PASSWORD=MAIL_PASSWORD)
    result = run_cli(tmp_path, "test-mail", CALLBACK_TOKEN=TOKEN, SSL_CERT_FILE=str(tmp_path / "ca.pem"), **env)
    assert result.returncode == 0, result.stderr
    assert "Correo de prueba enviado" in result.stdout and "STARTTLS" in result.stdout
    assert MAIL_PASSWORD not in result.stdout + result.stderr
    (mail,) = inbox.wait(1)
    assert mail.tls and mail.login == MAIL_USER
    assert mail.recipients == RECIPIENT_LIST
    assert "Correo de prueba" in mail.subject and "correo de prueba de sam-callback" in mail.body
    assert_no_secret(mail)


def test_test_mail_says_it_went_in_clear_when_the_server_offers_no_starttls(inbox: Inbox, tmp_path: Path) -> None:
    env = inbox.env(EMAIL_TLS_HABILITAR="True")  # no user; the plain inbox offers no STARTTLS
    result = run_cli(tmp_path, "test-mail", CALLBACK_TOKEN=TOKEN, **env)
    assert result.returncode == 0, result.stderr
    assert "sin cifrar: el servidor no ofrece STARTTLS, sin usuario" in result.stdout
    assert "(STARTTLS" not in result.stdout
    (mail,) = inbox.wait(1)
    assert not mail.tls


def test_alerts_log_how_the_mail_travelled(
    make_settings: Callable[..., Settings], inbox: Inbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sam.callback.alerts")
    alerts = Alerts(mail_settings(make_settings, inbox, email_use_tls=True), clock=FakeClock())
    alerts.start()
    try:
        alerts.unavailable("dep-en-claro", "RUN_FAILED", "req-1")
        inbox.wait(1)
        wait_for(lambda: "Alerta enviada por correo" in caplog.text, what="la línea del envío")
    finally:
        alerts.stop()
    sent = next(r.getMessage() for r in caplog.records if "Alerta enviada por correo" in r.getMessage())
    assert "(sin cifrar: el servidor no ofrece STARTTLS, sin usuario)" in sent
    assert any(r.levelno == logging.WARNING and "viajan sin cifrar" in r.getMessage() for r in caplog.records)


def test_test_mail_says_why_a_wrong_password_fails_without_printing_it(
    make_inbox: Callable[..., Inbox], tls_ca: trustme.CA, tmp_path: Path
) -> None:
    inbox = _tls_inbox(make_inbox, tls_ca)
    env = inbox.env(EMAIL_TLS_HABILITAR="True", EMAIL_USUARIO=MAIL_USER, EMAIL_PASSWORD="otra-clave-9931")
    result = run_cli(tmp_path, "test-mail", CALLBACK_TOKEN=TOKEN, SSL_CERT_FILE=str(tmp_path / "ca.pem"), **env)
    assert result.returncode == 1
    assert "rechazó el usuario o la contraseña" in result.stderr
    assert "otra-clave-9931" not in result.stdout + result.stderr
    assert inbox.messages() == []


def test_test_mail_refuses_a_certificate_it_cannot_verify(
    make_inbox: Callable[..., Inbox], tls_ca: trustme.CA, tmp_path: Path
) -> None:
    inbox = _tls_inbox(make_inbox, tls_ca)
    env = inbox.env(EMAIL_TLS_HABILITAR="True", EMAIL_USUARIO=MAIL_USER, EMAIL_PASSWORD=MAIL_PASSWORD)
    result = run_cli(tmp_path, "test-mail", CALLBACK_TOKEN=TOKEN, **env)  # the private CA is not trusted
    assert result.returncode == 1
    assert "certificado TLS del servidor no es válido" in result.stderr
    assert MAIL_PASSWORD not in result.stdout + result.stderr
    assert inbox.messages() == []


def test_test_mail_reads_the_email_lines_of_sams_env_file(inbox: Inbox, tmp_path: Path) -> None:
    lines = [f"{name}={value}" for name, value in inbox.env().items()]
    (tmp_path / ".env").write_text("\n".join([f"CALLBACK_TOKEN={TOKEN}", "SQL_SAM_HOST=", *lines]) + "\n")
    result = run_cli(tmp_path, "test-mail")
    assert result.returncode == 0, result.stderr
    assert "operaciones@example.test, guardia@example.test" in result.stdout
    (mail,) = inbox.wait(1)
    assert mail.recipients == RECIPIENT_LIST and not mail.tls and mail.login is None


def test_test_mail_without_a_mail_server_says_so(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "test-mail", CALLBACK_TOKEN=TOKEN)
    assert result.returncode == 1
    assert "EMAIL_SMTP_HOST no está configurado" in result.stderr


def test_test_mail_to_a_closed_port_says_the_connection_was_refused(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "test-mail", CALLBACK_TOKEN=TOKEN, **mail_env(free_port()))
    assert result.returncode == 1
    assert "conexión rechazada" in result.stderr


# --- one mail per condition per repeat interval ---------------------------------------------------


class FakeClock:
    """Monotonic time the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_repeat_interval_holds_a_second_mail_and_the_next_one_counts_it(
    make_settings: Callable[..., Settings], inbox: Inbox
) -> None:
    settings = mail_settings(make_settings, inbox, alert_repeat_seconds=3600)
    clock = FakeClock()
    alerts = Alerts(settings, clock=clock)
    alerts.start()
    try:
        alerts.unavailable("dep-primero", "RUN_FAILED", "req-1")
        inbox.wait(1)
        alerts.unavailable("dep-segundo", "RUN_FAILED", "req-2")
        alerts.unmatched("dep-huerfano", "req-3", 86400)
        # Mails leave in the order their conditions happened: the unmatched one arriving second
        # proves the second 503 was held back.
        first, second = inbox.wait(2)
        assert "dep-primero" in first.body and "dep-huerfano" in second.body
        assert "Callback sin ejecución en SAM" in second.subject
        clock.now += 3600
        third = inbox.wait(3)[2]
    finally:
        alerts.stop()
    assert "Callback perdido: respuesta 503" in third.subject
    assert "dep-segundo" in third.body and "dep-primero" not in third.body
    assert "1 avisos de este tipo se retuvieron" in third.body
    assert "CALLBACK_ALERT_REPEAT_SECONDS" in third.body


def test_a_mail_that_could_not_be_sent_is_tried_again_soon_with_what_came_since(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """A failed send is not the condition's mail for the interval: a minute later it goes, with everything."""
    caplog.set_level(logging.INFO, logger="sam.callback.alerts")
    inbox = Inbox()  # not started yet: the mail server is down for the first alerts
    settings = mail_settings(make_settings, inbox, alert_auth_failures=3, alert_repeat_seconds=3600)
    clock = FakeClock()
    alerts = Alerts(settings, clock=clock, retry_seconds=60)
    wrong = (AuthFailure.TOKEN_INVALID,)
    alerts.start()
    try:
        for _ in range(3):
            alerts.refused("10.0.0.7", 401, wrong)
        alerts.unavailable("dep-perdido", "RUN_FAILED", "req-1")
        wait_for(
            lambda: sum("No se pudo enviar la alerta" in r.getMessage() for r in caplog.records) >= 2,
            what="los dos envíos fallidos en el log",
        )
        inbox.controller.start()
        alerts.refused("10.0.0.8", 401, wrong)  # counted with the three the failed mail named
        clock.now += 60
        received = inbox.wait(2)
        clock.now += 60  # nothing new: nothing more is mailed
        alerts.unmatched("dep-huerfano", "req-9", 86400)
        assert "dep-huerfano" in inbox.wait(3)[2].body
    finally:
        alerts.stop()
        inbox.controller.stop()
    by_subject = {mail.subject: mail.body for mail in received}
    refused = next(body for subject, body in by_subject.items() if "Callbacks rechazados" in subject)
    assert "4 callbacks rechazados" in refused and "desde el correo anterior" not in refused
    assert "3 × 401 desde 10.0.0.7" in refused and "1 × 401 desde 10.0.0.8" in refused
    lost = next(body for subject, body in by_subject.items() if "Callback perdido" in subject)
    assert "dep-perdido" in lost and "se retuvieron" not in lost
    assert len(inbox.messages()) == 3


def test_failed_sends_are_retried_ever_later_and_a_delivery_starts_afresh() -> None:
    """A mail server that keeps refusing (a wrong password) is tried after 60 s, 120 s, 240 s..., not every minute."""
    policy = AlertPolicy(auth_failures=1, database_seconds=300, repeat_seconds=3600, retry_seconds=60)
    lost = Unavailable("dep-1", "RUN_FAILED", "req-1")
    [first] = policy.occurrence(AlertKind.UNAVAILABLE, lost, now=0, wall=0)
    policy.not_sent(first, now=10, wall=10)
    assert policy.tick(now=69, wall=69) == []
    [second] = policy.tick(now=70, wall=70)  # 60 s after the failure, with what the first said
    assert second.occurrences == first.occurrences and second.held == 0
    policy.not_sent(second, now=75, wall=75)
    assert policy.tick(now=194, wall=194) == []
    [third] = policy.tick(now=195, wall=195)  # 120 s after the second failure
    policy.delivered(AlertKind.UNAVAILABLE, now=196, wall=196)
    # Delivered: the repeat interval holds the next one, and a later failure starts at 60 s again.
    assert policy.occurrence(AlertKind.UNAVAILABLE, lost, now=200, wall=200) == []
    [fourth] = policy.tick(now=195 + 3600, wall=0)
    policy.not_sent(fourth, now=3800, wall=0)
    assert policy.tick(now=3859, wall=0) == [] and len(policy.tick(now=3860, wall=0)) == 1
    assert third.occurrences == first.occurrences


def test_a_failed_send_does_not_rewind_the_interval_a_newer_mail_started() -> None:
    policy = AlertPolicy(auth_failures=1, database_seconds=300, repeat_seconds=100, retry_seconds=10)
    [old] = policy.occurrence(AlertKind.UNAVAILABLE, Unavailable("a", "S", "r1"), now=0, wall=0)
    [new] = policy.occurrence(AlertKind.UNAVAILABLE, Unavailable("b", "S", "r2"), now=150, wall=0)
    policy.not_sent(old, now=160, wall=0)  # its failure is reported after the newer one went
    assert policy.tick(now=200, wall=0) == []  # the newer mail's interval stands
    assert new.at == 150


class _RefusingInbox(Inbox):
    """An SMTP server that refuses one recipient and takes the message for the others."""

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        """aiosmtpd's hook: refuse nadie@, accept the rest."""
        if address.startswith("nadie@"):
            return "550 No existe ese buzón"
        envelope.rcpt_tos.append(address)
        return "250 OK"


def test_a_mail_one_recipient_refused_is_not_sent_again_to_the_others(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in one address of EMAIL_DESTINATARIOS: the others got the mail; they must not get it every minute."""
    caplog.set_level(logging.INFO, logger="sam.callback.alerts")
    inbox = _RefusingInbox()
    inbox.controller.start()
    settings = mail_settings(make_settings, inbox, email_recipients="operaciones@example.test; nadie@example.test")
    clock = FakeClock()
    alerts = Alerts(settings, clock=clock, retry_seconds=60)
    alerts.start()
    try:
        alerts.unavailable("dep-perdido", "RUN_FAILED", "req-1")
        (mail,) = inbox.wait(1)
        wait_for(
            lambda: any("rechazó algunos destinatarios" in r.getMessage() for r in caplog.records), what="el aviso"
        )
        clock.now += 60
    finally:
        alerts.stop()
        inbox.controller.stop()
    assert mail.recipients == ["operaciones@example.test"]
    assert len(inbox.messages()) == 1
    line = next(r for r in caplog.records if "rechazó algunos destinatarios" in r.getMessage())
    assert line.levelno == logging.ERROR and "nadie@example.test" in line.getMessage()
    assert not [r for r in caplog.records if "al detener el servicio" in r.getMessage()]


def test_an_alert_held_at_stop_after_a_failed_send_does_not_claim_one_was_sent(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sam.callback.alerts")
    alerts = Alerts(_mail_through(make_settings, free_port()), clock=FakeClock())
    alerts.start()
    alerts.unavailable("dep-primero", "RUN_FAILED", "req-1")
    wait_for(lambda: any("No se pudo enviar" in r.getMessage() for r in caplog.records), what="el envío fallido")
    alerts.unavailable("dep-segundo", "RUN_FAILED", "req-2")
    alerts.stop()
    (held,) = [r.getMessage() for r in caplog.records if "al detener el servicio" in r.getMessage()]
    assert "no se pudo enviar" in held and "ya se envió" not in held
    assert "dep-primero" in held and "dep-segundo" in held


def test_alerts_held_at_stop_are_logged_not_mailed_a_second_time_in_the_interval(
    make_settings: Callable[..., Settings], inbox: Inbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sam.callback.alerts")
    alerts = Alerts(mail_settings(make_settings, inbox), clock=FakeClock())
    alerts.start()
    alerts.refused_for_good("dep-columna", "RUN_COMPLETED", "ProgrammingError: columna FechaInicioReal no existe", 7)
    (first,) = inbox.wait(1)
    alerts.refused_for_good("dep-columna-2", "RUN_COMPLETED", "ProgrammingError: columna FechaInicioReal no existe", 8)
    alerts.stop()
    # SPEC 9: at most one mail per condition per interval, even at stop; the held one is not forgotten.
    assert len(inbox.messages()) == 1
    assert "Callback rechazado por la base de datos" in first.subject
    assert "spool n.º 7" in first.body and "spool retry" in first.body
    held = [r for r in caplog.records if "Alerta retenida al detener el servicio" in r.getMessage()]
    assert [r.levelno for r in held] == [logging.ERROR]
    assert "dep-columna-2" in held[0].getMessage() and "CALLBACK_ALERT_REPEAT_SECONDS" in held[0].getMessage()


def test_alerts_due_at_stop_are_still_mailed(make_settings: Callable[..., Settings], inbox: Inbox) -> None:
    settings = mail_settings(make_settings, inbox, alert_repeat_seconds=3600)
    clock = FakeClock()
    alerts = Alerts(settings, clock=clock)
    alerts.start()
    alerts.unavailable("dep-primero", "RUN_FAILED", "req-1")
    inbox.wait(1)
    alerts.unavailable("dep-segundo", "RUN_FAILED", "req-2")
    # Events are handled in order: the unmatched mail arriving proves the second 503 was held.
    alerts.unmatched("dep-huerfano", "req-3", 86400)
    inbox.wait(2)
    clock.now += 3600  # the interval is over: the held one is due, at stop too
    alerts.stop()
    third = inbox.wait(3)[2]
    assert "dep-segundo" in third.body and "1 avisos de este tipo se retuvieron" in third.body


def test_refusals_after_an_alert_are_counted_and_mailed_when_the_interval_ends(
    make_settings: Callable[..., Settings], inbox: Inbox
) -> None:
    settings = mail_settings(make_settings, inbox, alert_auth_failures=3, alert_repeat_seconds=3600)
    clock = FakeClock()
    alerts = Alerts(settings, clock=clock)
    wrong = (AuthFailure.TOKEN_INVALID,)
    alerts.start()
    try:
        for _ in range(4):  # four at once: the threshold is 3
            alerts.refused("10.0.0.7", 401, wrong)
        (first,) = inbox.wait(1)
        clock.now += 8
        alerts.refused("10.0.0.8", 401, wrong)  # 8 s later, alone: below the threshold
        # Events are handled in order: a mail of another kind arriving second proves no refusal mail went.
        alerts.unmatched("dep-huerfano", "req-9", 86400)
        assert "Callback sin ejecución en SAM" in inbox.wait(2)[1].subject
        clock.now += 3600  # the interval is over: the two refusals counted since the first mail go now
        third = inbox.wait(3)[2]
        clock.now += 3600  # an interval with no refusal: back to the threshold
        alerts.refused("10.0.0.9", 401, wrong)
        alerts.unmatched("dep-huerfano-2", "req-10", 86400)
        assert "dep-huerfano-2" in inbox.wait(4)[3].body
    finally:
        alerts.stop()
    assert "3 callbacks rechazados" in first.body and "3 × 401 desde 10.0.0.7" in first.body
    assert "Callbacks rechazados por autenticación" in third.subject
    assert "2 callbacks rechazados desde el correo anterior" in third.body
    assert "1 × 401 desde 10.0.0.7: token: token estático incorrecto" in third.body
    assert "1 × 401 desde 10.0.0.8: token: token estático incorrecto" in third.body
    assert "los 2 callbacks rechazados después del correo anterior se contaron" in third.body
    assert "alcancen o no el umbral" in third.body
    # The lone refusal after a quiet interval waits for the threshold again (and nothing was mailed at stop:
    # below the threshold is not an alert).
    assert len(inbox.messages()) == 4


def test_refusals_after_an_alert_are_logged_at_stop_not_mailed_again(
    make_settings: Callable[..., Settings], inbox: Inbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sam.callback.alerts")
    settings = mail_settings(make_settings, inbox, alert_auth_failures=2, alert_repeat_seconds=3600)
    alerts = Alerts(settings, clock=FakeClock())
    alerts.start()
    alerts.refused("10.0.0.7", 401, (AuthFailure.TOKEN_INVALID,))
    alerts.refused("10.0.0.7", 401, (AuthFailure.TOKEN_INVALID,))
    inbox.wait(1)
    alerts.refused("10.0.0.7", 403, (AuthFailure.ADDRESS_NOT_ALLOWED,))
    alerts.stop()
    assert len(inbox.messages()) == 1
    (held,) = [r.getMessage() for r in caplog.records if "Alerta retenida al detener el servicio" in r.getMessage()]
    assert "1 callback rechazado desde el correo anterior" in held
    assert "1 × 403 desde 10.0.0.7" in held


def test_alerts_a_hanging_mail_server_keeps_are_logged_with_their_text_at_stop(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sam.callback.alerts")
    silent = SilentServer()
    settings = _mail_through(make_settings, silent.port, email_use_tls=False, email_password=MAIL_PASSWORD)
    alerts = Alerts(settings, clock=FakeClock(), secrets=[MAIL_PASSWORD, TOKEN], timeout=3, stop_seconds=0.5)
    try:
        alerts.start()
        sender = alerts._sender  # to see it end once its try times out
        assert sender is not None
        alerts.unavailable("dep-en-vuelo", "RUN_FAILED", "req-1")
        wait_for(lambda: silent.accepted() >= 1, what="el envío del primer correo conectado al servidor mudo")
        alerts.unmatched("dep-en-cola", "req-2", 86400)
        alerts.rejected(deployment_id="dep-en-cola-2", reason="status: falta", client="10.1.2.3", request_id="req-3")
        alerts.unavailable("dep-retenido", "RUN_FAILED", "req-4")  # held by the interval: logged at stop
        started = time.monotonic()
        alerts.stop()
        elapsed = time.monotonic() - started
        assert elapsed < 0.5 + 1.0  # the grace, plus the time to log
        unsent = [r for r in caplog.records if "Alerta no enviada por correo" in r.getMessage()]
        assert [r.levelno for r in unsent] == [logging.ERROR] * 3
        held = [r for r in caplog.records if "Alerta retenida al detener el servicio" in r.getMessage()]
        assert [r.levelno for r in held] == [logging.ERROR]
        texts = [r.getMessage() for r in unsent + held]
        for deployment_id in ("dep-en-vuelo", "dep-en-cola", "dep-en-cola-2", "dep-retenido"):
            assert sum(deployment_id + " " in text or deployment_id + "\n" in text for text in texts) >= 1
        assert all("ALERTA" in text and "Qué revisar" in text for text in texts)
        assert any("3 alertas sin enviar" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
        # The try in flight times out later: it is not reported a second time.
        wait_for(lambda: not sender.is_alive(), timeout=15, what="el fin del hilo de envío")
        assert not any("No se pudo enviar la alerta" in r.getMessage() for r in caplog.records)
        assert MAIL_PASSWORD not in caplog.text and TOKEN not in caplog.text
    finally:
        silent.close()


def test_database_down_says_callbacks_get_503_when_the_spool_cannot_keep_them(
    make_settings: Callable[..., Settings], inbox: Inbox, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool-vacio.db")
    spool.open()  # readable and empty: its backlog is 0, yet the callbacks below got 503
    settings = mail_settings(make_settings, inbox, alert_database_seconds=300)
    clock = FakeClock()
    alerts = Alerts(settings, spool=spool, clock=clock)
    alerts.start()
    try:
        alerts.database_down("OperationalError: sin conexión")
        alerts.unavailable("dep-503-a", "RUN_COMPLETED", "req-1")
        alerts.unavailable("dep-503-b", "RUN_COMPLETED", "req-2")
        inbox.wait(1)  # the first 503 (the second is held by the interval)
        clock.now += 300
        down = inbox.wait(2)[1]
        alerts.database_up()
        back = inbox.wait(3)[2]
    finally:
        alerts.stop()
        spool.close()
    assert "Base de datos de SAM inaccesible y spool sin poder guardar" in down.subject
    assert "se siguen aceptando" not in down.body and "no se pierde ningún callback" not in down.body
    assert "se rechazan con 503" in down.body
    assert "callbacks rechazados con 503 (no guardados) durante la caída: 2" in down.body
    assert "salvo que alguien lo reenvíe" in down.body
    assert "Base de datos de SAM disponible de nuevo" in back.subject
    assert "callbacks rechazados con 503 (perdidos) durante la caída: 2" in back.body
    assert "Ninguno por la caída" not in back.body and "se perdieron" in back.body


def test_database_down_with_a_working_spool_says_callbacks_are_kept(
    make_settings: Callable[..., Settings], inbox: Inbox, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    clock = FakeClock()
    alerts = Alerts(mail_settings(make_settings, inbox, alert_database_seconds=300), spool=spool, clock=clock)
    alerts.start()
    try:
        alerts.database_down("OperationalError: sin conexión")
        # Events are handled in order: once this mail is in, the outage started before the clock moves.
        alerts.unmatched("dep-huerfano", "req-1", 86400)
        inbox.wait(1)
        clock.now += 300
        down = inbox.wait(2)[1]
    finally:
        alerts.stop()
        spool.close()
    assert "spool sin poder guardar" not in down.subject
    assert "se siguen aceptando" in down.body and "503 (no guardados)" not in down.body


def test_a_callback_refused_for_good_mail_does_not_claim_it_is_still_in_the_spool(
    make_settings: Callable[..., Settings], inbox: Inbox
) -> None:
    alerts = Alerts(mail_settings(make_settings, inbox), clock=FakeClock())
    alerts.start()
    try:
        alerts.refused_for_good("dep-columna", "RUN_COMPLETED", "ProgrammingError: columna no existe", 7)
        (mail,) = inbox.wait(1)
    finally:
        alerts.stop()
    assert "sigue guardado" not in mail.body
    assert "quedó guardado en el spool con el error" in mail.body and "`sam-callback spool list`" in mail.body


def test_without_a_mail_server_alerts_are_error_lines_once_per_interval(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sam.callback.alerts")
    alerts = Alerts(make_settings(), clock=FakeClock())
    alerts.start()
    try:
        alerts.unavailable("dep-a", "RUN_FAILED", "req-a")
        alerts.unavailable("dep-b", "RUN_FAILED", "req-b")
        alerts.rejected(
            deployment_id="dep-c", reason="status: campo obligatorio", client="10.1.2.3", request_id="req-c"
        )

        def alert_lines() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "ALERTA" in r.getMessage()]

        wait_for(lambda: len(alert_lines()) >= 2, what="dos líneas ALERTA")
    finally:
        alerts.stop()
    lines = alert_lines()
    assert [r.levelno for r in lines] == [logging.ERROR] * len(lines)
    assert "dep-a" in lines[0].getMessage() and "Qué revisar" in lines[0].getMessage()
    assert "Callback rechazado por su contenido" in lines[1].getMessage() and "dep-c" in lines[1].getMessage()
    # dep-b was held by the interval, then logged at stop, saying why it came late.
    assert len(lines) == 3 and "dep-b" in lines[2].getMessage()
    assert lines[2].getMessage().startswith("Alerta retenida al detener el servicio")


def test_check_says_where_alerts_go(tmp_path: Path) -> None:
    """`check` tells whether alerts reach a mailbox or only the log."""
    env = isolated_env(tmp_path) | {"CALLBACK_TOKEN": TOKEN}
    alone = run_cli(tmp_path, "check", **env)
    assert "[AVISO] EMAIL_SMTP_HOST sin configurar" in alone.stdout
    mail = env | {
        "EMAIL_SMTP_HOST": "smtp.ejemplo.test",
        "EMAIL_SMTP_PUERTO": "25",
        "EMAIL_REMITENTE": "sam@ejemplo.test",
        "EMAIL_DESTINATARIOS": "uno@ejemplo.test;dos@ejemplo.test",
    }
    configured = run_cli(tmp_path, "check", **mail)
    assert "[OK]    Alertas por correo a 2 destinatario(s) por smtp.ejemplo.test:25" in configured.stdout
