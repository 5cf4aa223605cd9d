"""Every SQL statement against SAM's database: the `Ejecuciones` table and the guarded update."""

from __future__ import annotations

import contextlib
import enum
import logging
import operator
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Identity,
    Integer,
    MetaData,
    Table,
    Time,
    Unicode,
    UnicodeText,
    bindparam,
    case,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import mssql, postgresql, sqlite
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlalchemy.sql.expression import FunctionElement

from .domain import Callback, Outcome
from .files import unwritable_reason

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


class arrival(FunctionElement[Any]):  # noqa: N801 - reads like the SQL function it renders
    """The moment a callback arrived on the database's clock: its now minus the seconds waited.

    Two binds: the seconds waited, for a server with a clock of its own, and the local time of
    arrival as text, for SQLite, whose clock is this process's own.
    """

    type = DateTime()
    inherit_cache = True


def _waited(element: arrival, compiler: Any, **kw: Any) -> str:
    waited, _local = list(element.clauses)
    return str(compiler.process(waited, **kw))


@compiles(arrival)
def _arrival_default(element: arrival, compiler: Any, **kw: Any) -> str:
    return f"CURRENT_TIMESTAMP - {_waited(element, compiler, **kw)}"


@compiles(arrival, "mssql")
def _arrival_mssql(element: arrival, compiler: Any, **kw: Any) -> str:
    # DATEADD wants an int; the columns keep whole seconds anyway.
    return f"DATEADD(second, -CAST({_waited(element, compiler, **kw)} AS INT), GETDATE())"


@compiles(arrival, "postgresql")
def _arrival_postgresql(element: arrival, compiler: Any, **kw: Any) -> str:
    # Whole seconds, as on the direct path, and never after the arrival (no rounding up).
    return f"date_trunc('second', LOCALTIMESTAMP - make_interval(secs => {_waited(element, compiler, **kw)}))"


@compiles(arrival, "sqlite")
def _arrival_sqlite(element: arrival, compiler: Any, **kw: Any) -> str:
    # The embedded database reads the same clock as this process: the arrival is computed here,
    # in datetime('now', 'localtime')'s format. Evaluated in SQL, the statement ran SQLite's
    # localtime conversion five times per row, the largest cost the arrival added to a callback.
    _waited_bind, local = list(element.clauses)
    return str(compiler.process(local, **kw))


class comparable_time(FunctionElement[Any]):  # noqa: N801 - reads like the SQL it renders
    """A datetime column as the database compares it with the arrival.

    SQLite keeps datetimes as text and compares them as text: '2026-11-30T00:00:00' (a form
    SQLite itself reads) sorts after '2026-11-30 10:00:00'. `datetime()` puts any of its forms
    in the arrival's. Elsewhere the column has a real datetime type.
    """

    type = DateTime()
    inherit_cache = True


