"""The ceiling: the smallest raw ASGI app that reads a POST body and answers JSON (no framework, no database)."""

from __future__ import annotations

from typing import Any

_BODY = b'{"status":"OK","code":"updated","message":"ok","request_id":"-","deploymentId":"-","result":"updated"}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Drain the request body, then send a fixed JSON answer."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})
