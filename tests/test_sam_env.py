"""SAM's own `.env` files (v1.17.0 and the release before its renaming) start the real service unchanged."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote_plus

import httpx
import pytest

from sam.callback.settings import Settings
from tests.utils import OUR_PREFIXES, Keys, ServerProcess, free_port, insert_run, run_cli, wait_for

# Our own copies of the shapes of SAM's `.env.example` files: the same variable names, quoting
# and layouts (a %-style LOG_FORMATO, a braced driver, a placeholder JWT key, APIGW_CLIENT_ID
# twice, the other services' lines), with values of our own.
CURRENT_TOKEN = "fixture-token-current-9f1c2b7e4d"
SAM_ENV_CURRENT = f"""# ===== CONFIGURACIÓN GENERAL SAM =====
LOG_DIRECTORIO=C:/RPA/Logs/SAM
LOG_NIVEL=INFO
LOG_FORMATO=%(asctime)s - PID:%(process)d - %(levelname)s - %(name)s - %(funcName)s - %(message)s
LOG_FECHA_FORMATO=%d-%m-%Y %H:%M:%S
LOG_BACKUP_CANTIDAD=5

LOG_ARCHIVO_LANZADOR=fixture_lanzador.log
LOG_ARCHIVO_BALANCEADOR=fixture_balanceador.log
LOG_ARCHIVO_CALLBACK=fixture_callback.log
LOG_ARCHIVO_INTERFAZ_WEB=fixture_web.log

SQL_SAM_DRIVER={{ODBC Driver 17 for SQL Server}}
SQL_SAM_HOST=10.20.30.40
SQL_SAM_BD_NOMBRE=SAM_FIXTURE
SQL_SAM_USUARIO=fixture_user
SQL_SAM_PASSWORD=fixture-pass-Zq81
SQL_SAM_CONEXION_TIMEOUT_SEG=45
SQL_SAM_QUERY_REINTENTOS_MAX=2
SQL_SAM_QUERY_SQLSTATE_REINTENTABLES=40001,HYT00
SQL_SAM_POOL_TAMANO=4

SQL_RPA360_DRIVER={{ODBC Driver 17 for SQL Server}}
SQL_RPA360_HOST=10.20.30.41
SQL_RPA360_BD_NOMBRE=RPA_FIXTURE

AA_URL=https://cr.fixture.invalid
AA_API_KEY=fixture-aa-key
AA_CALLBACK_URL="https://cb.fixture.invalid/api/callback"

CALLBACK_HOST=0.0.0.0
CALLBACK_PUERTO=8008
CALLBACK_THREADS=4
CALLBACK_ENDPOINT=/api/callback
CALLBACK_TOKEN={CURRENT_TOKEN}
CALLBACK_AUTH_MODO=optional
CALLBACK_HOST_PUBLICO=

EMAIL_SMTP_HOST=smtp.fixture.invalid
EMAIL_DESTINATARIOS=a@fixture.invalid;b@fixture.invalid
EMAIL_USUARIO=
EMAIL_PASSWORD=

LANZADOR_CICLO_INTERVALO_SEG=20
LANZADOR_CONCILIACION_INFERENCIA_MENSAJE="Finalizado (fixture)"
LANZADOR_ROBOT_PARAMETROS_JSON={{}}
ROBOTS_MAPA_JSON={{"FIXTURE_A": "RobotA", "FIXTURE_B": "RobotB"}}

APIGW_URL=https://gw.fixture.invalid/token
APIGW_CLIENT_ID=fixture-gw-client
APIGW_CLIENT_SECRET=fixture-gw-secret

AUTH_HOST=0.0.0.0
AUTH_PUERTO=5001
APIGW_CLIENT_ID=fixture-auth-client
APIGW_CLIENT_SECRET=fixture-auth-secret

JWT_CLAVE_PUBLICA="placeholder_fixture_key"
JWT_CLAVE_PRIVADA="placeholder_fixture_private"

JWT_AUDIENCE="fixture-audience"
JWT_ISSUER="fixture-issuer"
"""

OLD_TOKEN = "fixture-token-old-names-3a7d5e"
SAM_ENV_BEFORE_RENAMING = f"""# ===== CONFIGURACIÓN GENERAL SAM =====
LOG_DIRECTORY=C:/RPA/Logs/SAM
LOG_LEVEL=INFO
LOG_FORMAT=%(asctime)s - PID:%(process)d - %(levelname)s - %(name)s - %(funcName)s - %(message)s
LOG_DATEFMT=%Y/%m/%d %H:%M:%S
LOG_BACKUP_COUNT=6

APP_LOG_FILENAME_LANZADOR=old_lanzador.log
APP_LOG_FILENAME_CALLBACK=old_callback.log

