"""The types that cross layers: the callback, result codes, spool kinds and refusal reasons."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Callback:
    """One validated callback, ready to record."""

    deployment_id: str
    status: str
    raw: str


class ResultCode(enum.StrEnum):
    """The `code` of every answer, as it appears on the wire, in metric labels and in the logs."""

    UPDATED = "updated"
    ALREADY_PROCESSED = "already_processed"
    PENDING_MATCH = "pending_match"
    QUEUED = "queued"
    PROBE = "probe"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_PAYLOAD = "invalid_payload"
    TOO_MANY_REQUESTS = "too_many_requests"
    INTERNAL_ERROR = "internal_error"
    UNAVAILABLE = "unavailable"
    NOT_READY = "not_ready"
    # Not an answer: the client left before its body arrived (metrics and the log only).
    CLIENT_DISCONNECTED = "client_disconnected"


# The codes a callback's answer carries when it was recorded (or was a probe).
RECORDED_CODES = (
    ResultCode.UPDATED,
    ResultCode.ALREADY_PROCESSED,
    ResultCode.PENDING_MATCH,
    ResultCode.QUEUED,
    ResultCode.PROBE,
)


class Outcome(enum.Enum):
    """What the guarded update found; the value is the answer's code."""

    UPDATED = ResultCode.UPDATED
    ALREADY_PROCESSED = ResultCode.ALREADY_PROCESSED
    NOT_FOUND = ResultCode.PENDING_MATCH


class SpoolKind(enum.IntEnum):
    """Why a callback waits in the spool, as a priority: a newcomer behind a run takes its lowest kind."""

    # The run's row was missing at the last try: a newcomer for it waits for the row too, and
    # its answer says so (the database is up, "queued" would blame it).
    PENDING_MATCH = 0
    # The database could not be reached (or refused): applied as soon as it answers.
    QUEUED = 1

    @property
    def code(self) -> ResultCode:
        """The answer's code and the name stored in the spool file and shown to operators."""
        return _KIND_CODES[self]

    @classmethod
    def from_code(cls, text: str) -> SpoolKind:
        """The kind stored as `text` in a spool file ('queued' or 'pending_match')."""
        return _KINDS_BY_CODE[text]


_KIND_CODES = {SpoolKind.QUEUED: ResultCode.QUEUED, SpoolKind.PENDING_MATCH: ResultCode.PENDING_MATCH}
_KINDS_BY_CODE = {str(code): kind for kind, code in _KIND_CODES.items()}


class AuthFailure(enum.Enum):
    """Why a request was refused before its body was read: a metric label and a Spanish text."""

    MISSING_CREDENTIALS = ("missing_credentials", "sin credenciales")
    TOKEN_MISSING = ("missing_credentials", "token: ausente")
    JWT_MISSING = ("missing_credentials", "jwt: ausente")
    TOKEN_UNCONFIGURED = ("invalid_token", "token: token estático no configurado")
    TOKEN_INVALID = ("invalid_token", "token: token estático incorrecto")
    BEARER_SCHEME = ("jwt_invalid", "jwt: cabecera Authorization sin esquema Bearer")
    JWT_UNCONFIGURED = ("jwt_unconfigured", "jwt: JWT no configurado o clave JWT inutilizable (JWT_CLAVE_PUBLICA)")
    JWT_TOO_LONG = ("jwt_invalid", "jwt: token demasiado largo")
    JWT_MALFORMED = ("jwt_invalid", "jwt: token mal formado")
    KEY_CHOOSING_HEADER = ("key_choosing_header", "jwt: cabecera del token intenta elegir la clave")
    JWT_ALGORITHM = ("jwt_algorithm", "jwt: algoritmo no permitido")
    UNKNOWN_KID = ("jwt_unknown_kid", "jwt: kid desconocido")
    JWT_EXPIRED = ("jwt_expired", "jwt: token caducado")
    JWT_NOT_YET_VALID = ("jwt_not_yet_valid", "jwt: token aún no válido (nbf/iat en el futuro)")
    JWT_AUDIENCE = ("jwt_audience", "jwt: audiencia (aud) incorrecta")
    JWT_ISSUER = ("jwt_issuer", "jwt: emisor (iss) incorrecto")
    JWT_MISSING_EXP = ("jwt_invalid", "jwt: falta el claim exp")
    JWT_MISSING_AUD = ("jwt_audience", "jwt: falta el claim aud")
    JWT_MISSING_ISS = ("jwt_issuer", "jwt: falta el claim iss")
    JWT_MISSING_CLAIM = ("jwt_invalid", "jwt: falta un claim obligatorio")
    JWT_SIGNATURE = ("jwt_signature", "jwt: firma no válida")
    JWT_INVALID = ("jwt_invalid", "jwt: token no válido")
    CLIENT_ID_HEADER = ("client_id", "jwt: x-ibm-client-id ausente o incorrecto")
    CLIENT_ID_CLAIM = ("client_id", "jwt: claim client_id incorrecto")
    # Refused by address (403), before any credential is looked at; never an authentication metric.
    ADDRESS_NOT_ALLOWED = ("address_not_allowed", "dirección fuera de CALLBACK_ALLOWED_IPS")

    def __init__(self, label: str, text: str) -> None:
        self.label = label
        self.text = text


def describe(reasons: tuple[AuthFailure, ...]) -> str:
    """The reasons as one Spanish log text."""
    return "; ".join(reason.text for reason in reasons) or "sin motivo"


@dataclass(frozen=True, slots=True)
class DatabaseState:
    """Whether the writer reaches the database, and since when (epoch seconds)."""

    available: bool
    since: float
