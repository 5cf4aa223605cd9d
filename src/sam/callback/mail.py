"""Alert mail over SMTP with SAM's EMAIL_* settings: STARTTLS, login, a timeout, secret-free errors."""

from __future__ import annotations

import contextlib
import os
import smtplib
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from .logs import RedactingFilter
from .settings import Settings

SMTP_TIMEOUT_SECONDS = 10.0
# Port 465 speaks TLS from the first byte (SMTPS); every other port starts in clear text.
IMPLICIT_TLS_PORT = 465
# How a mail went when EMAIL_TLS_HABILITAR asked for STARTTLS, there was no user, and the server did not offer it.
CLEAR_WITHOUT_STARTTLS = "sin cifrar: el servidor no ofrece STARTTLS"


class MailError(Exception):
    """A mail that could not be sent; the message is Spanish and carries no secret."""


class PartlyDelivered(MailError):
    """The server took the message for some recipients and refused the others."""


@dataclass(frozen=True, slots=True)
class MailConfig:
    """Where and how alert mails are sent."""

    host: str
    port: int
    sender: str | None
    recipients: tuple[str, ...]
    use_tls: bool
    user: str | None
    password: str | None = field(default=None, repr=False)
    # How the last mail actually travelled (see `send`); None before any was sent.
    negotiated: str | None = field(default=None, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> MailConfig | None:
        """The mail configuration, or None when no EMAIL_SMTP_HOST is set."""
        if not settings.email_smtp_host:
            return None
        return cls(
            host=settings.email_smtp_host.strip(),
            port=settings.email_smtp_port,
            sender=settings.email_from.strip() if settings.email_from else None,
            recipients=tuple(settings.email_recipient_list),
            use_tls=settings.email_use_tls,
            user=settings.email_user.strip() if settings.email_user else None,
            password=settings.email_password,
        )

    def problems(self) -> list[str]:
        """What keeps this configuration from sending, one Spanish line each."""
        problems = []
        if not self.sender:
            problems.append("EMAIL_REMITENTE (o EMAIL_FROM) no está configurado")
        if not self.recipients:
            problems.append("EMAIL_DESTINATARIOS (o EMAIL_RECIPIENTS) no tiene ninguna dirección")
        return problems

    def describe(self) -> str:
        """The server and how it is (or, once sent, was) reached, for operators (never the password)."""
        if self.negotiated:
            security = self.negotiated
        elif self.port == IMPLICIT_TLS_PORT:
            security = "TLS"
        elif self.use_tls:
            # With a user STARTTLS is required; without one the mail goes in clear if the server lacks it.
            security = "STARTTLS" if self.user else "STARTTLS si el servidor lo ofrece"
        else:
            security = "sin cifrar"
        login = f"usuario {self.user}" if self.user else "sin usuario"
        return f"{self.host}:{self.port} ({security}, {login})"


def compose(config: MailConfig, *, subject: str, body: str, host_name: str) -> EmailMessage:
    """A plain-text UTF-8 message to every recipient."""
    message = EmailMessage()
    message["From"] = config.sender or ""
    message["To"] = ", ".join(config.recipients)
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=True)
    # make_msgid() alone asks DNS for this machine's full name, which may hang.
    message["Message-ID"] = make_msgid(domain=host_name or "sam-callback")
    message.set_content(body)
    return message


def send(config: MailConfig, message: EmailMessage, *, timeout: float = SMTP_TIMEOUT_SECONDS) -> str:
    """Deliver `message` and say how it travelled ("TLS", "STARTTLS", "sin cifrar", CLEAR_WITHOUT_STARTTLS).

    Raises MailError saying why not (Spanish, no secret).
    """
    problems = config.problems()
    if problems:
        raise MailError("; ".join(problems))
    try:
        return _deliver(config, message, timeout)
    except MailError:
        raise
    except (smtplib.SMTPException, OSError, ValueError) as exc:
        raise MailError(explain(exc, timeout)) from None


