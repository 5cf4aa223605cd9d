"""Service configuration from the environment and `.env`, with SAM's older names as aliases."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote_plus

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_FINAL_STATES = (
    "COMPLETED",
    "RUN_COMPLETED",
    "RUN_FAILED",
    "RUN_ABORTED",
    "RUN_TIMED_OUT",
    "DEPLOY_FAILED",
)
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
AuthMode = Literal["optional", "required", "none"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A start-up configuration that cannot work; each problem is one readable line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _alias(*names: str) -> Any:
    return Field(None, validation_alias=AliasChoices(*names))


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def parse_networks(value: str | None) -> list[IPNetwork]:
    """Parse a comma-separated list of addresses and CIDR ranges."""
    return [ipaddress.ip_network(part, strict=False) for part in _split(value)]


class Settings(BaseSettings):
    """Every setting of SPEC section 5; build with `Settings(_env_file=None, ...)` in tests."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        populate_by_name=True,
    )

    server_host: str = Field("0.0.0.0", validation_alias=AliasChoices("CALLBACK_SERVER_HOST", "CALLBACK_HOST"))  # noqa: S104
    server_port: int = Field(
        8008,
        ge=0,
        le=65535,
        validation_alias=AliasChoices("CALLBACK_SERVER_PORT", "CALLBACK_PUERTO"),
    )
    server_threads: int = Field(
        10,
        ge=1,
        le=200,
        validation_alias=AliasChoices("CALLBACK_SERVER_THREADS", "CALLBACK_THREADS"),
    )
    server_workers: int = Field(1, ge=1, le=64, validation_alias=AliasChoices("CALLBACK_SERVER_WORKERS"))
    endpoint_path: str = Field(
        "/api/callback",
        validation_alias=AliasChoices("CALLBACK_ENDPOINT_PATH", "CALLBACK_ENDPOINT"),
    )
    auth_mode: AuthMode = Field("optional", validation_alias=AliasChoices("CALLBACK_AUTH_MODE", "CALLBACK_AUTH_MODO"))
    token: str | None = _alias("CALLBACK_TOKEN")
    api_gateway_client_id: str | None = _alias("API_GATEWAY_CLIENT_ID")
    jwt_public_key: str | None = _alias("JWT_PUBLIC_KEY", "JWT_CLAVE_PUBLICA")
    jwt_audience: str | None = _alias("JWT_AUDIENCE")
    jwt_issuer: str | None = _alias("JWT_ISSUER")
    jwt_algorithms: str = Field("RS256", validation_alias=AliasChoices("JWT_ALGORITHMS"))
    jwt_leeway_seconds: int = Field(60, ge=0, le=86400 * 30, validation_alias=AliasChoices("JWT_LEEWAY_SECONDS"))

    database_url: str | None = _alias("SAM_DATABASE_URL")
    sql_driver: str = Field("ODBC Driver 17 for SQL Server", validation_alias=AliasChoices("SQL_SAM_DRIVER"))
    sql_host: str | None = _alias("SQL_SAM_HOST")
    sql_db_name: str | None = _alias("SQL_SAM_DB_NAME", "SQL_SAM_BD_NOMBRE")
    sql_uid: str | None = _alias("SQL_SAM_UID", "SQL_SAM_USUARIO")
    sql_pwd: str | None = _alias("SQL_SAM_PWD", "SQL_SAM_PASSWORD")

    spool_path: Path = Field(Path("./data/spool.db"), validation_alias=AliasChoices("CALLBACK_SPOOL_PATH"))
    max_body_bytes: int = Field(
        1_048_576,
        ge=1024,
        le=64 * 1_048_576,
        validation_alias=AliasChoices("CALLBACK_MAX_BODY_BYTES"),
    )
    # How long a client may take to send a request's line and headers, and then its body; how
    # long a request waits for the writer before keeping its callback in the spool itself.
    header_timeout_seconds: float = Field(
        15.0, ge=1, le=3600, validation_alias=AliasChoices("CALLBACK_HEADER_TIMEOUT_SECONDS")
    )
    body_timeout_seconds: float = Field(
        30.0, ge=1, le=3600, validation_alias=AliasChoices("CALLBACK_BODY_TIMEOUT_SECONDS")
    )
    database_timeout_seconds: float = Field(
        20.0, ge=1, le=3600, validation_alias=AliasChoices("CALLBACK_DATABASE_TIMEOUT_SECONDS")
    )
    final_states: str = Field(",".join(DEFAULT_FINAL_STATES), validation_alias=AliasChoices("CALLBACK_FINAL_STATES"))
    match_window_seconds: int = Field(86400, ge=0, validation_alias=AliasChoices("CALLBACK_MATCH_WINDOW_SECONDS"))
    docs_enabled: bool = Field(True, validation_alias=AliasChoices("CALLBACK_DOCS_ENABLED"))
    allowed_ips: str = Field("", validation_alias=AliasChoices("CALLBACK_ALLOWED_IPS"))
    trusted_proxies: str = Field("", validation_alias=AliasChoices("CALLBACK_TRUSTED_PROXIES"))
    auth_failures_limit: int = Field(30, ge=0, validation_alias=AliasChoices("CALLBACK_AUTH_FAILURES_LIMIT"))
    ssl_certfile: Path | None = _alias("CALLBACK_SSL_CERTFILE")
    ssl_keyfile: Path | None = _alias("CALLBACK_SSL_KEYFILE")

    log_directory: Path = Field(Path("./logs"), validation_alias=AliasChoices("LOG_DIRECTORY", "LOG_DIRECTORIO"))
    log_filename: str = Field(
        "sam_callback_server.log",
        validation_alias=AliasChoices("APP_LOG_FILENAME_CALLBACK", "CALLBACK_LOG_FILENAME", "LOG_ARCHIVO_CALLBACK"),
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", validation_alias=AliasChoices("LOG_LEVEL")
    )
    log_format: Literal["text", "json"] = Field("text", validation_alias=AliasChoices("LOG_FORMAT"))
    log_backup_count: int = Field(30, ge=0, le=3650, validation_alias=AliasChoices("LOG_BACKUP_COUNT"))

    @field_validator("auth_mode", mode="before")
    @classmethod
    def _auth_mode_alias(cls, value: Any) -> Any:
        # "strict" is the older name of "required"; SAM deployments still carry it.
        if isinstance(value, str):
            value = value.strip().lower()
            return "required" if value == "strict" else value
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator(
        "token", "api_gateway_client_id", "jwt_public_key", "jwt_audience", "jwt_issuer",
        "database_url", "sql_host", "sql_db_name", "sql_uid", "sql_pwd",
        "ssl_certfile", "ssl_keyfile",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # An empty line in .env (`CALLBACK_TOKEN=`) means "not set", not "the empty token".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("endpoint_path")
    @classmethod
    def _path_starts_with_slash(cls, value: str) -> str:
        value = value.strip()
        if not value.startswith("/") or " " in value:
            raise ValueError("debe empezar por '/' y no llevar espacios")
        return value.rstrip("/") or "/"

    # Derived values: computed here once so every module reads the same interpretation.

    @property
    def tokens(self) -> list[str]:
        """Static tokens accepted, in rotation order."""
        return _split(self.token)

    @property
    def final_state_set(self) -> frozenset[str]:
        """Final states, upper-case."""
        return frozenset(state.upper() for state in _split(self.final_states))

    @property
    def jwt_algorithm_list(self) -> list[str]:
        """Signature algorithms allowed for gateway JWTs."""
        return _split(self.jwt_algorithms)

    @property
    def allowed_networks(self) -> list[IPNetwork]:
        """Networks allowed to call; empty means everybody."""
        return parse_networks(self.allowed_ips)

    @property
    def trusted_proxy_networks(self) -> list[IPNetwork]:
        """Peers whose X-Forwarded-For is believed."""
        return parse_networks(self.trusted_proxies)

    @property
    def log_file(self) -> Path:
        """The rotated log file."""
        return self.log_directory / self.log_filename

    def resolved_database_url(self) -> str:
        """SQLAlchemy URL chosen by SPEC section 4: explicit URL, then SQL_SAM_*, then SQLite."""
        if self.database_url:
            return self.database_url
        if self.sql_host:
            return mssql_url(self)
        return "sqlite:///" + Path("./data/sam.db").as_posix()

    def problems(self) -> list[str]:
        """Cross-field problems that stop the start, one Spanish line each."""
        problems: list[str] = []
        for name, value in (
            ("CALLBACK_ALLOWED_IPS", self.allowed_ips),
            ("CALLBACK_TRUSTED_PROXIES", self.trusted_proxies),
        ):
            for part in _split(value):
                try:
                    ipaddress.ip_network(part, strict=False)
                except ValueError:
                    problems.append(f"{name}: '{part}' no es una dirección IP ni un rango CIDR válido")
        if not self.final_state_set:
            problems.append("CALLBACK_FINAL_STATES: la lista de estados finales no puede estar vacía")
        for state in self.final_state_set:
            if len(state) > 20:
                problems.append(f"CALLBACK_FINAL_STATES: '{state}' supera los 20 caracteres de la columna Estado")
        algorithms = self.jwt_algorithm_list
        if not algorithms:
            problems.append("JWT_ALGORITHMS: indique al menos un algoritmo (por ejemplo RS256)")
        for algorithm in algorithms:
            if algorithm not in ASYMMETRIC_ALGORITHMS:
                problems.append(
                    f"JWT_ALGORITHMS: '{algorithm}' no está permitido; solo algoritmos asimétricos "
                    f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))})"
                )
        if self.auth_mode in ("optional", "required") and not self.tokens and not self.jwt_public_key:
            problems.append(
                f"CALLBACK_AUTH_MODE={self.auth_mode} exige credenciales: configure CALLBACK_TOKEN "
                "y/o JWT_PUBLIC_KEY, o use CALLBACK_AUTH_MODE=none (no recomendado)"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            problems.append("CALLBACK_SSL_CERTFILE y CALLBACK_SSL_KEYFILE deben configurarse juntos")
        for name, path in (
            ("CALLBACK_SSL_CERTFILE", self.ssl_certfile),
            ("CALLBACK_SSL_KEYFILE", self.ssl_keyfile),
        ):
            if path is not None and not path.is_file():
                problems.append(f"{name}: no existe el fichero {path}")
        if self.ssl_certfile and self.ssl_keyfile and self.ssl_certfile.is_file() and self.ssl_keyfile.is_file():
            problem = _tls_problem(self.ssl_certfile, self.ssl_keyfile)
            if problem:
                problems.append(problem)
        if self.sql_host and not self.database_url and not self.sql_db_name:
            problems.append("SQL_SAM_DB_NAME: obligatorio cuando se configura SQL_SAM_HOST")
        return problems


def _tls_problem(certfile: Path, keyfile: Path) -> str | None:
    """Why the certificate and key cannot serve HTTPS, or None when they can."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # uvicorn would otherwise fail with a traceback, or, for an encrypted key, stop and ask for
        # its passphrase on a console that a Windows service does not have: answer "" instead.
        context.load_cert_chain(certfile, keyfile, password=lambda: "")
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        return (
            "CALLBACK_SSL_CERTFILE/CALLBACK_SSL_KEYFILE: no se pueden usar el certificado y la clave "
            f"({reason}); deben ser PEM, la clave sin contraseña y correspondiente al certificado"
        )
    return None


def mssql_url(settings: Settings) -> str:
    """pyodbc URL for SQL Server with the connection options SAM's own writers use."""
    parts = [
        f"DRIVER={{{settings.sql_driver}}}",
        f"SERVER={settings.sql_host}",
        f"DATABASE={settings.sql_db_name or ''}",
    ]
    if settings.sql_uid:
        parts += [
            f"UID={settings.sql_uid}",
            f"PWD={{{(settings.sql_pwd or '').replace('}', '}}')}}}",
        ]
    else:
        parts.append("Trusted_Connection=yes")
    parts += ["TrustServerCertificate=yes", "Connection Timeout=30"]
    return "mssql+pyodbc:///?odbc_connect=" + quote_plus(";".join(parts) + ";")


_FIELD_TO_ENV = {
    name: (field.validation_alias.choices[0] if isinstance(field.validation_alias, AliasChoices) else name)
    for name, field in Settings.model_fields.items()
}


def _translate(error: Any) -> str:
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    if kind in ("int_parsing", "int_type"):
        return "debe ser un número entero"
    if kind in ("float_parsing", "float_type"):
        return "debe ser un número"
    if kind in ("bool_parsing", "bool_type"):
        return "debe ser true o false"
    if kind == "literal_error":
        return f"valor no válido; se espera uno de: {ctx.get('expected', '')}"
    if kind in ("greater_than_equal", "less_than_equal"):
        bound = ctx.get("ge", ctx.get("le"))
        return f"fuera de rango (límite {bound})"
    if kind == "value_error":
        return str(ctx.get("error", "valor no válido"))
    return "valor no válido"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; raise ConfigError with one readable line per problem."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_input=False):
            field = str(error["loc"][0]) if error["loc"] else ""
            env_name = _FIELD_TO_ENV.get(field, field.upper())
            lines.append(f"{env_name}: {_translate(error)}")
        raise ConfigError(lines) from None
    problems = settings.problems()
    if problems:
        raise ConfigError(problems)
    return settings
