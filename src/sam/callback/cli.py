"""The `sam-callback` command: serve, check, init-db, send, spool, status, test-mail."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

import httpx

from . import __version__
from .settings import ConfigError, Settings, load_settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
_NEED_SERVING_CONFIGURATION = frozenset({"serve", "check"})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-callback", description="Receptor de callbacks de A360 para SAM")
    parser.add_argument("--version", action="version", version=f"sam-callback {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMANDO")
    commands.add_parser("serve", help="arranca el servidor (por defecto)")
    commands.add_parser("check", help="comprueba configuración, base de datos, tabla y spool")
    init_db = commands.add_parser("init-db", help="crea la tabla Ejecuciones (SQLite/PostgreSQL) o imprime el T-SQL")
    init_db.add_argument("--print-sql", action="store_true", help="solo imprime el T-SQL de SQL Server")
    send = commands.add_parser("send", help="envía un callback de ejemplo a un servidor en marcha")
    send.add_argument(
        "--url",
        required=True,
        help="URL completa del callback, p. ej. http://host:8008/api/callback",
    )
    send.add_argument("--deployment-id", default=None, help="deploymentId (por defecto, uno nuevo de prueba)")
    send.add_argument("--status", default="RUN_COMPLETED", help="estado a enviar (por defecto RUN_COMPLETED)")
    send.add_argument("--insecure", action="store_true", help="no verificar el certificado TLS")
    spool = commands.add_parser("spool", help="lista, reintenta o purga el spool")
    spool_commands = spool.add_subparsers(dest="spool_command", metavar="ACCION", required=True)
    spool_list = spool_commands.add_parser("list", help="lista los callbacks guardados")
    spool_list.add_argument("--unmatched", action="store_true", help="solo los no emparejados")
    spool_list.add_argument(
        "--refused", action="store_true", help="solo los rechazados por la base de datos de forma permanente"
    )
    spool_list.add_argument("--json", action="store_true", help="salida JSON")
    spool_retry = spool_commands.add_parser(
        "retry", help="los reintenta ya (los no emparejados reciben una nueva ventana)"
    )
    spool_retry.add_argument("--unmatched", action="store_true", help="solo los no emparejados")
    spool_retry.add_argument("--refused", action="store_true", help="solo los rechazados por la base de datos")
    purge = spool_commands.add_parser("purge", help="borra callbacks del spool")
    purge.add_argument("--all", action="store_true", help="todos, no solo los no emparejados")
    purge.add_argument("--older-than-days", type=float, default=None, help="solo los recibidos hace más de N días")
    purge.add_argument("--yes", action="store_true", help="confirma el borrado")
    commands.add_parser(
        "test-mail", help="envía un correo de prueba a EMAIL_DESTINATARIOS con la configuración EMAIL_*"
    )
    status = commands.add_parser("status", help="resumen de una instancia en marcha")
    status.add_argument(
        "--url",
        default=None,
        help="URL base, p. ej. http://127.0.0.1:8008 (por defecto, la configurada)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sam-callback` and `python -m sam.callback`."""
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    try:
        # Only serving needs credentials and TLS files; operator commands run without them.
        settings = load_settings(for_serving=command in _NEED_SERVING_CONFIGURATION)
        handler = _COMMANDS[command]
        return handler(settings, args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"Error de configuración: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from .server import serve

    return serve(settings)


def _check(settings: Settings, args: argparse.Namespace) -> int:
    from .checks import run_checks

    return run_checks(settings)


def _init_db(settings: Settings, args: argparse.Namespace) -> int:
    from .repository import Repository, driver_problem, make_engine, mssql_ddl

    url = settings.resolved_database_url()
    if args.print_sql or url.startswith("mssql"):
        print("-- Ejecute este T-SQL en la base de datos de SAM (crea dbo.Ejecuciones):")
        print(mssql_ddl())
        return EXIT_OK
    problem = driver_problem(url)
    if problem is not None:
        print(f"No se pudo crear la tabla: {problem}", file=sys.stderr)
        return EXIT_FAILED
    repository = Repository(make_engine(url), settings.final_state_set)
    try:
        existed = repository.table_exists()
        repository.create_schema()
    except Exception as exc:
        print(
            f"No se pudo crear la tabla: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        repository.dispose()
    print("La tabla Ejecuciones ya existía" if existed else "Tabla Ejecuciones creada")
    return EXIT_OK


def _send(settings: Settings, args: argparse.Namespace) -> int:
    deployment_id = args.deployment_id or f"prueba-{uuid.uuid4()}"
    body = {
        "deploymentId": deployment_id,
        "status": args.status,
        "botOutput": {"origen": {"type": "STRING", "string": "sam-callback send"}},
    }
    headers = {"Content-Type": "application/json"}
    if settings.tokens:
        headers["X-Authorization"] = settings.tokens[0]
    try:
        answer = httpx.post(args.url, json=body, headers=headers, timeout=15, verify=not args.insecure)
    except httpx.HTTPError as exc:
        print(
            f"No se pudo enviar el callback a {args.url}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"HTTP {answer.status_code}")
    print(answer.text)
    return EXIT_OK if answer.is_success else EXIT_FAILED


def _spool(settings: Settings, args: argparse.Namespace) -> int:
    from .spool import Spool, SpoolError

    spool = Spool(settings.spool_path)
    try:
        if args.spool_command == "list":
            entries = spool.entries(only_unmatched=args.unmatched, only_refused=args.refused)
            stats = spool.stats()
            if args.json:
                print(json.dumps([_entry_dict(e) for e in entries], ensure_ascii=False, indent=2))
                return EXIT_OK
            print(
                f"Spool {settings.spool_path}: {stats.queued} en cola, {stats.pending} esperando su ejecución, "
                f"{stats.unmatched} no emparejados, {stats.refused} rechazados"
            )
            if stats.refused:
                print(
                    "Rechazados: la base de datos no admite el UPDATE (columna ausente o demasiado pequeña, permisos). "
                    "Ejecute `sam-callback check`, aplique la migración de SAM indicada y `sam-callback spool retry`"
                )
            for e in entries:
                state = "NO EMPAREJADO" if e.unmatched else ("RECHAZADO" if e.refused else e.kind)
                print(
                    f"{e.seq:>8}  {_when(e.received_at)}  {state:<14} {e.deployment_id}  {e.status}  intentos={e.attempts}  {e.last_error or ''}"
                )
            return EXIT_OK
        if args.spool_command == "retry":
            count = spool.retry_now(only_unmatched=args.unmatched, only_refused=args.refused)
            print(f"{count} callbacks marcados para reintento inmediato (el servicio en marcha los aplicará)")
            return EXIT_OK
        if not args.yes:
            print("El borrado es definitivo: repita con --yes para confirmarlo", file=sys.stderr)
            return EXIT_FAILED
        older = time.time() - args.older_than_days * 86400 if args.older_than_days is not None else None
        count = spool.purge(only_unmatched=not args.all, older_than=older)
        print(f"{count} callbacks borrados del spool")
        return EXIT_OK
    except SpoolError as exc:
        print(f"Error del spool: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        spool.close()


def _status(settings: Settings, args: argparse.Namespace) -> int:
    from .status import show_status

    return show_status(settings, args.url)


def _test_mail(settings: Settings, args: argparse.Namespace) -> int:
    from .logs import secrets_of
    from .mail import MailError, send_test_mail

    try:
        config = send_test_mail(settings, secrets_of(settings))
    except MailError as exc:
        print(f"No se pudo enviar el correo de prueba: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"Correo de prueba enviado mediante {config.describe()} a: {', '.join(config.recipients)}")
    return EXIT_OK


def _entry_dict(entry: object) -> dict[str, object]:
    from dataclasses import asdict, is_dataclass

    return asdict(entry) if is_dataclass(entry) and not isinstance(entry, type) else {}


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "serve": _serve,
    "check": _check,
    "init-db": _init_db,
    "send": _send,
    "spool": _spool,
    "status": _status,
    "test-mail": _test_mail,
}
