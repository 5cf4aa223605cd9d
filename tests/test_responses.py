"""The answer envelope: the fast path for recorded callbacks says exactly what the general one says."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from sam.callback.domain import RECORDED_CODES, ResultCode
from sam.callback.responses import envelope, request_id_from, send_envelope, send_recorded


def _sent(coroutine_factory: Any) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        messages.append(message)

    asyncio.run(coroutine_factory(send))
    return messages


@pytest.mark.parametrize("code", RECORDED_CODES)
@pytest.mark.parametrize("deployment_id", ["dep-1", 'comillas "y" \\ barras', "ñandú \u2028 😀", "a" * 100])
def test_recorded_answer_is_byte_for_byte_the_envelope(code: ResultCode, deployment_id: str) -> None:
    fast = _sent(lambda send: send_recorded(send, code, "req-1", deployment_id))
    general = _sent(lambda send: send_envelope(send, code, "req-1", deploymentId=deployment_id, result=code))
    assert fast == general
    status, body = envelope(code, "req-1", deploymentId=deployment_id, result=code)
    assert fast[0]["status"] == status
    assert json.loads(fast[1]["body"]) == body


def test_new_request_ids_look_like_uuid4_hex_and_differ() -> None:
    ids = {request_id_from(None) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in ids)
    assert request_id_from(b"req-propio") == "req-propio"
    assert re.fullmatch(r"[0-9a-f]{32}", request_id_from(b"no valido con espacios"))
