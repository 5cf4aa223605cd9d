"""`sam-callback status`: a short human summary of a running instance."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from sam.callback.settings import Settings
from sam.callback.status import show_status
from tests.utils import ServerProcess, auth_headers, free_port, insert_run


def test_status_of_a_running_instance_through_the_cli(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory().start()
    insert_run(server.env["SAM_DATABASE_URL"], "d-status")
    callback = {"deploymentId": "d-status", "status": "RUN_COMPLETED"}
    assert httpx.post(server.callback_url, json=callback, headers=auth_headers()).json()["code"] == "updated"
    early = {"deploymentId": "d-status-early", "status": "RUN_COMPLETED"}
    assert httpx.post(server.callback_url, json=early, headers=auth_headers()).json()["code"] == "pending_match"
    assert httpx.post(server.callback_url, json=callback).status_code == 401
    # No --url: the address comes from the same settings the service reads (CALLBACK_SERVER_PORT).
    done = subprocess.run(
        [sys.executable, "-m", "sam.callback", "status"],
        env=server.env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"Instancia en http://127.0.0.1:{server.port}" in out
    assert "Vivacidad (/health):  OK" in out
    assert "Preparado (/ready):   SÍ" in out
    assert "Base de datos:        responde" in out
    assert "Spool:                1 pendientes (en cola 0, esperando ejecución 1)" in out
    assert "No emparejados:       0" in out
    assert "Callbacks desde el arranque: pending_match=1, unauthorized=1, updated=1" in out
    assert "Fallos de autenticación desde el arranque: 1" in out


def test_status_of_an_instance_without_database(
    server_factory: Callable[..., ServerProcess],
    make_settings: Callable[..., Settings],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = server_factory(SAM_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/sam").start()
    assert show_status(make_settings(), server.base_url) == 1
    out = capsys.readouterr().out
    assert "Preparado (/ready):   NO" in out
    assert "Base de datos:        NO responde" in out


def test_status_when_nothing_listens(
    make_settings: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert show_status(make_settings(), url) == 1
    assert f"Instancia en {url}: NO RESPONDE" in capsys.readouterr().out


def test_status_names_callbacks_the_database_refused_for_good(
    server_factory: Callable[..., ServerProcess],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A table without FechaInicioReal (SAM's migration 005): status says why it is not ready, not only 'NO'."""
    url = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            'CREATE TABLE "Ejecuciones" ("EjecucionId" INTEGER PRIMARY KEY, "DeploymentId" varchar(50) NOT NULL UNIQUE,'
            ' "FechaInicio" timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP, "FechaFin" timestamp, "Estado" varchar(20)'
            ' NOT NULL, "FechaActualizacion" timestamp, "CallbackInfo" text)'
        )
        conn.exec_driver_sql("""INSERT INTO "Ejecuciones" ("DeploymentId", "Estado") VALUES ('sin-005', 'RUNNING')""")
    engine.dispose()
    server = server_factory(SAM_DATABASE_URL=url).start()
    callback = {"deploymentId": "sin-005", "status": "RUN_COMPLETED"}
    assert httpx.post(server.callback_url, json=callback, headers=auth_headers()).json()["code"] == "queued"
    assert show_status(make_settings(), server.base_url) == 1
    out = capsys.readouterr().out
    assert "Base de datos:        responde" in out and "Preparado (/ready):   NO" in out
    assert "Rechazados por la base de datos: 1 (" in out and "FechaInicioReal" in out
