"""Secrets (issue 4 item 7) and start-up configuration: nothing secret is ever written or answered."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests import utils
from tests.utils import TOKEN, Keys, ServerProcess, wait_for

CLIENT_ID = "client-id-secreto-" + uuid.uuid4().hex
BODY = b'{"deploymentId":"secretos","status":"RUN_COMPLETED"}'


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m sam.callback ARGS` with only these settings."""
    values = utils.isolated_env(tmp_path)
    return utils.run_cli(tmp_path, *args, **(values | env))


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_token_or_jwt_reaches_logs_console_or_answers(
    server_factory: Callable[..., ServerProcess], keys: Keys, other_keys: Keys, tmp_path: Path, log_format: str
) -> None:
    """Right and wrong credentials of every kind go in; none of them comes out anywhere."""
    server = server_factory(
        JWT_PUBLIC_KEY=keys.public_pem,
        API_GATEWAY_CLIENT_ID=CLIENT_ID,
        CALLBACK_AUTH_FAILURES_LIMIT="5",
        LOG_LEVEL="DEBUG",
        LOG_FORMAT=log_format,
    ).start()
    wrong_tokens = [f"token-equivocado-{uuid.uuid4().hex}" for _ in range(8)]
    jwts = {
        "valid": keys.token(client_id=CLIENT_ID),
        "forged": other_keys.token(client_id=CLIENT_ID),
        "expired": keys.token(expires_in=-3600),
        "wrong_client": keys.token(client_id="otro-cliente-" + uuid.uuid4().hex),
    }
    secrets = [TOKEN, CLIENT_ID, *wrong_tokens, *jwts.values()]
    # Each JWT's signature alone is secret enough: a log that cut the token short must not keep it.
    secrets += [token.rsplit(".", 1)[1] for token in jwts.values()]
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=server.base_url, timeout=10) as client:

        def post(headers: dict[str, str], body: bytes = BODY) -> None:
            answers.append(
                client.post("/api/callback", content=body, headers={"Content-Type": "application/json"} | headers)
            )

        post({"X-Authorization": TOKEN})
        post({"X-Authorization": TOKEN}, b'{"deploymentId": 5}')  # 400 with details
        for wrong in wrong_tokens:  # past the limit these become 429s
            post({"X-Authorization": wrong})
        for token in jwts.values():
            post({"Authorization": f"Bearer {token}", "x-ibm-client-id": CLIENT_ID})
            post({"Authorization": f"Bearer {token}", "x-ibm-client-id": "mal-" + uuid.uuid4().hex})
            post({"Authorization": f"Bearer {token}", "X-Authorization": wrong_tokens[0], "x-ibm-client-id": CLIENT_ID})
        post({"X-Authorization": TOKEN, "Authorization": f"Bearer {jwts['forged']}", "x-ibm-client-id": CLIENT_ID})
        # A credential sent as the request id: never the id of the lines, mails or answer.
        post({"X-Authorization": TOKEN, "X-Request-ID": TOKEN})
        post({"X-Authorization": TOKEN, "X-Request-ID": CLIENT_ID})
        # A credential in the body: its own answer echoes what the caller sent; no log keeps it.
        echoed = client.post(
            "/api/callback",
            content=json.dumps({"deploymentId": TOKEN, "status": "RUN_FAILED"}).encode(),
            headers={"Content-Type": "application/json", "X-Authorization": TOKEN},
        )
        assert echoed.status_code == 202, echoed.text
        for path in ("/health", "/ready", "/metrics", "/no-existe"):
            answers.append(
                client.get(path, headers={"X-Authorization": TOKEN, "Authorization": f"Bearer {jwts['valid']}"})
            )
    statuses = {answer.status_code for answer in answers}
    assert {202, 400, 401, 429} <= statuses, statuses
    server.stop()
    log_files = list((tmp_path / "logs").iterdir())
    assert log_files
    written = {path.name: path.read_text(encoding="utf-8", errors="replace") for path in log_files}
    written["console"] = server.console()
    assert "Autenticación fallida" in written["console"]
    assert "X-Request-ID con forma de credencial" in written["console"]
    for answer in answers:
        written[f"{answer.request.method} {answer.request.url.path} {answer.status_code}"] = (
            answer.text + "\n" + "\n".join(f"{name}: {value}" for name, value in answer.headers.items())
        )
    for where, text in written.items():
        for secret in secrets:
            assert secret not in text, f"un secreto aparece en {where}"


def test_check_warns_about_short_tokens_and_mode_none(tmp_path: Path) -> None:
    """`sam-callback check` warns, without printing the token, and still succeeds."""
    short = "corto-" + uuid.uuid4().hex[:8]
    result = run_cli(tmp_path, "check", CALLBACK_TOKEN=TOKEN, CALLBACK_TOKENS_ANTERIORES=short)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[AVISO] CALLBACK_TOKENS_ANTERIORES n.º 1" in output
    assert "32" in output
    assert "[AVISO] CALLBACK_TOKEN " not in output  # the long token is fine
    assert short not in output and TOKEN not in output

    result = run_cli(tmp_path, "check", CALLBACK_AUTH_MODE="none")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[AVISO] CALLBACK_AUTH_MODE=none" in output


