"""The `sam-callback` command as an operator runs it: init-db, check, send, spool, serve."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from sam.callback.repository import make_engine
from tests.utils import TOKEN, Keys, ServerProcess, fetch_run, insert_run, run_cli, run_cli_in_terminal, wait_for


def cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI with the test token and logs under `cwd`."""
    return run_cli(cwd, *args, **({"CALLBACK_TOKEN": TOKEN, "LOG_DIRECTORY": str(cwd / "logs")} | env))


def test_init_db_creates_the_table_on_sqlite_and_is_idempotent(tmp_path: Path) -> None:
    first = cli(tmp_path, "init-db")
    assert first.returncode == 0, first.stderr
    assert sa.inspect(make_engine("sqlite:///" + (tmp_path / "data" / "sam.db").as_posix())).has_table("Ejecuciones")
    second = cli(tmp_path, "init-db")
    assert second.returncode == 0 and "ya existía" in second.stdout


def test_init_db_on_postgresql(tmp_path: Path, pg_server: str) -> None:
    name = f"samcb_init_{os.getpid()}"
    admin = sa.create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = pg_server.rsplit("/", 1)[0] + f"/{name}"
    try:
        result = cli(tmp_path, "init-db", SAM_DATABASE_URL=url)
        assert result.returncode == 0, result.stderr
        engine = make_engine(url)
        assert sa.inspect(engine).has_table("Ejecuciones")
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_init_db_prints_tsql_for_sql_server(tmp_path: Path) -> None:
    result = cli(tmp_path, "init-db", SQL_SAM_HOST="sqlsrv01", SQL_SAM_DB_NAME="SAM")
    assert result.returncode == 0
    assert "CREATE TABLE dbo.[Ejecuciones]" in result.stdout and "GO" in result.stdout
    assert cli(tmp_path, "init-db", "--print-sql").stdout.count("CREATE TABLE") == 1


def test_check_reports_ok_and_warns_about_short_tokens(tmp_path: Path) -> None:
    cli(tmp_path, "init-db")
    result = cli(tmp_path, "check", CALLBACK_TOKEN="corto")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[OK]" in result.stdout and "Tabla Ejecuciones presente" in result.stdout
    assert "[AVISO]" in result.stdout and "32" in result.stdout
    assert "corto" not in result.stdout


def test_a_env_file_that_is_not_utf8_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Notepad's "ANSI" with an accented comment: every command says which line, and stops with 2."""
    (tmp_path / ".env").write_bytes(b"# Configuraci\xf3n de SAM\nCALLBACK_TOKEN=" + TOKEN.encode() + b"\n")
    for command in (["serve"], ["check"], ["spool", "list"], ["status"]):
        result = cli(tmp_path, *command)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.strip().splitlines() == [
            "Error de configuración: .env: no es texto UTF-8 (línea 1, byte 0xf3); guárdelo con codificación UTF-8"
        ], command


def test_a_log_folder_that_cannot_be_written_stops_serve_and_check_with_exit_2(tmp_path: Path) -> None:
    """A log folder under a file (or a missing drive, no permission) is a configuration error, not a traceback."""
    (tmp_path / "afile").write_text("")
    folder = str(tmp_path / "afile" / "logs")
    for command in ("serve", "check"):
        result = cli(tmp_path, command, LOG_DIRECTORY=folder)
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert "no se puede escribir el log" in output and "Traceback" not in output
        assert "Configuración válida" not in output
    # A file name with folders in it is fine: serve creates them, as it creates the log folder.
    result = cli(tmp_path, "check", LOG_ARCHIVO_CALLBACK="sub/dir/callback.log")
    assert result.returncode == 0, result.stdout
    assert "[OK]    Log utilizable" in result.stdout


def test_check_creates_nothing(tmp_path: Path) -> None:
    """Run by an administrator before the first start, check must not leave folders the service cannot write."""
    result = cli(tmp_path, "check")
    assert result.returncode == 0, result.stdout
    assert "aún no existe: el servicio la creará" in result.stdout
    assert "Spool: aún no existe; el servicio lo creará" in result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_check_refuses_an_unusable_database_url_as_serve_does(tmp_path: Path) -> None:
    (tmp_path / "un-fichero").write_text("no es una carpeta")
    under_a_file = f"sqlite:///{(tmp_path / 'un-fichero' / 'sam.db').as_posix()}"
    for url, problem in (
        ("nonsense://x", "no es una URL de base de datos válida"),
        (under_a_file, "no se puede crear la"),  # serve: "la carpeta de la base SQLite"; check: "la base SQLite"
    ):
        for command in ("serve", "check"):
            result = cli(tmp_path, command, SAM_DATABASE_URL=url)
            output = result.stdout + result.stderr
            assert result.returncode == 2, output
            assert problem in output and "Configuración válida" not in output and "Traceback" not in output


