"""`sam-callback send`: the header sets SAM's launcher and web unlock send, and the smoke-test body."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx

from .payload import PROBE_PREFIX

_SECRET_HEADERS = ("X-Authorization", "Authorization", "x-ibm-client-id")


class SendAs(StrEnum):
    """Whose request `send` reproduces."""

    # SAM's launcher: callbackInfo.headers = X-Authorization (CALLBACK_TOKEN), plus the gateway's
    # Authorization and x-ibm-client-id when its API gateway client is configured.
    LAUNCHER = "lanzador"
    # SAM's web "unlock": RUN_ABORTED with only the gateway's Authorization and x-ibm-client-id.
    UNLOCK = "desbloqueo"
    # The static token alone.
    STATIC = "token"


class SendError(Exception):
    """A request that cannot be built or sent; the message is Spanish and holds no secret."""


@dataclass(frozen=True)
class CallbackRequest:
    """What `send` posts; `headers` hold secrets and are never printed."""

    mode: SendAs
    deployment_id: str
    probe: bool
    body: dict[str, Any]
    headers: dict[str, str] = field(repr=False)
    warnings: tuple[str, ...] = ()

    @property
    def header_names(self) -> list[str]:
        """The header names, without their values."""
        return list(self.headers)


def _read_jwt(jwt: str | None, jwt_file: Path | None) -> str | None:
    if jwt_file is not None:
        try:
            jwt = jwt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SendError(f"no se puede leer el JWT de {jwt_file}: {type(exc).__name__}") from None
    if jwt is None:
        return None
    text = jwt.strip()
    # A file copied from a gateway's answer or a header may carry the scheme already.
    if text[:7].lower() == "bearer ":
        text = text[7:].strip()
    if not text or any(char.isspace() or not char.isprintable() for char in text):
        raise SendError("el JWT está vacío o contiene espacios o caracteres no imprimibles")
    return text


def build_request(
    *,
    mode: SendAs,
    deployment_id: str | None,
    status: str | None,
    token: str | None,
    client_id: str | None,
    jwt: str | None,
    jwt_file: Path | None,
) -> CallbackRequest:
    """The body and headers of the callback `mode` describes; raise SendError when it cannot be built."""
    bearer = _read_jwt(jwt, jwt_file)
    warnings: list[str] = []
    headers = {"Content-Type": "application/json"}
    if mode is SendAs.UNLOCK and bearer is None:
        raise SendError("--como desbloqueo exige el JWT del API Gateway (--jwt o --jwt-file)")
    if mode is SendAs.STATIC and bearer is not None:
        raise SendError("--como token envía solo X-Authorization: quite --jwt/--jwt-file o use --como lanzador")
    if mode is not SendAs.UNLOCK:
        if token:
            headers["X-Authorization"] = token
        else:
            warnings.append("CALLBACK_TOKEN no está configurado: se envía sin X-Authorization, como haría SAM")
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
        if client_id:
            headers["x-ibm-client-id"] = client_id
        else:
            warnings.append("APIGW_CLIENT_ID no está configurado: se envía sin x-ibm-client-id, como haría SAM")
    probe = deployment_id is None
    if deployment_id is None:
        deployment_id = f"{PROBE_PREFIX}{uuid.uuid4().hex[:16]}"
    body: dict[str, Any] = {"deploymentId": deployment_id}
    if mode is SendAs.UNLOCK:
        # The unlock's shape: ids as strings or null, a message in botOutput.
        body |= {
            "status": status or "RUN_ABORTED",
            "deviceId": None,
            "userId": None,
            "botOutput": {"message": "Desbloqueo de prueba enviado con sam-callback send"},
        }
    else:
        body |= {
            "status": status or "RUN_COMPLETED",
            "botOutput": {"origen": {"type": "STRING", "string": "sam-callback send"}},
        }
    for name, variable in (("X-Authorization", "CALLBACK_TOKEN"), ("x-ibm-client-id", "APIGW_CLIENT_ID")):
        try:
            headers.get(name, "").encode("latin-1")
        except UnicodeEncodeError:
            # SAM's launcher (requests) could not send it either: its headers travel as Latin-1.
            raise SendError(f"{variable} tiene caracteres que no caben en una cabecera HTTP (Latin-1)") from None
    return CallbackRequest(
        mode=mode, deployment_id=deployment_id, probe=probe, body=body, headers=headers, warnings=tuple(warnings)
    )


def post_callback(request: CallbackRequest, *, url: str, verify: bool) -> tuple[int, str]:
    """POST the callback; return the HTTP status and the answer's text."""
    try:
        # Latin-1, as SAM's launcher (requests) encodes header values: "ñ" arrives as one byte.
        headers = {name.encode("ascii"): value.encode("latin-1") for name, value in request.headers.items()}
        answer = httpx.post(url, json=request.body, headers=headers, timeout=15, verify=verify)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        # Some transport errors quote the offending header value: mask every one we sent.
        message = str(exc)
        for name in _SECRET_HEADERS:
            value = request.headers.get(name)
            if value:
                message = message.replace(value.removeprefix("Bearer "), "***")
        raise SendError(f"{type(exc).__name__}: {message}") from None
    return answer.status_code, answer.text
