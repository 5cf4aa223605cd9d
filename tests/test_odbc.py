"""SAM's SQL Server settings reach a real ODBC driver (FreeTDS registered under SAM's driver name)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from sam.callback.repository import make_engine
from sam.callback.settings import Settings
from tests.utils import TOKEN, ServerProcess, free_port, require_service, wait_for

SAM_DRIVER = "ODBC Driver 17 for SQL Server"
PASSWORD = "clave-odbc-Qw73;}x"


def _freetds_library() -> Path:
    """FreeTDS's ODBC driver from the Debian package `tdsodbc`; skipped (failed under CI) without it."""
    if shutil.which("dpkg") is None:
        require_service("FreeTDS/unixODBC", "no es un sistema Debian (dpkg)")
    listing = subprocess.run(["dpkg", "-L", "tdsodbc"], capture_output=True, text=True, check=False)  # noqa: S607
    libraries = [Path(line) for line in listing.stdout.splitlines() if line.endswith("libtdsodbc.so")]
    odbc_manager = subprocess.run(["dpkg", "-s", "unixodbc"], capture_output=True, text=True, check=False)  # noqa: S607
    if not libraries or odbc_manager.returncode != 0:
        require_service(
            "FreeTDS/unixODBC", "instale los paquetes unixodbc y tdsodbc (apt-get install unixodbc tdsodbc)"
        )
    return libraries[0]


@pytest.fixture
def odbc_sysini(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A test-local odbcinst.ini registering FreeTDS under SAM's driver name (ODBCSYSINI)."""
    folder = tmp_path / "odbc"
    folder.mkdir()
    (folder / "odbcinst.ini").write_text(
        f"[{SAM_DRIVER}]\nDescription = FreeTDS con el nombre del driver de SAM\nDriver = {_freetds_library()}\n",
        encoding="utf-8",
    )
    (folder / "odbc.ini").write_text("", encoding="utf-8")
    monkeypatch.setenv("ODBCSYSINI", str(folder))
    return folder


def _connect_error(settings: Settings) -> str:
    engine = make_engine(settings.resolved_database_url(), connect_timeout=settings.sql_connect_timeout)
    try:
        with engine.connect():
            pytest.fail("nadie escucha en ese puerto: la conexión no puede funcionar")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        engine.dispose()
    return ""


@pytest.mark.parametrize("driver", ["{ODBC Driver 17 for SQL Server}", "ODBC Driver 17 for SQL Server"])
def test_sam_driver_line_reaches_the_driver(odbc_sysini: Path, driver: str) -> None:
    """Braced as SAM writes it or not, the driver loads; the failure is FreeTDS's, without the password."""
    settings = Settings(
        _env_file=None,
        sql_driver=driver,
        sql_host=f"127.0.0.1,{free_port()}",
        sql_db_name="SAM",
        sql_uid="usuario_odbc",
        sql_pwd=PASSWORD,
        sql_connect_timeout=5,
    )
    message = _connect_error(settings)
    assert "FreeTDS" in message and "08S01" in message, message
    assert "Can't open lib" not in message and "IM002" not in message
    assert PASSWORD not in message and "Qw73" not in message


def test_an_unregistered_driver_name_fails_differently(odbc_sysini: Path) -> None:
    """The control: a name the driver manager does not know never reaches FreeTDS."""
    settings = Settings(
        _env_file=None, sql_driver="{ODBC Driver 99 for SQL Server}", sql_host=f"127.0.0.1,{free_port()}",
        sql_db_name="SAM", sql_uid="u", sql_pwd=PASSWORD, sql_connect_timeout=5,
    )  # fmt: skip
    message = _connect_error(settings)
    assert "FreeTDS" not in message and ("IM002" in message or "Can't open lib" in message), message


def test_service_on_sam_sql_settings_queues_and_never_logs_the_password(
    odbc_sysini: Path, tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    """The real service with SAM's SQL Server settings and no server: callbacks kept, /ready 503, no password."""
    server = server_factory(
        SAM_DATABASE_URL="",
        SQL_SAM_DRIVER="{ODBC Driver 17 for SQL Server}",
        SQL_SAM_HOST=f"127.0.0.1,{free_port()}",
        SQL_SAM_BD_NOMBRE="SAM",
        SQL_SAM_USUARIO="usuario_odbc",
        SQL_SAM_PASSWORD=PASSWORD,
        SQL_SAM_CONEXION_TIMEOUT_SEG="3",
        ODBCSYSINI=os.environ["ODBCSYSINI"],
    ).start()
    answer = httpx.post(
        server.callback_url,
        json={"deploymentId": "dep-odbc-1", "status": "RUN_COMPLETED"},
        headers={"X-Authorization": TOKEN},
        timeout=30,
    )
    assert answer.status_code == 202 and answer.json()["code"] == "queued", answer.text
    assert httpx.get(server.base_url + "/ready", timeout=30).status_code == 503
    log_file = tmp_path / "logs" / "sam_callback_server.log"
    wait_for(lambda: log_file.exists() and "dep-odbc-1" in log_file.read_text(encoding="utf-8"), what="log")
    output = log_file.read_text(encoding="utf-8") + server.console()
    assert "mssql" in output  # the start-up line names the database, with the password masked
    assert PASSWORD not in output and "Qw73" not in output
