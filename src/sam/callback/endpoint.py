"""The callback endpoint as plain ASGI: the hot path, with no framework work it does not need."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING

import anyio.to_thread
from starlette.types import Receive, Scope, Send

from .domain import AuthFailure, ResultCode, describe
from .logs import log_fields
from .payload import NotAJsonObject, PayloadError, is_probe, parse_callback
from .protocols import BODY_RECEIVED
from .rejected import RejectedStoreError
from .responses import send_envelope, send_recorded

if TYPE_CHECKING:
    from .activity import Activity
    from .runtime import Runtime

log = logging.getLogger("sam.callback.http")

_INFO = logging.INFO
_JSON_TYPES = (b"application/json", b"text/plain")
_REFUSED = frozenset({ResultCode.UNAUTHORIZED, ResultCode.FORBIDDEN, ResultCode.TOO_MANY_REQUESTS})


class _BodyTooLarge(Exception):
    pass


class CallbackEndpoint:
    """The callback path's handler, called by the dispatcher (app.py) with the request's id."""

    def __init__(self, *, runtime: Runtime, activity: Activity) -> None:
        self.runtime = runtime
        self.activity = activity
        self.max_body = runtime.settings.max_body_bytes
        self.body_timeout = runtime.settings.body_timeout_seconds

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, headers: dict[bytes, bytes]
    ) -> None:
        """Answer one callback request, named `request_id` by the dispatcher; `headers` are its headers."""
        started = time.perf_counter()
        peer = scope["client"][0] if scope.get("client") else "-"
        client = peer
        deployment_id: str | None = None
        status: str | None = None
        code = ResultCode.INTERNAL_ERROR
        try:
            forwarded = _all_values(scope, b"x-forwarded-for") if b"x-forwarded-for" in headers else None
            client = self.runtime.resolver.client_address(peer, forwarded)
            code, deployment_id, status = await self._handle(scope, receive, send, headers, request_id, client)
        except Exception:
            log.exception("Error interno atendiendo un callback de %s", client)
            code = ResultCode.INTERNAL_ERROR
            await send_envelope(send, code, request_id)
        seconds = time.perf_counter() - started
        self.runtime.metrics.observe_callback(code=code, status=status, seconds=seconds)
        if code not in _REFUSED:  # refused requests are noted with their reason where they are refused
            self.activity.callback(deployment_id, status, code, client, request_id)
        if code != ResultCode.TOO_MANY_REQUESTS:
            duration_ms = round(seconds * 1000, 1)
            fields = {"request_id": request_id, "client": client, "deploymentId": deployment_id,
                      "status": status, "result": code, "duration_ms": duration_ms}  # fmt: skip
            log_fields(
                log, _INFO, "callback cliente=%s deploymentId=%s estado=%s resultado=%s duracion_ms=%.1f",
                client, deployment_id or "-", status or "-", code, duration_ms, fields=fields,
            )  # fmt: skip

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        request_id: str,
        client: str,
    ) -> tuple[ResultCode, str | None, str | None]:
        runtime = self.runtime
        if scope["method"] != "POST":
            await send_envelope(send, ResultCode.METHOD_NOT_ALLOWED, request_id, headers=[(b"allow", b"POST")])
            return ResultCode.METHOD_NOT_ALLOWED, None, None
        if not runtime.resolver.allowed_address(client):
            log.warning("Petición rechazada: la dirección %s no está en CALLBACK_ALLOWED_IPS", client)
            runtime.alerts.refused(client, 403, (AuthFailure.ADDRESS_NOT_ALLOWED,))
            self.activity.refused(client, 403, (AuthFailure.ADDRESS_NOT_ALLOWED,))
            await send_envelope(send, ResultCode.FORBIDDEN, request_id)
            return ResultCode.FORBIDDEN, None, None
        verdict = runtime.authenticator.check(
            _text(headers.get(b"x-authorization")),
            _text(headers.get(b"authorization")),
            _text(headers.get(b"x-ibm-client-id")),
        )
        if not verdict.ok:
            return await self._refuse(send, request_id, client, verdict.reasons), None, None
        if verdict.reasons:
            # Mode optional: a valid credential carried the request; the bad one is still news.
            log.warning(
                "Credencial no válida ignorada (otra es válida) cliente=%s motivo=%s",
                client,
                describe(verdict.reasons),
            )
        content_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        unsupported = bool(content_type) and content_type not in _JSON_TYPES and not content_type.endswith(b"+json")
        try:
            body = await self._read_body(scope, receive, headers.get(b"content-length"))
        except _BodyTooLarge:
            await send_envelope(
                send, ResultCode.PAYLOAD_TOO_LARGE, request_id, headers=[(b"connection", b"close")],
                message=f"El cuerpo supera el máximo de {self.max_body} bytes (CALLBACK_MAX_BODY_BYTES)",
            )  # fmt: skip
            return ResultCode.PAYLOAD_TOO_LARGE, None, None
        except TimeoutError:
            await send_envelope(send, ResultCode.REQUEST_TIMEOUT, request_id, headers=[(b"connection", b"close")])
            return ResultCode.REQUEST_TIMEOUT, None, None
        if body is None:
            return ResultCode.CLIENT_DISCONNECTED, None, None
        if unsupported:
            reason = f"tipo de contenido no admitido: {_text(content_type)}"
            return await self._unsupported(send, request_id, client, headers, body, reason)
        try:
            callback = parse_callback(body)
        except NotAJsonObject as exc:
            exc = _with_charset_hint(exc, headers.get(b"content-type", b""))
            if content_type != b"text/plain":
                return await self._invalid(send, request_id, client, headers, body, exc)
            # SPEC 2.1 takes text/plain only when it carries a JSON object: otherwise it is one
            # more content type this service does not read.
            reason = f"tipo de contenido no admitido: text/plain sin un objeto JSON ({exc.details[0]['problem']})"
            return await self._unsupported(send, request_id, client, headers, body, reason)
        except PayloadError as exc:
            return await self._invalid(send, request_id, client, headers, body, exc)
        if is_probe(callback):
            # A smoke test of the deployment: it got this far, so it is authentic and valid.
            await send_recorded(send, ResultCode.PROBE, request_id, callback.deployment_id)
            return ResultCode.PROBE, callback.deployment_id, callback.status
        code = await runtime.recorder.submit(callback, request_id)
        if code == ResultCode.UNAVAILABLE:
            runtime.alerts.unavailable(callback.deployment_id, callback.status, request_id)
            await send_envelope(
                send, code, request_id, headers=[(b"retry-after", b"30")], deploymentId=callback.deployment_id
            )
        else:
            await send_recorded(send, code, request_id, callback.deployment_id)
        return code, callback.deployment_id, callback.status

    async def _unsupported(
        self, send: Send, request_id: str, client: str, headers: dict[bytes, bytes], body: bytes, reason: str
    ) -> tuple[ResultCode, str | None, str | None]:
        # Authenticated, so the body is kept: A360 will not send it again (SPEC 10).
        code = ResultCode.UNSUPPORTED_MEDIA_TYPE
        await self._keep_rejected(body, request_id, client, code, reason, headers, None)
        await send_envelope(send, code, request_id)
        return code, None, None

    async def _invalid(
        self,
        send: Send,
        request_id: str,
        client: str,
        headers: dict[bytes, bytes],
        body: bytes,
        exc: PayloadError,
    ) -> tuple[ResultCode, str | None, str | None]:
        log.warning("Callback rechazado por payload no válido cliente=%s detalles=%s", client, exc.details)
        reason = "; ".join(f"{detail['field']}: {detail['problem']}" for detail in exc.details)
        await self._keep_rejected(
            body, request_id, client, ResultCode.INVALID_PAYLOAD, reason, headers, exc.deployment_id
        )
        await send_envelope(send, ResultCode.INVALID_PAYLOAD, request_id, details=exc.details)
        return ResultCode.INVALID_PAYLOAD, exc.deployment_id, exc.status

    async def _keep_rejected(
        self,
        body: bytes,
        request_id: str,
        client: str,
        code: ResultCode,
        reason: str,
        headers: dict[bytes, bytes],
        deployment_id: str | None,
    ) -> None:
        """Keep an authenticated body the service refused; failing to keep it never changes the answer."""
        try:
            seq = await anyio.to_thread.run_sync(
                functools.partial(
                    self.runtime.rejected.add,
                    body=body,
                    request_id=request_id,
                    client=client,
                    code=code.value,
                    reason=reason,
                    content_type=_text(headers.get(b"content-type")) or "",
                    deployment_id=deployment_id,
                )
            )
        except RejectedStoreError as exc:
            log.error("No se pudo guardar el callback rechazado request_id=%s: %s", request_id, exc)
            seq = None
        self.runtime.on_rejected(
            seq=seq, client=client, reason=reason, deployment_id=deployment_id, request_id=request_id
        )

    async def _refuse(self, send: Send, request_id: str, client: str, reasons: tuple[AuthFailure, ...]) -> ResultCode:
        runtime = self.runtime
        # The first reason names the failure: in mode required a bad JWT comes before "token: ausente".
        runtime.metrics.auth_failures.labels(reasons[0].label if reasons else "other").inc()
        throttled, retry_after = runtime.throttle.fail(client)
        self.activity.refused(client, 429 if throttled else 401, reasons)
        if throttled:
            runtime.note_throttled(client)
            runtime.alerts.refused(client, 429, reasons)
            await send_envelope(
                send,
                ResultCode.TOO_MANY_REQUESTS,
                request_id,
                headers=[(b"retry-after", str(retry_after).encode())],
            )
            return ResultCode.TOO_MANY_REQUESTS
        log.warning("Autenticación fallida cliente=%s motivo=%s", client, describe(reasons))
        runtime.alerts.refused(client, 401, reasons)
        await send_envelope(
            send,
            ResultCode.UNAUTHORIZED,
            request_id,
            headers=[(b"www-authenticate", b'Bearer realm="sam-callback"')],
        )
        return ResultCode.UNAUTHORIZED

    async def _read_body(self, scope: Scope, receive: Receive, content_length: bytes | None) -> bytes | None:
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                declared = -1
            if declared > self.max_body:
                raise _BodyTooLarge
        if scope.get(BODY_RECEIVED):
            # The common case, and no timer to arm and cancel: the body is already here.
            return await self._receive_body(receive)
        # A client that stops sending mid-body must not hold the request open for ever.
        async with asyncio.timeout(self.body_timeout):
            return await self._receive_body(receive)

    async def _receive_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _with_charset_hint(exc: NotAJsonObject, content_type: bytes) -> NotAJsonObject:
    """A body that is not UTF-8 sent with another charset declared: say that JSON is UTF-8 only."""
    charset = content_type.lower().partition(b"charset=")[2].split(b";", 1)[0].strip(b" \"'")
    if not charset or charset in (b"utf-8", b"utf8") or "UTF-8" not in exc.details[0]["problem"]:
        return exc
    return NotAJsonObject(
        f"el cuerpo no es UTF-8 válido: declara charset={_text(charset)}, pero un JSON va siempre en UTF-8 "
        "(RFC 8259) y el servicio no lo convierte"
    )


def _all_values(scope: Scope, name: bytes) -> str:
    # Every line of a repeated header, joined as RFC 9110 says: a proxy that adds its own line
    # (HAProxy's `option forwardfor`) must not let the client's own line be the one read.
    return ", ".join(value.decode("latin-1") for key, value in scope["headers"] if key == name)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
