"""The JSON envelope of every answer, its stable codes and their Spanish messages."""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable
from typing import Any

from starlette.types import Send

from .domain import RECORDED_CODES, ResultCode

# code -> (HTTP status, envelope status, message for operators); every code but client_disconnected.
ANSWERS: dict[ResultCode, tuple[int, str, str]] = {
    ResultCode.UPDATED: (200, "OK", "Estado de la ejecución actualizado"),
    ResultCode.ALREADY_PROCESSED: (
        200,
        "OK",
        "La ejecución ya tenía ese estado o un estado final; no se ha modificado",
    ),
    ResultCode.PENDING_MATCH: (
        202,
        "ACCEPTED",
        "La ejecución aún no existe; el callback se ha guardado y se aplicará cuando aparezca",
    ),
    ResultCode.QUEUED: (
        202,
        "ACCEPTED",
        "La base de datos no ha registrado el callback por ahora; se ha guardado en el spool y se aplicará en cuanto lo acepte",
    ),
    ResultCode.PROBE: (
        200,
        "OK",
        "Callback de prueba recibido: autenticación y validación correctas; no se registra nada",
    ),
    ResultCode.UNAUTHORIZED: (401, "ERROR", "Credenciales ausentes o no válidas"),
    ResultCode.FORBIDDEN: (403, "ERROR", "La dirección de origen no está autorizada"),
    ResultCode.BAD_REQUEST: (
        400,
        "ERROR",
        "La petición HTTP no es válida (línea de petición, cabeceras o cuerpo mal formados)",
    ),
    ResultCode.NOT_FOUND: (404, "ERROR", "Ruta no encontrada"),
    ResultCode.METHOD_NOT_ALLOWED: (405, "ERROR", "Método no permitido"),
    ResultCode.REQUEST_TIMEOUT: (408, "ERROR", "El cuerpo de la petición no llegó a tiempo"),
    ResultCode.PAYLOAD_TOO_LARGE: (
        413,
        "ERROR",
        "El cuerpo de la petición supera el tamaño máximo permitido",
    ),
    ResultCode.HEADERS_TOO_LARGE: (
        431,
        "ERROR",
        "La línea de petición y las cabeceras superan el tamaño máximo permitido",
    ),
    ResultCode.UNSUPPORTED_MEDIA_TYPE: (
        415,
        "ERROR",
        "Tipo de contenido no admitido; envíe application/json",
    ),
    ResultCode.INVALID_PAYLOAD: (400, "ERROR", "El cuerpo de la petición no es un callback válido"),
    ResultCode.TOO_MANY_REQUESTS: (
        429,
        "ERROR",
        "Demasiados intentos de autenticación fallidos; espere antes de reintentar",
    ),
    ResultCode.INTERNAL_ERROR: (500, "ERROR", "Error interno; consulte el log con el request_id"),
    ResultCode.UNAVAILABLE: (
        503,
        "ERROR",
        "No se pudo guardar el callback ni en la base de datos ni en el spool; reintente más tarde",
    ),
    ResultCode.NOT_READY: (503, "ERROR", "El servicio no está listo: la base de datos no responde"),
}

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id_from(value: bytes | str | None) -> str:
    """The caller's X-Request-ID when it is short and plain, else a new one."""
    if value:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if _SANE_REQUEST_ID.fullmatch(text):
            return text
    return _new_request_id()


def _reset_request_ids() -> None:
    global _request_id_prefix, _request_id_counter
    _request_id_prefix = os.urandom(10).hex()
    _request_id_counter = itertools.count()


def _new_request_id() -> str:
    # The shape of uuid4().hex (32 hex digits): 80 random bits per process, then a counter. One
    # system call per process instead of one per request (which also handed the GIL to others).
    return f"{_request_id_prefix}{next(_request_id_counter) & 0xFFFF_FFFF_FFFF:012x}"


_request_id_prefix = ""
_request_id_counter = itertools.count()
_reset_request_ids()
if hasattr(os, "register_at_fork"):  # a forked child must not repeat its parent's ids
    os.register_at_fork(after_in_child=_reset_request_ids)


def envelope(
    code: ResultCode, request_id: str, *, message: str | None = None, **extra: Any
) -> tuple[int, dict[str, Any]]:
    """HTTP status and body for `code`."""
    http_status, status, default_message = ANSWERS[code]
    body: dict[str, Any] = {
        "status": status,
        "code": code.value,
        "message": message or default_message,
        "request_id": request_id,
    }
    body.update({key: value for key, value in extra.items() if value is not None})
    return http_status, body


# json.dumps(..., ensure_ascii=False) builds a new encoder on every call; one is enough.
_encode = json.JSONEncoder(ensure_ascii=False).encode


def _recorded_template(code: ResultCode) -> tuple[int, str, str]:
    http_status, body = envelope(code, "", deploymentId="", result=code.value)
    head, _, tail = _encode(body).partition(', "deploymentId": ""')
    return http_status, head.removesuffix('""'), tail


# The answer to a recorded callback is the same text each time but for two values: it is
# assembled from pieces made by the same encoder (tests compare it with `envelope`).
_RECORDED = {code: _recorded_template(code) for code in RECORDED_CODES}


async def send_envelope(
    send: Send,
    code: ResultCode,
    request_id: str,
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    message: str | None = None,
    **extra: Any,
) -> int:
    """Send a complete JSON answer on a raw ASGI channel; return its HTTP status."""
    http_status, body = envelope(code, request_id, message=message, **extra)
    return await _send_json(send, http_status, _encode(body).encode("utf-8"), request_id, headers)


async def send_recorded(send: Send, code: ResultCode, request_id: str, deployment_id: str) -> int:
    """`send_envelope(send, code, request_id, deploymentId=deployment_id, result=code)`, faster."""
    template = _RECORDED.get(code)
    if template is None:
        return await send_envelope(send, code, request_id, deploymentId=deployment_id, result=code.value)
    http_status, head, tail = template
    text = f'{head}{_encode(request_id)}, "deploymentId": {_encode(deployment_id)}{tail}'
    return await _send_json(send, http_status, text.encode("utf-8"), request_id, ())


async def _send_json(
    send: Send, http_status: int, payload: bytes, request_id: str, headers: Iterable[tuple[bytes, bytes]]
) -> int:
    await send(
        {
            "type": "http.response.start",
            "status": http_status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"x-request-id", request_id.encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
    return http_status
