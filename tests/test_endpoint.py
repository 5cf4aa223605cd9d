"""The callback endpoint over HTTP: every row of SPEC 2.2 that does not need a fault, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sam.callback.app import create_app
from sam.callback.settings import Settings
from tests.utils import TOKEN, auth_headers, fetch_run, insert_run, wait_for


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """The same behaviour is required on the embedded SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def api(make_settings: Callable[..., Settings], db_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(database_url=db_url))) as test_client:
        yield test_client


def post(api: TestClient, body: Any, *, headers: dict[str, str] | None = None) -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return api.post("/api/callback", content=content, headers=auth_headers() if headers is None else headers)


def test_running_run_is_updated_with_raw_body_and_final_times(api: TestClient, db_url: str) -> None:
    insert_run(db_url, "dep-1", "RUNNING")
    raw = b'{"status":"run_completed", "deploymentId":"dep-1","extra":{"b":1,"a":[1,2]},"botOutput":{"x":{"type":"STRING","string":"hola"}}}'
    answer = post(api, raw)
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "OK" and body["code"] == "updated" and body["result"] == "updated"
    assert body["deploymentId"] == "dep-1" and body["request_id"] == answer.headers["x-request-id"]
    row = fetch_run(db_url, "dep-1")
    assert row is not None
    assert row["Estado"] == "RUN_COMPLETED"
    assert row["CallbackInfo"] == raw.decode()  # exactly as received: key order, spacing, extra fields
    assert row["FechaFin"] is not None and row["FechaActualizacion"] is not None and row["FechaInicioReal"] is not None


def test_a_non_final_status_also_ends_the_run(api: TestClient, db_url: str) -> None:
    """SAM's reconciler skips every row whose CallbackInfo is set: the callback must end the run."""
    insert_run(db_url, "dep-2", "DEPLOYED")
    assert post(api, {"deploymentId": "dep-2", "status": "RUNNING"}).json()["code"] == "updated"
    row = fetch_run(db_url, "dep-2")
    assert row is not None and row["Estado"] == "RUNNING" and row["FechaFin"] is not None


@pytest.mark.parametrize("guess", ["COMPLETED_INFERRED", "UNKNOWN"])
def test_reconciler_guesses_are_overwritten(api: TestClient, db_url: str, guess: str) -> None:
    insert_run(db_url, "dep-g", guess)
    assert post(api, {"deploymentId": "dep-g", "status": "RUN_FAILED"}).json()["code"] == "updated"
    assert fetch_run(db_url, "dep-g")["Estado"] == "RUN_FAILED"  # type: ignore[index]


@pytest.mark.parametrize(
    "final", ["COMPLETED", "RUN_COMPLETED", "RUN_FAILED", "RUN_ABORTED", "RUN_TIMED_OUT", "DEPLOY_FAILED"]
)
def test_final_state_is_never_overwritten(api: TestClient, db_url: str, final: str) -> None:
    insert_run(db_url, "dep-f", final, CallbackInfo="original")
    answer = post(api, {"deploymentId": "dep-f", "status": "RUNNING"})
    assert answer.status_code == 200 and answer.json()["code"] == "already_processed"
    row = fetch_run(db_url, "dep-f")
    assert row is not None and row["Estado"] == final and row["CallbackInfo"] == "original"


def test_same_state_twice_is_a_duplicate(api: TestClient, db_url: str) -> None:
    insert_run(db_url, "dep-d", "RUNNING")
    assert post(api, {"deploymentId": "dep-d", "status": "run_paused"}).json()["code"] == "updated"
    second = post(api, {"deploymentId": "dep-d", "status": "RUN_PAUSED", "n": 2})
    assert second.status_code == 200 and second.json()["code"] == "already_processed"
    assert json.loads(fetch_run(db_url, "dep-d")["CallbackInfo"])["status"] == "run_paused"  # type: ignore[index]


