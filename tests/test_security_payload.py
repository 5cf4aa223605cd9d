"""Hostile bodies of issue 4 item 2, in process: too large (with or without Content-Length) or malformed."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from sam.callback.app import create_app
from sam.callback.settings import Settings
from tests.utils import auth_headers, fetch_run, insert_run

LIMIT = 4096
VALID = b'{"deploymentId":"sigue-vivo","status":"RUN_COMPLETED"}'
PREFIX = b'{"deploymentId":"a","status":"RUN_COMPLETED","x":'

MALFORMED = {
    "deeply_nested_lists": PREFIX + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deeply_nested_objects": PREFIX + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}",
    "huge_integer": PREFIX + b"9" * 100_000 + b"}",
    "huge_negative_integer": PREFIX + b"-" + b"9" * 5_000 + b"}",
    "float_overflow": PREFIX + b"1e999999}",
    "nan": PREFIX + b"NaN}",
    "infinity": PREFIX + b"-Infinity}",
    "invalid_utf8": b'{"deploymentId":"\xff\xfe\xfd","status":"RUN_COMPLETED"}',
    "overlong_utf8": b'{"deploymentId":"\xc0\xaf","status":"RUN_COMPLETED"}',
    "utf8_encoded_surrogate": b'{"deploymentId":"\xed\xa0\x80","status":"RUN_COMPLETED"}',
    "truncated_utf8": b'{"deploymentId":"\xe2\x82","status":"RUN_COMPLETED"}',
    "utf16_body": '{"deploymentId":"a","status":"RUN_COMPLETED"}'.encode("utf-16"),
    "lone_high_surrogate_in_id": b'{"deploymentId":"a\\ud800","status":"RUN_COMPLETED"}',
    "lone_low_surrogate_in_status": b'{"deploymentId":"a","status":"\\udc00"}',
    "lone_surrogate_in_extra_key": b'{"deploymentId":"a","status":"RUN_COMPLETED","\\udfff":1}',
    "lone_surrogate_in_bot_output": b'{"deploymentId":"a","status":"RUN_COMPLETED","botOutput":{"v":"\\ud83d"}}',
    "escaped_nul_in_id": b'{"deploymentId":"a\\u0000b","status":"RUN_COMPLETED"}',
    "escaped_nul_in_extra": b'{"deploymentId":"a","status":"RUN_COMPLETED","z":"\\u0000"}',
    "raw_nul_in_string": b'{"deploymentId":"a\x00","status":"RUN_COMPLETED"}',
    "raw_nul_after_object": b'{"deploymentId":"a","status":"RUN_COMPLETED"}\x00',
    "raw_nul_only": b"\x00" * 64,
    "control_chars_in_id": b'{"deploymentId":"a\\u001b[31m","status":"RUN_COMPLETED"}',
    "empty": b"",
    "not_an_object": b'["deploymentId","status"]',
    "two_objects": VALID + VALID,
    "unterminated": b'{"deploymentId":"a","status":"RUN_COMPLETED"',
}


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("huge_integer", "número fuera de rango"),
        ("float_overflow", "número fuera de rango"),
        ("deeply_nested_objects", "anida demasiados niveles"),
        ("nan", "no es JSON válido"),
        ("unterminated", "no es JSON válido"),
        ("not_an_object", "debe ser un objeto JSON"),
        ("invalid_utf8", "no es UTF-8 válido"),
    ],
)
def test_the_400_says_truly_why_the_body_was_refused(
    make_settings: Callable[..., Settings], name: str, problem: str
) -> None:
    """Valid JSON refused on purpose (a 100 000-digit number, deep nesting) is not called invalid JSON."""
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as api:
        answer = api.post("/api/callback", content=MALFORMED[name], headers=auth_headers())
    assert answer.status_code == 400
    assert problem in answer.json()["details"][0]["problem"]


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """A service with a small body limit so that limits are cheap to cross."""
    with TestClient(create_app(make_settings(max_body_bytes=LIMIT)), raise_server_exceptions=False) as client:
        yield client


def assert_still_serving(api: TestClient) -> None:
    """A valid callback still gets its normal answer."""
    answer = api.post("/api/callback", content=VALID, headers=auth_headers())
    assert answer.status_code == 202, answer.text


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_bodies_are_400_never_500(make_settings: Callable[..., Settings], name: str) -> None:
    """Each hostile body is an invalid_payload with details, then the service carries on."""
    settings = make_settings(max_body_bytes=1_048_576)
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        answer = api.post("/api/callback", content=MALFORMED[name], headers=auth_headers())
        assert answer.status_code == 400, answer.text
        body = answer.json()
        assert body["code"] == "invalid_payload"
        assert body["details"]
        assert_still_serving(api)
    assert "Traceback" not in settings.log_file.read_text(encoding="utf-8")


def test_body_over_the_limit_with_content_length_is_413(api: TestClient) -> None:
    """A declared Content-Length over the limit is refused without reading the body."""
    answer = api.post("/api/callback", content=b"{" + b" " * LIMIT + b"}", headers=auth_headers())
    assert answer.status_code == 413
    assert answer.json()["code"] == "payload_too_large"
    assert answer.headers["connection"] == "close"
    assert_still_serving(api)


def test_chunked_body_over_the_limit_is_413(api: TestClient) -> None:
    """Without Content-Length the body is counted as it arrives (the real server test proves it stops reading)."""

    def chunks() -> Iterator[bytes]:
        yield b'{"deploymentId":"a","status":"RUN_COMPLETED","x":"'
        for _ in range(2 * LIMIT // 1024):
            yield b"a" * 1024
        yield b'"}'

    answer = api.post("/api/callback", content=chunks(), headers=auth_headers())
    assert "content-length" not in answer.request.headers
    assert answer.status_code == 413
    assert answer.json()["code"] == "payload_too_large"
    assert_still_serving(api)


def test_body_at_the_limit_is_read(api: TestClient) -> None:
    """The limit is inclusive: exactly LIMIT bytes is a normal request."""
    padding = LIMIT - len(VALID) - len(b',"p":""')
    body = VALID[:-1] + b',"p":"' + b"a" * padding + b'"}'
    assert len(body) == LIMIT
    assert api.post("/api/callback", content=body, headers=auth_headers()).status_code == 202


DUPLICATED = {
    "deployment_id_twice": (
        b'{"deploymentId":"dup-a","status":"RUN_COMPLETED","deploymentId":"dup-b"}',
        ["deploymentId"],
    ),
    "status_twice": (b'{"deploymentId":"dup-a","status":"RUN_COMPLETED","status":"RUN_FAILED"}', ["status"]),
    "both_twice": (
        b'{"status":"RUNNING","deploymentId":"dup-a","status":"RUN_FAILED","deploymentId":"dup-b"}',
        ["deploymentId", "status"],
    ),
    "same_value_twice": (b'{"deploymentId":"dup-a","deploymentId":"dup-a","status":"RUN_COMPLETED"}', ["deploymentId"]),
    "escaped_spelling": (
        b'{"deploymentId":"dup-a","deployment\\u0049d":"dup-b","status":"RUN_COMPLETED"}',
        ["deploymentId"],
    ),
}


@pytest.mark.parametrize("name", sorted(DUPLICATED))
def test_a_body_naming_deployment_id_or_status_twice_is_400(make_settings: Callable[..., Settings], name: str) -> None:
    """SQL Server's JSON_VALUE over CallbackInfo would read the first value, we the last: refused, nothing written."""
    settings = make_settings()
    url = settings.resolved_database_url()
    insert_run(url, "dup-a", "RUNNING")
    insert_run(url, "dup-b", "RUNNING")
    body, fields = DUPLICATED[name]
    with TestClient(create_app(settings)) as api:
        answer = api.post("/api/callback", content=body, headers=auth_headers())
        assert answer.status_code == 400, answer.text
        assert answer.json()["code"] == "invalid_payload"
        assert [d["field"] for d in answer.json()["details"]] == fields
        assert all(d["problem"] == "aparece más de una vez en el cuerpo" for d in answer.json()["details"])
        assert api.get("/ready").json()["spool"]["backlog"] == 0
    assert fetch_run(url, "dup-a")["Estado"] == "RUNNING"  # type: ignore[index]
    assert fetch_run(url, "dup-b")["Estado"] == "RUNNING"  # type: ignore[index]


def test_nested_repeated_names_and_other_repeated_keys_are_the_bodys_business(
    make_settings: Callable[..., Settings],
) -> None:
    """Only the top level's deploymentId and status must be unique; the raw body is stored as received."""
    settings = make_settings()
    url = settings.resolved_database_url()
    insert_run(url, "dup-ok", "RUNNING")
    body = (
        b'{"deploymentId":"dup-ok","status":"RUN_COMPLETED","extra":1,"extra":2,'
        b'"botOutput":{"status":"a","status":"b","deploymentId":"x","deploymentId":"y"}}'
    )
    with TestClient(create_app(settings)) as api:
        answer = api.post("/api/callback", content=body, headers=auth_headers())
        assert answer.status_code == 200 and answer.json()["code"] == "updated"
    row = fetch_run(url, "dup-ok")
    assert row is not None and row["Estado"] == "RUN_COMPLETED" and row["CallbackInfo"] == body.decode()
