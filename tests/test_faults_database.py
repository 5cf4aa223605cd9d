"""Fault injection: PostgreSQL cut through a TCP proxy, row locks and transient SQL errors."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from sam.callback.app import create_app
from sam.callback.settings import DEFAULT_FINAL_STATES, Settings
from tests.faults_support import (
    FINAL,
    Answer,
    TcpProxy,
    all_runs,
    callback_body,
    check_first_final_kept,
    insert_runs,
    ready,
    running_then_two_finals,
    send_chains,
    spool_backlog,
    spool_rows,
    summary,
)
from tests.utils import TOKEN, ServerProcess, fetch_run, wait_for

pytestmark = pytest.mark.slow

HEADERS = {"X-Authorization": TOKEN, "Content-Type": "application/json"}


def _post(server: ServerProcess, raw: str) -> httpx.Response:
    return httpx.post(server.callback_url, content=raw, headers=HEADERS, timeout=60)


def test_database_outage_queues_every_callback_then_drains_in_arrival_order(
    server_factory: Callable[..., ServerProcess], pg_url: str
) -> None:
    """Cut PostgreSQL mid-load: 202 queued, /ready 503; back: drained in order, /ready 200."""
    runs = [f"outage-{i:03d}" for i in range(150)]
    insert_runs(pg_url, runs)
    chains = [running_then_two_finals(d) for d in runs]
    with TcpProxy(5432) as proxy:
        server = server_factory(SAM_DATABASE_URL=proxy.url_for(pg_url)).start()
        answers: list[Answer] = []
        load = threading.Thread(target=send_chains, args=(server.callback_url, chains), kwargs={"answers": answers})
        load.start()
        wait_for(lambda: len(answers) >= 90, timeout=60, what="primeras respuestas con la base de datos arriba")
        proxy.cut()
        cut_at = time.monotonic()
        load.join(120)
        assert not load.is_alive()

        status, body = ready(server.base_url)
        assert status == 503, body
        assert body["database"]["reachable"] is False
        assert body["spool"]["backlog"] > 0
        after_cut = [a for a in answers if a.sent_at > cut_at]
        assert after_cut, "la carga debía seguir durante el corte"
        assert {(a.http_status, a.code) for a in after_cut} == {(202, "queued")}, summary(after_cut)
        assert all(a.http_status in (200, 202) for a in answers), summary(answers)

        proxy.restore()
        wait_for(lambda: ready(server.base_url)[0] == 200, timeout=30, what="/ready 200 tras volver la base de datos")
        wait_for(lambda: spool_backlog(server.base_url) == 0, timeout=60, what="spool vacío")
        assert check_first_final_kept(answers, all_runs(pg_url), DEFAULT_FINAL_STATES) == []
        assert all(row["Estado"] == FINAL for row in all_runs(pg_url).values())
        assert server.stop() == 0


def test_row_lock_held_until_timeout_is_retried_from_the_spool(
    server_factory: Callable[..., ServerProcess], pg_url: str
) -> None:
    """Another connection holds the row past lock_timeout: 202 queued, applied after release."""
    insert_runs(pg_url, ["locked-1", "free-1"])
    server = server_factory(SAM_DATABASE_URL=pg_url).start()
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as holder:
            holder.execute(
                sa.text('SELECT 1 FROM "Ejecuciones" WHERE "DeploymentId" = :d FOR UPDATE'), {"d": "locked-1"}
            )
            raw = callback_body("locked-1", FINAL)
            response = _post(server, raw)
            assert (response.status_code, response.json()["code"]) == (202, "queued")
            holder.rollback()
    finally:
        engine.dispose()
    wait_for(
        lambda: (fetch_run(pg_url, "locked-1") or {}).get("CallbackInfo") == raw,
        timeout=30,
        what="aplicado desde el spool",
    )
    assert fetch_run(pg_url, "locked-1")["Estado"] == FINAL  # type: ignore[index]
    wait_for(lambda: spool_backlog(server.base_url) == 0, timeout=30, what="spool vacío")
    response = _post(server, callback_body("free-1", FINAL))
    assert (response.status_code, response.json()["code"]) == (200, "updated")


FAULT_TRIGGER = """
CREATE TABLE fault_injection (deployment_id text PRIMARY KEY, errcode text NOT NULL);
CREATE FUNCTION inject_fault() RETURNS trigger AS $$
DECLARE code text;
BEGIN
    SELECT errcode INTO code FROM fault_injection WHERE deployment_id = NEW."DeploymentId";
    IF code IS NOT NULL THEN
        RAISE EXCEPTION 'fallo inyectado por el test' USING ERRCODE = code;
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER inject_fault BEFORE UPDATE ON "Ejecuciones" FOR EACH ROW EXECUTE FUNCTION inject_fault();
"""


@pytest.fixture
def faulty_pg(pg_url: str) -> Iterator[sa.Engine]:
    """The test database with a trigger that raises a chosen SQLSTATE for chosen rows."""
    engine = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(FAULT_TRIGGER)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("errcode", ["serialization_failure", "deadlock_detected"])
def test_transient_sql_error_is_retried_from_the_spool_without_holding_back_others(
    server_factory: Callable[..., ServerProcess], pg_url: str, faulty_pg: sa.Engine, errcode: str
) -> None:
    """A run whose UPDATE keeps failing is retried with backoff; other runs are still applied."""
    insert_runs(pg_url, ["faulty-1", *[f"healthy-{i}" for i in range(5)]])
    with faulty_pg.connect() as conn:
        conn.execute(sa.text("INSERT INTO fault_injection VALUES ('faulty-1', :code)"), {"code": errcode})
    server = server_factory(SAM_DATABASE_URL=pg_url).start()
    raw = callback_body("faulty-1", FINAL)
    response = _post(server, raw)
    assert (response.status_code, response.json()["code"]) == (202, "queued")
    spool_path = server.cwd / "spool" / "spool.db"
    wait_for(
        lambda: [r["attempts"] for r in spool_rows(spool_path)] >= [2], timeout=30, what="reintentos desde el spool"
    )

    # Other runs keep being applied while one row still fails.
    healthy = {f"healthy-{i}": callback_body(f"healthy-{i}", FINAL) for i in range(5)}
    for body in healthy.values():
        assert _post(server, body).status_code in (200, 202)
    wait_for(
        lambda: all((fetch_run(pg_url, d) or {}).get("CallbackInfo") == body for d, body in healthy.items()),
        timeout=30,
        what="los demás callbacks aplicados pese al fallo de una fila",
    )
    assert fetch_run(pg_url, "faulty-1")["Estado"] == "DEPLOYED"  # type: ignore[index]

    with faulty_pg.connect() as conn:
        conn.execute(sa.text("DELETE FROM fault_injection"))
    wait_for(
        lambda: (fetch_run(pg_url, "faulty-1") or {}).get("CallbackInfo") == raw,
        timeout=90,
        what="aplicado al cesar el fallo",
    )
    wait_for(lambda: spool_backlog(server.base_url) == 0, timeout=30, what="spool vacío")


def test_database_that_never_answers_still_gets_callbacks_answered(
    server_factory: Callable[..., ServerProcess], pg_url: str
) -> None:
    """PostgreSQL accepts the connection but its backends freeze: 202 queued, applied once back."""
    insert_runs(pg_url, ["warm-1", "hung-1", "hung-2"])
    # The request keeps the callback in the spool itself after 2 s instead of 20 s.
    server = server_factory(SAM_DATABASE_URL=pg_url, CALLBACK_DATABASE_TIMEOUT_SECONDS="2").start()
    assert _post(server, callback_body("warm-1", FINAL)).json()["code"] == "updated"
    database = pg_url.rsplit("/", 1)[1]
    engine = sa.create_engine(pg_url.rsplit("/", 1)[0] + "/postgres")
    try:
        with engine.connect() as conn:
            backends = (
                conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :d"), {"d": database})
                .scalars()
                .all()
            )
    finally:
        engine.dispose()
    assert backends
    bodies = {d: callback_body(d, FINAL) for d in ("hung-1", "hung-2")}
    try:
        for pid in backends:
            try:
                os.kill(pid, signal.SIGSTOP)  # a frozen server: the socket stays open, nothing answers
            except PermissionError:
                pytest.skip("sin permiso para detener los procesos de PostgreSQL")
        for body in bodies.values():
            response = _post(server, body)
            assert (response.status_code, response.json()["code"]) == (202, "queued")
    finally:
        for pid in backends:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)
    wait_for(lambda: spool_backlog(server.base_url) == 0, timeout=60, what="spool vacío al volver la base")
    for deployment_id, body in bodies.items():
        row = fetch_run(pg_url, deployment_id)
        assert row is not None
        assert (row["Estado"], row["CallbackInfo"]) == (FINAL, body)
    assert server.stop() == 0
    log = server.console()
    # The first waited the timeout; the second went straight to the spool instead of waiting too.
    assert "no responde en 2 s; callback guardado en el spool deploymentId=hung-1" in log
    assert "sigue sin responder; callback guardado en el spool sin esperar deploymentId=hung-2" in log
    assert "La base de datos vuelve a responder al escritor" in log


def test_an_outage_is_noticed_and_its_end_too_with_no_callback_arriving(pg_url: str, tmp_path: Path) -> None:
    """The writer looks at an idle database now and then: the outage is logged (and alerted) without traffic."""
    with TcpProxy(5432) as proxy:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            database_url=proxy.url_for(pg_url),
            spool_path=tmp_path / "spool" / "spool.db",
            log_directory=tmp_path / "logs",
            token=TOKEN,
        )
        with TestClient(create_app(settings)) as client:
            recorder = client.app.state.runtime.recorder  # type: ignore[attr-defined]
            recorder.heartbeat_seconds = 0.2
            proxy.cut()
            wait_for(lambda: not recorder.database_available, timeout=30, what="el corte se nota sin callbacks")
            proxy.restore()
            wait_for(lambda: recorder.database_available, timeout=60, what="la vuelta se nota sin callbacks")
    log = settings.log_file.read_text(encoding="utf-8")
    assert "Base de datos no disponible" in log and "La base de datos responde de nuevo" in log
