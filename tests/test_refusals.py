"""A database that refuses for good (SAM's migrations 005/007 missing): kept, visible, applied once fixed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.dialects import mssql

from sam.callback.app import create_app
from sam.callback.checks import column_problems
from sam.callback.domain import Callback
from sam.callback.recorder import Recorder
from sam.callback.repository import Failure, Repository, classify_error, make_engine
from sam.callback.settings import DEFAULT_FINAL_STATES, Settings
from sam.callback.spool import Spool
from tests.faults_support import callback_body, ready
from tests.utils import TOKEN, ServerProcess, auth_headers, fetch_run, insert_run, isolated_env, run_cli, wait_for

# SAM's table before its migrations: CallbackInfo nvarchar(500) (007), no FechaInicioReal (005).
SAM_TABLE = """
CREATE TABLE "Ejecuciones" (
    "EjecucionId" {identity} PRIMARY KEY,
    "DeploymentId" varchar(50) NOT NULL UNIQUE,
    "RobotId" int, "EquipoId" int, "UserId" int, "Hora" time,
    "FechaInicio" timestamp NOT NULL DEFAULT {now},
    "FechaFin" timestamp,
    "Estado" varchar(20) NOT NULL,
    "FechaActualizacion" timestamp,
    "CallbackInfo" varchar(500),
    "IntentosConciliadorFallidos" int NOT NULL DEFAULT 0,
    "FechaUltimoUNKNOWN" timestamp
    {fecha_inicio_real}
)
"""


def _sam_table(url: str, *, with_fecha_inicio_real: bool) -> None:
    """Replace the test table with SAM's as it was before the migrations."""
    engine = sa.create_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    ddl = SAM_TABLE.format(
        identity="INTEGER" if sqlite else "serial",
        now="CURRENT_TIMESTAMP" if sqlite else "LOCALTIMESTAMP(0)",
        fecha_inicio_real=', "FechaInicioReal" timestamp' if with_fecha_inicio_real else "",
    )
    with engine.begin() as conn:
        conn.exec_driver_sql('DROP TABLE IF EXISTS "Ejecuciones"')
        conn.exec_driver_sql(ddl)
    engine.dispose()


