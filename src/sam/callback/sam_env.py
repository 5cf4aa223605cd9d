"""SAM's variable names for each setting, read the way SAM's ConfigManager reads them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from dotenv.parser import parse_stream
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

# Field -> names, SAM's current (Spanish) name first, then the older ones. SAM's ConfigManager
# tries the new name, then the old one, and treats an empty value as unset: so does this table.
NAMES: dict[str, tuple[str, ...]] = {
    "server_host": ("CALLBACK_HOST", "CALLBACK_SERVER_HOST"),
    "server_port": ("CALLBACK_PUERTO", "CALLBACK_SERVER_PORT"),
    "server_threads": ("CALLBACK_THREADS", "CALLBACK_SERVER_THREADS"),
    "server_workers": ("CALLBACK_SERVER_WORKERS",),
    "endpoint_path": ("CALLBACK_ENDPOINT", "CALLBACK_ENDPOINT_PATH"),
    "auth_mode": ("CALLBACK_AUTH_MODO", "CALLBACK_AUTH_MODE"),
    "token": ("CALLBACK_TOKEN",),
    "previous_tokens": ("CALLBACK_TOKENS_ANTERIORES", "CALLBACK_PREVIOUS_TOKENS"),
    "api_gateway_client_id": ("APIGW_CLIENT_ID", "API_GATEWAY_CLIENT_ID"),
    # Read on its own as well: in SAM's files before the renaming, APIGW_CLIENT_ID is the auth
    # server's client and API_GATEWAY_CLIENT_ID the one the launcher sends (see Settings).
    "api_gateway_client_id_older": ("API_GATEWAY_CLIENT_ID",),
    "jwt_public_key": ("JWT_CLAVE_PUBLICA", "JWT_PUBLIC_KEY"),
    "jwt_audience": ("JWT_AUDIENCE",),
    "jwt_issuer": ("JWT_ISSUER",),
    "jwt_algorithms": ("JWT_ALGORITHMS",),
    "jwt_leeway_seconds": ("JWT_LEEWAY_SECONDS",),
    "database_url": ("SAM_DATABASE_URL",),
    "sql_driver": ("SQL_SAM_DRIVER",),
    "sql_host": ("SQL_SAM_HOST",),
    "sql_db_name": ("SQL_SAM_BD_NOMBRE", "SQL_SAM_DB_NAME"),
    "sql_uid": ("SQL_SAM_USUARIO", "SQL_SAM_UID"),
    "sql_pwd": ("SQL_SAM_PASSWORD", "SQL_SAM_PWD"),
    "sql_connect_timeout": ("SQL_SAM_CONEXION_TIMEOUT_SEG", "SQL_SAM_TIMEOUT_CONEXION_INICIAL"),
    "spool_path": ("CALLBACK_SPOOL_PATH",),
    "max_body_bytes": ("CALLBACK_MAX_BODY_BYTES",),
    "final_states": ("CALLBACK_FINAL_STATES",),
    "match_window_seconds": ("CALLBACK_MATCH_WINDOW_SECONDS",),
    "docs_enabled": ("CALLBACK_DOCS_ENABLED",),
    "allowed_ips": ("CALLBACK_ALLOWED_IPS",),
    "admin_allowed_ips": ("CALLBACK_ADMIN_ALLOWED_IPS",),
    "rejected_max": ("CALLBACK_REJECTED_MAX",),
    "header_timeout_seconds": ("CALLBACK_HEADER_TIMEOUT_SECONDS",),
    "body_timeout_seconds": ("CALLBACK_BODY_TIMEOUT_SECONDS",),
    "database_timeout_seconds": ("CALLBACK_DATABASE_TIMEOUT_SECONDS",),
    "trusted_proxies": ("CALLBACK_TRUSTED_PROXIES",),
    "auth_failures_limit": ("CALLBACK_AUTH_FAILURES_LIMIT",),
    "ssl_certfile": ("CALLBACK_SSL_CERTFILE",),
    "ssl_keyfile": ("CALLBACK_SSL_KEYFILE",),
    "log_directory": ("LOG_DIRECTORIO", "LOG_DIRECTORY"),
    "log_filename": ("LOG_ARCHIVO_CALLBACK", "APP_LOG_FILENAME_CALLBACK", "CALLBACK_LOG_FILENAME"),
    "log_level": ("LOG_NIVEL", "LOG_LEVEL"),
    "log_format": ("LOG_FORMATO", "LOG_FORMAT"),
    "log_date_format": ("LOG_FECHA_FORMATO", "LOG_DATEFMT"),
    "log_backup_count": ("LOG_BACKUP_CANTIDAD", "LOG_BACKUP_COUNT"),
    "email_smtp_host": ("EMAIL_SMTP_HOST", "EMAIL_SMTP_SERVER"),
    "email_smtp_port": ("EMAIL_SMTP_PUERTO", "EMAIL_SMTP_PORT"),
    "email_from": ("EMAIL_REMITENTE", "EMAIL_FROM"),
    "email_recipients": ("EMAIL_DESTINATARIOS", "EMAIL_RECIPIENTS"),
    "email_use_tls": ("EMAIL_TLS_HABILITAR", "EMAIL_USE_TLS"),
    "email_user": ("EMAIL_USUARIO", "EMAIL_USER"),
    "email_password": ("EMAIL_PASSWORD",),
    "alert_auth_failures": ("CALLBACK_ALERT_AUTH_FAILURES",),
    "alert_database_seconds": ("CALLBACK_ALERT_DATABASE_SECONDS",),
    "alert_repeat_seconds": ("CALLBACK_ALERT_REPEAT_SECONDS",),
}

# Settings whose value is read regardless of case: `INFO` and `info` do not disagree.
_CASE_INSENSITIVE = frozenset({"auth_mode", "log_level", "docs_enabled", "email_use_tls"})


def env_name(field: str) -> str:
    """How messages name `field`: SAM's current name first, then the older ones (`NEW/OLD`)."""
    names = NAMES.get(field)
    return "/".join(names) if names else field.upper()


