"""The alert kinds, what each one reports, and its Spanish mail: what happened, what it costs, what to check."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from .domain import AuthFailure, describe

if TYPE_CHECKING:
    from .alert_policy import Alert


class AlertKind(StrEnum):
    """The conditions of SPEC section 9; the value is a stable id for logs."""

    REFUSED_CALLBACKS = "refused_callbacks"
    DATABASE_DOWN = "database_down"
    DATABASE_BACK = "database_back"
    UNAVAILABLE = "unavailable"
    REFUSED_FOR_GOOD = "refused_for_good"
    UNMATCHED = "unmatched"
    REJECTED = "rejected"

    @property
    def subject(self) -> str:
        """The mail's subject, without the host."""
        return _TEXTS[self].subject


class Occurrence(Protocol):
    """One thing that happened; its lines name it for an operator, with no credential."""

    def lines(self) -> list[str]:
        """Spanish detail lines."""
        ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refused callback: the client address, the answer, and the reasons as logged."""

    client: str
    status: int
    reasons: tuple[AuthFailure, ...]

    def lines(self) -> list[str]:
        """One line."""
        return [f"{self.status} desde {self.client}: {describe(self.reasons)}"]


@dataclass(frozen=True, slots=True)
class RefusedCallbacks:
    """Refused callbacks counted by client address, answer and reason, the most frequent first."""

    total: int
    sources: tuple[tuple[str, int, str, int], ...]
    others: int = 0
    # Counted after the previous mail of this kind, below the threshold or not.
    since_last_mail: bool = False

    def lines(self) -> list[str]:
        """A total, then one line per address, answer and reason."""
        refused = "1 callback rechazado" if self.total == 1 else f"{self.total} callbacks rechazados"
        since = " desde el correo anterior" if self.since_last_mail else ""
        lines = [f"{refused}{since} (dirección, respuesta, motivo):"]
        lines += [f"  {count} × {status} desde {client}: {reason}" for client, status, reason, count in self.sources]
        if self.others:
            lines.append(f"  {self.others} más desde otras direcciones o por otros motivos")
        return lines


@dataclass(frozen=True, slots=True)
class DatabaseDown:
    """The database has not answered for `seconds`."""

    seconds: float
    error: str | None
    backlog: int | None
    # Callbacks answered 503 since the database last answered: the spool could not keep them.
    lost: int = 0

    @property
    def spool_failing(self) -> bool:
        """The spool is not keeping callbacks either: some got 503, or it cannot even be read."""
        return self.lost > 0 or self.backlog is None

    def lines(self) -> list[str]:
        """How long, the last error, the spool backlog and the callbacks refused with 503."""
        lines = [
            f"sin respuesta desde hace {duration(self.seconds)}",
            f"último error: {self.error or 'desconocido'}",
            f"callbacks guardados en el spool a la espera: {_count(self.backlog)}",
        ]
        if self.spool_failing:
            lines.append(f"callbacks rechazados con 503 (no guardados) durante la caída: {self.lost}")
        return lines


@dataclass(frozen=True, slots=True)
class DatabaseBack:
    """The database answers again after `seconds` without answering."""

    seconds: float
    backlog: int | None
    lost: int = 0

    def lines(self) -> list[str]:
        """How long it was out, what waits in the spool, and what was lost with a 503."""
        lines = [
            f"responde de nuevo tras {duration(self.seconds)} sin respuesta",
            f"callbacks en el spool pendientes de aplicar: {_count(self.backlog)}",
        ]
        if self.lost:
            lines.append(f"callbacks rechazados con 503 (perdidos) durante la caída: {self.lost}")
        return lines


@dataclass(frozen=True, slots=True)
class Unavailable:
    """A callback answered 503 because it could not be kept."""

    deployment_id: str
    status: str
    request_id: str

    def lines(self) -> list[str]:
        """The lost callback."""
        return [f"deploymentId={self.deployment_id} estado={self.status} request_id={self.request_id}"]


@dataclass(frozen=True, slots=True)
class RefusedForGood:
    """A callback the database refuses for a reason retrying cannot fix."""

    deployment_id: str
    status: str
    error: str
    seq: int | None = None

    def lines(self) -> list[str]:
        """The callback, its place in the spool, and the database's error."""
        where = f" (spool n.º {self.seq})" if self.seq is not None else ""
        return [f"deploymentId={self.deployment_id} estado={self.status}{where}: {self.error}"]