def test_early_callback_is_kept_and_matched_when_the_row_appears(api: TestClient, db_url: str) -> None:
    answer = post(api, {"deploymentId": "dep-early", "status": "RUN_COMPLETED"})
    assert answer.status_code == 202
    assert answer.json()["status"] == "ACCEPTED" and answer.json()["code"] == "pending_match"
    ready = api.get("/ready").json()
    assert ready["spool"]["pending_match"] == 1
    insert_run(db_url, "dep-early", "RUNNING")
    wait_for(
        lambda: (fetch_run(db_url, "dep-early") or {}).get("Estado") == "RUN_COMPLETED", timeout=30, what="emparejado"
    )
    wait_for(lambda: api.get("/ready").json()["spool"]["backlog"] == 0, what="spool vacío")


def test_later_callback_for_a_waiting_run_queues_behind_it(api: TestClient, db_url: str) -> None:
    assert post(api, {"deploymentId": "dep-order", "status": "RUNNING"}).json()["code"] == "pending_match"
    assert post(api, {"deploymentId": "dep-order", "status": "RUN_FAILED"}).json()["code"] == "pending_match"
    insert_run(db_url, "dep-order", "DEPLOYED")
    wait_for(lambda: (fetch_run(db_url, "dep-order") or {}).get("Estado") == "RUN_FAILED", what="orden de llegada")
    assert json.loads(fetch_run(db_url, "dep-order")["CallbackInfo"])["status"] == "RUN_FAILED"  # type: ignore[index]


def test_integer_ids_and_typed_bot_output_are_accepted(api: TestClient, db_url: str) -> None:
    insert_run(db_url, "dep-int", "RUNNING")
    body = {
        "deploymentId": "dep-int",
        "status": "RUN_COMPLETED",
        "deviceId": 17,
        "userId": 42,
        "botOutput": {"r": {"type": "NUMBER", "number": "3"}},
    }
    assert post(api, body).json()["code"] == "updated"


def test_text_plain_json_object_is_accepted(api: TestClient, db_url: str) -> None:
    insert_run(db_url, "dep-txt", "RUNNING")
    headers = {"X-Authorization": TOKEN, "Content-Type": "text/plain; charset=utf-8"}
    assert post(api, {"deploymentId": "dep-txt", "status": "RUN_COMPLETED"}, headers=headers).status_code == 200


@pytest.mark.parametrize("body", [b"hola", b"[1, 2]", b'"texto"', b"\xff\xfe"])
def test_text_plain_that_is_not_a_json_object_is_an_unsupported_type(api: TestClient, body: bytes) -> None:
    """SPEC 2.1 takes text/plain only when it parses as a JSON object; anything else is 415, not 400."""
    headers = {"X-Authorization": TOKEN, "Content-Type": "text/plain"}
    answer = post(api, body, headers=headers)
    assert answer.status_code == 415 and answer.json()["code"] == "unsupported_media_type"


def test_text_plain_object_with_bad_fields_is_still_a_400_with_details(api: TestClient) -> None:
    headers = {"X-Authorization": TOKEN, "Content-Type": "text/plain"}
    answer = post(api, {"deploymentId": "dep-txt-400"}, headers=headers)
    assert answer.status_code == 400 and answer.json()["details"][0]["field"] == "status"


def test_charset_parameter_is_accepted(api: TestClient, db_url: str) -> None:
    insert_run(db_url, "dep-cs", "RUNNING")
    headers = {"X-Authorization": TOKEN, "Content-Type": "application/json; charset=UTF-8"}
    assert post(api, {"deploymentId": "dep-cs", "status": "RUN_COMPLETED"}, headers=headers).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "body"),
        (b"[1, 2]", "body"),
        (b'"text"', "body"),
        (b"", "body"),
        (b'{"status": "RUN_COMPLETED"}', "deploymentId"),
        (b'{"deploymentId": "x"}', "status"),
        (b'{"deploymentId": "   ", "status": "RUN_COMPLETED"}', "deploymentId"),
        (b'{"deploymentId": "' + b"x" * 51 + b'", "status": "RUN_COMPLETED"}', "deploymentId"),
        (b'{"deploymentId": "x", "status": "' + b"S" * 21 + b'"}', "status"),
        (b'{"deploymentId": 12, "status": "RUN_COMPLETED"}', "deploymentId"),
        (b'{"deploymentId": "x", "status": "RUN_COMPLETED", "userId": 1.5}', "userId"),
        (b'{"deploymentId": "x", "status": "RUN_COMPLETED", "botOutput": [1]}', "botOutput"),
        (b'{"deploymentId": "x", "status": ""}', "status"),
    ],
)
def test_invalid_payload_is_400_with_details(api: TestClient, body: bytes, field: str) -> None:
    answer = post(api, body)
    assert answer.status_code == 400
    envelope = answer.json()
    assert envelope["status"] == "ERROR" and envelope["code"] == "invalid_payload"
    assert any(detail["field"] == field for detail in envelope["details"]), envelope


