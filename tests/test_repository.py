"""SAM's database: the T-SQL SQL Server receives (compiled with the mssql dialect) and the guarded update."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.dialects.mssql import pyodbc as mssql_pyodbc
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg

from sam.callback.domain import Callback, Outcome
from sam.callback.repository import (
    Repository,
    compile_statements,
    guarded_update,
    make_engine,
    mssql_ddl,
    sqlite_local_time,
)
from sam.callback.settings import DEFAULT_FINAL_STATES
from tests.utils import fetch_run, insert_run

FINALS = sorted(DEFAULT_FINAL_STATES)


def normalise(sql: str) -> str:
    return " ".join(sql.split())


def test_guarded_update_in_tsql() -> None:
    """One statement for every status: it ends the run at its arrival, never before FechaInicio."""
    statements = compile_statements(FINALS, mssql_pyodbc.dialect(paramstyle="qmark"), "dbo")
    update = normalise(statements["update"].sql)
    not_final = " AND ".join(["dbo.[Ejecuciones].[Estado] != ?"] * len(FINALS))
    arrival = "DATEADD(second, -CAST(? AS INT), GETDATE())"
    received = (
        f"CASE WHEN (dbo.[Ejecuciones].[FechaInicio] > {arrival}) THEN dbo.[Ejecuciones].[FechaInicio] "
        f"ELSE {arrival} END"
    )
    assert update == normalise(
        f"UPDATE dbo.[Ejecuciones] SET [FechaFin]={received}, [Estado]=?, [FechaActualizacion]=GETDATE(), "
        f"[CallbackInfo]=?, [FechaInicioReal]=coalesce(dbo.[Ejecuciones].[FechaInicioReal], {received}) "
        f"WHERE dbo.[Ejecuciones].[DeploymentId] = ? AND {not_final} AND dbo.[Ejecuciones].[Estado] != ?"
    )
    params = statements["update"].params(deployment_id="d", new_status="RUNNING", raw="{}", waited=12.0)
    assert params == (12.0, 12.0, "RUNNING", "{}", 12.0, 12.0, "d", *FINALS, "RUNNING")
    assert set(statements) == {"update", "lookup"}
    assert (
        normalise(statements["lookup"].sql)
        == "SELECT dbo.[Ejecuciones].[Estado] FROM dbo.[Ejecuciones] WHERE dbo.[Ejecuciones].[DeploymentId] = ?"
    )


def test_statements_are_parameterised_on_every_dialect() -> None:
    evil = "x'; DROP TABLE Ejecuciones; --"
    for dialect, schema in (
        (mssql_pyodbc.dialect(paramstyle="qmark"), "dbo"),
        (pg_psycopg.dialect(), None),
        (sqlite_dialect.dialect(), None),
    ):
        for prepared in compile_statements(FINALS, dialect, schema).values():
            assert evil not in prepared.sql and "RUN_FAILED" not in prepared.sql
            values = {"deployment_id": evil, "new_status": "S", "raw": "{}", "waited": 0.0}
            assert evil in str(prepared.params(**values, arrived_local="2026-11-30 10:00:00"))


def test_postgresql_uses_sams_quoted_names() -> None:
    sql = compile_statements(FINALS, pg_psycopg.dialect())["update"].sql
    assert 'UPDATE "Ejecuciones" SET "FechaFin"=CASE' in sql and '"CallbackInfo"' in sql
    # Whole seconds, never rounded past the arrival.
    assert "date_trunc('second', LOCALTIMESTAMP - make_interval(secs => %(waited)s))" in sql


def test_init_db_tsql_matches_sams_table() -> None:
    ddl = normalise(mssql_ddl())
    for fragment in (
        "CREATE TABLE dbo.[Ejecuciones]",
        "[EjecucionId] INTEGER NOT NULL IDENTITY(1,1)",
        "[DeploymentId] NVARCHAR(50) NOT NULL",
        "[Hora] TIME(0) NULL",
        "[FechaInicio] DATETIME2(0) NOT NULL DEFAULT GETDATE()",
        "[FechaFin] DATETIME2(0) NULL",
        "[Estado] NVARCHAR(20) NOT NULL",
        "[CallbackInfo] NVARCHAR(max) NULL",
        "[IntentosConciliadorFallidos] INTEGER NOT NULL DEFAULT 0",
        "[FechaUltimoUNKNOWN] DATETIME NULL",
        "[FechaInicioReal] DATETIME NULL",
        "PRIMARY KEY ([EjecucionId])",
        "UNIQUE ([DeploymentId])",
    ):
        assert fragment in ddl, fragment


def test_outcomes_in_one_transaction(tmp_path: Path) -> None:
    url = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    insert_run(url, "a", "RUNNING")
    insert_run(url, "b", "RUN_COMPLETED")
    repository = Repository(make_engine(url), DEFAULT_FINAL_STATES)
    try:
        outcomes = repository.apply_many(
            [
                Callback("a", "RUN_FAILED", '{"n":1}'),
                Callback("a", "RUN_COMPLETED", '{"n":2}'),
                Callback("b", "RUN_FAILED", "{}"),
                Callback("c", "RUN_FAILED", "{}"),
            ]
        )
    finally:
        repository.dispose()
    assert outcomes == [Outcome.UPDATED, Outcome.ALREADY_PROCESSED, Outcome.ALREADY_PROCESSED, Outcome.NOT_FOUND]
    row = fetch_run(url, "a")
    assert row is not None and row["Estado"] == "RUN_FAILED" and row["CallbackInfo"] == '{"n":1}'


def test_concurrent_writers_on_postgresql_update_exactly_once(pg_url: str) -> None:
    """Two connections racing on one run: the guarded statement lets exactly one win."""
    insert_run(pg_url, "race", "RUNNING")
    repositories = [Repository(make_engine(pg_url), DEFAULT_FINAL_STATES) for _ in range(8)]
    results: list[Outcome] = []
    barrier = threading.Barrier(len(repositories))

    def attempt(repository: Repository, status: str) -> None:
        barrier.wait()
        results.extend(repository.apply_many([Callback("race", status, f'{{"s":"{status}"}}')]))

    statuses = ["RUN_COMPLETED", "RUN_FAILED"] * 4
    threads = [threading.Thread(target=attempt, args=(r, s)) for r, s in zip(repositories, statuses, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for repository in repositories:
        repository.dispose()
    assert results.count(Outcome.UPDATED) == 1 and results.count(Outcome.ALREADY_PROCESSED) == 7
    row = fetch_run(pg_url, "race")
    assert row is not None and row["CallbackInfo"] == f'{{"s":"{row["Estado"]}"}}'


def test_database_clock_is_used(pg_url: str) -> None:
    insert_run(pg_url, "clock", "RUNNING")
    repository = Repository(make_engine(pg_url), DEFAULT_FINAL_STATES)
    try:
        repository.apply_many([Callback("clock", "RUN_COMPLETED", "{}")])
        with repository.engine.connect() as conn:
            db_now = conn.execute(sa.text("SELECT LOCALTIMESTAMP(0)")).scalar_one()
    finally:
        repository.dispose()
    row = fetch_run(pg_url, "clock")
    assert row is not None and abs((db_now - row["FechaFin"]).total_seconds()) < 60


def test_sqlite_schema_is_created_on_first_start(make_settings: Callable[..., object], tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from sam.callback.app import create_app

    url = f"sqlite:///{(tmp_path / 'nuevo' / 'sam.db').as_posix()}"
    with TestClient(create_app(make_settings(database_url=url))):  # type: ignore[arg-type]
        pass
    assert sa.inspect(make_engine(url)).has_table("Ejecuciones")


def test_sqlite_binds_the_arrival_in_its_own_clock_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite the arrival is bound as text, exactly as SQLite's localtime would write it."""
    sql = compile_statements(FINALS, sqlite_dialect.dialect())["update"].sql
    # No localtime conversion per row for the arrival; FechaActualizacion keeps the database's now.
    assert sql.count("datetime('now', 'localtime')") == 1 and "printf" not in sql
    connection = sqlite3.connect(":memory:")
    try:
        for zone in ("America/Argentina/Buenos_Aires", "Europe/Madrid", "UTC"):
            monkeypatch.setenv("TZ", zone)
            time.tzset()
            # Either side of Madrid's change to summer time, and a fraction of a second (truncated).
            for epoch in (1711846799.9, 1711846800.0, 1764500000.5):
                query = "SELECT datetime(?, 'unixepoch', 'localtime')"
                (expected,) = connection.execute(query, (int(epoch),)).fetchone()
                assert sqlite_local_time(epoch) == expected, zone
    finally:
        monkeypatch.undo()
        time.tzset()
        connection.close()


def test_the_guard_needs_final_states() -> None:
    """Without final states the statement would overwrite finished runs: refused, not built."""
    with pytest.raises(ValueError, match="final state"):
        guarded_update([])