@dataclass(frozen=True, slots=True)
class Unmatched:
    """A callback whose run never appeared in `Ejecuciones`."""

    deployment_id: str
    request_id: str
    waited_seconds: float

    def lines(self) -> list[str]:
        """The callback and how long it waited."""
        return [
            f"deploymentId={self.deployment_id} request_id={self.request_id} "
            f"esperó {duration(self.waited_seconds)} sin encontrar su fila"
        ]


@dataclass(frozen=True, slots=True)
class Rejected:
    """An authenticated callback rejected for its body and kept for inspection."""

    deployment_id: str | None
    reason: str
    client: str
    request_id: str
    seq: int | None = None

    def lines(self) -> list[str]:
        """The callback, who sent it, and why it was rejected."""
        kept = f" (guardado con n.º {self.seq})" if self.seq is not None else " (su cuerpo NO se guardó)"
        return [
            f"deploymentId={self.deployment_id or 'ilegible'} desde {self.client} "
            f"request_id={self.request_id}{kept}: {self.reason}"
        ]


@dataclass(frozen=True, slots=True)
class _Text:
    subject: str
    what: str
    cost: str
    check: str


_LOST = "A360 envía cada callback una sola vez y no lo reintenta"

_TEXTS: dict[AlertKind, _Text] = {
    AlertKind.REFUSED_CALLBACKS: _Text(
        subject="Callbacks rechazados por autenticación",
        what=(
            "sam-callback ha rechazado callbacks por sus credenciales o por su dirección de origen "
            "(respuestas 401, 403 o 429): se alcanzó el umbral CALLBACK_ALERT_AUTH_FAILURES en menos de 10 minutos."
        ),
        cost=(
            f"Cada callback rechazado se ha perdido: {_LOST}. SAM no conocerá por esta vía el final de esas "
            "ejecuciones y dependerá de su conciliador. Si el token de este servicio y el del lanzador de SAM no "
            "coinciden, se pierden todos los callbacks hasta corregirlo."
        ),
        check=(
            "Que CALLBACK_TOKEN sea idéntico en el .env de este servicio y en el del lanzador de SAM (tras cambiarlo, "
            "las ejecuciones ya lanzadas traen el token anterior: CALLBACK_TOKENS_ANTERIORES). Con la pasarela de API: "
            "JWT_CLAVE_PUBLICA, JWT_AUDIENCE, JWT_ISSUER, APIGW_CLIENT_ID y la caducidad de los JWT. Un 403 indica una "
            "dirección fuera de CALLBACK_ALLOWED_IPS. Si las direcciones no son de A360 ni de la pasarela, puede ser un "
            "intento de acceso."
        ),
    ),
    AlertKind.DATABASE_DOWN: _Text(
        subject="Base de datos de SAM inaccesible",
        what=(
            "La base de datos de SAM no responde desde hace más de CALLBACK_ALERT_DATABASE_SECONDS. Los callbacks "
            "se siguen aceptando y se guardan en el spool local (CALLBACK_SPOOL_PATH); se aplicarán cuando vuelva."
        ),
        cost=(
            "Por ahora no se pierde ningún callback, pero SAM no ve los estados finales mientras dure la caída. "
            f"Si además el spool no pudiera escribir (disco lleno), los callbacks se rechazarían con 503: {_LOST}."
        ),
        check=(
            "El servidor de base de datos y la red hasta él, SQL_SAM_HOST / SAM_DATABASE_URL, el usuario "
            "SQL_SAM_USUARIO y su contraseña, y el espacio libre en el disco del spool. `sam-callback check` prueba "
            "la conexión. Cuando vuelva a responder llegará otro correo."
        ),
    ),
    AlertKind.DATABASE_BACK: _Text(
        subject="Base de datos de SAM disponible de nuevo",
        what="La base de datos de SAM responde otra vez. Los callbacks guardados en el spool se están aplicando.",
        cost="Ninguno por la caída en sí: lo guardado en el spool se aplica ahora, en orden de llegada.",
        check=(
            "Que el spool se vacíe: `sam-callback status` o GET /ready (spool.backlog). Si queda algo, "
            "`sam-callback spool list` muestra cada callback con su último error."
        ),
    ),
    AlertKind.UNAVAILABLE: _Text(
        subject="Callback perdido: respuesta 503",
        what=(
            "Un callback llegó con la base de datos inaccesible y no se pudo guardar en el spool local; "
            "se respondió 503 (unavailable)."
        ),
        cost=(
            f"Ese callback se ha perdido: {_LOST}. La ejecución quedará en SAM con el estado que le asigne su "
            "conciliador."
        ),
        check=(
            "El disco y los permisos de la carpeta del spool (CALLBACK_SPOOL_PATH) y su espacio libre, y la base de "
            "datos de SAM. El log explica por qué falló el spool ('No se pudo guardar en el spool')."
        ),
    ),
    AlertKind.REFUSED_FOR_GOOD: _Text(
        subject="Callback rechazado por la base de datos",
        what=(
            "La base de datos rechazó un callback por un motivo que reintentar no arregla (una columna que falta, un "
            "valor demasiado largo, un permiso). El callback quedó guardado en el spool con el error; "
            "`sam-callback spool list` muestra si sigue allí (un `spool retry` posterior puede haberlo aplicado ya)."
        ),
        cost=(
            "No se pierde mientras siga en el spool, pero SAM no verá ese estado hasta que se corrija la causa; "
            f"{_LOST}, así que el spool es su única copia."
        ),
        check=(
            "El error indicado. `sam-callback check` comprueba las columnas que escribe el servicio (migraciones 005 y "
            "007 de SAM) y `sam-callback spool list` muestra los afectados; una vez corregido, `sam-callback spool "
            "retry` los aplica al momento."
        ),
    ),
    AlertKind.UNMATCHED: _Text(
        subject="Callback sin ejecución en SAM",
        what=(
            "Un callback esperó su fila en Ejecuciones durante toda la ventana CALLBACK_MATCH_WINDOW_SECONDS y no "
            "apareció; quedó en el spool como no emparejado (`sam-callback spool list --unmatched` muestra si sigue "
            "allí)."
        ),
        cost=(f"Ese estado final no llegará a Ejecuciones por sí solo. {_LOST}: el spool guarda la única copia."),
        check=(
            "Si ese deploymentId existe en Ejecuciones (¿otra base de datos?, ¿falló la inserción del lanzador?). "
            "`sam-callback spool list --unmatched` los lista y `sam-callback spool retry --unmatched` les da una "
            "nueva ventana."
        ),
    ),
    AlertKind.REJECTED: _Text(
        subject="Callback rechazado por su contenido",
        what=(
            "Un callback con credenciales válidas fue rechazado por su contenido (400 o 415). Su cuerpo se guardó "
            "tal como llegó para poder leerlo, salvo donde se indica que no (CALLBACK_REJECTED_MAX=0, o el "
            "almacén de rechazados no se pudo escribir)."
        ),
        cost=f"Su estado no llegará a SAM por esta vía: {_LOST}.",
        check=(
            "`sam-callback spool list --rejected` y `sam-callback spool show SEQ` muestran lo recibido. Si A360 o la "
            "pasarela han cambiado el formato del callback, el motivo indicado dice qué campo no se aceptó."
        ),
    ),
}