def test_wrong_content_type_is_415(api: TestClient) -> None:
    headers = {"X-Authorization": TOKEN, "Content-Type": "application/x-www-form-urlencoded"}
    answer = post(api, b"deploymentId=x&status=RUN_COMPLETED", headers=headers)
    assert answer.status_code == 415 and answer.json()["code"] == "unsupported_media_type"


def test_body_over_the_limit_is_413(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(max_body_bytes=2048))) as api:
        body = json.dumps({"deploymentId": "x", "status": "RUN_COMPLETED", "pad": "p" * 4096}).encode()
        answer = post(api, body)
        assert answer.status_code == 413 and answer.json()["code"] == "payload_too_large"


def test_missing_credentials_is_401_not_400(api: TestClient) -> None:
    answer = api.post("/api/callback", content=b"{}", headers={"Content-Type": "application/json"})
    assert answer.status_code == 401
    assert answer.json()["code"] == "unauthorized" and "www-authenticate" in answer.headers


def test_other_methods_get_405_with_allow(api: TestClient) -> None:
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        answer = api.request(method, "/api/callback")
        assert answer.status_code == 405 and answer.headers["allow"] == "POST"
        assert answer.json()["code"] == "method_not_allowed"


def test_the_built_in_routes_405_lists_head_too(api: TestClient) -> None:
    """HEAD works wherever GET does (load balancers probe with it): Allow says so."""
    for path in ("/health", "/ready", "/metrics", "/panel"):
        answer = api.post(path)
        assert answer.status_code == 405 and answer.json()["code"] == "method_not_allowed"
        assert answer.headers["allow"] == "GET, HEAD", path
        assert api.head(path).status_code != 405, path


def test_the_callback_path_takes_one_trailing_slash_and_no_more(api: TestClient) -> None:
    body = {"deploymentId": "dep-barra", "status": "RUN_COMPLETED"}
    assert api.post("/api/callback/", json=body, headers=auth_headers()).json()["code"] == "pending_match"
    for path in ("/api/callback//", "/api/callback///", "//api/callback"):
        answer = api.post(path, json=body, headers=auth_headers())
        assert answer.status_code == 404 and answer.json()["code"] == "not_found", path


def test_json_is_utf8_whatever_charset_the_content_type_declares(api: TestClient) -> None:
    """RFC 8259: a charset on application/json has no effect; a Latin-1 body gets a 400 that says why."""
    text = '{"deploymentId": "dep-ñandú", "status": "RUN_COMPLETED"}'
    headers = auth_headers() | {"Content-Type": "application/json; charset=ISO-8859-1"}
    answer = api.post("/api/callback", content=text.encode("utf-8"), headers=headers)
    assert answer.status_code == 202 and answer.json()["deploymentId"] == "dep-ñandú"
    refused = api.post("/api/callback", content=text.encode("latin-1"), headers=headers)
    assert refused.status_code == 400
    [detail] = refused.json()["details"]
    assert "charset=iso-8859-1" in detail["problem"] and "RFC 8259" in detail["problem"]


def test_unknown_path_is_404_envelope(api: TestClient) -> None:
    answer = api.get("/no/existe")
    assert answer.status_code == 404
    assert answer.json()["status"] == "ERROR" and answer.json()["code"] == "not_found" and answer.json()["request_id"]


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_head_works_wherever_get_does(api: TestClient, path: str) -> None:
    """Load balancers probe with HEAD: the GET's status and headers, no body."""
    answer = api.head(path)
    assert answer.status_code == 200 and answer.content == b"" and answer.headers["x-request-id"]