def _deliver(config: MailConfig, message: EmailMessage, timeout: float) -> str:
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if config.port == IMPLICIT_TLS_PORT:
        smtp = smtplib.SMTP_SSL(config.host, config.port, timeout=timeout, context=context)
        security = "TLS"
    else:
        smtp = smtplib.SMTP(config.host, config.port, timeout=timeout)
        security = "sin cifrar"
    try:
        smtp.ehlo()
        if config.use_tls and config.port != IMPLICIT_TLS_PORT:
            if smtp.has_extn("starttls"):
                smtp.starttls(context=context)
                smtp.ehlo()
                security = "STARTTLS"
            elif not config.user:
                security = CLEAR_WITHOUT_STARTTLS
            else:
                raise MailError(
                    "el servidor no ofrece STARTTLS y no se envía la contraseña sin cifrar "
                    "(revise EMAIL_SMTP_HOST/EMAIL_SMTP_PUERTO o use EMAIL_TLS_HABILITAR=False sin usuario)"
                )
        if config.user:
            smtp.login(config.user, config.password or "")
        refused = smtp.send_message(message, from_addr=config.sender, to_addrs=list(config.recipients))
    finally:
        # Once the message is sent, a QUIT the server answers badly is no failure to report.
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        smtp.close()
    if refused:
        raise PartlyDelivered("el servidor rechazó algunos destinatarios: " + ", ".join(sorted(refused)))
    return security


def explain(exc: BaseException, timeout: float = SMTP_TIMEOUT_SECONDS) -> str:
    """Why a mail failed, in Spanish, from the exception's type and the server's reply code."""
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return f"el servidor rechazó el usuario o la contraseña (EMAIL_USUARIO/EMAIL_PASSWORD; código {exc.smtp_code})"
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return "el servidor no admite autenticación (AUTH): deje EMAIL_USUARIO vacío o active EMAIL_TLS_HABILITAR"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "el servidor rechazó todos los destinatarios: " + ", ".join(sorted(exc.recipients))
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return f"el servidor rechazó el remitente {exc.sender} (código {exc.smtp_code})"
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"el servidor respondió con el código {exc.smtp_code}: {_reply_text(exc.smtp_error)}"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        # smtplib turns a read that timed out into a disconnection; the cause is still the timeout.
        if isinstance(exc.__context__, TimeoutError):
            return f"el servidor no respondió en {timeout:g} s"
        return "el servidor cerró la conexión"
    if isinstance(exc, smtplib.SMTPException):
        return f"error SMTP ({type(exc).__name__})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"el certificado TLS del servidor no es válido ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"error TLS ({exc.reason or type(exc).__name__})"
    if isinstance(exc, TimeoutError):
        return f"el servidor no respondió en {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "conexión rechazada: no hay servidor de correo en ese puerto"
    if isinstance(exc, socket.gaierror):
        return "no se pudo resolver el nombre del servidor de correo"
    if isinstance(exc, OSError):
        return f"error de red ({exc.strerror or type(exc).__name__})"
    return f"{type(exc).__name__}"


def _reply_text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return " ".join(text.split())[:200]


def send_test_mail(settings: Settings, secrets: Iterable[str] = ()) -> MailConfig:
    """Send one test mail; return the configuration with how it travelled (`describe()` says so).

    Raises MailError (Spanish, no secret) if it fails.
    """
    config = MailConfig.from_settings(settings)
    if config is None:
        raise MailError("EMAIL_SMTP_HOST no está configurado: las alertas solo se registran en el log (nivel ERROR)")
    host = socket.gethostname()
    body = (
        f"Este es un correo de prueba de sam-callback en {host} (proceso {os.getpid()}), enviado el "
        f"{datetime.now().strftime('%Y-%m-%d %H:%M:%S')} con `sam-callback test-mail`.\n\n"
        "Si lo recibe, las alertas del servicio llegarán a estas direcciones: callbacks rechazados por "
        "autenticación, base de datos de SAM inaccesible (y su vuelta), callbacks que no se pudieron guardar "
        "(503), rechazados por la base de datos, sin ejecución tras la ventana de espera o rechazados por su "
        "contenido.\n\n"
        f"Destinatarios: {', '.join(config.recipients)}\n"
        f"Servidor de correo: {config.describe()}\n"
    )
    message = compose(config, subject=f"[sam-callback {host}] Correo de prueba", body=body, host_name=host)
    try:
        security = send(config, message)
    except MailError as exc:
        raise MailError(RedactingFilter(secrets).redact(f"{config.describe()}: {exc}")) from None
    return replace(config, negotiated=security)