# Variants whose first lines would not be true as written above.
_REFUSED_SINCE_LAST_MAIL = _Text(
    subject=_TEXTS[AlertKind.REFUSED_CALLBACKS].subject,
    what=(
        "sam-callback ha seguido rechazando callbacks por sus credenciales o por su dirección de origen (respuestas "
        "401, 403 o 429) después del correo anterior de este tipo. Tras un aviso se cuentan todos los rechazos "
        "hasta que acaba CALLBACK_ALERT_REPEAT_SECONDS, alcancen o no el umbral, y se envían en este correo."
    ),
    cost=_TEXTS[AlertKind.REFUSED_CALLBACKS].cost,
    check=_TEXTS[AlertKind.REFUSED_CALLBACKS].check,
)

_DATABASE_DOWN_SPOOL_FAILING = _Text(
    subject=f"{_TEXTS[AlertKind.DATABASE_DOWN].subject} y spool sin poder guardar",
    what=(
        "La base de datos de SAM no responde desde hace más de CALLBACK_ALERT_DATABASE_SECONDS y el spool local "
        "(CALLBACK_SPOOL_PATH) tampoco puede guardar: los callbacks que llegan se rechazan con 503 y no se guardan "
        "en ninguna parte."
    ),
    cost=(
        f"Cada callback rechazado con 503 se ha perdido: {_LOST}, salvo que alguien lo reenvíe a mano. SAM no "
        "verá el final de esas ejecuciones (quedarán con el estado que les asigne su conciliador), y ninguno se "
        "aplicará cuando vuelva la base de datos."
    ),
    check=(
        "Primero el spool: espacio libre en su disco y permisos de la carpeta CALLBACK_SPOOL_PATH (el log dice por "
        "qué falló: 'No se pudo guardar en el spool'). Después el servidor de base de datos y la red hasta él, "
        "SQL_SAM_HOST / SAM_DATABASE_URL, el usuario SQL_SAM_USUARIO y su contraseña; `sam-callback check` prueba "
        "ambos. Los correos «Callback perdido: respuesta 503» nombran cada callback perdido. Cuando la base de datos "
        "vuelva a responder llegará otro correo."
    ),
)

