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
        ("CALLBACK_ENDPOINT", "api/callback", "endpoint_path", "/api/callback"),
        ("APIGW_CLIENT_ID", "cliente-gw", "api_gateway_client_id", "cliente-gw"),
        ("API_GATEWAY_CLIENT_ID", "cliente-gw", "api_gateway_client_id", "cliente-gw"),
        ("LOG_NIVEL", "debug", "log_level", "DEBUG"),
        ("LOG_NIVEL", "warn", "log_level", "WARNING"),  # logging's aliases, which SAM's services take
        ("LOG_NIVEL", "FATAL", "log_level", "CRITICAL"),
        ("LOG_BACKUP_CANTIDAD", "7", "log_backup_count", 7),
        ("LOG_FECHA_FORMATO", "%d/%m/%Y %H:%M", "log_date_format", "%d/%m/%Y %H:%M"),
        ("LOG_DATEFMT", "%d/%m/%Y", "log_date_format", "%d/%m/%Y"),
        ("SQL_SAM_CONEXION_TIMEOUT_SEG", "60", "sql_connect_timeout", 60),
        ("SQL_SAM_TIMEOUT_CONEXION_INICIAL", "45", "sql_connect_timeout", 45),
        ("SQL_SAM_DRIVER", "{ODBC Driver 17 for SQL Server}", "sql_driver", "ODBC Driver 17 for SQL Server"),
        ("APP_LOG_FILENAME_CALLBACK", "cb3.log", "log_filename", "cb3.log"),
        ("CALLBACK_TOKENS_ANTERIORES", "viejo-1, viejo-2", "previous_tokens", ["viejo-1", "viejo-2"]),
        ("CALLBACK_PREVIOUS_TOKENS", "viejo-1", "previous_tokens", ["viejo-1"]),
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