def test_check_fails_readably_when_the_database_is_down(tmp_path: Path) -> None:
    result = cli(tmp_path, "check", SAM_DATABASE_URL="postgresql+psycopg://postgres:secreto@127.0.0.1:1/sam")
    assert result.returncode == 1
    assert "[ERROR] Base de datos no accesible" in result.stdout
    assert "secreto" not in result.stdout + result.stderr and "Traceback" not in result.stdout + result.stderr


def test_check_warns_about_mode_none(tmp_path: Path) -> None:
    result = cli(tmp_path, "check", CALLBACK_AUTH_MODE="none")
    assert "CALLBACK_AUTH_MODE=none" in result.stdout


def test_send_posts_a_sample_callback_to_a_running_server(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory().start()
    db = server.env["SAM_DATABASE_URL"]
    insert_run(db, "smoke-1", "RUNNING")
    result = cli(
        tmp_path, "send", "--url", server.callback_url, "--deployment-id", "smoke-1", "--status", "RUN_COMPLETED"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HTTP 200" in result.stdout and '"updated"' in result.stdout
    assert fetch_run(db, "smoke-1")["Estado"] == "RUN_COMPLETED"  # type: ignore[index]
    wrong = cli(tmp_path, "send", "--url", server.callback_url, CALLBACK_TOKEN="otro-token-que-no-vale-para-nada-xx")
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stdout
    assert server.stop() == 0


def test_send_carries_a_latin1_token_as_sams_launcher_does(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """'ñ' travels as one Latin-1 byte (requests does the same) and matches; a token outside Latin-1 is refused cleanly."""
    token = "señal-de-prueba-con-eñe-0123456789abcdef"
    server = server_factory(CALLBACK_TOKEN=token).start()
    sent = cli(tmp_path, "send", "--url", server.callback_url, CALLBACK_TOKEN=token)
    assert sent.returncode == 0 and "HTTP 200" in sent.stdout, sent.stdout + sent.stderr
    refused = cli(tmp_path, "send", "--url", server.callback_url, CALLBACK_TOKEN="token-con-€-0123456789abcdef-xyz")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "CALLBACK_TOKEN tiene caracteres que no caben en una cabecera HTTP" in refused.stderr
    assert "€" not in refused.stderr + refused.stdout
    checked = cli(tmp_path, "check", CALLBACK_TOKEN=token)
    assert "CALLBACK_TOKEN tiene caracteres no ASCII" in checked.stdout and token not in checked.stdout
    assert server.stop() == 0


def test_spool_commands_in_a_folder_without_a_spool_create_nothing_and_say_so(tmp_path: Path) -> None:
    """Run from the wrong folder, `spool list` says there is no spool there instead of creating an empty one."""
    for command in (["list"], ["list", "--rejected"], ["list", "--json"], ["retry"], ["purge", "--yes"]):
        result = cli(tmp_path, "spool", *command)
        assert result.returncode == 0, (command, result.stderr)
        assert "no existe el spool" in result.stderr and "CALLBACK_SPOOL_PATH" in result.stderr
    assert cli(tmp_path, "spool", "list", "--json").stdout.strip() == "[]"
    shown = cli(tmp_path, "spool", "show", "1")
    assert shown.returncode == 1 and "No hay ningún callback rechazado con el número 1" in shown.stderr
    assert not (tmp_path / "data").exists()


def test_spool_list_retry_purge(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = server_factory(CALLBACK_MATCH_WINDOW_SECONDS="0").start()
    env = {"CALLBACK_SPOOL_PATH": server.env["CALLBACK_SPOOL_PATH"]}
    assert cli(tmp_path, "send", "--url", server.callback_url, "--deployment-id", "huerfano-1").returncode == 0
    wait_for(lambda: "NO EMPAREJADO" in cli(tmp_path, "spool", "list", **env).stdout, what="listado como no emparejado")
    listing = cli(tmp_path, "spool", "list", "--unmatched", **env)
    assert "huerfano-1" in listing.stdout and "1 no emparejados" in listing.stdout
    assert '"deployment_id": "huerfano-1"' in cli(tmp_path, "spool", "list", "--json", **env).stdout
    assert server.stop() == 0
    # The run appears late; an operator retries the unmatched callback and a restart applies it.
    insert_run(server.env["SAM_DATABASE_URL"], "huerfano-1", "RUNNING")
    retried = cli(tmp_path, "spool", "retry", "--unmatched", **env)
    assert retried.returncode == 0 and retried.stdout.startswith("1 ")
    server.env["CALLBACK_MATCH_WINDOW_SECONDS"] = "3600"
    server.start()
    wait_for(
        lambda: fetch_run(server.env["SAM_DATABASE_URL"], "huerfano-1")["Estado"] == "RUN_COMPLETED",
        what="aplicado tras retry",
    )  # type: ignore[index]
    assert server.stop() == 0
    # Purge removes what the operator gives up on.
    server.env["CALLBACK_MATCH_WINDOW_SECONDS"] = "0"
    server.start()
    assert cli(tmp_path, "send", "--url", server.callback_url, "--deployment-id", "huerfano-2").returncode == 0
    wait_for(
        lambda: "huerfano-2" in cli(tmp_path, "spool", "list", "--unmatched", **env).stdout,
        what="segundo no emparejado",
    )
    assert server.stop() == 0
    # At a terminal, purge asks first; anything but "s" keeps the callbacks.
    code, screen = run_cli_in_terminal(tmp_path, "spool", "purge", answer="n", **env)
    assert code == 1 and "¿Continuar? [s/N]" in screen and "No se ha borrado nada" in screen
    assert "huerfano-2" in cli(tmp_path, "spool", "list", "--unmatched", **env).stdout
    code, screen = run_cli_in_terminal(tmp_path, "spool", "purge", answer="s", **env)
    assert code == 0 and "1 callbacks borrados del spool" in screen
    assert "huerfano-2" not in cli(tmp_path, "spool", "list", **env).stdout


def test_python_dash_m_serves_and_stops_cleanly(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory().start()
    assert server.stop() == 0
    assert "sam-callback listo" in server.console()


CLIENT_ID = "cliente-gateway-de-pruebas"


def test_send_reproduces_the_launcher_and_the_unlock_header_sets(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, keys: Keys, other_keys: Keys
) -> None:
    """Mode required with token, key and client id: only the launcher's full set passes; the unlock's carries no token."""
    key_file = tmp_path / "gateway.pem"
    key_file.write_text(keys.public_pem)
    gateway = {"API_GATEWAY_CLIENT_ID": CLIENT_ID}
    server = server_factory(CALLBACK_AUTH_MODE="required", JWT_PUBLIC_KEY=str(key_file), **gateway).start(wait=False)
    # Mode optional, for the unlock; both start at once (another spool and log folder, the same database).
    lenient = server_factory(
        CALLBACK_AUTH_MODE="optional", JWT_PUBLIC_KEY=str(key_file), **gateway,
        CALLBACK_SPOOL_PATH=str(tmp_path / "spool-2" / "spool.db"), LOG_DIRECTORY=str(tmp_path / "logs-2"),
    )  # fmt: skip
    lenient.cwd = tmp_path / "lenient"  # its console output apart from the other's
    lenient.cwd.mkdir()
    lenient.start(wait=False)
    for started in (server, lenient):
        # Two interpreters importing at once on a loaded machine: more than start()'s 30 s.
        wait_for(started._healthy, timeout=180, what=f"arranque del servidor en {started.base_url}")
    jwt_file = tmp_path / "jwt.txt"
    jwt_file.write_text("Bearer " + keys.token() + "\n")
    bad_jwt = other_keys.token()
    url = server.callback_url

    launcher = cli(tmp_path, "send", "--url", url, "--jwt-file", str(jwt_file), **gateway)
    assert launcher.returncode == 0, launcher.stdout + launcher.stderr
    assert "cabeceras Content-Type, X-Authorization, Authorization, x-ibm-client-id" in launcher.stdout
    assert '"code": "probe"' in launcher.stdout
    # Each header of the set is needed: without the JWT, or without the client id, mode required refuses.
    assert "HTTP 401" in cli(tmp_path, "send", "--url", url, **gateway).stdout
    assert "HTTP 401" in cli(tmp_path, "send", "--url", url, "--jwt-file", str(jwt_file)).stdout
    assert "HTTP 401" in cli(tmp_path, "send", "--url", url, "--como", "token").stdout
    # The unlock sends no X-Authorization: refused in mode required even though a token is configured.
    unlock = cli(tmp_path, "send", "--url", url, "--como", "desbloqueo", "--jwt-file", str(jwt_file), **gateway)
    assert "cabeceras Content-Type, Authorization, x-ibm-client-id" in unlock.stdout and "HTTP 401" in unlock.stdout
    assert server.stop() == 0

    # Mode optional: the unlock's JWT and client id are enough, and its RUN_ABORTED ends a real run.
    url = lenient.callback_url
    insert_run(server.env["SAM_DATABASE_URL"], "dep-trabada", "RUNNING")
    unlock = cli(
        tmp_path, "send", "--url", url, "--como", "desbloqueo", "--jwt-file", str(jwt_file),
        "--deployment-id", "dep-trabada", **gateway,
    )  # fmt: skip
    assert unlock.returncode == 0 and '"code": "updated"' in unlock.stdout, unlock.stdout + unlock.stderr
    row = fetch_run(server.env["SAM_DATABASE_URL"], "dep-trabada")
    assert row is not None and row["Estado"] == "RUN_ABORTED"
    assert json.loads(row["CallbackInfo"])["deviceId"] is None
    # A JWT the gateway did not sign: the unlock has no token to fall back on.
    forged = cli(tmp_path, "send", "--url", url, "--como", "desbloqueo", "--jwt", bad_jwt, **gateway)
    assert forged.returncode == 1 and "HTTP 401" in forged.stdout
    assert lenient.stop() == 0
    outputs = launcher.stdout + launcher.stderr + unlock.stdout + unlock.stderr + forged.stdout + forged.stderr
    assert TOKEN not in outputs and bad_jwt not in outputs and CLIENT_ID not in outputs
    assert jwt_file.read_text().split()[1] not in outputs


def test_send_refuses_header_sets_it_cannot_build(tmp_path: Path) -> None:
    unlock = cli(tmp_path, "send", "--url", "http://127.0.0.1:9/api/callback", "--como", "desbloqueo")
    assert unlock.returncode == 2 and "exige el JWT" in unlock.stderr
    token = cli(tmp_path, "send", "--url", "http://127.0.0.1:9/api/callback", "--como", "token", "--jwt", "abc.def.ghi")
    assert token.returncode == 2 and "solo X-Authorization" in token.stderr and "abc.def.ghi" not in token.stderr
    missing = cli(tmp_path, "send", "--url", "http://127.0.0.1:9/api/callback", "--jwt-file", str(tmp_path / "no"))
    assert missing.returncode == 2 and "no se puede leer el JWT" in missing.stderr


def test_send_never_prints_the_token_when_the_server_cannot_be_reached(tmp_path: Path) -> None:
    result = cli(tmp_path, "send", "--url", "http://127.0.0.1:9/api/callback", "--jwt", "eyJhbGciOi.eyJzdWIi.firma")
    assert result.returncode == 1 and "No se pudo enviar el callback" in result.stderr
    assert TOKEN not in result.stdout + result.stderr and "eyJhbGciOi" not in result.stdout + result.stderr


def test_help_and_usage_errors_are_in_spanish(tmp_path: Path) -> None:
    """argparse's own words too: if a Python release rewords them, this test says which went back to English."""
    helped = cli(tmp_path, "spool", "list", "--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith("uso: sam-callback spool list")
    assert "\nopciones:\n" in helped.stdout and "muestra esta ayuda y sale" in helped.stdout
    assert "argumentos:" in cli(tmp_path, "--help").stdout
    for args, expected in (
        (["spool", "show"], "faltan argumentos obligatorios: seq"),
        (["spool", "show", "x"], "argumento seq: número no válido: 'x'"),
        (["desconocida"], "argumento COMANDO: valor no válido: 'desconocida' (se espera uno de: 'serve'"),
        (["check", "sobra"], "argumentos no reconocidos: sobra"),
        (
            ["send", "--url", "u", "--jwt", "a", "--jwt-file", "b"],
            "argumento --jwt-file: no se puede usar junto con --jwt",
        ),
    ):
        result = cli(tmp_path, *args)
        assert result.returncode == 2, args
        assert result.stderr.startswith("uso: sam-callback"), result.stderr
        assert expected in result.stderr, result.stderr
        assert "usage" not in result.stderr and "error: the" not in result.stderr
