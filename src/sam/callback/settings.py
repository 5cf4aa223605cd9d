"""Service configuration from the environment and `.env`, validated inside the model."""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import quote_plus

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .sam_env import EnvFileError, SamEnvironmentSource, ensure_readable, env_name

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
DEFAULT_SMTP_PORT = 587
AuthMode = Literal["optional", "required", "none"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# SPEC 11: the settings that are credentials (re-read without a restart); the rest need one.
CREDENTIAL_FIELDS = frozenset(
    {
        "token", "previous_tokens", "jwt_public_key", "jwt_audience", "jwt_issuer",
        "api_gateway_client_id", "api_gateway_client_id_older", "allowed_ips",
    }
)  # fmt: skip
# LOG_FORMATO values that are not a logging format string.
NAMED_LOG_FORMATS = frozenset({"text", "json"})


class ConfigError(Exception):
    """A start-up configuration that cannot work; each problem is one readable line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _as_list(value: Any) -> Any:
    # Environment values are comma strings; tests and code may pass lists.
    return _split(value) if isinstance(value, str) else value


# The service's own routes (app.py), which the callback path must not shadow.
_BUILT_IN_PATHS = frozenset(
    {"/health", "/ready", "/metrics", "/panel", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
)


def parse_networks(value: str | list[Any] | None) -> list[IPNetwork]:
    """Parse addresses and CIDR ranges (a comma string or a list); ValueError names the bad one."""
    networks: list[IPNetwork] = []
    for part in _as_list(value) or []:
        if isinstance(part, ipaddress.IPv4Network | ipaddress.IPv6Network):
            networks.append(part)
            continue
        try:
            networks.append(ipaddress.ip_network(str(part).strip(), strict=False))
        except ValueError:
            raise ValueError(f"'{part}' no es una dirección IP ni un rango CIDR válido") from None
    return networks


def log_format_problem(fmt: str) -> str | None:
    """Why a %-style logging format cannot render a record, or None when it can."""
    record = logging.LogRecord("sam.callback", logging.INFO, __file__, 1, "prueba", None, None, func="f")
    record.request_id = "-"
    try:
        logging.Formatter(fmt, validate=True).format(record)
    except (ValueError, KeyError, TypeError) as exc:
        detail = f"campo desconocido {exc}" if isinstance(exc, KeyError) else str(exc)
        return f"no es 'json' ni un formato de logging válido ({detail})"
    return None


class Settings(BaseSettings):
    """Every setting of SPEC section 5; build with `Settings(_env_file=None, field=value)` in tests.

    Values come from `.env` and the environment under SAM's names (`sam_env.NAMES`); keyword
    arguments use the field names. Every value is validated here, so a Settings object that
    exists is valid; what only serving needs (credentials, TLS files) is `problems()`.
    """

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    server_host: str = "0.0.0.0"  # noqa: S104 - a service listens on every interface, as SAM's does
    server_port: int = Field(8008, ge=0, le=65535)
    server_threads: int = Field(10, ge=1, le=200)
    server_workers: int = Field(1, ge=1, le=64)
    endpoint_path: str = "/api/callback"
    auth_mode: AuthMode = "optional"
    token: str | None = None
    previous_tokens: list[str] = Field(default_factory=list)
    api_gateway_client_id: str | None = None
    api_gateway_client_id_older: str | None = None
    jwt_public_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_algorithms: list[str] = Field(default_factory=lambda: ["RS256"])
    jwt_leeway_seconds: int = Field(60, ge=0, le=86400 * 30)

    database_url: str | None = None
    sql_driver: str = "ODBC Driver 17 for SQL Server"
    sql_host: str | None = None
    sql_db_name: str | None = None
    sql_uid: str | None = None
    sql_pwd: str | None = None
    sql_connect_timeout: int = Field(30, ge=1, le=3600)

    spool_path: Path = Path("./data/spool.db")
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    # How long a client may take to send a request's line and headers, and then its body; how
    # long a request waits for the writer before keeping its callback in the spool itself.
    header_timeout_seconds: float = Field(15.0, ge=1, le=3600)
    body_timeout_seconds: float = Field(30.0, ge=1, le=3600)
    database_timeout_seconds: float = Field(20.0, ge=1, le=3600)
    final_states: list[str] = Field(default_factory=lambda: list(DEFAULT_FINAL_STATES))
    match_window_seconds: int = Field(86400, ge=0)
    docs_enabled: bool = True
    allowed_ips: list[IPNetwork] = Field(default_factory=list)
    trusted_proxies: list[IPNetwork] = Field(default_factory=list)
    auth_failures_limit: int = Field(30, ge=0)
    rejected_max: int = Field(1000, ge=0, le=1_000_000)
    # Who may open /panel; empty closes it to everybody (unlike allowed_ips, where empty is all).
    admin_allowed_ips: list[IPNetwork] = Field(default_factory=lambda: parse_networks("127.0.0.1/8, ::1"))
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    log_directory: Path = Path("./logs")
    log_filename: str = "sam_callback_server.log"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # "text" (the service's layout), "json", or a %-style logging format as SAM's services use.
    log_format: str = "text"
    log_date_format: str = "%Y-%m-%d %H:%M:%S"
    log_backup_count: int = Field(30, ge=0, le=3650)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments first, then SAM's names from the environment and `.env`."""
        # `Settings(_env_file=None)` reaches the dotenv source; SAM's source reads the same file.
        return init_settings, SamEnvironmentSource(settings_cls, getattr(dotenv_settings, "env_file", None))

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
        if not isinstance(value, str):
            return value
        # SAM's services take any name `logging` knows: WARN and FATAL are its aliases.
        value = value.strip().upper()
        return {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(value, value)

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value.strip().lower() in NAMED_LOG_FORMATS:
            return value.strip().lower()
        problem = log_format_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator(
        "token", "api_gateway_client_id", "api_gateway_client_id_older", "jwt_public_key", "jwt_audience", "jwt_issuer",
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

    @field_validator("previous_tokens", mode="before")
    @classmethod
    def _previous_tokens(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("final_states", mode="before")
    @classmethod
    def _final_states(cls, value: Any) -> Any:
        states = [str(state).strip().upper() for state in _as_list(value) or [] if str(state).strip()]
        if not states:
            raise ValueError("la lista de estados finales no puede estar vacía")
        for state in states:
            if len(state) > 20:
                raise ValueError(f"'{state}' supera los 20 caracteres de la columna Estado")
        return sorted(set(states), key=states.index)

    @field_validator("jwt_algorithms", mode="before")
    @classmethod
    def _jwt_algorithms(cls, value: Any) -> Any:
        algorithms = [str(a).strip() for a in _as_list(value) or [] if str(a).strip()]
        if not algorithms:
            raise ValueError("indique al menos un algoritmo (por ejemplo RS256)")
        for algorithm in algorithms:
            if algorithm not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(
                    f"'{algorithm}' no está permitido; solo algoritmos asimétricos "
                    f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))})"
                )
        return algorithms

    @field_validator("allowed_ips", "trusted_proxies", "admin_allowed_ips", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        return parse_networks(value)

    @field_validator("endpoint_path")
    @classmethod
    def _endpoint_path(cls, value: str) -> str:
        value = value.strip()
        if " " in value or "?" in value or "#" in value:
            raise ValueError("debe ser una ruta sin espacios, '?' ni '#' (por ejemplo /api/callback)")
        # SAM accepts the path with or without its leading slash (`api/callback`).
        value = "/" + value.lstrip("/")
        value = value.rstrip("/") or "/"
        if value in _BUILT_IN_PATHS:
            # The callback would take the route over: a load balancer's /health would get 405.
            raise ValueError(f"{value} es una ruta propia del servicio; elija otra (por ejemplo /api/callback)")
        return value

    @field_validator("sql_driver")
    @classmethod
    def _sql_driver(cls, value: str) -> str:
        # SAM writes the driver braced (`{ODBC Driver 17 for SQL Server}`); the URL braces it once.
        value = value.strip()
        if value.startswith("{") and value.endswith("}"):
            value = value[1:-1].strip()
        if not value or "{" in value or "}" in value or ";" in value:
            raise ValueError("nombre de driver ODBC no válido (por ejemplo ODBC Driver 17 for SQL Server)")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> Self:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("CALLBACK_SSL_CERTFILE y CALLBACK_SSL_KEYFILE deben configurarse juntos")
        if self.sql_host and not self.database_url and not self.sql_db_name:
            raise ValueError("SQL_SAM_BD_NOMBRE/SQL_SAM_DB_NAME: obligatorio cuando se configura SQL_SAM_HOST")
        return self

    # Derived values, read by the other modules under these names.

    @property
    def tokens(self) -> list[str]:
        """Static tokens accepted: CALLBACK_TOKEN, taken whole, then the previous ones."""
        return ([self.token] if self.token else []) + [t for t in self.previous_tokens if t != self.token]

    @property
    def gateway_client_ids(self) -> tuple[str, ...]:
        """The `x-ibm-client-id` values a JWT may come with: APIGW_CLIENT_ID, then API_GATEWAY_CLIENT_ID.

        SAM's current `.env` names the launcher's gateway client APIGW_CLIENT_ID. Its files from
        before the renaming name it API_GATEWAY_CLIENT_ID and use APIGW_CLIENT_ID for the auth
        server; that launcher (and the web unlock) sends the former. Both are the operator's
        own values, so either is accepted rather than refusing that launcher's callbacks.
        """
        ids = (self.api_gateway_client_id, self.api_gateway_client_id_older)
        return tuple(dict.fromkeys(value for value in ids if value))

    @property
    def final_state_set(self) -> frozenset[str]:
        """Final states, upper-case."""
        return frozenset(self.final_states)

    @property
    def jwt_algorithm_list(self) -> list[str]:
        """Signature algorithms allowed for gateway JWTs."""
        return list(self.jwt_algorithms)

    @property
    def allowed_networks(self) -> list[IPNetwork]:
        """Networks allowed to call; empty means everybody."""
        return list(self.allowed_ips)

    @property
    def admin_allowed_networks(self) -> list[IPNetwork]:
        """Networks allowed to open the operator page."""
        return list(self.admin_allowed_ips)

    @property
    def trusted_proxy_networks(self) -> list[IPNetwork]:
        """Peers whose X-Forwarded-For is believed."""
        return list(self.trusted_proxies)

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
        """What stops serving (not the operator commands), one Spanish line each."""
        problems: list[str] = []
        if self.auth_mode in ("optional", "required") and not self.tokens and not self.jwt_public_key:
            problems.append(
                f"{env_name('auth_mode')}={self.auth_mode} exige credenciales: configure CALLBACK_TOKEN "
                "y/o JWT_CLAVE_PUBLICA, o use CALLBACK_AUTH_MODO=none (no recomendado)"
            )
        for name, path in (("CALLBACK_SSL_CERTFILE", self.ssl_certfile), ("CALLBACK_SSL_KEYFILE", self.ssl_keyfile)):
            if path is not None and not path.is_file():
                problems.append(f"{name}: no existe el fichero {path}")
        if self.ssl_certfile and self.ssl_keyfile and self.ssl_certfile.is_file() and self.ssl_keyfile.is_file():
            problem = _tls_problem(self.ssl_certfile, self.ssl_keyfile)
            if problem:
                problems.append(problem)
        return problems

    # --- E-mail alerts (SPEC sections 5 and 9): SAM's EMAIL_* settings, read as SAM reads them ---

    # Their SAM names (current first) are in sam_env.NAMES, like every other setting's.
    email_smtp_host: str | None = None
    email_smtp_port: int = Field(DEFAULT_SMTP_PORT, ge=1, le=65535)
    email_from: str | None = None
    email_recipients: str = ""
    email_use_tls: bool = True
    email_user: str | None = None
    email_password: str | None = None
    alert_auth_failures: int = Field(5, ge=0, le=100_000)
    alert_database_seconds: int = Field(300, ge=0, le=86400 * 7)
    alert_repeat_seconds: int = Field(3600, ge=1, le=86400 * 7)

    @field_validator("email_smtp_host", "email_from", "email_user", "email_password", mode="before")
    @classmethod
    def _blank_email_is_unset(cls, value: Any) -> Any:
        # SAM's .env.example ships `EMAIL_USUARIO=` and `EMAIL_PASSWORD=`: empty means "not set".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("email_smtp_port", "email_use_tls", mode="before")
    @classmethod
    def _blank_email_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and not value.strip():
            return DEFAULT_SMTP_PORT if info.field_name == "email_smtp_port" else True
        return value.strip() if isinstance(value, str) else value

    @property
    def email_recipient_list(self) -> list[str]:
        """Alert recipients; SAM separates them with ';' and accepts ',' too."""
        return _split(self.email_recipients.replace(";", ","))


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
        # Windows authentication, as SAM connects when no user is configured.
        parts.append("Trusted_Connection=yes")
    parts.append("TrustServerCertificate=yes")
    return "mssql+pyodbc:///?odbc_connect=" + quote_plus(";".join(parts) + ";")


def _translate(error: Any) -> str:
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "debe ser un número entero"
    if kind in ("float_parsing", "float_type"):
        return "debe ser un número"
    if kind in ("bool_parsing", "bool_type"):
        return "debe ser true o false"
    if kind == "literal_error":
        # pydantic writes the list in English ("'a', 'b' or 'c'").
        expected = str(ctx.get("expected", "")).replace(" or ", ", ")
        return f"valor no válido; se espera uno de: {expected}"
    if kind in ("greater_than_equal", "less_than_equal"):
        bound = ctx.get("ge", ctx.get("le"))
        return f"fuera de rango (límite {bound})"
    if kind == "value_error":
        return str(ctx.get("error", "valor no válido"))
    return "valor no válido"


ENV_FILE_VARIABLE = "CALLBACK_ENV_FILE"


def env_file_path() -> Path:
    """The dotenv file to read and watch: CALLBACK_ENV_FILE from the process environment, else `./.env`.

    systemd's EnvironmentFile= is read once, at start, and its values would beat the file's on
    every reload; naming the file here lets the service re-read it (SPEC 11).
    """
    return Path(os.environ.get(ENV_FILE_VARIABLE) or ".env")


def load_settings(*, for_serving: bool = True, **overrides: Any) -> Settings:
    """Read the settings; raise ConfigError with one readable line per problem.

    `for_serving=False` is for operator commands (`status`, `spool`, `init-db --print-sql`),
    which work where no credential is configured.
    """
    env_file = env_file_path()
    if os.environ.get(ENV_FILE_VARIABLE) and not env_file.is_file():
        raise ConfigError([f"{ENV_FILE_VARIABLE}: no existe el fichero '{env_file}'"])
    overrides.setdefault("_env_file", env_file)
    try:
        # pydantic-settings reads the file too, and would fail with a traceback.
        ensure_readable(overrides["_env_file"])
        settings = Settings(**overrides)
    except EnvFileError as exc:
        raise ConfigError([str(exc)]) from None
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_input=False):
            loc = error["loc"]
            if loc:
                lines.append(f"{env_name(str(loc[0]))}: {_translate(error)}")
            else:
                lines.append(_translate(error))
        raise ConfigError(list(dict.fromkeys(lines))) from None
    if for_serving:
        problems = settings.problems()
        if problems:
            raise ConfigError(problems)
    return settings
