"""Every SQL statement against SAM's database: the `Ejecuciones` table and the guarded update."""

from __future__ import annotations

import contextlib
import enum
import logging
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Engine,
    Identity,
    Integer,
    MetaData,
    Table,
    Time,
    Unicode,
    UnicodeText,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import mssql, postgresql
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlalchemy.sql.expression import FunctionElement

log = logging.getLogger("sam.callback.db")

metadata = MetaData()


class db_now(FunctionElement[Any]):  # noqa: N801 - reads like the SQL function it renders
    """The database's own local clock, as SAM's other writers use it (GETDATE() on SQL Server)."""

    type = DateTime()
    inherit_cache = True


@compiles(db_now)
def _now_default(element: db_now, compiler: Any, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(db_now, "mssql")
def _now_mssql(element: db_now, compiler: Any, **kw: Any) -> str:
    return "GETDATE()"


@compiles(db_now, "postgresql")
def _now_postgresql(element: db_now, compiler: Any, **kw: Any) -> str:
    return "LOCALTIMESTAMP(0)"


@compiles(db_now, "sqlite")
def _now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    return "datetime('now', 'localtime')"


def _datetime2() -> Any:
    return (
        DateTime()
        .with_variant(mssql.DATETIME2(0), "mssql")  # type: ignore[no-untyped-call]
        .with_variant(postgresql.TIMESTAMP(precision=0), "postgresql")
    )


def _time0() -> Any:
    return Time().with_variant(mssql.TIME(0), "mssql")  # type: ignore[no-untyped-call]


def _legacy_datetime() -> Any:
    return DateTime().with_variant(mssql.DATETIME(), "mssql")


# SAM's table exactly as SAM has it: names and case are SAM's so one set of statements serves
# SQL Server, PostgreSQL (quoted identifiers) and SQLite.
ejecuciones = Table(
    "Ejecuciones",
    metadata,
    Column("EjecucionId", Integer, Identity(start=1, increment=1), primary_key=True),
    Column("DeploymentId", Unicode(50), nullable=False, unique=True),
    Column("RobotId", Integer),
    Column("EquipoId", Integer),
    Column("UserId", Integer),
    Column("Hora", _time0()),
    Column("FechaInicio", _datetime2(), nullable=False, server_default=db_now()),
    Column("FechaFin", _datetime2()),
    Column("Estado", Unicode(20), nullable=False),
    Column("FechaActualizacion", _datetime2()),
    Column("CallbackInfo", UnicodeText().with_variant(mssql.NVARCHAR(None), "mssql")),
    Column("IntentosConciliadorFallidos", Integer, nullable=False, server_default=text("0")),
    Column("FechaUltimoUNKNOWN", _legacy_datetime()),
    Column("FechaInicioReal", _legacy_datetime()),
)


class Outcome(enum.Enum):
    """What the guarded update found."""

    UPDATED = "updated"
    ALREADY_PROCESSED = "already_processed"
    NOT_FOUND = "pending_match"


@dataclass(frozen=True, slots=True)
class Callback:
    """One validated callback, ready to record."""

    deployment_id: str
    status: str
    raw: str


def guarded_update(final_states: Iterable[str], *, final: bool) -> Any:
    """The one atomic statement of SPEC 4.1; `final` says whether the new status is final."""
    t = ejecuciones
    now = db_now()
    # One bind parameter per final state (not an expanding IN) so the statement compiles once
    # to plain SQL that the hot path executes on the driver cursor.
    finals = [bindparam(f"final_{i}", state, type_=Unicode(20)) for i, state in enumerate(sorted(final_states))]
    values: dict[str, Any] = {
        "Estado": bindparam("new_status", type_=Unicode(20)),
        "CallbackInfo": bindparam("raw", type_=UnicodeText()),
        "FechaActualizacion": now,
        "FechaInicioReal": func.coalesce(t.c.FechaInicioReal, now),
    }
    if final:
        values["FechaFin"] = now
    return (
        update(t)
        .where(
            t.c.DeploymentId == bindparam("deployment_id", type_=Unicode(50)),
            t.c.Estado.not_in(finals),
            t.c.Estado != bindparam("new_status", type_=Unicode(20)),
        )
        .values(values)
    )


def lookup_state() -> Any:
    """Current state of one run, used to tell a duplicate from an early callback."""
    return select(ejecuciones.c.Estado).where(
        ejecuciones.c.DeploymentId == bindparam("deployment_id", type_=Unicode(50))
    )


class _Prepared:
    """A Core statement compiled once for one dialect, run as plain driver SQL on the hot path."""

    def __init__(self, statement: Any, dialect: Dialect, schema: str | None = None) -> None:
        options: dict[str, Any] = {}
        if schema is not None:
            options = {"schema_translate_map": {None: schema}, "render_schema_translate": True}
        compiled = statement.compile(dialect=dialect, **options)
        self.sql = str(compiled)
        self.fixed = {key: value for key, value in compiled.params.items() if value is not None}
        self.order = list(compiled.positiontup or []) if compiled.positional else None

    def params(self, **values: Any) -> Any:
        """Driver parameters in the dialect's paramstyle."""
        merged = self.fixed | values
        if self.order is not None:
            return tuple(merged[name] for name in self.order)
        return merged


def compile_statements(
    final_states: Iterable[str], dialect: Dialect, schema: str | None = None
) -> dict[str, _Prepared]:
    """The hot-path statements as the given database will receive them."""
    return {
        "update_final": _Prepared(guarded_update(final_states, final=True), dialect, schema),
        "update_open": _Prepared(guarded_update(final_states, final=False), dialect, schema),
        "lookup": _Prepared(lookup_state(), dialect, schema),
    }


def is_disconnect(exc: BaseException) -> bool:
    """True when the error means the database itself is out of reach."""
    if isinstance(exc, DBAPIError):
        return bool(exc.connection_invalidated) or type(exc.orig).__name__ in (
            "OperationalError",
            "InterfaceError",
        )
    return isinstance(exc, OSError | sqlite3.OperationalError)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a 2xx promises the update is on disk, not only in the WAL's page cache.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def driver_problem(url: str) -> str | None:
    """Why `url` cannot be used (unparseable, or its driver does not load), or None."""
    try:
        make_url(url).get_dialect().import_dbapi()
    except ImportError as exc:
        # Typically pyodbc without unixODBC or Microsoft's ODBC driver on the machine.
        return f"no se puede cargar el driver de base de datos ({exc}); instale el driver ODBC de SQL Server y unixODBC"
    except Exception:
        return "no es una URL de base de datos válida de SQLAlchemy (p. ej. postgresql+psycopg://usuario@servidor/base)"
    return None


def make_engine(url: str, *, pool_size: int = 5, connect_timeout: int = 15) -> Engine:
    """Engine for SAM's database with timeouts that turn a stuck database into a fast error."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    options: dict[str, Any] = {"pool_pre_ping": True, "future": True}
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": 5, "check_same_thread": False, "isolation_level": None}
    elif backend == "postgresql":
        # A held row lock or a hung statement must fail within seconds so the callback goes
        # to the spool instead of stalling every other callback behind it.
        connect_args = {
            "connect_timeout": 5,
            "options": "-c lock_timeout=5000 -c statement_timeout=15000",
            # A server that vanishes without closing the socket (a network black hole) is
            # noticed by the kernel in seconds instead of the default two hours.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 20000,
        }
        options |= {"pool_size": pool_size, "max_overflow": 2, "pool_timeout": 5}
    elif backend == "mssql":
        connect_args = {"timeout": connect_timeout}
        options |= {"pool_size": pool_size, "max_overflow": 2, "pool_timeout": 5}
        options["execution_options"] = {"schema_translate_map": {None: "dbo"}}
    engine = create_engine(parsed, connect_args=connect_args, **options)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling is off (isolation_level=None): BEGIN explicitly.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    elif backend == "mssql":
        event.listen(engine, "connect", lambda dbapi_conn, _r: _set_lock_timeout(dbapi_conn))
    return engine


def _set_lock_timeout(dbapi_connection: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("SET LOCK_TIMEOUT 5000")
    cursor.close()


class Repository:
    """SAM's database as this service sees it: one guarded update, a lookup, and the schema."""

    def __init__(self, engine: Engine, final_states: Iterable[str]) -> None:
        self.engine = engine
        self.final_states = frozenset(final_states)
        schema = "dbo" if engine.dialect.name == "mssql" else None
        statements = compile_statements(self.final_states, engine.dialect, schema)
        self._update_final = statements["update_final"]
        self._update_open = statements["update_open"]
        self._lookup = statements["lookup"]

    def apply_many(self, callbacks: Sequence[Callback]) -> list[Outcome]:
        """Record callbacks in one transaction, in order; raise SQLAlchemyError on failure."""
        with self.engine.begin() as conn:
            # On the driver's cursor: SQLAlchemy's per-statement bookkeeping costs more than an
            # UPDATE by key. Errors still go through SQLAlchemy, which wraps them and
            # invalidates the pooled connection when the database has gone away.
            dbapi_connection = conn.connection.dbapi_connection
            cursor = dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                if self.engine.dialect.driver == "psycopg":
                    return self._apply_pipelined(dbapi_connection, callbacks)
                return [self._apply_on_cursor(cursor, callback) for callback in callbacks]
            except Exception as exc:
                conn._handle_dbapi_exception(exc, self._update_open.sql, None, cursor, None)
                raise
            finally:
                with contextlib.suppress(Exception):
                    cursor.close()

    def _params(self, callback: Callback) -> tuple[_Prepared, Any]:
        prepared = self._update_final if callback.status in self.final_states else self._update_open
        return prepared, prepared.params(
            deployment_id=callback.deployment_id, new_status=callback.status, raw=callback.raw
        )

    def _apply_on_cursor(self, cursor: Any, callback: Callback) -> Outcome:
        prepared, params = self._params(callback)
        cursor.execute(prepared.sql, params)
        if cursor.rowcount == 1:
            return Outcome.UPDATED
        cursor.execute(self._lookup.sql, self._lookup.params(deployment_id=callback.deployment_id))
        return Outcome.ALREADY_PROCESSED if cursor.fetchone() is not None else Outcome.NOT_FOUND

    def _apply_pipelined(self, connection: Any, callbacks: Sequence[Callback]) -> list[Outcome]:
        # psycopg's pipeline mode sends the whole batch in one round trip instead of one per
        # callback; the statements still run one after another, in order, in one transaction.
        with connection.pipeline():
            updates = []
            for callback in callbacks:
                cursor = connection.cursor()
                prepared, params = self._params(callback)
                cursor.execute(prepared.sql, params)
                updates.append(cursor)
        outcomes = [Outcome.UPDATED if cursor.rowcount == 1 else Outcome.NOT_FOUND for cursor in updates]
        missed = [i for i, outcome in enumerate(outcomes) if outcome is Outcome.NOT_FOUND]
        if missed:
            with connection.pipeline():
                lookups = []
                for i in missed:
                    cursor = connection.cursor()
                    cursor.execute(self._lookup.sql, self._lookup.params(deployment_id=callbacks[i].deployment_id))
                    lookups.append(cursor)
            for i, cursor in zip(missed, lookups, strict=True):
                if cursor.fetchone() is not None:
                    outcomes[i] = Outcome.ALREADY_PROCESSED
        return outcomes

    def apply_one(self, conn: Connection, callback: Callback) -> Outcome:
        """Apply one callback inside an open transaction."""
        prepared = self._update_final if callback.status in self.final_states else self._update_open
        params = prepared.params(deployment_id=callback.deployment_id, new_status=callback.status, raw=callback.raw)
        if conn.exec_driver_sql(prepared.sql, params).rowcount == 1:
            return Outcome.UPDATED
        row = conn.exec_driver_sql(self._lookup.sql, self._lookup.params(deployment_id=callback.deployment_id)).first()
        return Outcome.ALREADY_PROCESSED if row is not None else Outcome.NOT_FOUND

    def ping(self) -> None:
        """Raise unless the database answers a trivial query."""
        with self.engine.connect() as conn:
            conn.execute(select(1))

    def table_exists(self) -> bool:
        """True when `Ejecuciones` is there."""
        with self.engine.connect() as conn:
            schema = "dbo" if self.engine.dialect.name == "mssql" else None
            return bool(inspect(conn).has_table("Ejecuciones", schema=schema))

    def create_schema(self) -> None:
        """Create `Ejecuciones` when it is missing (SQLite and PostgreSQL)."""
        metadata.create_all(self.engine, checkfirst=True)

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def mssql_ddl() -> str:
    """T-SQL that creates `dbo.Ejecuciones` as SAM has it, for an operator to run."""
    dialect = mssql.dialect()  # type: ignore[no-untyped-call]
    table = ejecuciones.to_metadata(MetaData(), schema="dbo")
    statements = [str(CreateTable(table).compile(dialect=dialect)).strip()]
    statements += [str(CreateIndex(index).compile(dialect=dialect)).strip() for index in table.indexes]
    return "\n".join(f"{statement};\nGO" for statement in statements) + "\n"


def describe_error(exc: BaseException) -> str:
    """A short, secret-free description of a database error for logs and the spool."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        message = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else ""
        return f"{type(exc.orig).__name__}: {message}"[:300]
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


# PWD=secret or PWD={sec}}ret} (ODBC escapes "}" as "}}") inside an ODBC connection string.
_ODBC_PASSWORD = re.compile(r"(?i)\b(PWD|PASSWORD)\s*=\s*(\{(?:[^}]|\}\})*\}|[^;]*)")


def display_url(url: str | URL) -> str:
    """The database URL as operators may see it: the password hidden, also inside odbc_connect."""
    parsed = make_url(url)
    # hide_password only knows the user:password@ part; SQL_SAM_PWD travels inside the
    # url-encoded odbc_connect string, where it would be printed as is.
    odbc = parsed.query.get("odbc_connect")
    if isinstance(odbc, str):
        parsed = parsed.update_query_dict({"odbc_connect": _ODBC_PASSWORD.sub(r"\1=***", odbc)})
    return parsed.render_as_string(hide_password=True)