class EnvFileError(ValueError):
    """The `.env` file cannot be read as UTF-8 text; the message says where and what to do."""


def _unreadable(env_file: str | os.PathLike[str], exc: Exception) -> EnvFileError:
    if isinstance(exc, UnicodeDecodeError):
        # Notepad's "ANSI" (Windows-1252) is the usual cause: say on which line, so the operator
        # finds the accented character, and how to save the file.
        data = Path(env_file).read_bytes()
        try:
            data.decode("utf-8")
            line, byte = 0, 0
        except UnicodeDecodeError as exact:
            line, byte = data[: exact.start].count(b"\n") + 1, data[exact.start]
        where = f"línea {line}, byte 0x{byte:02x}" if line else "codificación no válida"
        return EnvFileError(f"{env_file}: no es texto UTF-8 ({where}); guárdelo con codificación UTF-8")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return EnvFileError(f"{env_file}: no se puede leer ({reason})")


def ensure_readable(env_file: str | os.PathLike[str] | None) -> None:
    """Raise EnvFileError when `env_file` exists and is not readable UTF-8 text."""
    if env_file is not None and Path(env_file).is_file():
        try:
            Path(env_file).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            raise _unreadable(env_file, exc) from None


def read_environment(env_file: str | os.PathLike[str] | None = ".env") -> dict[str, str]:
    """`.env` overlaid by the process environment (the environment wins), names upper-cased.

    Raises EnvFileError when the file is there but is not readable UTF-8 text.
    """
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        try:
            values = dotenv_values(env_file, encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            raise _unreadable(env_file, exc) from None
        for name, value in values.items():
            if value is not None:
                merged[name.upper()] = value
    for name, value in os.environ.items():
        merged[name.upper()] = value
    return merged


def _present(value: str | None) -> bool:
    return value is not None and value.strip() != ""


# Settings where a variable set to nothing is a value, not "unset": an empty
# CALLBACK_ADMIN_ALLOWED_IPS closes the operator page to everyone, as the docs say.
_BLANK_IS_A_VALUE = frozenset({"admin_allowed_ips"})


def resolve(variables: Mapping[str, str]) -> dict[str, str]:
    """Field -> value: the first of its names that is set and not blank (blank counts for a few)."""
    resolved: dict[str, str] = {}
    for field, names in NAMES.items():
        for name in names:
            value = variables.get(name)
            if value is not None and (_present(value) or field in _BLANK_IS_A_VALUE):
                resolved[field] = value
                break
    return resolved


def conflicts(variables: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(field, name in force, ignored name) for each setting written twice with different values."""
    found: list[tuple[str, str, str]] = []
    for field, names in NAMES.items():
        set_names = [name for name in names if _present(variables.get(name))]
        values = [variables[name].strip() for name in set_names]
        if field in _CASE_INSENSITIVE:
            values = [value.lower() for value in values]
        found += [
            (field, set_names[0], other)
            for other, value in zip(set_names[1:], values[1:], strict=True)
            if value != values[0]
        ]
    return found


def repeated_in_file(env_file: str | os.PathLike[str] | None = ".env") -> list[str]:
    """Names this service reads that the `.env` file sets more than once with different values.

    SAM's own `.env.example` sets APIGW_CLIENT_ID twice (gateway and auth server): the last
    line wins, for SAM and for this service alike, which an operator may not expect.
    """
    if env_file is None or not Path(env_file).is_file():
        return []
    ours = {name for names in NAMES.values() for name in names}
    seen: dict[str, set[str]] = {}
    try:
        with open(env_file, encoding="utf-8") as stream:
            for binding in parse_stream(stream):
                if binding.key is not None and binding.key.upper() in ours:
                    seen.setdefault(binding.key.upper(), set()).add((binding.value or "").strip())
    except (UnicodeDecodeError, OSError):
        return []  # load_settings has already said why the file cannot be read
    return sorted(name for name, values in seen.items() if len(values) > 1)


def name_warnings(env_file: str | os.PathLike[str] | None) -> list[str]:
    """What `check` and the start-up log say of names written twice with different values."""
    lines = []
    for field, used, ignored in conflicts(read_environment(env_file)):
        if field == "api_gateway_client_id":
            # A .env from before SAM's renaming: the launcher sends API_GATEWAY_CLIENT_ID.
            lines.append(
                f"{used} y {ignored} tienen valores distintos: x-ibm-client-id se acepta con cualquiera de los dos"
            )
        else:
            lines.append(f"{used} y {ignored} tienen valores distintos: se usa {used} (el nombre actual de SAM)")
    lines += [
        f"{name} aparece varias veces en .env con valores distintos: se usa la última línea"
        for name in repeated_in_file(env_file)
    ]
    if env_file is not None:
        # SAM's ConfigLoader lays src/sam/<service>/.env over the project's .env for that service.
        own = (Path(env_file).parent / "src" / "sam" / "callback" / ".env").absolute()
        if own.is_file():
            lines.append(
                f"existe {own}: el servicio de callback de SAM lo lee por encima del .env, este servicio no; "
                "pase sus líneas al .env"
            )
    return lines


class SamEnvironmentSource(PydanticBaseSettingsSource):
    """A settings source that applies SAM's precedence instead of pydantic-settings' aliases."""

    def __init__(self, settings_cls: type[BaseSettings], env_file: Any) -> None:
        super().__init__(settings_cls)
        self.env_file = env_file

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: `__call__` resolves every field at once."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        """Values by field name, from `.env` and the environment."""
        env_file = self.env_file
        if isinstance(env_file, list | tuple):
            env_file = env_file[-1] if env_file else None
        return dict(resolve(read_environment(env_file)))
