"""`GET /ready` (database, spool backlog, unmatched) and request ids on every answer."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from sam.callback.app import create_app
from sam.callback.settings import Settings
from tests.utils import auth_headers, free_port

GENERATED = re.compile(r"[0-9a-f]{32}")


def test_ready_reports_database_spool_and_unmatched(client: TestClient) -> None:
    client.post("/api/callback", json={"deploymentId": "d-early", "status": "RUN_COMPLETED"}, headers=auth_headers())
    answer = client.get("/ready")
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "OK" and body["code"] == "ready"
    assert body["database"] == {"reachable": True}
    assert body["spool"]["available"] is True
    assert body["spool"]["backlog"] == 1
    assert body["spool"]["pending_match"] == 1
    assert body["spool"]["queued"] == 0
    assert body["spool"]["oldest_age_seconds"] >= 0
    assert body["unmatched"] == 0
    assert body["auth_mode"] == "optional"
    assert body["warnings"] == []


def test_ready_is_503_when_the_database_does_not_answer(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/sam")
    with TestClient(create_app(settings)) as client:
        queued = client.post(
            "/api/callback", json={"deploymentId": "d-q", "status": "RUN_FAILED"}, headers=auth_headers()
        )
        assert queued.json()["code"] == "queued"
        answer = client.get("/ready")
    assert answer.status_code == 503
    assert "retry-after" in answer.headers
    body = answer.json()
    assert body["status"] == "ERROR" and body["code"] == "not_ready"
    assert body["database"]["reachable"] is False
    assert body["database"]["error"]
    assert body["spool"]["queued"] == 1
    assert body["spool"]["backlog"] == 1


def test_ready_warns_when_authentication_is_off(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(auth_mode="none", token=None))) as client:
        body = client.get("/ready").json()
    assert body["auth_mode"] == "none"
    assert any("CALLBACK_AUTH_MODE=none" in warning for warning in body["warnings"])


@pytest.mark.parametrize(
    ("method", "path", "expected_status"),
    [
        ("POST", "/api/callback", 202),
        ("POST", "/api/callback-unauthorized", 401),
        ("GET", "/api/callback", 405),
        ("GET", "/health", 200),
        ("GET", "/ready", 200),
        ("GET", "/no-such-path", 404),
    ],
)
def test_a_sane_request_id_is_echoed_in_header_and_envelope(
    client: TestClient, method: str, path: str, expected_status: int
) -> None:
    headers = {"X-Request-ID": "gw-7f3a:trace/01+x=y@z.-_"}
    body = None
    if path.startswith("/api/callback") and method == "POST":
        headers |= auth_headers() if path == "/api/callback" else auth_headers("wrong-token-wrong")
        body = {"deploymentId": "d-rid", "status": "RUN_COMPLETED"}
        path = "/api/callback"
    answer = client.request(method, path, json=body, headers=headers)
    assert answer.status_code == expected_status
    assert answer.headers["x-request-id"] == headers["X-Request-ID"]
    assert answer.json()["request_id"] == headers["X-Request-ID"]


@pytest.mark.parametrize(
    "offered",
    [None, "", "has space", "x" * 129, "ñandú", "<script>", "a;b"],
)
@pytest.mark.parametrize("path", ["/api/callback", "/health"])
def test_an_absent_or_odd_request_id_is_replaced_by_a_generated_one(
    client: TestClient, offered: str | None, path: str
) -> None:
    headers: dict[str, str | bytes] = dict(auth_headers())
    if offered is not None:
        headers["X-Request-ID"] = offered.encode("utf-8")  # raw bytes, as a proxy could forward them
    if path == "/health":
        answer = client.get(path, headers=headers)
    else:
        answer = client.post(path, json={"deploymentId": "d-gen", "status": "RUN_COMPLETED"}, headers=headers)
    generated = answer.headers["x-request-id"]
    assert GENERATED.fullmatch(generated)
    assert answer.json()["request_id"] == generated


def test_generated_request_ids_are_unique(client: TestClient) -> None:
    ids = {client.get("/health").headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20