_DATABASE_BACK_AFTER_LOSSES = _Text(
    subject=_TEXTS[AlertKind.DATABASE_BACK].subject,
    what=_TEXTS[AlertKind.DATABASE_BACK].what,
    cost=(
        "Lo guardado en el spool se aplica ahora, en orden de llegada. Pero durante la caída el spool tampoco pudo "
        f"guardar y algunos callbacks se rechazaron con 503: esos se perdieron ({_LOST}) salvo que se reenvíen a mano."
    ),
    check=(
        "Las ejecuciones de los correos «Callback perdido: respuesta 503» en SAM, y el disco y los permisos de "
        "CALLBACK_SPOOL_PATH. Que el spool se vacíe: `sam-callback status` o GET /ready (spool.backlog)."
    ),
)


def _text_for(alert: Alert) -> _Text:
    last = alert.occurrences[-1][1] if alert.occurrences else None
    if isinstance(last, RefusedCallbacks) and last.since_last_mail:
        return _REFUSED_SINCE_LAST_MAIL
    if isinstance(last, DatabaseDown) and last.spool_failing:
        return _DATABASE_DOWN_SPOOL_FAILING
    if isinstance(last, DatabaseBack) and last.lost:
        return _DATABASE_BACK_AFTER_LOSSES
    return _TEXTS[alert.kind]


@dataclass(frozen=True, slots=True)
class RenderedAlert:
    """A mail's subject and body, and one line for the log."""

    subject: str
    body: str
    summary: str


def render(alert: Alert, *, host: str, repeat_seconds: int) -> RenderedAlert:
    """The Spanish mail for `alert`: what happened, what it costs, what to check."""
    text = _text_for(alert)
    total = len(alert.occurrences) + alert.unlisted
    subject = f"[sam-callback {host}] {text.subject}" + (f" ({total})" if total > 1 else "")
    happened: list[str] = []
    for wall, what in alert.occurrences:
        first, *rest = what.lines()
        happened.append(f"- {_when(wall)}  {first}")
        happened += [f"  {line}" for line in rest]
    if alert.unlisted:
        happened.append(f"- y {alert.unlisted} más (se muestran los {len(alert.occurrences)} más recientes)")
    held = ""
    if alert.held and alert.kind is AlertKind.REFUSED_CALLBACKS:
        counted = (
            "el callback rechazado después del correo anterior se contó y se incluye"
            if alert.held == 1
            else f"los {alert.held} callbacks rechazados después del correo anterior se contaron y se incluyen"
        )
        held = (
            f"\n\nComo máximo se envía un correo de cada tipo cada {duration(repeat_seconds)} "
            f"(CALLBACK_ALERT_REPEAT_SECONDS): {counted} en este."
        )
    elif alert.held:
        held = (
            f"\n\nComo máximo se envía un correo de cada tipo cada {duration(repeat_seconds)} "
            f"(CALLBACK_ALERT_REPEAT_SECONDS): {alert.held} avisos de este tipo se retuvieron desde el anterior "
            "y se incluyen en este."
        )
    body = (
        f"{text.what}\n\nQué ha pasado:\n" + "\n".join(happened) + held
        + f"\n\nQué supone:\n{text.cost}\n\nQué revisar:\n{text.check}\n\n"
        f"-- \nsam-callback en {host}. Pruebe el envío con `sam-callback test-mail`.\n"
    )  # fmt: skip
    details = " | ".join(line.strip() for _, what in alert.occurrences for line in what.lines())
    summary = f"{text.subject}: {details}" + (f" (y {alert.unlisted} más)" if alert.unlisted else "")
    summary += f". Qué supone: {text.cost} Qué revisar: {text.check}"
    return RenderedAlert(subject=subject, body=body, summary=summary)


def duration(seconds: float) -> str:
    """`1 h 5 min`, `5 min 3 s`, `42 s`."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"


def _count(value: int | None) -> str:
    return "desconocido (el spool no responde)" if value is None else str(value)


def _when(wall: float) -> str:
    return datetime.fromtimestamp(wall).strftime("%Y-%m-%d %H:%M:%S")
