"""Every accepted callback ends the run, at the moment it arrived, even when it waited in the spool."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from fastapi.testclient import TestClient

from sam.callback.app import create_app
from sam.callback.domain import Callback, Outcome
from sam.callback.repository import Repository, make_engine
from sam.callback.settings import DEFAULT_FINAL_STATES, Settings
from tests.faults_support import TcpProxy, callback_body
from tests.utils import auth_headers, fetch_run, insert_run, wait_for

# Columns keep whole seconds and the clock is read around the request, not inside it.
TOLERANCE = timedelta(seconds=2)
OUTAGE = timedelta(seconds=4)


def _sqlite_now() -> datetime:
    """SQLite's datetime('now', 'localtime'), as the service writes it."""
    return datetime.now().replace(microsecond=0)


def _pg_now(url: str) -> datetime:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            value: datetime = conn.execute(sa.text("SELECT LOCALTIMESTAMP(0)")).scalar_one()
            return value
    finally:
        engine.dispose()


def _apply(url: str, callback: Callback, waited: float = 0.0) -> Outcome:
    repository = Repository(make_engine(url), DEFAULT_FINAL_STATES)
    try:
        return repository.apply_many([callback], waited=[waited])[0]
    finally:
        repository.dispose()


def _check_every_status_ends_the_run(url: str, now: Callable[[], datetime]) -> None:
    insert_run(url, "corriendo", "DEPLOYED")
    before = now()
    assert _apply(url, Callback("corriendo", "RUNNING", '{"status":"RUNNING"}')) is Outcome.UPDATED
    row = fetch_run(url, "corriendo")
    assert row is not None and row["Estado"] == "RUNNING" and row["CallbackInfo"] == '{"status":"RUNNING"}'
    # SAM's reconciler skips the row from now on (CallbackInfo set): it must be complete.
    assert row["FechaFin"] is not None and before - TOLERANCE <= row["FechaFin"] <= now() + TOLERANCE
    assert row["FechaInicioReal"] == row["FechaFin"]

    # A callback that waited an hour in the spool ends the run an hour ago, not now.
    insert_run(url, "esperado", "RUNNING", FechaInicio=now() - timedelta(hours=3))
    assert _apply(url, Callback("esperado", "RUN_COMPLETED", "{}"), waited=3600) is Outcome.UPDATED
    row = fetch_run(url, "esperado")
    assert row is not None
    assert abs(row["FechaFin"] - (now() - timedelta(hours=1))) <= TOLERANCE
    assert row["FechaActualizacion"] - row["FechaFin"] >= timedelta(minutes=59)

    # Never before the run started: a FechaInicio later than the arrival ends the run at its start.
    start = now() + timedelta(hours=1)
    insert_run(url, "futuro", "RUNNING", FechaInicio=start)
    assert _apply(url, Callback("futuro", "RUN_FAILED", "{}"), waited=30) is Outcome.UPDATED
    row = fetch_run(url, "futuro")
    assert row is not None and row["FechaFin"] == start and row["FechaInicioReal"] == start


def test_every_status_ends_the_run_at_arrival_on_sqlite(tmp_path: Path) -> None:
    _check_every_status_ends_the_run(f"sqlite:///{(tmp_path / 'sam.db').as_posix()}", _sqlite_now)


def test_every_status_ends_the_run_at_arrival_on_postgresql(pg_url: str) -> None:
    _check_every_status_ends_the_run(pg_url, lambda: _pg_now(pg_url))


def test_sqlite_compares_a_start_written_with_a_t_as_a_time_not_as_text(tmp_path: Path) -> None:
    """'2026-11-30T00:00:00' is a datetime SQLite reads; compared as text it would sort after the arrival."""
    url = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    started = (datetime.now() - timedelta(hours=2)).replace(microsecond=0)
    insert_run(url, "con-t", "RUNNING")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text('UPDATE "Ejecuciones" SET "FechaInicio" = :start WHERE "DeploymentId" = \'con-t\''),
            {"start": started.isoformat()},
        )
    engine.dispose()
    before = _sqlite_now()
    assert _apply(url, Callback("con-t", "RUN_COMPLETED", "{}")) is Outcome.UPDATED
    row = fetch_run(url, "con-t")
    assert row is not None and before - TOLERANCE <= row["FechaFin"] <= _sqlite_now() + TOLERANCE