def test_mode_none_warns_at_start_and_on_ready(server_factory: Callable[..., ServerProcess]) -> None:
    """An open endpoint is never silent about it."""
    server = server_factory(CALLBACK_AUTH_MODE="none").start()
    ready = httpx.get(server.base_url + "/ready", timeout=10).json()
    assert any("CALLBACK_AUTH_MODE=none" in warning for warning in ready["warnings"])
    wait_for(lambda: "CALLBACK_AUTH_MODE=none" in server.console(), what="aviso de modo none en el log")


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CALLBACK_TOKEN": TOKEN, "JWT_ALGORITHMS": "HS256"}, "JWT_ALGORITHMS"),
        ({"CALLBACK_TOKEN": TOKEN, "JWT_ALGORITHMS": "RS256,none"}, "JWT_ALGORITHMS"),
        ({"CALLBACK_AUTH_MODE": "strict"}, "CALLBACK_AUTH_MODE=required"),
        ({"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnada\n-----END PUBLIC KEY-----"}, "JWT_PUBLIC_KEY"),
        (
            {
                "JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnada\n-----END PUBLIC KEY-----",
                "CALLBACK_SERVER_WORKERS": "2",
            },
            "JWT_PUBLIC_KEY",
        ),
        ({"JWT_PUBLIC_KEY": '{"keys": [{"kty": "oct", "k": "c2VjcmV0bw"}]}'}, "JWT_PUBLIC_KEY"),
        ({"CALLBACK_TOKEN": TOKEN, "CALLBACK_SERVER_PORT": "no-es-un-puerto"}, "CALLBACK_SERVER_PORT"),
        (
            {
                "CALLBACK_TOKEN": TOKEN,
                "SQL_SAM_PWD": "contraseña-secreta-1234",
                "CALLBACK_MAX_BODY_BYTES": "contraseña-secreta-1234",
            },
            "CALLBACK_MAX_BODY_BYTES",
        ),
    ],
)
def test_bad_security_config_exits_2_without_secrets(tmp_path: Path, env: dict[str, str], needle: str) -> None:
    """One readable line per problem, exit code 2, no traceback, and no secret value echoed back."""
    result = run_cli(tmp_path, **env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert needle in result.stderr
    assert all(line.startswith("Error de configuración: ") for line in result.stderr.strip().splitlines()), output
    for secret in (TOKEN, "contraseña-secreta-1234", "c2VjcmV0bw"):
        assert secret not in output


def test_private_key_given_as_the_public_key_is_refused(tmp_path: Path, keys: Keys) -> None:
    """Pasting the gateway's private key stops the start, and its text is not echoed."""
    from cryptography.hazmat.primitives import serialization

    private_pem = keys.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    key_file = tmp_path / "gateway.pem"
    key_file.write_text(private_pem)
    for value in (private_pem, str(key_file)):
        result = run_cli(tmp_path, JWT_PUBLIC_KEY=value)
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert "clave privada" in output
        assert private_pem.splitlines()[1] not in output


@pytest.mark.parametrize("password", ["sencilla-123456", "p@ss w0rd!{x}", "{a}};PWD=b}", "x;Password=y"])
def test_sql_server_password_is_hidden_wherever_the_url_is_shown(password: str) -> None:
    """The ODBC connection string carries SQL_SAM_PWD url-encoded: hide_password alone would show it."""
    from urllib.parse import quote_plus

    from sam.callback.repository import display_url
    from sam.callback.settings import Settings, mssql_url

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, token=TOKEN, sql_host="sql.example", sql_db_name="SAM", sql_uid="sam", sql_pwd=password
    )
    shown = display_url(mssql_url(settings))
    assert "sql.example" in shown
    for fragment in {password, quote_plus(password), quote_plus(password.replace("}", "}}"))} | set(
        password.split(";")
    ):
        if len(fragment) > 3:
            assert fragment not in shown, shown
    assert "PWD%3D%2A%2A%2A" in shown


def test_check_does_not_print_the_database_password(tmp_path: Path, pg_server: str) -> None:
    """`sam-callback check` names the database it reached, without its password."""
    url = pg_server.replace("postgresql+psycopg://postgres@", "postgresql+psycopg://postgres:clave-bd-secreta@")
    result = run_cli(tmp_path, "check", CALLBACK_TOKEN=TOKEN, SAM_DATABASE_URL=url)
    output = result.stdout + result.stderr
    assert "127.0.0.1" in output
    assert "clave-bd-secreta" not in output