@pytest.mark.parametrize("path", ["/health/", "/ready/", "/panel/", "/docs/", "/openapi.json/"])
def test_a_trailing_slash_on_a_built_in_route_is_a_404_envelope_not_a_redirect(api: TestClient, path: str) -> None:
    answer = api.get(path, headers={"Host": "otro-servidor.example"}, follow_redirects=False)
    assert answer.status_code == 404 and "location" not in answer.headers
    assert answer.json()["code"] == "not_found"


def test_health_has_sams_shape(api: TestClient) -> None:
    answer = api.get("/health")
    assert answer.status_code == 200
    assert answer.json()["status"] == "OK" and answer.json()["message"]


def test_ready_reports_database_and_spool(api: TestClient) -> None:
    answer = api.get("/ready")
    assert answer.status_code == 200
    body = answer.json()
    assert body["database"]["reachable"] is True and body["spool"]["backlog"] == 0 and body["unmatched"] == 0


def test_docs_can_be_switched_off(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings())) as api:
        assert api.get("/docs").status_code == 200
        spec = api.get("/openapi.json").json()
        assert "/api/callback" in spec["paths"]
    with TestClient(create_app(make_settings(docs_enabled=False))) as api:
        assert api.get("/docs").status_code == 404
        assert api.get("/openapi.json").status_code == 404


def test_custom_endpoint_path(make_settings: Callable[..., Settings], tmp_path: Any) -> None:
    url = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    insert_run(url, "dep-path", "RUNNING")
    with TestClient(create_app(make_settings(endpoint_path="/a360/fin"))) as api:
        answer = api.post(
            "/a360/fin", content=b'{"deploymentId":"dep-path","status":"RUN_COMPLETED"}', headers=auth_headers()
        )
        assert answer.status_code == 200
        assert api.post("/api/callback", content=b"{}", headers=auth_headers()).status_code == 404


def test_database_unreachable_queues_then_restart_replays(
    make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    good_url = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    insert_run(good_url, "dep-q", "RUNNING")
    # A PostgreSQL URL on a port nobody listens on: connection refused at once.
    down = make_settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/nada")
    with TestClient(create_app(down)) as api:
        answer = post(api, {"deploymentId": "dep-q", "status": "RUN_COMPLETED"})
        assert answer.status_code == 202 and answer.json()["code"] == "queued"
        ready = api.get("/ready")
        assert ready.status_code == 503 and ready.json()["spool"]["queued"] == 1
    assert fetch_run(good_url, "dep-q")["Estado"] == "RUNNING"  # type: ignore[index]
    with TestClient(create_app(make_settings(database_url=good_url))) as api:
        wait_for(
            lambda: fetch_run(good_url, "dep-q")["Estado"] == "RUN_COMPLETED", what="spool reaplicado tras reiniciar"
        )  # type: ignore[index]
        wait_for(lambda: api.get("/ready").json()["spool"]["backlog"] == 0, what="spool vacío")


def test_unmatched_after_the_window_stays_listed(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(match_window_seconds=0))) as api:
        assert post(api, {"deploymentId": "nunca", "status": "RUN_COMPLETED"}).json()["code"] == "pending_match"
        wait_for(lambda: api.get("/ready").json()["unmatched"] == 1, what="no emparejado listado")
        assert api.get("/ready").json()["spool"]["backlog"] == 0


def test_upper_casing_never_makes_the_status_longer(api: TestClient, db_url: str) -> None:
    insert_run(db_url, "dep-ss", "RUNNING")
    status = "straße" + "x" * 14  # 20 characters; "ß".upper() would be "SS"
    answer = post(api, {"deploymentId": "dep-ss", "status": status})
    assert answer.status_code == 200, answer.text
    assert fetch_run(db_url, "dep-ss")["Estado"] == "STRAßE" + "X" * 14  # type: ignore[index]


