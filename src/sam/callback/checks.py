"""`sam-callback check`: configuration, database, table and spool, as a readable report."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .auth import Authenticator
from .files import unwritable_reason
from .logs import log_file_problem
from .payload import PROBE_PREFIX
from .repository import Repository, describe_error, display_url, driver_problem, make_engine, sqlite_file
from .sam_env import name_warnings
from .settings import ConfigError, Settings, env_file_path
from .spool import Spool, SpoolError

MIN_TOKEN_LENGTH = 32

_MIGRATION_005 = "aplique database/migrations/005_add_fecha_inicio_real.sql de SAM"
_MIGRATION_007 = "aplique database/migrations/007_increase_callback_info_size.sql de SAM"
# Columns the guarded UPDATE writes or reads, the least each must hold, and the remedy.
_REQUIRED: tuple[tuple[str, int | None, str], ...] = (
    ("DeploymentId", 50, "la tabla no es la de SAM: revise el esquema de SAM"),
    ("Estado", 20, "la tabla no es la de SAM: revise el esquema de SAM"),
    ("CallbackInfo", None, _MIGRATION_007),
    ("FechaInicio", 0, "la tabla no es la de SAM: revise el esquema de SAM"),
    ("FechaFin", 0, "la tabla no es la de SAM: revise el esquema de SAM"),
    ("FechaActualizacion", 0, "la tabla no es la de SAM: revise el esquema de SAM"),
    ("FechaInicioReal", 0, _MIGRATION_005),
)


def _length(column_type: Any) -> int | None:
    """The declared character length, None when unbounded (TEXT, NVARCHAR(max))."""
    length = getattr(column_type, "length", None)
    if isinstance(length, str):  # SQL Server reflects NVARCHAR(max) as length "max" on some versions
        return None
    return length if isinstance(length, int) and length > 0 else None


def _mail_lines(settings: Settings) -> None:
    # Alerts are how an operator hears that callbacks are being lost (SPEC 9): say where they go.
    if not settings.email_smtp_host:
        _line(None, "EMAIL_SMTP_HOST sin configurar: las alertas solo se escriben en el log (nivel ERROR)")
    elif not settings.email_from or not settings.email_recipient_list:
        _line(
            None,
            "EMAIL_REMITENTE y EMAIL_DESTINATARIOS son necesarios para enviar alertas: "
            "sin ellos las alertas solo se escriben en el log",
        )
    else:
        recipients = len(settings.email_recipient_list)
        _line(
            True,
            f"Alertas por correo a {recipients} destinatario(s) por {settings.email_smtp_host}:"
            f"{settings.email_smtp_port}; pruébelo con `sam-callback test-mail`",
        )


def column_problems(columns: Iterable[Mapping[str, Any]], *, enforces_lengths: bool = True) -> list[str]:
    """What keeps the service's UPDATE from working, from reflected `Ejecuciones` columns (one line each).

    `columns` are the dictionaries of SQLAlchemy's `Inspector.get_columns`; `enforces_lengths`
    is False on SQLite, which stores any length whatever the declared type says.
    """
    found = {str(column["name"]): column["type"] for column in columns}
    problems: list[str] = []
    for name, least, remedy in _REQUIRED:
        if name not in found:
            problems.append(f"Columna Ejecuciones.{name} ausente: {remedy}")
            continue
        if not enforces_lengths or least == 0:
            continue
        length = _length(found[name])
        if least is None and length is not None:
            problems.append(
                f"Columna Ejecuciones.{name} admite solo {length} caracteres y el cuerpo del callback "
                f"puede ser mayor (debe ser NVARCHAR(MAX)/text): {remedy}"
            )
        elif least is not None and length is not None and length < least:
            problems.append(f"Columna Ejecuciones.{name} admite {length} caracteres; necesita {least}: {remedy}")
    return problems


def _line(ok: bool | None, text: str) -> None:
    mark = {True: "[OK]   ", False: "[ERROR]", None: "[AVISO]"}[ok]
    print(f"{mark} {text}")  # noqa: T201 - this module is the CLI's report


def run_checks(settings: Settings) -> int:
    """Print one line per check; return 0 when nothing failed, 1 when a check failed, 2 for a configuration `serve` refuses."""
    failed = False
    try:
        authenticator = Authenticator(settings)
    except ConfigError as exc:
        for problem in exc.problems:
            _line(False, problem)
        return 2
    url = settings.resolved_database_url()
    # What `serve` refuses with exit code 2 is a configuration problem here too.
    # Nothing is created here: `check` may run as another user than the service.
    unusable = driver_problem(url, create=False)
    config_problems = [f"Base de datos: {unusable}"] if unusable is not None else []
    log_problem = log_file_problem(settings, create=False)
    config_problems += [log_problem] if log_problem is not None else []
    if config_problems:
        for problem in config_problems:
            _line(False, problem)
        return 2
    _line(True, f"Configuración válida (modo de autenticación: {settings.auth_mode})")
    _line(True, f"Log utilizable: {settings.log_file}")
    for warning in name_warnings(env_file_path()):
        _line(None, warning)
    for warning in authenticator.warnings:
        _line(None, warning)
    if settings.auth_mode == "none":
        _line(
            None,
            "CALLBACK_AUTH_MODE=none: cualquiera que alcance el puerto puede registrar callbacks",
        )
    for index, token in enumerate(settings.tokens):
        if len(token) < MIN_TOKEN_LENGTH:
            name = "CALLBACK_TOKEN" if index == 0 and settings.token else f"CALLBACK_TOKENS_ANTERIORES n.º {index}"
            _line(None, f"{name} tiene {len(token)} caracteres; se recomiendan al menos {MIN_TOKEN_LENGTH}")
        if not token.isascii():
            name = "CALLBACK_TOKEN" if index == 0 and settings.token else f"CALLBACK_TOKENS_ANTERIORES n.º {index}"
            # HTTP header values travel as Latin-1 (SAM's launcher, Python's requests, encodes them
            # so): a character outside it cannot be sent at all, and other tools may send UTF-8.
            _line(
                None,
                f"{name} tiene caracteres no ASCII: el lanzador de SAM lo envía en Latin-1 y otras "
                "herramientas quizá en UTF-8 (que no coincidiría); use solo letras, cifras y signos ASCII",
            )
    _mail_lines(settings)
    database_failed = _database_lines(settings, url)
    return 1 if _spool_lines(settings) or database_failed or failed else 0


def _database_lines(settings: Settings, url: str) -> bool:
    """The database's lines; True when one failed."""
    failed = False
    database = sqlite_file(url)
    if database is not None and not database.exists():
        # Not created here: `check` may run as another user than the service.
        _line(None, f"La base SQLite {database} aún no existe: el servicio la creará, con su tabla, al arrancar")
        return False
    repository = Repository(make_engine(url, connect_timeout=settings.sql_connect_timeout), settings.final_state_set)
    shown = display_url(repository.engine.url)
    try:
        repository.ping()
        _line(True, f"Base de datos accesible: {shown}")
        if repository.table_exists():
            problems = column_problems(
                repository.table_columns(), enforces_lengths=repository.engine.dialect.name != "sqlite"
            )
            for problem in problems:
                failed = True
                _line(False, problem)
            if not problems:
                _line(True, "Tabla Ejecuciones presente, con las columnas que escribe el servicio")
                # SELECT alone lets every check above pass, and then every callback is refused.
                denied = repository.update_problem(f"{PROBE_PREFIX}check")
                if denied is None:
                    _line(True, "La cuenta puede actualizar Ejecuciones (sentencia del servicio, sin cambios)")
                else:
                    failed = True
                    _line(
                        False,
                        f"La cuenta no puede actualizar Ejecuciones ({denied}): conceda SELECT y UPDATE sobre "
                        "dbo.Ejecuciones al usuario de SQL_SAM_USUARIO",
                    )
        elif repository.engine.dialect.name == "sqlite":
            _line(None, "Tabla Ejecuciones ausente: el servicio la creará al arrancar (SQLite)")
        else:
            failed = True
            _line(False, "Tabla Ejecuciones ausente: ejecute `sam-callback init-db`")
    except Exception as exc:
        failed = True
        _line(False, f"Base de datos no accesible ({shown}): {describe_error(exc)}")
    finally:
        repository.dispose()
    return failed


def _spool_lines(settings: Settings) -> bool:
    """The spool's line; True when it failed."""
    failed = False
    if not settings.spool_path.exists():
        reason = unwritable_reason(settings.spool_path)
        if reason is not None:
            _line(False, f"No se puede crear el spool {settings.spool_path} ({reason}) (CALLBACK_SPOOL_PATH)")
            return True
        _line(True, f"Spool: aún no existe; el servicio lo creará en {settings.spool_path}")
        return False
    spool = Spool(settings.spool_path)
    try:
        spool.open()
        stats = spool.stats()
        _line(
            True,
            f"Spool utilizable: {settings.spool_path} ({stats.backlog} pendientes, {stats.unmatched} no emparejados)",
        )
    except SpoolError as exc:
        failed = True
        _line(False, str(exc))
    finally:
        spool.close()
    return failed
