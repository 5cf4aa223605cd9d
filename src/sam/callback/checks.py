"""`sam-callback check`: configuration, database, table and spool, as a readable report."""

from __future__ import annotations

from .auth import Authenticator
from .repository import Repository, describe_error, display_url, driver_problem, make_engine
from .sam_env import conflicts, read_environment, repeated_in_file
from .settings import ConfigError, Settings
from .spool import Spool, SpoolError

MIN_TOKEN_LENGTH = 32


def _line(ok: bool | None, text: str) -> None:
    mark = {True: "[OK]   ", False: "[ERROR]", None: "[AVISO]"}[ok]
    print(f"{mark} {text}")  # noqa: T201 - this module is the CLI's report


def run_checks(settings: Settings) -> int:
    """Print one line per check; return 0 when nothing failed, else 1."""
    failed = False
    try:
        authenticator = Authenticator(settings)
    except ConfigError as exc:
        for problem in exc.problems:
            _line(False, problem)
        return 2
    _line(True, f"Configuración válida (modo de autenticación: {settings.auth_mode})")
    for _field, used, ignored in conflicts(read_environment()):
        _line(None, f"{used} y {ignored} tienen valores distintos: se usa {used} (el nombre actual de SAM)")
    for name in repeated_in_file():
        _line(None, f"{name} aparece varias veces en .env con valores distintos: se usa la última línea")
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
    url = settings.resolved_database_url()
    unusable = driver_problem(url)
    if unusable is not None:
        _line(False, f"Base de datos: {unusable}")
        return 1
    repository = Repository(make_engine(url, connect_timeout=settings.sql_connect_timeout), settings.final_state_set)
    shown = display_url(repository.engine.url)
    try:
        repository.ping()
        _line(True, f"Base de datos accesible: {shown}")
        if repository.table_exists():
            _line(True, "Tabla Ejecuciones presente")
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
    return 1 if failed else 0