SQL_SAM_DRIVER={{ODBC Driver 17 for SQL Server}}
SQL_SAM_HOST=10.20.30.50
SQL_SAM_DB_NAME=SAM_OLD
SQL_SAM_UID=old_user
SQL_SAM_PWD=old-pass-Kp27
SQL_SAM_TIMEOUT_CONEXION_INICIAL=50
SQL_SAM_POOL_SIZE=4

AA_CR_URL=https://cr-old.fixture.invalid
AA_URL_CALLBACK="https://cb-old.fixture.invalid/api/callback"

CALLBACK_SERVER_HOST=0.0.0.0
CALLBACK_SERVER_PORT=8008
CALLBACK_SERVER_THREADS=4
CALLBACK_ENDPOINT_PATH=/api/callback
CALLBACK_TOKEN={OLD_TOKEN}
CALLBACK_AUTH_MODE=optional

EMAIL_SMTP_SERVER=smtp-old.fixture.invalid
EMAIL_DESTINATARIOS=c@fixture.invalid;d@fixture.invalid

MAPA_ROBOTS={{"KEY": "Robot"}}

API_GATEWAY_URL=https://gw-old.fixture.invalid/token
API_GATEWAY_CLIENT_ID=old-gw-client
API_GATEWAY_CLIENT_SECRET=old-gw-secret

AUTH_SERVER_HOST=0.0.0.0
APIGW_CLIENT_ID=old-auth-client
APIGW_CLIENT_SECRET=old-auth-secret

# Debe estar entre comillas si tiene saltos de línea.
JWT_PUBLIC_KEY="-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA...
-----END PUBLIC KEY-----"

JWT_PRIVATE_KEY="-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ...
-----END PRIVATE KEY-----"
JWT_AUDIENCE="fixture-audience"
JWT_ISSUER="fixture-issuer"
"""

# Two SAM .env files: (text, token, log file name, the SAM date format's shape).
FIXTURES = {
    "v1.17.0": (SAM_ENV_CURRENT, CURRENT_TOKEN, "fixture_callback.log", r"\d\d-\d\d-\d{4} \d\d:\d\d:\d\d"),
    "01b29a7": (SAM_ENV_BEFORE_RENAMING, OLD_TOKEN, "old_callback.log", r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d"),
}
SECRETS = ("fixture-pass-Zq81", "old-pass-Kp27", "fixture-auth-client", "old-auth-client", "old-gw-client")


def _clean_environment() -> dict[str, str]:
    prefixes = (*OUR_PREFIXES, "APIGW_", "EMAIL_", "AA_")
    return {name: value for name, value in os.environ.items() if not name.startswith(prefixes)}


@pytest.fixture
def sam_service(tmp_path: Path) -> Iterator[Callable[..., tuple[ServerProcess, Path]]]:
    """The real service started in a folder holding one of SAM's .env files (plus `extra` variables)."""
    servers: list[ServerProcess] = []

    def start(name: str, **extra: str) -> tuple[ServerProcess, Path]:
        (tmp_path / ".env").write_text(FIXTURES[name][0], encoding="utf-8")
        port = free_port()
        # The environment wins over .env: a free port, a local address, a log folder this
        # machine has (C:/RPA/Logs/SAM is SAM's Windows default), and SQLite instead of the
        # fixture's SQL Server (SAM_DATABASE_URL wins over SQL_SAM_*).
        env = (
            _clean_environment()
            | {
                "CALLBACK_PUERTO": str(port),
                "CALLBACK_SERVER_PORT": str(port),
                "CALLBACK_HOST": "127.0.0.1",
                "CALLBACK_SERVER_HOST": "127.0.0.1",
                "LOG_DIRECTORIO": str(tmp_path / "logs"),
                "LOG_DIRECTORY": str(tmp_path / "logs"),
                "SAM_DATABASE_URL": f"sqlite:///{(tmp_path / 'sam.db').as_posix()}",
                "CALLBACK_SPOOL_PATH": str(tmp_path / "spool.db"),
            }
            | extra
        )
        server = ServerProcess(env=env, cwd=tmp_path, port=port)
        servers.append(server)
        return server.start(), tmp_path

    yield start
    for server in servers:
        if server.process is not None and server.process.poll() is None:
            server.stop()


