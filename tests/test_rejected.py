"""Rejected callbacks (SPEC 10): authenticated 400/415 bodies are kept, bounded, and readable from the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from sam.callback.app import create_app
from sam.callback.rejected import RejectedStore
from sam.callback.settings import Settings
from tests.utils import OUR_PREFIXES, TOKEN, auth_headers, isolated_env, run_cli, run_cli_in_terminal


def _store(settings: Settings) -> RejectedStore:
    return RejectedStore(settings.spool_path, max_entries=settings.rejected_max)


def _kept_count(settings: Settings) -> int:
    store = _store(settings)
    try:
        return store.count()
    finally:
        store.close()


def test_an_authenticated_invalid_body_is_answered_and_kept_as_received(settings: Settings) -> None:
    body = b'{"deploymentId": "dep-400", "status": 7, "extra": "\xc3\xb1"}'
    with TestClient(create_app(settings)) as client:
        answer = client.post("/api/callback", content=body, headers=auth_headers() | {"X-Request-ID": "req-400"})
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_payload"
    store = _store(settings)
    try:
        [kept] = store.entries()
    finally:
        store.close()
    assert kept.body == body
    assert kept.code == "invalid_payload"
    assert kept.request_id == "req-400"
    assert kept.client == "testclient"
    assert "status" in kept.reason


def test_with_rejected_max_zero_nothing_is_kept_and_nothing_claims_it_was(
    make_settings: Callable[..., Settings],
) -> None:
    """CALLBACK_REJECTED_MAX=0 keeps no body (and drops those kept before); the log says so."""
    earlier = make_settings()
    with TestClient(create_app(earlier)) as client:
        assert client.post("/api/callback", content=b"[1]", headers=auth_headers()).status_code == 400
    assert _kept_count(earlier) == 1
    settings = make_settings(rejected_max=0)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/api/callback", content=b'{"deploymentId": "dep-0"}', headers=auth_headers())
    assert answer.status_code == 400
    assert _kept_count(settings) == 0
    log = settings.log_file.read_text(encoding="utf-8")
    assert "Callback rechazado NO guardado (CALLBACK_REJECTED_MAX=0" in log and "deploymentId=dep-0" in log
    assert "guardado n.º" not in log.split("NO guardado", 1)[1]


def test_an_unsupported_content_type_is_answered_415_and_kept(settings: Settings) -> None:
    body = b"<callback><deploymentId>dep-xml</deploymentId></callback>"
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/api/callback", content=body, headers={"X-Authorization": TOKEN, "Content-Type": "application/xml"}
        )
    assert answer.status_code == 415
    store = _store(settings)
    try:
        [kept] = store.entries()
    finally:
        store.close()
    assert kept.body == body
    assert kept.code == "unsupported_media_type"
    assert kept.content_type == "application/xml"


def test_bodies_of_unauthenticated_requests_are_never_kept(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        for headers in ({"Content-Type": "application/json"}, auth_headers("otro-token-que-no-es-el-bueno")):
            answer = client.post("/api/callback", content=b"not json at all", headers=headers)
            assert answer.status_code == 401
        answer = client.post("/api/callback", content=b"<x/>", headers={"Content-Type": "application/xml"})
        assert answer.status_code == 401
    assert _kept_count(settings) == 0


def test_mode_none_keeps_rejected_bodies_too(make_settings: Callable[..., Settings]) -> None:
    """Mode none lets every request through authentication: its rejected bodies are as valuable, and bounded."""
    settings = make_settings(auth_mode="none", token=None, rejected_max=1)
    with TestClient(create_app(settings)) as client:
        assert client.post("/api/callback", content=b'["no es un objeto"]').status_code == 400
        answer = client.post("/api/callback", content=b"<x/>", headers={"Content-Type": "application/xml"})
        assert answer.status_code == 415
    assert _kept_count(settings) == 1


def test_only_the_newest_rejected_max_are_kept(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(rejected_max=3)
    with TestClient(create_app(settings)) as client:
        for number in range(5):
            answer = client.post("/api/callback", content=f'["cuerpo {number}"]'.encode(), headers=auth_headers())
            assert answer.status_code == 400
    store = _store(settings)
    try:
        kept = store.entries()
    finally:
        store.close()
    assert [entry.body for entry in kept] == [f'["cuerpo {n}"]'.encode() for n in (2, 3, 4)]


def _keep_one(env: dict[str, str], **entry: Any) -> int:
    """Store one rejected callback where the CLI of `env` looks; return its number."""
    store = RejectedStore(Path(env["CALLBACK_SPOOL_PATH"]), max_entries=10)
    try:
        fields = {"client": "10.1.2.3", "code": "invalid_payload"} | entry
        seq = store.add(**fields)
        assert seq is not None
        return seq
    finally:
        store.close()


def test_the_cli_lists_shows_and_purges_rejected_callbacks(tmp_path: Path) -> None:
    env = isolated_env(tmp_path) | {"CALLBACK_TOKEN": TOKEN}
    seq = _keep_one(
        env,
        body=b'{"deploymentId": "dep-cli", "status": ""}',
        request_id="req-cli",
        reason="status: debe tener entre 1 y 20 caracteres",
        content_type="application/json",
        deployment_id="dep-cli",
    )

    listed = run_cli(tmp_path, "spool", "list", "--rejected", **env)
    assert listed.returncode == 0, listed.stderr
    assert "dep-cli" in listed.stdout and "10.1.2.3" in listed.stdout and "req-cli" in listed.stdout

    as_json = run_cli(tmp_path, "spool", "list", "--rejected", "--json", **env)
    assert json.loads(as_json.stdout)[0]["body"] == '{"deploymentId": "dep-cli", "status": ""}'

    shown = run_cli(tmp_path, "spool", "show", str(seq), **env)
    assert shown.returncode == 0, shown.stderr
    assert '{"deploymentId": "dep-cli", "status": ""}' in shown.stdout
    assert "status: debe tener entre 1 y 20 caracteres" in shown.stdout

    missing = run_cli(tmp_path, "spool", "show", "999", **env)
    assert missing.returncode == 1 and "999" in missing.stderr

    code, screen = run_cli_in_terminal(tmp_path, "spool", "purge", "--rejected", answer="no", **env)
    assert code == 1 and "callbacks rechazados guardados" in screen and "No se ha borrado nada" in screen
    assert "dep-cli" in run_cli(tmp_path, "spool", "list", "--rejected", **env).stdout
    purged = run_cli(tmp_path, "spool", "purge", "--rejected", **env)  # as SPEC 10 names it
    assert purged.returncode == 0 and "1 callbacks rechazados borrados" in purged.stdout
    assert "dep-cli" not in run_cli(tmp_path, "spool", "list", "--rejected", **env).stdout


def test_spool_show_prints_terminal_escapes_as_text(tmp_path: Path) -> None:
    """A body with an escape sequence (it would recolour or rewrite the operator's terminal) is shown, not obeyed."""
    env = isolated_env(tmp_path) | {"CALLBACK_TOKEN": TOKEN}
    seq = _keep_one(
        env,
        body=b'["\x1b[2J\x1b]0;pwned\x07", "\r"]',
        request_id="req-esc",
        reason="body: el cuerpo debe ser un objeto JSON",
        content_type="text/plain\x1b[31m",
        deployment_id=None,
    )
    shown = run_cli(tmp_path, "spool", "show", str(seq), **env)
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout and "\r" not in shown.stdout
    assert '["\\u001b[2J\\u001b]0;pwned\\u0007", "\\u000d"]' in shown.stdout
    assert "text/plain\\u001b[31m" in shown.stdout


def test_a_reader_that_goes_away_leaves_no_traceback(tmp_path: Path) -> None:
    """`sam-callback spool list --rejected --json | head -1`: the pipe closes early, the command ends quietly."""
    env = isolated_env(tmp_path) | {"CALLBACK_TOKEN": TOKEN}
    store = RejectedStore(Path(env["CALLBACK_SPOOL_PATH"]), max_entries=500)
    try:
        for number in range(300):
            store.add(
                body=b"x" * 2000, request_id=f"req-{number}", client="10.1.2.3", code="invalid_payload",
                reason="body: el cuerpo no es JSON válido", content_type="application/json", deployment_id=None,
            )  # fmt: skip
    finally:
        store.close()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(OUR_PREFIXES)}
    command = [sys.executable, "-m", "sam.callback", "spool", "list", "--rejected", "--json"]
    with subprocess.Popen(
        command, cwd=tmp_path, env=clean | env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.readline()
        process.stdout.close()  # as `head -1` does
        errors = process.stderr.read().decode("utf-8", "replace")
        process.wait(timeout=60)
    assert "Traceback" not in errors and "BrokenPipeError" not in errors
