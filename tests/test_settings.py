"""Configuration of SPEC 5: names, aliases, `.env`, precedence, database choice, readable errors."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote_plus

import pytest

from sam.callback.settings import ConfigError, Settings, load_settings
from tests.utils import TOKEN, run_cli


def settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> Settings:
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = settings_from_env(monkeypatch, tmp_path, CALLBACK_TOKEN=TOKEN)
    assert (s.server_host, s.server_port, s.server_threads, s.server_workers) == ("0.0.0.0", 8008, 10, 1)  # noqa: S104
    assert s.endpoint_path == "/api/callback" and s.auth_mode == "optional"
    assert s.max_body_bytes == 1_048_576 and s.match_window_seconds == 86400 and s.auth_failures_limit == 30
    assert s.final_state_set == {
        "COMPLETED",
        "RUN_COMPLETED",
        "RUN_FAILED",
        "RUN_ABORTED",
        "RUN_TIMED_OUT",
        "DEPLOY_FAILED",
    }
    assert s.log_file == Path("./logs/sam_callback_server.log") and s.log_level == "INFO" and s.log_format == "text"
    assert s.log_backup_count == 30 and s.jwt_algorithm_list == ["RS256"] and s.jwt_leeway_seconds == 60
    assert s.spool_path == Path("./data/spool.db")
    assert s.resolved_database_url() == "sqlite:///data/sam.db"


@pytest.mark.parametrize(
    ("alias", "value", "attribute", "expected"),
    [
        ("CALLBACK_HOST", "127.0.0.2", "server_host", "127.0.0.2"),
        ("CALLBACK_PUERTO", "9001", "server_port", 9001),
        ("CALLBACK_THREADS", "4", "server_threads", 4),
        ("CALLBACK_ENDPOINT", "/cb", "endpoint_path", "/cb"),
        ("CALLBACK_AUTH_MODO", "strict", "auth_mode", "required"),
        ("SQL_SAM_BD_NOMBRE", "SAM", "sql_db_name", "SAM"),
        ("SQL_SAM_USUARIO", "sam_user", "sql_uid", "sam_user"),
        ("SQL_SAM_PASSWORD", "clave", "sql_pwd", "clave"),
        ("LOG_DIRECTORIO", "C:/RPA/Logs/SAM", "log_directory", Path("C:/RPA/Logs/SAM")),
        ("CALLBACK_LOG_FILENAME", "cb.log", "log_filename", "cb.log"),
        ("LOG_ARCHIVO_CALLBACK", "cb2.log", "log_filename", "cb2.log"),
    ],
)
def test_spanish_aliases(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, alias: str, value: str, attribute: str, expected: object
) -> None:
    s = settings_from_env(monkeypatch, tmp_path, CALLBACK_TOKEN=TOKEN, **{alias: value})
    assert getattr(s, attribute) == expected


def test_jwt_clave_publica_alias(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, keys: object) -> None:
    pem = keys.public_pem  # type: ignore[attr-defined]
    s = settings_from_env(monkeypatch, tmp_path, JWT_CLAVE_PUBLICA=pem)
    assert s.jwt_public_key == pem


def test_env_file_is_read_and_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"CALLBACK_TOKEN={TOKEN}\nCALLBACK_PUERTO=9100\nLOG_LEVEL=debug\n", encoding="utf-8")
    s = settings_from_env(monkeypatch, tmp_path, LOG_LEVEL="WARNING")
    assert s.tokens == [TOKEN] and s.server_port == 9100 and s.log_level == "WARNING"


def test_database_url_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = settings_from_env(
        monkeypatch,
        tmp_path,
        CALLBACK_TOKEN=TOKEN,
        SQL_SAM_HOST="sqlsrv01",
        SQL_SAM_DB_NAME="SAM",
        SQL_SAM_UID="u",
        SQL_SAM_PWD="p;w}d",
    )
    url = s.resolved_database_url()
    assert url.startswith("mssql+pyodbc:///?odbc_connect=")
    odbc = unquote_plus(url.split("=", 1)[1])
    assert "DRIVER={ODBC Driver 17 for SQL Server}" in odbc and "SERVER=sqlsrv01" in odbc and "DATABASE=SAM" in odbc
    assert "UID=u" in odbc and "PWD={p;w}}d}" in odbc  # braces quote ';' and '}' as ODBC requires
    assert "TrustServerCertificate=yes" in odbc and "Connection Timeout=30" in odbc
    monkeypatch.setenv("SAM_DATABASE_URL", "postgresql+psycopg://x@db/sam")
    assert load_settings().resolved_database_url() == "postgresql+psycopg://x@db/sam"


def test_windows_integrated_security_without_uid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = settings_from_env(
        monkeypatch,
        tmp_path,
        CALLBACK_TOKEN=TOKEN,
        SQL_SAM_HOST="sqlsrv01",
        SQL_SAM_DB_NAME="SAM",
        SQL_SAM_DRIVER="ODBC Driver 18 for SQL Server",
    )
    odbc = unquote_plus(s.resolved_database_url().split("=", 1)[1])
    assert "Trusted_Connection=yes" in odbc and "DRIVER={ODBC Driver 18 for SQL Server}" in odbc


def test_each_bad_value_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name, value in {
        "CALLBACK_SERVER_PORT": "ochenta",
        "CALLBACK_AUTH_MODE": "quizas",
        "LOG_FORMAT": "xml",
        "CALLBACK_TOKEN": TOKEN,
    }.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    problems = error.value.problems
    assert len(problems) == 3
    assert any(line.startswith("CALLBACK_SERVER_PORT:") for line in problems)
    assert any(line.startswith("CALLBACK_AUTH_MODE:") for line in problems)
    assert any(line.startswith("LOG_FORMAT:") for line in problems)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CALLBACK_SERVER_PORT": "x", "CALLBACK_TOKEN": TOKEN}, "CALLBACK_SERVER_PORT"),
        ({}, "CALLBACK_AUTH_MODE=optional"),
        ({"CALLBACK_AUTH_MODE": "required"}, "CALLBACK_AUTH_MODE=required"),
        ({"JWT_PUBLIC_KEY": "no-es-una-clave.pem"}, "JWT_PUBLIC_KEY"),
        ({"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"}, "JWT_PUBLIC_KEY"),
        ({"CALLBACK_TOKEN": TOKEN, "CALLBACK_ALLOWED_IPS": "10.0.0.0/33"}, "CALLBACK_ALLOWED_IPS"),
        ({"CALLBACK_TOKEN": TOKEN, "SAM_DATABASE_URL": "esto-no-es-una-url"}, "SAM_DATABASE_URL"),
    ],
)
def test_bad_start_up_config_exits_2_with_readable_lines(tmp_path: Path, env: dict[str, str], needle: str) -> None:
    result = run_cli(tmp_path, **env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert needle in result.stderr
    assert all(line.startswith("Error de configuración: ") for line in result.stderr.strip().splitlines())