def test_postgresql_arrival_is_whole_seconds_on_the_spooled_path_too(pg_url: str) -> None:
    """A callback that waited 2.5 s ends the run at a whole second, as one that did not wait."""
    insert_run(pg_url, "fraccion", "RUNNING", FechaInicio=_pg_now(pg_url) - timedelta(hours=1))
    assert _apply(pg_url, Callback("fraccion", "RUN_COMPLETED", "{}"), waited=2.5) is Outcome.UPDATED
    row = fetch_run(pg_url, "fraccion")
    assert row is not None
    assert row["FechaFin"].microsecond == 0 and row["FechaInicioReal"].microsecond == 0


def _wait_outage(now: Callable[[], datetime], arrived: datetime) -> None:
    """Keep the database away until its clock shows the outage lasted OUTAGE."""
    wait_for(lambda: now() >= arrived + OUTAGE, timeout=30, interval=0.2, what="duración del corte")


def _post_queued(client: TestClient, deployment_id: str) -> str:
    raw = callback_body(deployment_id, "RUN_COMPLETED")
    response = client.post("/api/callback", content=raw, headers=auth_headers())
    assert (response.status_code, response.json()["code"]) == (202, "queued"), response.text
    return raw


def test_after_a_sqlite_outage_the_run_ends_at_arrival_not_at_the_write(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """The database file cannot be opened (a folder stands in its place); later it is back with the row."""
    database = tmp_path / "datos" / "sam.db"
    url = f"sqlite:///{database.as_posix()}"
    staged = tmp_path / "preparada.db"
    insert_run(f"sqlite:///{staged.as_posix()}", "tras-corte", "RUNNING")
    database.mkdir(parents=True)
    with TestClient(create_app(make_settings(database_url=url))) as client:
        arrived = _sqlite_now()
        raw = _post_queued(client, "tras-corte")
        _wait_outage(_sqlite_now, arrived)
        database.rmdir()
        os.rename(staged, database)
        restored = _sqlite_now()
        wait_for(
            lambda: (fetch_run(url, "tras-corte") or {}).get("CallbackInfo") == raw,
            timeout=60,
            what="callback aplicado desde el spool",
        )
    row = fetch_run(url, "tras-corte")
    assert row is not None
    assert arrived - TOLERANCE <= row["FechaFin"] <= arrived + TOLERANCE
    assert row["FechaActualizacion"] >= restored - TOLERANCE > row["FechaFin"]


def test_after_a_postgresql_outage_the_run_ends_at_arrival_not_at_the_write(
    make_settings: Callable[..., Settings], pg_url: str
) -> None:
    """PostgreSQL cut through a TCP proxy: the callback is spooled, applied after, dated at arrival."""
    insert_run(pg_url, "tras-corte", "RUNNING")
    with TcpProxy(5432) as proxy, TestClient(create_app(make_settings(database_url=proxy.url_for(pg_url)))) as client:
        proxy.cut()
        arrived = _pg_now(pg_url)
        raw = _post_queued(client, "tras-corte")
        _wait_outage(lambda: _pg_now(pg_url), arrived)
        proxy.restore()
        restored = _pg_now(pg_url)
        wait_for(
            lambda: (fetch_run(pg_url, "tras-corte") or {}).get("CallbackInfo") == raw,
            timeout=60,
            what="callback aplicado desde el spool",
        )
    row = fetch_run(pg_url, "tras-corte")
    assert row is not None
    assert arrived - TOLERANCE <= row["FechaFin"] <= arrived + TOLERANCE
    assert row["FechaActualizacion"] >= restored - TOLERANCE > row["FechaFin"]