@compiles(comparable_time)
def _comparable_default(element: comparable_time, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(comparable_time, "sqlite")
def _comparable_sqlite(element: comparable_time, compiler: Any, **kw: Any) -> str:
    return f"datetime({compiler.process(element.clauses, **kw)})"


def sqlite_local_time(epoch: float) -> str:
    """`epoch` as SQLite's datetime('now', 'localtime') writes it: local time, whole seconds."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def guarded_update(final_states: Iterable[str]) -> Any:
    """The one atomic statement of SPEC 4.1, for every status: it records the callback and ends the run."""
    t = ejecuciones
    states = sorted(final_states)
    if not states:
        # Without final states the guard would vanish and a late callback could reopen a finished
        # run. Settings refuse an empty CALLBACK_FINAL_STATES; this is for any other caller.
        raise ValueError("guarded_update needs at least one final state")
    # One bind parameter per final state (not an expanding IN) so the statement compiles once
    # to plain SQL that the hot path executes on the driver cursor.
    finals = [bindparam(f"final_{i}", state, type_=Unicode(20)) for i, state in enumerate(states)]
    # "Estado NOT IN (finals)" written as one "<>" per final state: the same rows (SQL defines
    # NOT IN so, NULLs included), but SQLite builds a temporary b-tree for an IN list on every
    # execution, which cost more than the rest of the UPDATE. SQL Server and PostgreSQL plan
    # both forms alike.
    not_final = [t.c.Estado != final for final in finals]
    arrived = arrival(bindparam("waited", type_=Float()), bindparam("arrived_local", type_=Unicode(19)))
    # A callback cannot end a run before it started: a row whose FechaInicio is later than the
    # arrival (clocks apart, a launcher that wrote late) ends at its start.
    received = case((comparable_time(t.c.FechaInicio) > arrived, t.c.FechaInicio), else_=arrived)
    return (
        update(t)
        .where(
            t.c.DeploymentId == bindparam("deployment_id", type_=Unicode(50)),
            *not_final,
            t.c.Estado != bindparam("new_status", type_=Unicode(20)),
        )
        .values(
            {
                "Estado": bindparam("new_status", type_=Unicode(20)),
                "CallbackInfo": bindparam("raw", type_=UnicodeText()),
                "FechaActualizacion": db_now(),
                "FechaInicioReal": func.coalesce(t.c.FechaInicioReal, received),
                # Every accepted callback ends the run: SAM's reconciler skips every row whose
                # CallbackInfo is set, so a row left without FechaFin would stay open for ever.
                "FechaFin": received,
            }
        )
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
        if dialect.paramstyle == "numeric":
            # SQLite's numbered parameters: "?1" written four times is bound once. (":1" would be
            # a named parameter, which Python 3.14's sqlite3 refuses to bind from a sequence.)
            self.sql = _NUMERIC_PARAMETER.sub(r"?\1", self.sql)
        self.fixed = {key: value for key, value in compiled.params.items() if value is not None}
        self.order = list(compiled.positiontup or []) if compiled.positional else None
        # itemgetter builds the driver's tuple in C; with one name it would return the bare value.
        self._pick: Callable[[dict[str, Any]], Any] | None = None
        if self.order is not None:
            self._pick = operator.itemgetter(*self.order) if len(self.order) > 1 else _one(self.order[0])

    def params(self, **values: Any) -> Any:
        """Driver parameters in the dialect's paramstyle."""
        merged = self.fixed | values
        return merged if self._pick is None else self._pick(merged)


def _one(name: str) -> Callable[[dict[str, Any]], tuple[Any]]:
    return lambda values: (values[name],)


# ":7" as SQLAlchemy's numeric paramstyle writes it, never inside a quoted literal in our statements.
_NUMERIC_PARAMETER = re.compile(r"(?<![\w:']):(\d+)\b")


def compile_statements(
    final_states: Iterable[str], dialect: Dialect, schema: str | None = None
) -> dict[str, _Prepared]:
    """The hot-path statements as the given database will receive them."""
    if dialect.name == "sqlite":
        # Numbered parameters: the arrival, written four times in the UPDATE, is bound once per
        # callback instead of four times (and without named parameters' lookups by name).
        dialect = sqlite.dialect(paramstyle="numeric")
    return {
        "update": _Prepared(guarded_update(final_states), dialect, schema),
        "lookup": _Prepared(lookup_state(), dialect, schema),
    }


class Failure(enum.Enum):
    """What a database error means for the callback that met it."""

    # The database as a whole is out of reach (down, unreachable, no free connection, an SQLite
    # file locked by another process): spool everything, back off, probe.
    DISCONNECT = "disconnect"
    TRANSIENT = "transient"  # the database answered but refused this time: retry with backoff
    PERMANENT = "permanent"  # retrying cannot fix it (schema, size, permission): keep, alert


# SQLSTATEs of refusals that pass (locks, deadlocks, serialization, cancelled statements,
# shutdowns, lack of resources) and of refusals only a person can fix.
_TRANSIENT_STATES = ("40", "55P03", "57", "53", "HYT0", "08")
_PERMANENT_STATES = ("42", "22", "23", "0A", "44")
# SQL Server's native numbers, which pyodbc puts in the message as "(207)".
_MSSQL_TRANSIENT = {1205, 1222, -2}
_MSSQL_PERMANENT = {207, 208, 8152, 2628, 229, 230, 515, 547, 2627, 2601}
_MSSQL_NATIVE = re.compile(r"\((-?\d+)\)")
_SQLITE_PERMANENT = ("no such column", "no such table", "has no column", "constraint failed", "datatype mismatch")


def classify_error(exc: BaseException) -> Failure:
    """Tell an unreachable database from a passing refusal and from one that retrying cannot fix."""
    if not isinstance(exc, DBAPIError):
        # A pool that gives no connection in time, an OSError: nothing reached a table.
        return Failure.DISCONNECT
    orig = exc.orig
    if exc.connection_invalidated:
        return Failure.DISCONNECT
    sqlstate = getattr(orig, "sqlstate", None)  # psycopg
    if sqlstate is None and orig is not None and orig.args and isinstance(orig.args[0], str):
        # pyodbc: args are (SQLSTATE, message with the native error number in parentheses).
        candidate = orig.args[0]
        if len(candidate) == 5 and candidate.isalnum() and len(orig.args) > 1:
            sqlstate = candidate
            for number in _MSSQL_NATIVE.findall(str(orig.args[1])):
                if int(number) in _MSSQL_TRANSIENT:
                    return Failure.TRANSIENT
                if int(number) in _MSSQL_PERMANENT:
                    return Failure.PERMANENT
    if isinstance(sqlstate, str) and sqlstate:
        if sqlstate.startswith("08"):
            return Failure.DISCONNECT
        if sqlstate.startswith(_TRANSIENT_STATES):
            return Failure.TRANSIENT
        if sqlstate.startswith(_PERMANENT_STATES):
            return Failure.PERMANENT
        return Failure.TRANSIENT
    if isinstance(orig, sqlite3.Error):
        message = str(orig).lower()
        if isinstance(orig, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.ProgrammingError) or any(
            fragment in message for fragment in _SQLITE_PERMANENT
        ):
            return Failure.PERMANENT
        # "database is locked"/busy included: SQLite locks the whole file, not one row.
        return Failure.DISCONNECT
    return Failure.DISCONNECT if is_disconnect(exc) else Failure.TRANSIENT


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


def sqlite_file(url: str | URL) -> Path | None:
    """The file of a SQLite URL (None for other databases and for an in-memory one)."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database)


def driver_problem(url: str, *, create: bool = True) -> str | None:
    """Why `url` cannot be used (unparseable, its driver does not load, no folder for SQLite), or None.

    With `create` a SQLite file's folder is created; without (`check`), nothing is.
    """
    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()
    except ImportError as exc:
        # Typically pyodbc without unixODBC or Microsoft's ODBC driver on the machine.
        return f"no se puede cargar el driver de base de datos ({exc}); instale el driver ODBC de SQL Server y unixODBC"
    except Exception:
        return "no es una URL de base de datos válida de SQLAlchemy (p. ej. postgresql+psycopg://usuario@servidor/base)"
    database = sqlite_file(parsed)
    if database is not None:
        folder = database.parent
        if not create:
            reason = unwritable_reason(database)
            return None if reason is None else f"no se puede crear la base SQLite '{database}' ({reason})"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"no se puede crear la carpeta de la base SQLite '{folder}' ({exc.strerror or type(exc).__name__})"
    return None


def make_engine(url: str, *, pool_size: int = 5, connect_timeout: int = 15) -> Engine:
    """Engine for SAM's database with timeouts that turn a stuck database into a fast error."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    options: dict[str, Any] = {"pool_pre_ping": True, "future": True}
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        database = sqlite_file(parsed)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
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
        self._update = statements["update"]
        self._lookup = statements["lookup"]
        # SQLite's clock is this process's: the arrival is bound as text (see `arrival`).
        self._local_clock = engine.dialect.name == "sqlite"
        self._local_second = -1
        self._local_text = ""

    def apply_many(self, callbacks: Sequence[Callback], waited: Sequence[float] | None = None) -> list[Outcome]:
        """Record callbacks in one transaction, in order; raise DBAPIError when the database refuses.

        `waited[i]` is how long callback i waited in the spool (seconds; none on the direct
        path): its run ends at its arrival, not at this write. Once a run's row is missing, that
        run's later callbacks in the call are not tried (its order would break if the row
        appeared between two statements).
        """
        delays = list(waited) if waited is not None else [0.0] * len(callbacks)
        params = [self._update_params(callback, delay) for callback, delay in zip(callbacks, delays, strict=True)]
        dialect = self.engine.dialect
        with self.engine.begin() as conn:
            # On the driver's cursor: SQLAlchemy's per-statement bookkeeping costs more than an
            # UPDATE by key. Errors are wrapped below as SQLAlchemy would wrap them.
            dbapi_connection = conn.connection.dbapi_connection
            try:
                if dialect.driver == "psycopg" and len({c.deployment_id for c in callbacks}) == len(callbacks):
                    return self._pipelined(dbapi_connection, callbacks, params)
                return self._one_by_one(dbapi_connection, callbacks, params)
            except dialect.loaded_dbapi.Error as exc:
                raise self._wrapped(conn, exc) from exc

    def _update_params(self, callback: Callback, waited: float) -> Any:
        waited = max(0.0, float(waited))
        # The arrival in the form the statement renders for this dialect (see `arrival`).
        clock = {"arrived_local": self._local_time(time.time() - waited)} if self._local_clock else {"waited": waited}
        return self._update.params(
            deployment_id=callback.deployment_id, new_status=callback.status, raw=callback.raw, **clock
        )

    def _local_time(self, epoch: float) -> str:
        # One text per second, shared by every callback of that second.
        second = int(epoch)
        if second != self._local_second:
            self._local_second, self._local_text = second, sqlite_local_time(second)
        return self._local_text

    def _lookup_params(self, callback: Callback) -> Any:
        return self._lookup.params(deployment_id=callback.deployment_id)

    def _one_by_one(self, connection: Any, callbacks: Sequence[Callback], params: list[Any]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        missing: set[str] = set()
        cursor = connection.cursor()
        try:
            for callback, update_params in zip(callbacks, params, strict=True):
                if callback.deployment_id in missing:
                    outcomes.append(Outcome.NOT_FOUND)
                    continue
                cursor.execute(self._update.sql, update_params)
                if cursor.rowcount == 1:
                    outcomes.append(Outcome.UPDATED)
                    continue
                cursor.execute(self._lookup.sql, self._lookup_params(callback))
                found = cursor.fetchone() is not None
                outcomes.append(Outcome.ALREADY_PROCESSED if found else Outcome.NOT_FOUND)
                if not found:
                    missing.add(callback.deployment_id)
        finally:
            with contextlib.suppress(Exception):
                cursor.close()
        return outcomes

    def _pipelined(self, connection: Any, callbacks: Sequence[Callback], params: list[Any]) -> list[Outcome]:
        # psycopg's pipeline mode sends the whole batch in one round trip instead of one per
        # callback; the statements still run one after another, in order, in one transaction.
        # Only for batches with one callback per run: it cannot stop a run at its missing row.
        with connection.pipeline():
            updates = []
            for update_params in params:
                cursor = connection.cursor()
                cursor.execute(self._update.sql, update_params)
                updates.append(cursor)
        outcomes = [Outcome.UPDATED if cursor.rowcount == 1 else Outcome.NOT_FOUND for cursor in updates]
        missed = [i for i, outcome in enumerate(outcomes) if outcome is Outcome.NOT_FOUND]
        if missed:
            with connection.pipeline():
                lookups = []
                for i in missed:
                    cursor = connection.cursor()
                    cursor.execute(self._lookup.sql, self._lookup_params(callbacks[i]))
                    lookups.append(cursor)
            for i, cursor in zip(missed, lookups, strict=True):
                if cursor.fetchone() is not None:
                    outcomes[i] = Outcome.ALREADY_PROCESSED
        return outcomes

    def _wrapped(self, conn: Connection, exc: Exception) -> BaseException:
        """The driver's error as the DBAPIError SQLAlchemy raises; a lost connection leaves the pool."""
        dialect = self.engine.dialect
        dbapi_connection = conn.connection.dbapi_connection
        driver_error: Any = exc
        lost = dialect.is_disconnect(driver_error, dbapi_connection, None)
        if lost:
            conn.invalidate(exc)
        return DBAPIError.instance(
            self._update.sql,
            None,
            exc,
            dialect.loaded_dbapi.Error,
            hide_parameters=True,
            connection_invalidated=lost,
            dialect=dialect,
        )

    def update_problem(self, deployment_id: str) -> str | None:
        """Why the service's UPDATE would be refused (no permission, a read-only file), or None.

        Runs the very statement the writer runs, for `deployment_id` (an id no run has), and
        rolls it back: nothing changes, whatever the database.
        """
        probe = Callback(deployment_id=deployment_id, status="SAM-CALLBACK-CHECK", raw="{}")
        with self.engine.connect() as conn:
            transaction = conn.begin()
            try:
                conn.exec_driver_sql(self._update.sql, self._update_params(probe, 0.0))
            except DBAPIError as exc:
                return describe_error(exc)
            finally:
                transaction.rollback()
        return None

    def ping(self) -> None:
        """Raise unless the database answers a trivial query."""
        with self.engine.connect() as conn:
            conn.execute(select(1))

    def table_exists(self) -> bool:
        """True when `Ejecuciones` is there."""
        with self.engine.connect() as conn:
            schema = "dbo" if self.engine.dialect.name == "mssql" else None
            return bool(inspect(conn).has_table("Ejecuciones", schema=schema))

    def table_columns(self) -> list[Any]:
        """`Ejecuciones`' columns as SQLAlchemy's inspector reflects them (name, type, ...)."""
        with self.engine.connect() as conn:
            schema = "dbo" if self.engine.dialect.name == "mssql" else None
            return list(inspect(conn).get_columns("Ejecuciones", schema=schema))

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