def _alter(url: str, statement: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(statement)
    engine.dispose()


def _cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(cwd, *args, **(isolated_env(cwd) | {"CALLBACK_TOKEN": TOKEN} | env))


# --- the column rules --------------------------------------------------------------------------


def _columns(**types: Any) -> list[dict[str, Any]]:
    base: dict[str, Any] = {
        "DeploymentId": mssql.NVARCHAR(50),
        "Estado": mssql.NVARCHAR(20),
        "CallbackInfo": mssql.NVARCHAR(None),
        "FechaInicio": mssql.DATETIME2(0),  # type: ignore[no-untyped-call]
        "FechaFin": mssql.DATETIME2(0),  # type: ignore[no-untyped-call]
        "FechaActualizacion": mssql.DATETIME2(0),  # type: ignore[no-untyped-call]
        "FechaInicioReal": mssql.DATETIME(),
    }
    merged = base | types
    return [{"name": name, "type": kind} for name, kind in merged.items() if kind is not None]


def test_column_rules_for_sql_server_types() -> None:
    assert column_problems(_columns()) == []
    assert column_problems(_columns(CallbackInfo=mssql.NVARCHAR("max"))) == []
    [short] = column_problems(_columns(CallbackInfo=mssql.NVARCHAR(500)))
    assert "CallbackInfo" in short and "500" in short
    assert "database/migrations/007_increase_callback_info_size.sql de SAM" in short
    [missing] = column_problems(_columns(FechaInicioReal=None))
    assert "FechaInicioReal" in missing and "database/migrations/005_add_fecha_inicio_real.sql" in missing
    [estado] = column_problems(_columns(Estado=mssql.NVARCHAR(10)))
    assert "Estado" in estado and "20" in estado
    # SQLite stores any length whatever the declared type says.
    assert column_problems(_columns(CallbackInfo=mssql.NVARCHAR(500)), enforces_lengths=False) == []


def test_check_names_the_missing_migrations_on_real_tables(tmp_path: Path, pg_url: str) -> None:
    sqlite_url = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    _sam_table(sqlite_url, with_fecha_inicio_real=False)
    result = _cli(tmp_path, "check", SAM_DATABASE_URL=sqlite_url)
    assert result.returncode == 1, result.stdout
    assert "[ERROR] Columna Ejecuciones.FechaInicioReal ausente" in result.stdout
    assert "005_add_fecha_inicio_real.sql" in result.stdout

    _sam_table(pg_url, with_fecha_inicio_real=False)
    result = _cli(tmp_path, "check", SAM_DATABASE_URL=pg_url)
    assert result.returncode == 1, result.stdout
    errors = [line for line in result.stdout.splitlines() if line.startswith("[ERROR]")]
    assert len(errors) == 2, result.stdout
    assert any("CallbackInfo" in line and "007_increase_callback_info_size.sql" in line for line in errors)
    assert any("FechaInicioReal" in line and "005_add_fecha_inicio_real.sql" in line for line in errors)

    _alter(pg_url, 'ALTER TABLE "Ejecuciones" ALTER COLUMN "CallbackInfo" TYPE text')
    _alter(pg_url, 'ALTER TABLE "Ejecuciones" ADD COLUMN "FechaInicioReal" timestamp')
    result = _cli(tmp_path, "check", SAM_DATABASE_URL=pg_url)
    assert result.returncode == 0 and "[ERROR]" not in result.stdout, result.stdout


def test_check_fails_when_the_account_may_read_but_not_update(tmp_path: Path, pg_url: str) -> None:
    """SELECT alone passes every table check; check runs the service's UPDATE (rolled back) to be sure."""
    role = f"samcb_ro_{uuid.uuid4().hex[:8]}"
    _alter(pg_url, f'CREATE ROLE "{role}" LOGIN')
    try:
        _alter(pg_url, f'GRANT SELECT ON "Ejecuciones" TO "{role}"')
        reader = pg_url.replace("postgresql+psycopg://postgres@", f"postgresql+psycopg://{role}@")
        result = _cli(tmp_path, "check", SAM_DATABASE_URL=reader)
        assert result.returncode == 1, result.stdout
        [error] = [line for line in result.stdout.splitlines() if line.startswith("[ERROR]")]
        assert "no puede actualizar Ejecuciones" in error and "UPDATE" in error
        _alter(pg_url, f'GRANT UPDATE ON "Ejecuciones" TO "{role}"')
        result = _cli(tmp_path, "check", SAM_DATABASE_URL=reader)
        assert result.returncode == 0, result.stdout
        assert "[OK]    La cuenta puede actualizar Ejecuciones" in result.stdout
        assert fetch_run(pg_url, "sam-callback-prueba-check") is None
    finally:
        _alter(pg_url, f'REVOKE ALL ON "Ejecuciones" FROM "{role}"')
        _alter(pg_url, f'DROP ROLE IF EXISTS "{role}"')


# --- classification on real errors -------------------------------------------------------------


def test_real_errors_are_classified(tmp_path: Path, pg_url: str) -> None:
    def failure(url: str, *statements: str) -> Failure:
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                for statement in statements:
                    conn.exec_driver_sql(statement)
        except sa.exc.DBAPIError as exc:
            return classify_error(exc)
        finally:
            engine.dispose()
        raise AssertionError("la sentencia debía fallar")

    sqlite_url = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    insert_run(sqlite_url, "x")
    assert failure(sqlite_url, 'UPDATE "Ejecuciones" SET "NoExiste" = 1') is Failure.PERMANENT
    assert failure(sqlite_url, 'SELECT * FROM "NoExiste"') is Failure.PERMANENT
    _sam_table(pg_url, with_fecha_inicio_real=False)
    insert_pg = """INSERT INTO "Ejecuciones" ("DeploymentId", "Estado") VALUES ('x', 'RUNNING')"""
    _alter(pg_url, insert_pg)
    assert failure(pg_url, """UPDATE "Ejecuciones" SET "FechaInicioReal" = NULL""") is Failure.PERMANENT
    assert failure(pg_url, f"""UPDATE "Ejecuciones" SET "CallbackInfo" = '{"x" * 600}'""") is Failure.PERMANENT
    assert failure(pg_url, "SET LOCAL statement_timeout = 10", "SELECT pg_sleep(1)") is Failure.TRANSIENT


# --- the direct path: one refused callback does not sink its batch ------------------------------


def test_a_refused_callback_in_a_batch_does_not_sink_the_others(tmp_path: Path, pg_url: str) -> None:
    _sam_table(pg_url, with_fecha_inicio_real=True)
    runs = [f"lote-{n}" for n in range(20)]
    for deployment_id in [*runs, "grande"]:
        _alter(
            pg_url, f"""INSERT INTO "Ejecuciones" ("DeploymentId", "Estado") VALUES ('{deployment_id}', 'RUNNING')"""
        )
    repository = Repository(make_engine(pg_url), DEFAULT_FINAL_STATES)
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    refusals: list[tuple[str, str]] = []
    recorder = Recorder(repository, spool, match_window=60)
    recorder.events.on_refused = lambda deployment_id, _status, error: refusals.append((deployment_id, error))
    big = json.dumps({"deploymentId": "grande", "status": "RUN_COMPLETED", "relleno": "x" * 600})
    callbacks = [Callback(d, "RUN_COMPLETED", "{}") for d in runs]
    # The big one first, then a later callback of the same run: it must wait behind it.
    batch = [Callback("grande", "RUNNING", big), Callback("grande", "RUN_COMPLETED", "{}"), *callbacks]
    recorder.start()

    async def burst() -> list[str]:
        return await asyncio.gather(*(recorder.submit(cb, f"req-{n}") for n, cb in enumerate(batch)))

    try:
        results = asyncio.run(burst())
    finally:
        recorder.stop()
        spool.close()
        repository.dispose()
    assert results[:2] == ["queued", "queued"] and results[2:] == ["updated"] * len(runs)
    assert [d for d, _ in refusals] == ["grande"] and "StringDataRightTruncation" in refusals[0][1]
    assert (fetch_run(pg_url, "grande") or {})["Estado"] == "RUNNING"
    spool = Spool(tmp_path / "spool.db")
    entries = spool.entries()
    spool.close()
    assert [(e.status, e.refused) for e in entries] == [("RUNNING", True), ("RUN_COMPLETED", False)]


# --- end to end: kept, visible, applied by `spool retry` once the table is fixed ----------------


def _refused_is_visible(status: int, body: dict[str, Any], fragment: str) -> None:
    assert status == 503, body
    assert body["spool"]["refused"] == 1 and fragment in body["message"], body
    assert "spool retry" in body["message"]


def test_missing_column_on_sqlite_is_kept_until_fixed_and_retried(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    url = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    spool_path = tmp_path / "spool" / "spool.db"
    _sam_table(url, with_fecha_inicio_real=False)
    _alter(url, """INSERT INTO "Ejecuciones" ("DeploymentId", "Estado") VALUES ('sin-005', 'RUNNING')""")
    with TestClient(create_app(make_settings(database_url=url))) as client:
        raw = callback_body("sin-005", "RUN_COMPLETED")
        response = client.post("/api/callback", content=raw, headers=auth_headers())
        assert (response.status_code, response.json()["code"]) == (202, "queued")
        answer = client.get("/ready")
        _refused_is_visible(answer.status_code, answer.json(), "no such column")

        listing = _cli(tmp_path, "spool", "list", "--refused", CALLBACK_SPOOL_PATH=str(spool_path))
        assert listing.returncode == 0, listing.stderr
        assert (
            "1 rechazados por la base de datos" in listing.stdout
            and "RECHAZADO" in listing.stdout
            and "sin-005" in listing.stdout
        )
        assert "FechaInicioReal" in listing.stdout

        _alter(url, 'ALTER TABLE "Ejecuciones" ADD COLUMN "FechaInicioReal" datetime')
        retried = _cli(tmp_path, "spool", "retry", CALLBACK_SPOOL_PATH=str(spool_path))
        assert retried.returncode == 0 and retried.stdout.startswith("1 "), retried.stdout
        wait_for(lambda: (fetch_run(url, "sin-005") or {}).get("CallbackInfo") == raw, what="aplicado tras el retry")
        wait_for(lambda: client.get("/ready").status_code == 200, what="/ready 200 tras aplicarlo")
    row = fetch_run(url, "sin-005")
    assert row is not None and row["Estado"] == "RUN_COMPLETED" and row["FechaFin"] is not None


@pytest.mark.slow
def test_callback_info_too_small_on_postgresql_is_kept_until_fixed_and_retried(
    server_factory: Callable[..., ServerProcess], pg_url: str
) -> None:
    _sam_table(pg_url, with_fecha_inicio_real=True)
    for deployment_id in ("grande", "normal"):
        _alter(
            pg_url, f"""INSERT INTO "Ejecuciones" ("DeploymentId", "Estado") VALUES ('{deployment_id}', 'RUNNING')"""
        )
    server = server_factory(SAM_DATABASE_URL=pg_url).start()
    raw = callback_body("grande", "RUN_COMPLETED", relleno="x" * 600)
    response = httpx_post(server, raw)
    assert (response.status_code, response.json()["code"]) == (202, "queued")
    status, body = ready(server.base_url)
    _refused_is_visible(status, body, "StringDataRightTruncation")
    # Others keep being recorded at once.
    assert httpx_post(server, callback_body("normal", "RUN_COMPLETED")).json()["code"] == "updated"

    spool_path = str(server.cwd / "spool" / "spool.db")
    (server.cwd / "cli").mkdir()
    listing = _cli(server.cwd / "cli", "spool", "list", CALLBACK_SPOOL_PATH=spool_path)
    assert "RECHAZADO" in listing.stdout and "grande" in listing.stdout, listing.stdout

    _alter(pg_url, 'ALTER TABLE "Ejecuciones" ALTER COLUMN "CallbackInfo" TYPE text')
    retried = _cli(server.cwd / "cli", "spool", "retry", CALLBACK_SPOOL_PATH=spool_path)
    assert retried.returncode == 0, retried.stderr
    wait_for(lambda: (fetch_run(pg_url, "grande") or {}).get("CallbackInfo") == raw, what="aplicado tras el retry")
    wait_for(lambda: ready(server.base_url)[0] == 200, what="/ready 200 tras aplicarlo")
    assert server.stop() == 0


def httpx_post(server: ServerProcess, raw: str) -> Any:
    import httpx

    return httpx.post(server.callback_url, content=raw, headers=auth_headers(), timeout=60)


def test_a_spool_written_by_the_previous_version_is_upgraded_in_place(tmp_path: Path) -> None:
    """Callbacks kept by the previous version survive the upgrade and keep their arrival time."""
    import sqlite3

    path = tmp_path / "spool.db"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE entries (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, deployment_id TEXT NOT NULL, status TEXT NOT NULL,
            raw TEXT NOT NULL, request_id TEXT NOT NULL DEFAULT '', received_at REAL NOT NULL, kind TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, last_error TEXT,
            unmatched INTEGER NOT NULL DEFAULT 0
        );
        INSERT INTO entries (deployment_id, status, raw, received_at, kind, next_attempt_at, unmatched)
        VALUES ('antiguo', 'RUN_COMPLETED', '{}', 1000.0, 'pending_match', 1000.0, 1);
        """
    )
    old.close()
    spool = Spool(path)
    try:
        [entry] = spool.entries()
        assert (entry.deployment_id, entry.unmatched, entry.refused) == ("antiguo", True, False)
        assert spool.retry_now(only_unmatched=True) == 1
        [entry] = spool.entries()
        # A new match window, but the run still ends when the callback arrived.
        assert entry.received_at == 1000.0 and entry.window_start > 1000.0 and not entry.unmatched
        assert spool.stats().refused == 0
    finally:
        spool.close()
