"""The OpenAPI document, including the callback operation that plain ASGI serves."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .payload import CallbackPayload, Envelope
from .responses import ANSWERS
from .settings import Settings

_CALLBACK_CODES = (
    "updated", "already_processed", "pending_match", "queued", "invalid_payload", "unauthorized",
    "forbidden", "method_not_allowed", "request_timeout", "payload_too_large",
    "unsupported_media_type", "too_many_requests", "internal_error", "unavailable",
)  # fmt: skip


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Replace `app.openapi` with one that documents the callback endpoint too."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["CallbackPayload"] = CallbackPayload.model_json_schema(ref_template="#/components/schemas/{model}")
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
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]
