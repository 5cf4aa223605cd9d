"""The `sam-callback` command: serve, check, init-db, send, spool, status, test-mail."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from . import __version__
from .payload import PROBE_PREFIX
from .sending import SendAs, SendError, build_request, post_callback
from .settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from .spool import SpoolEntry

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
_NEED_SERVING_CONFIGURATION = frozenset({"serve", "check"})


# argparse's own words, in Spanish: operators read the help and the errors in Spanish. Matched
# as argparse writes them today; a wording argparse changes stays English (tests/test_cli.py says so).
_HELP_WORDS = (
    (re.compile(r"^usage: ", re.MULTILINE), "uso: "),
    (re.compile(r"^positional arguments:$", re.MULTILINE), "argumentos:"),
    (re.compile(r"^options:$", re.MULTILINE), "opciones:"),
    (re.compile(r"show this help message and exit"), "muestra esta ayuda y sale"),
    (re.compile(r"show program's version number and exit"), "muestra la versión y sale"),
)
_ERRORS = (
    (re.compile(r"^the following arguments are required: (.*)$"), r"faltan argumentos obligatorios: \1"),
    (
        re.compile(r"^argument (.*?): invalid choice: (.*) \(choose from (.*)\)$"),
        r"argumento \1: valor no válido: \2 (se espera uno de: \3)",
    ),
    (re.compile(r"^argument (.*?): invalid (?:int|float) value: (.*)$"), r"argumento \1: número no válido: \2"),
    (re.compile(r"^argument (.*?): expected one argument$"), r"argumento \1: falta su valor"),
    (re.compile(r"^argument (.*?): not allowed with argument (.*)$"), r"argumento \1: no se puede usar junto con \2"),
    (re.compile(r"^unrecognized arguments: (.*)$"), r"argumentos no reconocidos: \1"),
)


def _spanish(text: str, words: tuple[tuple[re.Pattern[str], str], ...]) -> str:
    for pattern, replacement in words:
        text = pattern.sub(replacement, text)
    return text


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage line, section titles, help option and errors in Spanish."""

    def format_usage(self) -> str:
        """The usage line, in Spanish."""
        return _spanish(super().format_usage(), _HELP_WORDS)

    def format_help(self) -> str:
        """The help text, in Spanish."""
        return _spanish(super().format_help(), _HELP_WORDS)

    def error(self, message: str) -> NoReturn:
        """The usage line and the error in Spanish; exit code 2, as argparse."""
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {_spanish(message, _ERRORS)}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sam-callback", description="Receptor de callbacks de A360 para SAM")
    parser.add_argument("--version", action="version", version=f"sam-callback {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMANDO")
    commands.add_parser("serve", help="arranca el servidor (por defecto)")
    commands.add_parser("check", help="comprueba configuración, base de datos, tabla y spool")
    init_db = commands.add_parser("init-db", help="crea la tabla Ejecuciones (SQLite/PostgreSQL) o imprime el T-SQL")
    init_db.add_argument("--print-sql", action="store_true", help="solo imprime el T-SQL de SQL Server")
    send = commands.add_parser(
        "send",
        help="envía un callback de ejemplo a un servidor en marcha",
        description=(
            "Envía un callback a un servidor en marcha con las cabeceras que usa SAM. Sin --deployment-id "
            f"el deploymentId empieza por '{PROBE_PREFIX}': el servidor lo autentica y lo valida, responde "
            "200 (probe) y no registra nada. Con --deployment-id es un callback real."
        ),
    )
    send.add_argument(
        "--url",
        required=True,
        help="URL completa del callback, p. ej. http://host:8008/api/callback",
    )
    send.add_argument(
        "--deployment-id",
        default=None,
        help=f"deploymentId de una ejecución real (por defecto, uno de prueba '{PROBE_PREFIX}...' que no se registra)",
    )
    send.add_argument(
        "--status",
        default=None,
        help="estado a enviar (por defecto RUN_COMPLETED; RUN_ABORTED con --como desbloqueo)",
    )
    send.add_argument(
        "--como",
        choices=[mode.value for mode in SendAs],
        default=SendAs.LAUNCHER.value,
        help=(
            "cabeceras a enviar: 'lanzador' (por defecto) las que el lanzador de SAM pone en callbackInfo: "
            "X-Authorization con CALLBACK_TOKEN y, si se da un JWT, Authorization: Bearer y x-ibm-client-id "
            "(APIGW_CLIENT_ID); 'desbloqueo' las del desbloqueo de la interfaz web: solo Bearer y "
            "x-ibm-client-id, estado RUN_ABORTED (exige JWT); 'token' solo X-Authorization"
        ),
    )
    jwt_source = send.add_mutually_exclusive_group()
    jwt_source.add_argument(
        "--jwt", default=None, metavar="TOKEN", help="JWT del API Gateway para Authorization: Bearer"
    )
    jwt_source.add_argument(
        "--jwt-file",
        type=Path,
        default=None,
        metavar="RUTA",
        help="fichero con el JWT (preferible: no queda en el historial)",
    )
    send.add_argument("--insecure", action="store_true", help="no verificar el certificado TLS")
    spool = commands.add_parser("spool", help="lista, reintenta o purga el spool")
    spool_commands = spool.add_subparsers(dest="spool_command", metavar="ACCION", required=True)
    spool_list = spool_commands.add_parser("list", help="lista los callbacks guardados")
    spool_list.add_argument("--unmatched", action="store_true", help="solo los no emparejados")
    spool_list.add_argument(
        "--refused", action="store_true", help="solo los rechazados por la base de datos de forma permanente"
    )
    spool_list.add_argument("--rejected", action="store_true", help="los callbacks rechazados (400/415) guardados")
    spool_list.add_argument("--json", action="store_true", help="salida JSON")
    spool_show = spool_commands.add_parser("show", help="muestra un callback rechazado completo, con su cuerpo")
    spool_show.add_argument(
        "seq", type=int, help="número del callback rechazado (columna 1 de `spool list --rejected`)"
    )
    spool_retry = spool_commands.add_parser(
        "retry", help="los reintenta ya (los no emparejados reciben una nueva ventana)"
    )
    spool_retry.add_argument("--unmatched", action="store_true", help="solo los no emparejados")
    spool_retry.add_argument("--refused", action="store_true", help="solo los rechazados por la base de datos")
    purge = spool_commands.add_parser("purge", help="borra callbacks del spool")
    purge.add_argument("--all", action="store_true", help="todos, no solo los no emparejados")
    purge.add_argument("--rejected", action="store_true", help="vacía los callbacks rechazados guardados")
    purge.add_argument("--older-than-days", type=float, default=None, help="solo los recibidos hace más de N días")
    purge.add_argument("--yes", action="store_true", help="no pregunta en un terminal antes de borrar")
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
    except BrokenPipeError:
        # The reader went away (`sam-callback spool list | head`): no traceback, and Python's
        # own flush at exit must not fail again on the closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


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
    repository = Repository(make_engine(url, connect_timeout=settings.sql_connect_timeout), settings.final_state_set)
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
    try:
        request = build_request(
            mode=SendAs(args.como),
            deployment_id=args.deployment_id,
            status=args.status,
            token=settings.token,
            client_id=settings.api_gateway_client_id,
            jwt=args.jwt,
            jwt_file=args.jwt_file,
        )
    except SendError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in request.warnings:
        print(f"AVISO: {warning}", file=sys.stderr)
    print(f"Enviando como {request.mode.value}: cabeceras {', '.join(request.header_names)}")
    if request.probe:
        print(f"deploymentId de prueba {request.deployment_id}: el servidor no registrará nada")
    try:
        status_code, text = post_callback(request, url=args.url, verify=not args.insecure)
    except SendError as exc:
        print(f"No se pudo enviar el callback a {args.url}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"HTTP {status_code}")
    print(text)
    return EXIT_OK if 200 <= status_code < 300 else EXIT_FAILED


def _no_spool_here(settings: Settings, args: argparse.Namespace) -> int:
    """The spool file does not exist: nothing to list or change, and it is not created here."""
    # Run from the wrong folder (or without the service's CALLBACK_SPOOL_PATH), a read-only
    # command used to create an empty spool and show nothing as if nothing were pending.
    print(
        f"Aviso: no existe el spool {settings.spool_path}: no hay nada guardado ahí. Compruebe CALLBACK_SPOOL_PATH "
        "y la carpeta desde la que ejecuta la orden (la del servicio)",
        file=sys.stderr,
    )
    if args.spool_command == "show":
        print(f"No hay ningún callback rechazado con el número {args.seq}", file=sys.stderr)
        return EXIT_FAILED
    if args.spool_command == "list" and args.json:
        print("[]")
    return EXIT_OK


def _spool(settings: Settings, args: argparse.Namespace) -> int:
    from .spool import Spool, SpoolError

    if not settings.spool_path.exists():
        return _no_spool_here(settings, args)
    if args.spool_command == "show" or getattr(args, "rejected", False):
        return _rejected(settings, args)
    spool = Spool(settings.spool_path)
    try:
        if args.spool_command == "list":
            entries = spool.entries(only_unmatched=args.unmatched, only_refused=args.refused)
            stats = spool.stats()
            if args.json:
                print(json.dumps([_spool_dict(e) for e in entries], ensure_ascii=False, indent=2))
                return EXIT_OK
            print(
                f"Spool {settings.spool_path}: {stats.queued} en cola, {stats.pending} esperando su ejecución, "
                f"{stats.unmatched} no emparejados, {stats.refused} rechazados por la base de datos "
                "(los rechazados por su contenido, 400/415: `spool list --rejected`)"
            )
            if stats.refused:
                print(
                    "Rechazados: la base de datos no admite el UPDATE (columna ausente o demasiado pequeña, permisos). "
                    "Ejecute `sam-callback check`, aplique la migración de SAM indicada y `sam-callback spool retry`"
                )
            for e in entries:
                state = "NO EMPAREJADO" if e.unmatched else ("RECHAZADO" if e.refused else e.kind.code)
                print(
                    f"{e.seq:>8}  {_when(e.received_at)}  {state:<14} {e.deployment_id}  {e.status}  intentos={e.attempts}  {e.last_error or ''}"
                )
            return EXIT_OK
        if args.spool_command == "retry":
            count = spool.retry_now(only_unmatched=args.unmatched, only_refused=args.refused)
            print(f"{count} callbacks marcados para reintento inmediato (el servicio en marcha los aplicará)")
            return EXIT_OK
        if not _confirmed(args, "los callbacks del spool" if args.all else "los callbacks no emparejados del spool"):
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


def _confirmed(args: argparse.Namespace, what: str) -> bool:
    """Whether to purge: `--yes`, a script (SPEC 10 names the bare command), or a person who answers "s"."""
    if args.yes or not (sys.stdin.isatty() and sys.stdout.isatty()):
        return True
    try:
        answer = input(f"Se borrarán {what}, de forma definitiva. ¿Continuar? [s/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() in ("s", "si", "sí", "y", "yes"):
        return True
    print("No se ha borrado nada (--yes confirma sin preguntar)", file=sys.stderr)
    return False


def _rejected(settings: Settings, args: argparse.Namespace) -> int:
    from .rejected import RejectedStore, RejectedStoreError

    store = RejectedStore(settings.spool_path, max_entries=settings.rejected_max)
    try:
        if args.spool_command == "list":
            entries = store.entries()
            if args.json:
                print(json.dumps([_rejected_dict(e) for e in entries], ensure_ascii=False, indent=2))
                return EXIT_OK
            print(f"Callbacks rechazados guardados en {settings.spool_path}: {len(entries)}")
            for e in entries:
                print(
                    f"{e.seq:>8}  {_when(e.received_at)}  {e.client}  {e.deployment_id or '-'}  {e.reason}  request_id={e.request_id}"
                )
            return EXIT_OK
        if args.spool_command == "show":
            entry = store.get(args.seq)
            if entry is None:
                print(f"No hay ningún callback rechazado con el número {args.seq}", file=sys.stderr)
                return EXIT_FAILED
            # Whatever a caller sent is shown, never obeyed: control characters (terminal escape
            # sequences among them) are printed as \\uXXXX.
            print(f"Número:        {entry.seq}")
            print(f"Recibido:      {_when(entry.received_at)}")
            print(f"Cliente:       {_terminal_safe(entry.client)}")
            print(f"request_id:    {_terminal_safe(entry.request_id)}")
            print(f"Respuesta:     {entry.code}")
            print(f"Motivo:        {_terminal_safe(entry.reason)}")
            print(f"Content-Type:  {_terminal_safe(entry.content_type or '-')}")
            print(f"deploymentId:  {_terminal_safe(entry.deployment_id or '-')}")
            print("Cuerpo recibido (caracteres de control como \\uXXXX):")
            print(_terminal_safe(entry.body_text()))
            return EXIT_OK
        if args.spool_command == "purge":
            if not _confirmed(args, "los callbacks rechazados guardados"):
                return EXIT_FAILED
            print(f"{store.purge()} callbacks rechazados borrados")
            return EXIT_OK
        print("--rejected solo vale para list y purge", file=sys.stderr)
        return EXIT_FAILED
    except RejectedStoreError as exc:
        print(f"Error del spool: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        store.close()


# C0 and C1 controls but tab and newline, which a terminal only moves the cursor for.
_TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _terminal_safe(text: str) -> str:
    return _TERMINAL_CONTROLS.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _spool_dict(entry: SpoolEntry) -> dict[str, object]:
    # The kind by its name, as the spool file and the answers have it, not its priority number.
    return _entry_dict(entry) | {"kind": entry.kind.code.value}


def _rejected_dict(entry: object) -> dict[str, object]:
    data = _entry_dict(entry)
    body = data.pop("body", b"")
    data["body"] = body.decode("utf-8", errors="backslashreplace") if isinstance(body, bytes) else body
    return data


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
