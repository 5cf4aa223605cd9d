"""Smoke-test callbacks (deploymentId `sam-callback-prueba-...`): checked like any callback, never recorded."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import sqlalchemy as sa
from fastapi.testclient import TestClient

from sam.callback.app import create_app
from sam.callback.repository import ejecuciones, make_engine
from sam.callback.settings import Settings
from tests.utils import TOKEN, ServerProcess, auth_headers, fetch_run, insert_run, run_cli

PROBE = "sam-callback-prueba-0123456789abcdef"
MESSAGE = "Callback de prueba recibido: autenticación y validación correctas; no se registra nada"


def _rows(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(ejecuciones)).scalar_one())
    finally:
        engine.dispose()


def test_probe_is_answered_200_and_touches_neither_database_nor_spool(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(match_window_seconds=0, log_format="json")
    url = settings.resolved_database_url()
    insert_run(url, "otra-ejecucion", "RUNNING")
    with TestClient(create_app(settings)) as api:
        answer = api.post(
            "/api/callback",
            json={"deploymentId": PROBE, "status": "run_completed"},
            headers=auth_headers() | {"X-Request-ID": "req-probe"},
        )
        assert answer.status_code == 200
        assert answer.json() == {
            "status": "OK",
            "code": "probe",
            "message": MESSAGE,
            "request_id": "req-probe",
            "deploymentId": PROBE,
            "result": "probe",
        }
        ready = api.get("/ready").json()
        assert ready["spool"]["backlog"] == 0 and ready["unmatched"] == 0
        assert 'sam_callback_callbacks_total{result="probe",status="RUN_COMPLETED"} 1.0' in api.get("/metrics").text
    assert _rows(url) == 1 and fetch_run(url, PROBE) is None
    lines = [json.loads(line) for line in settings.log_file.read_text(encoding="utf-8").splitlines()]
    line = next(
        entry for entry in lines if entry.get("request_id") == "req-probe" and entry["message"].startswith("callback ")
    )
    assert line["result"] == "probe" and line["deploymentId"] == PROBE and line["status"] == "RUN_COMPLETED"


def test_probe_is_authenticated_and_validated_like_any_callback(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings())) as api:
        wrong = api.post(
            "/api/callback", json={"deploymentId": PROBE, "status": "X"}, headers=auth_headers("otro-token-x")
        )
        assert wrong.status_code == 401 and wrong.json()["code"] == "unauthorized"
        invalid = api.post("/api/callback", json={"deploymentId": PROBE, "status": "S" * 21}, headers=auth_headers())
        assert invalid.status_code == 400 and invalid.json()["code"] == "invalid_payload"
        too_long = api.post(
            "/api/callback", json={"deploymentId": PROBE + "x" * 20, "status": "X"}, headers=auth_headers()
        )
        assert too_long.status_code == 400


def test_probe_needs_no_database(make_settings: Callable[..., Settings]) -> None:
    """With the database down a probe still says that authentication and validation work, and queues nothing."""
    down = make_settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/nada")
    with TestClient(create_app(down)) as api:
        answer = api.post(
            "/api/callback", json={"deploymentId": PROBE, "status": "RUN_COMPLETED"}, headers=auth_headers()
        )
        assert answer.status_code == 200 and answer.json()["code"] == "probe"
        assert api.get("/ready").json()["spool"]["backlog"] == 0


def test_probe_code_is_documented_in_openapi(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/api/callback"]["post"]
    assert f"probe: {MESSAGE}" in operation["responses"]["200"]["description"]
    assert "sam-callback-prueba-" in operation["description"]


def _cli(cwd: Path, server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {name: server.env[name] for name in ("SAM_DATABASE_URL", "CALLBACK_SPOOL_PATH")}
    return run_cli(cwd, *args, CALLBACK_TOKEN=TOKEN, LOG_DIRECTORY=str(cwd / "cli-logs"), **env)


def test_send_without_deployment_id_leaves_nothing_behind(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The real CLI against a real server with no match window: nothing waits, nothing becomes unmatched."""
    server = server_factory(CALLBACK_MATCH_WINDOW_SECONDS="0").start()
    url = server.env["SAM_DATABASE_URL"]
    insert_run(url, "dep-real", "RUNNING")
    for mode in ("lanzador", "token"):
        sent = _cli(tmp_path, server, "send", "--url", server.callback_url, "--como", mode)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "HTTP 200" in sent.stdout and '"code": "probe"' in sent.stdout
        assert "no registrará nada" in sent.stdout and TOKEN not in sent.stdout + sent.stderr
    real = _cli(
        tmp_path, server, "send", "--url", server.callback_url, "--deployment-id", "dep-real", "--status", "RUN_FAILED"
    )
    assert real.returncode == 0 and '"code": "updated"' in real.stdout
    ready = httpx.get(server.base_url + "/ready", timeout=10).json()
    assert ready["spool"]["backlog"] == 0 and ready["unmatched"] == 0
    assert server.stop() == 0
    listing = _cli(tmp_path, server, "spool", "list", "--json")
    assert listing.returncode == 0 and json.loads(listing.stdout) == []
    assert _rows(url) == 1 and fetch_run(url, "dep-real")["Estado"] == "RUN_FAILED"  # type: ignore[index]