def test_deployment_id_of_50_characters_is_recorded_and_51_is_refused(api: TestClient, db_url: str) -> None:
    """DeploymentId is nvarchar(50): the longest id fits, one more character is a 400 in Spanish."""
    longest = "d" * 50
    insert_run(db_url, longest, "RUNNING")
    answer = post(api, {"deploymentId": f"  {longest}  ", "status": "RUN_COMPLETED"})
    assert answer.status_code == 200 and answer.json()["deploymentId"] == longest
    assert fetch_run(db_url, longest)["Estado"] == "RUN_COMPLETED"  # type: ignore[index]
    refused = post(api, {"deploymentId": "d" * 51, "status": "RUN_COMPLETED"})
    assert refused.status_code == 400 and refused.json()["code"] == "invalid_payload"
    assert refused.json()["details"] == [
        {
            "field": "deploymentId",
            "problem": "debe tener entre 1 y 50 caracteres (la columna DeploymentId es nvarchar(50))",
        }
    ]
    assert api.get("/ready").json()["spool"]["backlog"] == 0


def test_400_details_name_every_broken_field_at_once(api: TestClient) -> None:
    """A type error in one field does not hide the length of another; a fractional id says what is allowed."""
    both = post(api, {"deploymentId": "d" * 60, "status": 7}).json()
    assert [detail["field"] for detail in both["details"]] == ["deploymentId", "status"]
    fraction = post(api, {"deploymentId": "d" * 60, "status": "RUN_COMPLETED", "deviceId": 1.5}).json()
    assert fraction["details"] == [
        {
            "field": "deploymentId",
            "problem": "debe tener entre 1 y 50 caracteres (la columna DeploymentId es nvarchar(50))",
        },
        {"field": "deviceId", "problem": "debe ser un número entero o una cadena"},
    ]


def test_openapi_states_the_50_character_bound(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()["components"]["schemas"]["CallbackPayload"]["properties"]["deploymentId"]
    assert "1..50" in schema["description"] and "{0,48}" in schema["pattern"]


def _callback_lines(settings: Settings) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in settings.log_file.read_text(encoding="utf-8").splitlines()]
    return [entry for entry in entries if entry["message"].startswith("callback ")]


def test_400_log_line_names_the_readable_deployment_id_and_status(make_settings: Callable[..., Settings]) -> None:
    """An operator finds a refused callback in the log by its run (SPEC 6), never a forged line."""
    settings = make_settings(log_format="json")
    bodies = {
        "req-long": {"deploymentId": "L" * 51, "status": "run_completed"},
        "req-bad-status": {"deploymentId": "dep-400", "status": "S" * 21},
        "req-no-status": {"deploymentId": "dep-sin-estado"},
        "req-numeric-id": {"deploymentId": 12, "status": "RUN_FAILED"},
        "req-newline": {"deploymentId": "dep\nFALSO resultado=updated", "status": "RUN_FAILED"},
    }
    with TestClient(create_app(settings)) as api:
        for request_id, body in bodies.items():
            answer = api.post(
                "/api/callback",
                content=json.dumps(body).encode(),
                headers=auth_headers() | {"X-Request-ID": request_id},
            )
            assert answer.status_code == 400
    lines = {entry["request_id"]: entry for entry in _callback_lines(settings)}
    assert all(lines[request_id]["result"] == "invalid_payload" for request_id in bodies)
    assert (lines["req-long"]["deploymentId"], lines["req-long"]["status"]) == ("L" * 51, "RUN_COMPLETED")
    assert (lines["req-bad-status"]["deploymentId"], lines["req-bad-status"]["status"]) == ("dep-400", "S" * 21)
    assert (lines["req-no-status"]["deploymentId"], lines["req-no-status"]["status"]) == ("dep-sin-estado", None)
    assert (lines["req-numeric-id"]["deploymentId"], lines["req-numeric-id"]["status"]) == (None, "RUN_FAILED")
    assert lines["req-newline"]["deploymentId"] == "dep\\u000aFALSO resultado=updated"


def test_400_text_log_line_carries_the_id_on_one_line(settings: Settings) -> None:
    with TestClient(create_app(settings)) as api:
        body = b'{"deploymentId": "dep-texto\\r\\nfalsa", "status": "RUN_COMPLETED", "status": "x"}'
        assert post(api, body).status_code == 400
    line = next(
        line for line in settings.log_file.read_text(encoding="utf-8").splitlines() if "callback cliente=" in line
    )
    assert "deploymentId=dep-texto\\u000d\\u000afalsa estado=X resultado=invalid_payload" in line