def test_callback_env_file_names_the_file_to_read_instead_of_dotenv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """CALLBACK_ENV_FILE (deploy/linux) replaces ./.env; a name that does not exist is a configuration error."""
    (tmp_path / ".env").write_text("CALLBACK_PUERTO=9100\n", encoding="utf-8")
    config = tmp_path / "etc" / "sam-callback.env"
    config.parent.mkdir()
    config.write_text(f"CALLBACK_TOKEN={TOKEN}\nCALLBACK_PUERTO=9200\n", encoding="utf-8")
    s = settings_from_env(monkeypatch, tmp_path, CALLBACK_ENV_FILE=str(config))
    assert s.tokens == [TOKEN] and s.server_port == 9200
    monkeypatch.setenv("CALLBACK_ENV_FILE", str(tmp_path / "no-existe.env"))
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert raised.value.problems == [f"CALLBACK_ENV_FILE: no existe el fichero '{tmp_path / 'no-existe.env'}'"]


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
    assert "TrustServerCertificate=yes" in odbc and s.sql_connect_timeout == 30
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
    # Each line names SAM's current name first, then the older one the operator may have used.
    assert any(line.startswith("CALLBACK_PUERTO/CALLBACK_SERVER_PORT:") for line in problems)
    assert any(line.startswith("CALLBACK_AUTH_MODO/CALLBACK_AUTH_MODE:") for line in problems)
    assert any(line.startswith("LOG_FORMATO/LOG_FORMAT:") for line in problems)


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
        # The callback on a built-in route would turn a load balancer's /health into 405s.
        ({"CALLBACK_TOKEN": TOKEN, "CALLBACK_ENDPOINT": "/health"}, "/health es una ruta propia del servicio"),
        ({"CALLBACK_TOKEN": TOKEN, "CALLBACK_ENDPOINT": "metrics/"}, "/metrics es una ruta propia del servicio"),
    ],
)
def test_bad_start_up_config_exits_2_with_readable_lines(tmp_path: Path, env: dict[str, str], needle: str) -> None:
    result = run_cli(tmp_path, **env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert needle in result.stderr
    assert all(line.startswith("Error de configuración: ") for line in result.stderr.strip().splitlines())


@pytest.mark.parametrize(
    ("new", "old", "field", "new_value", "old_value", "expected", "fallback"),
    [
        ("CALLBACK_PUERTO", "CALLBACK_SERVER_PORT", "server_port", "9001", "9002", 9001, 9002),
        ("CALLBACK_AUTH_MODO", "CALLBACK_AUTH_MODE", "auth_mode", "required", "none", "required", "none"),
        ("APIGW_CLIENT_ID", "API_GATEWAY_CLIENT_ID", "api_gateway_client_id", "nuevo", "viejo", "nuevo", "viejo"),
        ("JWT_CLAVE_PUBLICA", "JWT_PUBLIC_KEY", "jwt_public_key", "nueva.pem", "vieja.pem", "nueva.pem", "vieja.pem"),
        ("LOG_FORMATO", "LOG_FORMAT", "log_format", "json", "%(message)s", "json", "%(message)s"),
        ("LOG_ARCHIVO_CALLBACK", "CALLBACK_LOG_FILENAME", "log_filename", "a.log", "b.log", "a.log", "b.log"),
        ("SQL_SAM_BD_NOMBRE", "SQL_SAM_DB_NAME", "sql_db_name", "SAM", "OTRA", "SAM", "OTRA"),
    ],
)
def test_sam_current_name_wins_and_blank_falls_back(
    tmp_path: Path, new: str, old: str, field: str, new_value: str, old_value: str, expected: object, fallback: object
) -> None:
    """SAM's ConfigManager reads the current name first; an empty value counts as unset."""
    env_file = tmp_path / ".env"
    env_file.write_text(f"{new}={new_value}\n{old}={old_value}\n", encoding="utf-8")
    assert getattr(Settings(_env_file=env_file), field) == expected
    env_file.write_text(f"{new}=\n{old}={old_value}\n", encoding="utf-8")
    assert getattr(Settings(_env_file=env_file), field) == fallback


def test_environment_wins_over_env_file_per_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The same name in both: the environment's value. SAM's other services' lines are ignored."""
    (tmp_path / ".env").write_text(
        f"CALLBACK_TOKEN={TOKEN}\nCALLBACK_PUERTO=9100\nLANZADOR_WORKERS_MAX=10\nAA_URL=https://cr.example\n",
        encoding="utf-8",
    )
    s = settings_from_env(monkeypatch, tmp_path, CALLBACK_PUERTO="9200")
    assert s.server_port == 9200 and s.tokens == [TOKEN]


def test_callback_token_is_one_value_taken_whole(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """SAM's launcher sends CALLBACK_TOKEN verbatim, commas and all; previous tokens follow it."""
    s = settings_from_env(
        monkeypatch, tmp_path, CALLBACK_TOKEN="uno,dos ,tres", CALLBACK_TOKENS_ANTERIORES="viejo-a, viejo-b,,"
    )
    assert s.tokens == ["uno,dos ,tres", "viejo-a", "viejo-b"]
    assert Settings(_env_file=None, token="t", previous_tokens=["p1", "p2"]).tokens == ["t", "p1", "p2"]


def test_list_settings_are_typed_once(tmp_path: Path) -> None:
    """Lists are parsed when the Settings is built: a comma string or a list, either way."""
    from_text = Settings(
        _env_file=None,
        final_states="completed, run_failed",
        jwt_algorithms="RS256,ES256",
        allowed_ips="10.0.0.0/8, ::1",
    )
    from_list = Settings(
        _env_file=None, final_states=["COMPLETED", "RUN_FAILED"], jwt_algorithms=["RS256", "ES256"],
        allowed_ips=["10.0.0.0/8", "::1"],
    )  # fmt: skip
    for s in (from_text, from_list):
        assert s.final_state_set == {"COMPLETED", "RUN_FAILED"}
        assert s.jwt_algorithm_list == ["RS256", "ES256"]
        assert [str(n) for n in s.allowed_networks] == ["10.0.0.0/8", "::1/128"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"final_states": " , "}, "CALLBACK_FINAL_STATES"),
        ({"final_states": "X" * 21}, "CALLBACK_FINAL_STATES"),
        ({"jwt_algorithms": "HS256"}, "JWT_ALGORITHMS"),
        ({"allowed_ips": "10.0.0.0/33"}, "CALLBACK_ALLOWED_IPS"),
        ({"trusted_proxies": "proxy"}, "CALLBACK_TRUSTED_PROXIES"),
        ({"log_format": "%(desconocido)s"}, "LOG_FORMATO"),
        ({"sql_driver": "{}"}, "SQL_SAM_DRIVER"),
        ({"sql_host": "db", "sql_db_name": None}, "SQL_SAM_BD_NOMBRE"),
        ({"ssl_certfile": "cert.pem"}, "CALLBACK_SSL_KEYFILE"),
    ],
)
def test_an_invalid_settings_object_cannot_exist(overrides: dict[str, object], needle: str) -> None:
    """Every value rule lives in the model: building it fails, and load_settings says why in one line."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Settings(_env_file=None, **overrides)
    with pytest.raises(ConfigError) as error:
        load_settings(_env_file=None, token=TOKEN, **overrides)
    assert len(error.value.problems) == 1 and needle in error.value.problems[0]


def test_serving_requirements_are_separate(tmp_path: Path) -> None:
    """No credential: a valid Settings for operator commands, a ConfigError for serving."""
    s = load_settings(for_serving=False, _env_file=None)
    assert s.tokens == [] and s.auth_mode == "optional"
    with pytest.raises(ConfigError) as error:
        load_settings(_env_file=None)
    assert "exige credenciales" in error.value.problems[0]


@pytest.mark.parametrize(
    "args", [("status", "--url", "http://127.0.0.1:9"), ("spool", "list"), ("init-db", "--print-sql")]
)
def test_operator_commands_run_without_credentials(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Issue 11 item 5: no CALLBACK_TOKEN, no key: the operator commands still run."""
    result = run_cli(tmp_path, *args)
    assert "exige credenciales" not in result.stderr, result.stderr
    assert result.returncode != 2, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["serve", "check"])
def test_serve_and_check_need_a_complete_configuration(tmp_path: Path, command: str) -> None:
    result = run_cli(tmp_path, command)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error de configuración: CALLBACK_AUTH_MODO/CALLBACK_AUTH_MODE=optional exige credenciales: configure "
        "CALLBACK_TOKEN y/o JWT_CLAVE_PUBLICA, o use CALLBACK_AUTH_MODO=none (no recomendado)"
    ]


def test_credential_settings_are_spec_11s_list() -> None:
    """The settings reloaded without a restart, by the names an operator writes."""
    from sam.callback.sam_env import NAMES
    from sam.callback.settings import CREDENTIAL_FIELDS

    assert {NAMES[field][0] for field in CREDENTIAL_FIELDS} == {
        "CALLBACK_TOKEN", "CALLBACK_TOKENS_ANTERIORES", "JWT_CLAVE_PUBLICA", "JWT_AUDIENCE", "JWT_ISSUER",
        "APIGW_CLIENT_ID", "API_GATEWAY_CLIENT_ID", "CALLBACK_ALLOWED_IPS",
    }  # fmt: skip
    assert set(NAMES) == set(Settings.model_fields)  # every setting has its SAM names
