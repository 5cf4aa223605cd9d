"""The callback body: strict JSON parsing, field rules of SPEC 2.1, and the response envelope."""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from .domain import Callback

# Control characters and lone surrogates cannot be stored in an nvarchar key nor matched
# against one; they are refused before they reach a driver.
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# \u0000 preceded by an even number of backslashes: "\\u0000" (an escaped backslash) is plain text.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_MAX_INT_DIGITS = 40
# Ejecuciones.DeploymentId is nvarchar(50), Estado nvarchar(20).
DEPLOYMENT_ID_MAX = 50
STATUS_MAX = 20
# deploymentIds with this prefix are smoke tests (`sam-callback send` without --deployment-id):
# checked like any callback, answered, and never recorded. A360's ids are UUIDs, never this.
PROBE_PREFIX = "sam-callback-prueba-"
# Fields that SQL Server's JSON_VALUE over CallbackInfo must read as we did: a body naming one
# twice is refused, since JSON_VALUE takes the first and a Python dict keeps the last.
_SINGLE_KEYS = ("deploymentId", "status")
# A rejected body's id and status reach the log line at most this long, control characters escaped.
_LOGGED_MAX = 100


def _integral(value: float) -> float:
    # JSON Schema, and so the OpenAPI document, counts 825.0 as an integer; 825.5 is not one.
    if not value.is_integer():
        raise ValueError("debe ser un número entero o una cadena")
    return value


NumericId = StrictStr | StrictInt | Annotated[StrictFloat, AfterValidator(_integral)]


class CallbackPayload(BaseModel):
    """What A360 posts when a run ends; unknown fields are kept."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    deploymentId: Annotated[  # noqa: N815
        StrictStr,
        Field(
            description=(
                f"Id del despliegue de A360 (1..{DEPLOYMENT_ID_MAX} caracteres tras quitar espacios). "
                f"Los que empiezan por '{PROBE_PREFIX}' son callbacks de prueba: se validan y no se registran"
            )
        ),
    ]
    status: Annotated[StrictStr, Field(description=f"Estado final de la ejecución (1..{STATUS_MAX} caracteres)")]
    deviceId: NumericId | None = None  # noqa: N815
    userId: NumericId | None = None  # noqa: N815
    botOutput: dict[str, Any] | None = None  # noqa: N815


class Envelope(BaseModel):
    """The one JSON shape of every answer."""

    status: Literal["OK", "ACCEPTED", "ERROR"]
    code: str
    message: str
    request_id: str
    deploymentId: str | None = None  # noqa: N815
    result: str | None = None
    details: list[dict[str, Any]] | None = None


class PayloadError(Exception):
    """The body is not a valid callback; `details` says why, field by field, in Spanish.

    `deployment_id` and `status` are the body's top-level strings, made safe for a log line,
    when it has them: an operator looks a rejected callback up by its run.
    """

    def __init__(
        self, details: list[dict[str, Any]], *, deployment_id: str | None = None, status: str | None = None
    ) -> None:
        super().__init__("payload no válido")
        self.details = details
        self.deployment_id = deployment_id
        self.status = status


class NotAJsonObject(PayloadError):
    """The body is not one JSON object at all (as opposed to an object with invalid fields)."""

    def __init__(self, problem: str) -> None:
        super().__init__([{"field": "body", "problem": problem}])


class _RepeatedKeys(dict[str, Any]):
    """A decoded object that named one of `_SINGLE_KEYS` more than once."""

    repeated: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) == len(pairs):  # the common case: no key twice, nothing else to look at
        return value
    names = [key for key, _ in pairs]
    repeated = tuple(key for key in _SINGLE_KEYS if names.count(key) > 1)
    if not repeated:
        return value
    marked = _RepeatedKeys(value)
    marked.repeated = repeated
    return marked


class _OutOfRange(ValueError):
    """A JSON number this service will not hold (valid JSON, refused on purpose)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"constante no permitida en JSON: {name}")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _OutOfRange("número fuera de rango")
    return value


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _OutOfRange("número fuera de rango")
    return int(text)


_decoder = json.JSONDecoder(parse_float=_parse_float, parse_int=_parse_int, parse_constant=_reject_constant)
# The same decoder, noting repeated keys: a Python call per object made decoding half as slow
# again, so it only reads the bodies where `_may_repeat_keys` cannot rule a repetition out.
_checking_decoder = json.JSONDecoder(
    object_pairs_hook=_object, parse_float=_parse_float, parse_int=_parse_int, parse_constant=_reject_constant
)
_QUOTED_ID, _QUOTED_STATUS = (f'"{key}"' for key in _SINGLE_KEYS)


def _may_repeat_keys(text: str) -> bool:
    # A key can only be spelled differently with \u escapes; without any, a name that appears
    # once as a quoted string cannot be a key twice. (Spelled out: a generator here cost more
    # than the counting.)
    return "\\u" in text or text.count(_QUOTED_ID) > 1 or text.count(_QUOTED_STATUS) > 1


