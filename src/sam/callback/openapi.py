"""The OpenAPI document, including the callback operation that plain ASGI serves."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .domain import ResultCode
from .payload import DEPLOYMENT_ID_MAX, PROBE_PREFIX, STATUS_MAX, CallbackPayload, Envelope
from .responses import ANSWERS
from .settings import Settings

# Every answer the callback path can give: the others belong to other paths or are never sent.
_CALLBACK_CODES = tuple(
    code
    for code in ResultCode
    if code not in {ResultCode.NOT_FOUND, ResultCode.NOT_READY, ResultCode.CLIENT_DISCONNECTED}
)

# What payload.py accepts, said in JSON Schema so that a client (or schemathesis) can tell a valid
# body from an invalid one: the pydantic model alone would claim that any string is a valid id.
_MAX_INT = 10**40 - 1  # payload.py refuses integers of more than 40 digits
# Patterns use only what every regex engine understands (validators compile them as Rust regexes):
# lone UTF-16 surrogates, also refused, cannot be written in them and are only described.
_NO_NUL = r"^[^\u0000]*$"
# Python's str.strip() whitespace, spelled out: engines disagree on what \s means.
_SPACE = r"[\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_TEXT = r"[^\u0000-\u001f\u007f]"
_SOLID = r"[^\u0000-\u0020\u007f\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def _trimmed(max_length: int) -> str:
    """Pattern of a string of 1..max_length characters after trimming, without control characters."""
    return rf"^{_SPACE}*(?:{_SOLID}|{_SOLID}{_TEXT}{{0,{max_length - 2}}}{_SOLID}){_SPACE}*$"


_JSON_VALUE: dict[str, Any] = {
    "description": (
        "Cualquier valor JSON sin caracteres nulos ni sustitutos UTF-16 sueltos, con enteros de 40 cifras como máximo"
    ),
    "anyOf": [
        {"type": "string", "pattern": _NO_NUL},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": {"$ref": "#/components/schemas/JsonValue"}},
        {
            "type": "object",
            "propertyNames": {"pattern": _NO_NUL},
            "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
        },
    ],
}


def _payload_schema() -> dict[str, Any]:
    schema = CallbackPayload.model_json_schema(ref_template="#/components/schemas/{model}")
    value_ref = {"$ref": "#/components/schemas/JsonValue"}
    properties = schema["properties"]
    properties["deploymentId"] |= {"pattern": _trimmed(DEPLOYMENT_ID_MAX)}
    properties["status"] |= {"pattern": _trimmed(STATUS_MAX)}
    for name in ("deviceId", "userId"):
        properties[name]["anyOf"] = [
            {"type": "string", "pattern": _NO_NUL},
            {"type": "integer", "minimum": -_MAX_INT, "maximum": _MAX_INT},
            {"type": "null"},
        ]
    properties["botOutput"]["anyOf"] = [
        {"type": "object", "propertyNames": {"pattern": _NO_NUL}, "additionalProperties": value_ref},
        {"type": "null"},
    ]
    schema["propertyNames"] = {"pattern": _NO_NUL}
    schema["additionalProperties"] = value_ref
    return schema


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Replace `app.openapi` with one that documents the callback endpoint too."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["CallbackPayload"] = _payload_schema()
        components["JsonValue"] = _JSON_VALUE
        components["Envelope"] = Envelope.model_json_schema(ref_template="#/components/schemas/{model}")
        schema["components"]["securitySchemes"] = {
            "token": {"type": "apiKey", "in": "header", "name": "X-Authorization"},
            "gatewayJwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
        }
        envelope_ref = {"$ref": "#/components/schemas/Envelope"}
        responses: dict[str, Any] = {}
        for code in _CALLBACK_CODES:
            http_status, _, message = ANSWERS[code]
            entry = responses.setdefault(
                str(http_status),
                {"description": "", "content": {"application/json": {"schema": envelope_ref}}},
            )
            entry["description"] = (entry["description"] + " | " if entry["description"] else "") + f"{code}: {message}"
        body_schema = {"$ref": "#/components/schemas/CallbackPayload"}
        schema.setdefault("paths", {})[settings.endpoint_path] = {
            "post": {
                "tags": ["callback"],
                "summary": "Recibe el callback de fin de ejecución de A360",
                "description": (
                    "Autentica, valida y registra el fin de una ejecución en Ejecuciones. Un cuerpo que nombre "
                    "deploymentId o status más de una vez es un 400 (SQL Server leería otro valor en CallbackInfo). "
                    f"Un deploymentId que empieza por '{PROBE_PREFIX}' es un callback de prueba: se autentica y se "
                    "valida, se responde 200 con el código probe y no se registra nada."
                ),
                "operationId": "post_callback",
                "security": [{"token": []}, {"gatewayJwt": []}],
                "parameters": [
                    {
                        "name": "x-ibm-client-id",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "X-Request-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": body_schema},
                        "text/plain": {"schema": body_schema},
                    },
                },
                "responses": responses,
            }
        }
        _document_operation_answers(schema["paths"])
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]


def _document_operation_answers(paths: dict[str, Any]) -> None:
    """Answers FastAPI cannot infer from the handlers: /metrics is text, /ready may be 503."""
    metrics = paths.get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    ready = paths.get("/ready", {}).get("get")
    if ready is not None:
        ready["responses"]["503"] = {
            "description": "La base de datos no responde; los callbacks se guardan en el spool",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
