"""Shared fixtures: real RSA keys, real SQLite files, the real PostgreSQL server, a real server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from sam.callback.app import create_app
from sam.callback.repository import make_engine, metadata
from sam.callback.settings import Settings
from tests.utils import (
    OUR_PREFIXES,
    PG_ADMIN_URL,
    TOKEN,
    Keys,
    ServerProcess,
    free_port,
    kill_server,
    new_keys,
    require_service,
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(OUR_PREFIXES):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def keys() -> Keys:
    """The gateway's key pair."""
    return new_keys()


@pytest.fixture(scope="session")
def other_keys() -> Keys:
    """A key pair the service does not trust."""
    return new_keys()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings on fresh files under tmp_path; keyword arguments override (field names)."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": f"sqlite:///{(tmp_path / 'sam.db').as_posix()}",
            "spool_path": tmp_path / "spool" / "spool.db",
            "log_directory": tmp_path / "logs",
            "token": TOKEN,
        }
        values |= overrides
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return build


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """Default test settings: SQLite file, static token, optional mode."""
    return make_settings()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The real app with its lifespan, over HTTP-in-process."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def pg_server() -> str:
    """Admin URL of the real PostgreSQL server (SAM_TEST_POSTGRES_URL); skipped when it does not answer, except under CI."""
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        require_service(
            "PostgreSQL",
            f"{sa.make_url(PG_ADMIN_URL).render_as_string(hide_password=True)} no responde ({type(exc).__name__})",
        )
    finally:
        engine.dispose()
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh PostgreSQL database with `Ejecuciones`, dropped afterwards."""
    name = f"samcb_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = pg_server.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    metadata.create_all(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Build real server processes from environment variables; all are killed at the end."""
    servers: list[ServerProcess] = []

    def build(**env: str) -> ServerProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith(OUR_PREFIXES)}
        port = free_port()
        values = {
            "CALLBACK_SERVER_HOST": "127.0.0.1",
            "CALLBACK_SERVER_PORT": str(port),
            "CALLBACK_TOKEN": TOKEN,
            "SAM_DATABASE_URL": f"sqlite:///{(tmp_path / 'sam.db').as_posix()}",
            "CALLBACK_SPOOL_PATH": str(tmp_path / "spool" / "spool.db"),
            "LOG_DIRECTORY": str(tmp_path / "logs"),
        } | env
        server = ServerProcess(env=base | values, cwd=tmp_path, port=int(values["CALLBACK_SERVER_PORT"]))
        servers.append(server)
        return server

    yield build
    for server in servers:
        kill_server(server)