def decode_body(body: bytes) -> tuple[str, dict[str, Any]]:
    """Decode a UTF-8 JSON object; return the raw text (stored as is) and the parsed object."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise NotAJsonObject("el cuerpo no es UTF-8 válido") from None
    # A BOM is tolerated (some Windows tools add one) but is not part of the stored JSON.
    parsed_text = text[1:] if text.startswith("\ufeff") else text
    try:
        decoder = _checking_decoder if _may_repeat_keys(parsed_text) else _decoder
        value, end = decoder.raw_decode(parsed_text, _skip_space(parsed_text, 0))
        if _skip_space(parsed_text, end) != len(parsed_text):
            raise ValueError("datos sobrantes")
    except _OutOfRange:
        raise NotAJsonObject(
            f"el cuerpo tiene un número fuera de rango (más de {_MAX_INT_DIGITS} cifras, o demasiado grande)"
        ) from None
    except RecursionError:
        raise NotAJsonObject("el cuerpo anida demasiados niveles de objetos o listas") from None
    except ValueError:
        raise NotAJsonObject("el cuerpo no es JSON válido") from None
    if not isinstance(value, dict):
        raise NotAJsonObject("el cuerpo debe ser un objeto JSON")
    return parsed_text, value


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


_NUMERIC_IDS = ("deviceId", "userId")
_FIELD_ORDER = ("deploymentId", "status", *_NUMERIC_IDS, "botOutput")
_MESSAGES = {
    "missing": "campo obligatorio",
    "string_type": "debe ser una cadena de texto",
    "int_type": "debe ser un número entero o una cadena",
    "dict_type": "debe ser un objeto JSON",
}


def _upper_same_length(text: str) -> str:
    # A360's states are ASCII; elsewhere str.upper() can grow a string ("ß" -> "SS") past the
    # 20 characters of Estado that were just validated, so such characters keep their case.
    if text.isascii():
        return text.upper()
    return "".join(upper if len(upper := char.upper()) == 1 else char for char in text)


def _loggable(value: Any, *, upper: bool = False) -> str | None:
    """A top-level string of a rejected body as a log line may show it, or None when unreadable."""
    if not isinstance(value, str) or not (text := value.strip()):
        return None
    if len(text) > _LOGGED_MAX:
        text = text[:_LOGGED_MAX] + "…"
    if upper:
        text = _upper_same_length(text)
    # A newline or a lone surrogate would forge or break the log line: shown as an escape.
    return _FORBIDDEN.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _rejected(details: list[dict[str, Any]], value: dict[str, Any]) -> PayloadError:
    return PayloadError(
        details, deployment_id=_loggable(value.get("deploymentId")), status=_loggable(value.get("status"), upper=True)
    )


def _text_problems(deployment_id: str | None, status: str | None) -> dict[str, str]:
    """The rules of SPEC 2.1 for the two stored strings (already trimmed and upper-cased); None is not checked."""
    problems: dict[str, str] = {}
    if deployment_id is not None:
        if not 1 <= len(deployment_id) <= DEPLOYMENT_ID_MAX:
            problems["deploymentId"] = (
                f"debe tener entre 1 y {DEPLOYMENT_ID_MAX} caracteres"
                f" (la columna DeploymentId es nvarchar({DEPLOYMENT_ID_MAX}))"
            )
        elif _FORBIDDEN.search(deployment_id):
            problems["deploymentId"] = "contiene caracteres de control no permitidos"
    if status is not None:
        if not 1 <= len(status) <= STATUS_MAX:
            problems["status"] = (
                f"debe tener entre 1 y {STATUS_MAX} caracteres (la columna Estado es nvarchar({STATUS_MAX}))"
            )
        elif _FORBIDDEN.search(status):
            problems["status"] = "contiene caracteres de control no permitidos"
    return problems


def _details(problems: dict[str, str]) -> list[dict[str, Any]]:
    return [{"field": field, "problem": problem} for field, problem in problems.items()]


def _invalid(exc: ValidationError, value: dict[str, Any]) -> PayloadError:
    """Every problem of a body the model refused: its type errors and the rules the other fields break."""
    problems: dict[str, str] = {}
    for error in exc.errors(include_url=False, include_input=False):
        field = str(error["loc"][0]) if error["loc"] else "body"
        if field in _NUMERIC_IDS:
            problems.setdefault(field, _MESSAGES["int_type"])
        else:
            problems.setdefault(field, _MESSAGES.get(error["type"], "valor no válido"))
    # A field with the right type still has its own rules: report them in the same answer.
    deployment_id, status = value.get("deploymentId"), value.get("status")
    checked = _text_problems(
        deployment_id.strip() if isinstance(deployment_id, str) and "deploymentId" not in problems else None,
        _upper_same_length(status.strip()) if isinstance(status, str) and "status" not in problems else None,
    )
    found = problems | checked
    ordered = {field: found[field] for field in _FIELD_ORDER if field in found}
    return _rejected(_details(ordered | found), value)


def parse_callback(body: bytes) -> Callback:
    """Validate a body against SPEC 2.1 and return the callback to record."""
    raw, value = decode_body(body)
    if isinstance(value, _RepeatedKeys):
        raise _rejected(
            [{"field": key, "problem": "aparece más de una vez en el cuerpo"} for key in value.repeated], value
        )
    try:
        payload = CallbackPayload.model_validate(value)
    except ValidationError as exc:
        raise _invalid(exc, value) from None
    deployment_id = payload.deploymentId.strip()
    status = _upper_same_length(payload.status.strip())
    problems = _text_problems(deployment_id, status)
    if ("\\u0000" in raw and _NUL_ESCAPE.search(raw)) or (_SURROGATE_ESCAPE.search(raw) and not _encodable(value)):
        problems["body"] = "contiene caracteres nulos o sustitutos UTF-16 sueltos"
    if problems:
        raise _rejected(_details(problems), value)
    return Callback(deployment_id=deployment_id, status=status, raw=raw)


def is_probe(callback: Callback) -> bool:
    """Whether a valid callback is a smoke test, answered but never recorded."""
    return callback.deployment_id.startswith(PROBE_PREFIX)