@pytest.mark.parametrize("release", sorted(FIXTURES))
def test_sam_env_file_starts_the_service_unchanged(
    sam_service: Callable[[str], tuple[ServerProcess, Path]], release: str
) -> None:
    """Serves /health, records a callback sent with the .env's token, logs in SAM's layout, warns of the key."""
    _, token, log_name, date_shape = FIXTURES[release]
    server, folder = sam_service(release)
    assert httpx.get(server.base_url + "/health", timeout=10).json()["status"] == "OK"

    database = f"sqlite:///{(folder / 'sam.db').as_posix()}"
    insert_run(database, "dep-sam-env-1")
    answer = httpx.post(
        server.callback_url,
        json={"deploymentId": "dep-sam-env-1", "status": "RUN_COMPLETED"},
        headers={"X-Authorization": token, "X-Request-ID": "req-sam-env-1"},
        timeout=10,
    )
    assert answer.status_code == 200 and answer.json()["code"] == "updated", answer.text
    refused = httpx.post(
        server.callback_url,
        json={"deploymentId": "dep-sam-env-2", "status": "RUN_COMPLETED"},
        headers={"Authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln"},
        timeout=10,
    )
    assert refused.status_code == 401

    ready = httpx.get(server.base_url + "/ready", timeout=10).json()
    assert any("JWT_CLAVE_PUBLICA" in warning for warning in ready["warnings"]), ready

    log_file = folder / "logs" / log_name
    sam_line = re.compile(rf"^{date_shape} - PID:\d+ - [A-Z]+ - [\w.]+ - \S+ - .*$")

    def callback_logged() -> bool:
        return log_file.exists() and "request_id=req-sam-env-1" in log_file.read_text(encoding="utf-8")

    wait_for(callback_logged, what="la línea del callback en el log de SAM")
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert all(sam_line.match(line) for line in lines), lines
    assert any(" - WARNING - " in line and "JWT_CLAVE_PUBLICA" in line for line in lines), lines
    # Under NSSM nobody runs `check`: the start-up log says which of two names won.
    names = (
        "APIGW_CLIENT_ID y API_GATEWAY_CLIENT_ID" if release == "01b29a7" else "APIGW_CLIENT_ID aparece varias veces"
    )
    assert any(" - WARNING - " in line and names in line for line in lines), lines
    output = log_file.read_text(encoding="utf-8") + server.console()
    assert token not in output and all(secret not in output for secret in SECRETS)


def test_unlock_with_the_client_id_the_launcher_before_the_renaming_sends(
    sam_service: Callable[..., tuple[ServerProcess, Path]], keys: Keys
) -> None:
    """SAM before the renaming sends API_GATEWAY_CLIENT_ID; its .env gives APIGW_CLIENT_ID to the auth server.

    With the gateway's real key in place of the placeholder, the web unlock (JWT and client id
    only) is accepted with the launcher's client id, and with the one APIGW_CLIENT_ID names.
    """
    server, folder = sam_service("01b29a7", JWT_PUBLIC_KEY=keys.public_pem)
    database = f"sqlite:///{(folder / 'sam.db').as_posix()}"
    jwt = keys.token(aud="fixture-audience", iss="fixture-issuer")
    for number, (client_id, expected) in enumerate(
        [("old-gw-client", 200), ("old-auth-client", 200), ("otro-cliente", 401), (None, 401)]
    ):
        deployment_id = f"dep-unlock-{number}"
        insert_run(database, deployment_id)
        headers = {"Authorization": f"Bearer {jwt}"} | ({"x-ibm-client-id": client_id} if client_id else {})
        answer = httpx.post(
            server.callback_url, json={"deploymentId": deployment_id, "status": "RUN_ABORTED"}, headers=headers
        )
        assert answer.status_code == expected, (client_id, answer.text)
    # A client_id claim names the same client as the header, not just any configured one.
    insert_run(database, "dep-unlock-mixto")
    mixed = keys.token(aud="fixture-audience", iss="fixture-issuer", client_id="old-auth-client")
    answer = httpx.post(
        server.callback_url,
        json={"deploymentId": "dep-unlock-mixto", "status": "RUN_ABORTED"},
        headers={"Authorization": f"Bearer {mixed}", "x-ibm-client-id": "old-gw-client"},
    )
    assert answer.status_code == 401


@pytest.mark.parametrize("release", sorted(FIXTURES))
def test_check_with_sam_env_file(tmp_path: Path, release: str) -> None:
    """`check` warns about the key and names disagreeing new/old names, never their values."""
    (tmp_path / ".env").write_text(FIXTURES[release][0], encoding="utf-8")
    env = {
        "SAM_DATABASE_URL": f"sqlite:///{(tmp_path / 'sam.db').as_posix()}",
        "CALLBACK_SPOOL_PATH": str(tmp_path / "spool.db"),
        "LOG_DIRECTORIO": str(tmp_path / "logs"),
    }
    result = run_cli(tmp_path, "check", **env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^\[AVISO\] JWT_CLAVE_PUBLICA/JWT_PUBLIC_KEY: .*los JWT se rechazan", output, re.M), output
    if release == "01b29a7":
        # APIGW_CLIENT_ID (the auth server's, read first as SAM does) and API_GATEWAY_CLIENT_ID differ.
        assert "[AVISO] APIGW_CLIENT_ID y API_GATEWAY_CLIENT_ID tienen valores distintos" in output
    else:
        # SAM's current file sets APIGW_CLIENT_ID for the gateway and again for the auth server.
        assert "[AVISO] APIGW_CLIENT_ID aparece varias veces en .env con valores distintos" in output
    assert FIXTURES[release][1] not in output and all(secret not in output for secret in SECRETS)


def _check(folder: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`sam-callback check` in `folder`, with a token and SQLite files there, plus `env`."""
    return run_cli(
        folder,
        "check",
        CALLBACK_TOKEN="t" * 40,
        SAM_DATABASE_URL=f"sqlite:///{(folder / 'sam.db').as_posix()}",
        CALLBACK_SPOOL_PATH=str(folder / "spool.db"),
        **env,
    )


def test_check_warns_when_new_and_old_names_disagree(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CALLBACK_PUERTO=8010\nCALLBACK_SERVER_PORT=8011\nLOG_NIVEL=INFO\nLOG_LEVEL=info\n")
    result = _check(tmp_path, CALLBACK_AUTH_MODO="optional", CALLBACK_AUTH_MODE="required")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[AVISO] CALLBACK_PUERTO y CALLBACK_SERVER_PORT tienen valores distintos: se usa CALLBACK_PUERTO" in output
    assert "[AVISO] CALLBACK_AUTH_MODO y CALLBACK_AUTH_MODE tienen valores distintos" in output
    assert "LOG_NIVEL y LOG_LEVEL" not in output  # same value, written differently only in case


@pytest.mark.parametrize("release", sorted(FIXTURES))
def test_sam_env_file_values_as_read(tmp_path: Path, release: str) -> None:
    """Without the test's overrides: SAM's log folder, and the SQL Server URL built from SQL_SAM_*."""
    env_file = tmp_path / ".env"
    env_file.write_text(FIXTURES[release][0], encoding="utf-8")
    settings = Settings(_env_file=env_file)
    assert settings.log_directory == Path("C:/RPA/Logs/SAM")
    assert settings.log_file.name == FIXTURES[release][2]
    assert settings.endpoint_path == "/api/callback" and settings.auth_mode == "optional"
    assert settings.tokens == [FIXTURES[release][1]]
    url = settings.resolved_database_url()
    odbc = unquote_plus(url.split("odbc_connect=", 1)[1])
    assert odbc.startswith("DRIVER={ODBC Driver 17 for SQL Server};"), odbc
    if release == "v1.17.0":
        assert "SERVER=10.20.30.40;DATABASE=SAM_FIXTURE;UID=fixture_user;" in odbc
        assert settings.sql_connect_timeout == 45 and settings.log_backup_count == 5
        assert settings.api_gateway_client_id == "fixture-auth-client"  # the later of the two lines, as dotenv reads it
    else:
        assert "SERVER=10.20.30.50;DATABASE=SAM_OLD;UID=old_user;" in odbc
        assert settings.sql_connect_timeout == 50 and settings.log_backup_count == 6
        assert settings.api_gateway_client_id == "old-auth-client"  # APIGW_CLIENT_ID first, as SAM reads it
        # ...but that release's launcher sends API_GATEWAY_CLIENT_ID: both are accepted.
        assert settings.gateway_client_ids == ("old-auth-client", "old-gw-client")


def test_check_names_sams_own_callback_env_file_which_is_not_read(tmp_path: Path) -> None:
    """SAM lays src/sam/callback/.env over its .env for its callback service; this service says it does not."""
    own = tmp_path / "src" / "sam" / "callback" / ".env"
    own.parent.mkdir(parents=True)
    own.write_text("CALLBACK_PUERTO=8010\n", encoding="utf-8")
    result = _check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"[AVISO] existe {own}" in result.stdout and "pase sus líneas al .env" in result.stdout


def test_strict_with_sams_placeholder_key_says_how_to_get_sams_behaviour(tmp_path: Path) -> None:
    """SAM's README recommends strict for its own service, where it means "check X-Authorization"."""
    result = run_cli(
        tmp_path,
        "serve",
        CALLBACK_TOKEN="t" * 40,
        CALLBACK_AUTH_MODO="strict",
        JWT_CLAVE_PUBLICA="placeholder_public_key",
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "JWT_CLAVE_PUBLICA" in line and "use CALLBACK_AUTH_MODO=optional" in line
