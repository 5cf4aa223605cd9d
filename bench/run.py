"""Benchmark: sam-callback under a burst of callbacks, beside a raw ASGI ceiling on the same uvicorn.

Usage: uv run python bench/run.py [--duration 15] [--connections 64] [--rows 200000]
       [--db sqlite|postgresql|both] [--client auto|wrk|python] [--quick] [--json FILE]

The server under test is pinned to CPU 0 and the load generator to CPU 1 (taskset). Every
request is a valid, authenticated callback for a different existing deploymentId.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

BENCH_DIR = Path(__file__).resolve().parent
PREFIX = "bench-"
TOKEN = "bench-token-0123456789-abcdefghijklmnop"  # noqa: S105 - a throwaway token for a local run
CALLBACK_PATH = "/api/callback"
PG_ADMIN_URL = os.environ.get("SAM_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
SERVER_CPU = "0"
CLIENT_CPU = "1"
TARGET_RPS_RATIO = 0.30
TARGET_P99_RATIO = 3.0
TARGET_PEAK_MB = 150.0


@dataclass
class Measurement:
    """What one load run against one server measured."""

    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    ok: int
    failed: int
    socket_errors: int
    peak_mb: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def cpu_us_per_request(self) -> float:
        """Server CPU time (user plus system) per answered request, in microseconds."""
        return self.cpu_seconds / self.requests * 1e6 if self.requests else 0.0

    rows_updated: int | None = None
    spooled: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def deployment_id(n: int) -> str:
    """The deploymentId of pre-filled row number `n`, as the load generators build it."""
    return f"{PREFIX}{n:07d}"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cpu: str, command: list[str], *, pin: bool) -> list[str]:
    """`command` run on one CPU with taskset, when pinning is on and taskset exists."""
    return ["taskset", "-c", cpu, *command] if pin else command


# --- databases ------------------------------------------------------------------------------


def _rows(count: int) -> list[tuple[Any, ...]]:
    started = datetime.now().replace(microsecond=0)
    return [(deployment_id(n), 100 + n % 40, 500 + n % 90, 20 + n % 7, "RUNNING", started) for n in range(count)]


_INSERT_COLUMNS = '"DeploymentId", "RobotId", "EquipoId", "UserId", "Estado", "FechaInicio"'


def prefill_sqlite(path: Path, rows: int) -> str:
    """A fresh SQLite file with the service's schema and `rows` running executions; return its URL."""
    from sam.callback.repository import make_engine, metadata

    url = f"sqlite:///{path.as_posix()}"
    engine = make_engine(url)
    metadata.create_all(engine)
    engine.dispose()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.executemany(
            f'INSERT INTO "Ejecuciones" ({_INSERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)',  # noqa: S608 - fixed columns
            [(*row[:5], row[5].isoformat(sep=" ")) for row in _rows(rows)],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return url


def prefill_postgresql(rows: int) -> str:
    """A fresh PostgreSQL database with the service's schema and `rows` running executions."""
    import psycopg

    from sam.callback.repository import metadata

    name = f"samcb_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    engine.dispose()
    plain = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain) as conn:
        with conn.cursor() as cursor, cursor.copy(f'COPY "Ejecuciones" ({_INSERT_COLUMNS}) FROM STDIN') as copy:
            for row in _rows(rows):
                copy.write_row(row)
        conn.commit()
        conn.autocommit = True
        conn.execute('VACUUM ANALYZE "Ejecuciones"')
    return url


def drop_postgresql(url: str) -> None:
    """Drop the benchmark's PostgreSQL database."""
    name = sa.make_url(url).database
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def count_updated(url: str) -> int:
    """Rows whose Estado the benchmark really changed."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(sa.text('SELECT COUNT(*) FROM "Ejecuciones" WHERE "Estado" <> \'RUNNING\'')).scalar_one()
            )
    finally:
        engine.dispose()


def count_spooled(path: Path) -> int:
    """Callbacks left in the spool (pending_match or queued)."""
    if not path.exists():
        return 0
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


# --- processes ------------------------------------------------------------------------------


def _process_tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        for child in children:
            pids += _process_tree(int(child))
    return pids


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process and its children, in MB."""
    total_kb = 0
    for member in _process_tree(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    """Poll `url` until it answers; fail with the server's output when the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"el servidor terminó al arrancar (código {process.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"el servidor no respondió en {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then wait for a clean exit (SIGKILL after 60 s)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(10)


@dataclass
class LoadOptions:
    """How to drive a server."""

    client: str
    connections: int
    duration: float
    rows: int
    pin: bool


def drive(port: int, options: LoadOptions, *, offset: int = 0) -> dict[str, Any]:
    """Run the load generator on CPU 1 against 127.0.0.1:port; return its summary."""
    if options.client == "wrk":
        command = [
            "wrk", "-t1", f"-c{options.connections}", f"-d{options.duration:g}s", "--timeout", "10s",
            "-s", str(BENCH_DIR / "callback.lua"), f"http://127.0.0.1:{port}{CALLBACK_PATH}",
            "--", CALLBACK_PATH, TOKEN, str(options.rows), str(offset), PREFIX, "1",
        ]  # fmt: skip
    else:
        command = [
            sys.executable, str(BENCH_DIR / "loadgen.py"), "--port", str(port), "--path", CALLBACK_PATH,
            "--token", TOKEN, "--rows", str(options.rows), "--offset", str(offset), "--prefix", PREFIX,
            "--connections", str(options.connections), "--duration", str(options.duration),
        ]  # fmt: skip
    result = subprocess.run(
        pinned(CLIENT_CPU, command, pin=options.pin), capture_output=True, text=True, timeout=options.duration + 120
    )
    for line in result.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return dict(json.loads(line.removeprefix("BENCH_JSON ")))
    raise SystemExit(f"el generador de carga no dio resultados:\n{result.stdout}\n{result.stderr}")


def _measurement(name: str, summary: dict[str, Any]) -> Measurement:
    seconds = summary["duration_us"] / 1e6
    requests = int(summary["requests"])
    failed = int(summary["errors_status"])
    return Measurement(
        name=name,
        rps=requests / seconds if seconds else 0.0,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        max_ms=summary["max_us"] / 1000,
        requests=requests,
        ok=requests - failed,
        failed=failed,
        socket_errors=sum(int(summary[k]) for k in ("errors_connect", "errors_read", "errors_write", "errors_timeout")),
    )


def measure_ceiling(work: Path, options: LoadOptions) -> Measurement:
    """Throughput and latency of a raw ASGI app on uvicorn: no framework, no database."""
    port = free_port()
    log = work / "ceiling.out"
    command = [
        sys.executable, "-m", "uvicorn", "ceiling:app", "--app-dir", str(BENCH_DIR), "--host", "127.0.0.1",
        "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(pinned(SERVER_CPU, command, pin=options.pin), stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/", process, log)
        cpu_before = cpu_seconds(process.pid)
        measurement = _measurement("techo (ASGI puro)", drive(port, options))
        measurement.peak_mb = peak_rss_mb(process.pid)
        measurement.cpu_seconds = cpu_seconds(process.pid) - cpu_before
    finally:
        stop(process)
    return measurement


def service_environment(url: str, folder: Path, port: int) -> dict[str, str]:
    """The service's configuration for a run: this environment without any of its own settings, plus these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLBACK_", "SAM_", "SQL_SAM_", "JWT_", "LOG_"))}
    return env | {
        "SAM_DATABASE_URL": url,
        "CALLBACK_SPOOL_PATH": str(folder / "spool" / "spool.db"),
        "CALLBACK_TOKEN": TOKEN,
        "CALLBACK_SERVER_HOST": "127.0.0.1",
        "CALLBACK_SERVER_PORT": str(port),
        "CALLBACK_ENDPOINT_PATH": CALLBACK_PATH,
        "LOG_DIRECTORY": str(folder / "logs"),
        "LOG_LEVEL": "INFO",
    }


def measure_service(work: Path, db: str, options: LoadOptions) -> Measurement:
    """Start sam-callback the real way on a pre-filled database, drive it, count what it wrote."""
    folder = work / db
    folder.mkdir()
    started = time.perf_counter()
    url = prefill_sqlite(folder / "sam.db", options.rows) if db == "sqlite" else prefill_postgresql(options.rows)
    prefill_seconds = time.perf_counter() - started
    port = free_port()
    spool = folder / "spool" / "spool.db"
    env = service_environment(url, folder, port)
    log = folder / "server.out"
    try:
        with log.open("wb") as sink:
            process = subprocess.Popen(
                pinned(SERVER_CPU, [sys.executable, "-m", "sam.callback"], pin=options.pin),
                cwd=folder,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_ready(f"http://127.0.0.1:{port}/health", process, log)
            cpu_before = cpu_seconds(process.pid)
            measurement = _measurement(f"sam-callback ({db})", drive(port, options))
            measurement.peak_mb = peak_rss_mb(process.pid)
            measurement.cpu_seconds = cpu_seconds(process.pid) - cpu_before
        finally:
            exit_code = stop(process)
        measurement.rows_updated = count_updated(url)
        measurement.spooled = count_spooled(spool)
        measurement.extra = {"prefill_seconds": round(prefill_seconds, 1), "exit_code": exit_code}
    finally:
        if db == "postgresql":
            drop_postgresql(url)
    return measurement


# --- report ---------------------------------------------------------------------------------


def report(ceiling: Measurement, services: list[Measurement], options: LoadOptions) -> list[str]:
    """The results as a table, with each service's ratios to the ceiling and the targets."""
    lines = [
        f"cliente={options.client} conexiones={options.connections} duración={options.duration:g}s "
        f"filas={options.rows} fijado={'sí (servidor CPU 0, carga CPU 1)' if options.pin else 'no'}",
        "",
        f"{'servidor':<26}{'rps':>9}{'p50 ms':>9}{'p99 ms':>9}{'pico MB':>9}{'2xx':>9}{'no 2xx':>8}"
        f"{'filas act.':>11}{'spool':>7}{'CPU µs/pet':>11}{'rps/techo':>11}{'p99/techo':>11}",
    ]
    for m in [ceiling, *services]:
        is_ceiling = m is ceiling
        rps_ratio = "" if is_ceiling else f"{m.rps / ceiling.rps:.2f}"
        p99_ratio = "" if is_ceiling else f"{m.p99_ms / ceiling.p99_ms:.2f}" if ceiling.p99_ms else "-"
        lines.append(
            f"{m.name:<26}{m.rps:>9.0f}{m.p50_ms:>9.1f}{m.p99_ms:>9.1f}{m.peak_mb:>9.1f}{m.ok:>9}{m.failed:>8}"
            f"{'' if m.rows_updated is None else m.rows_updated:>11}{'' if m.spooled is None else m.spooled:>7}"
            f"{m.cpu_us_per_request:>11.0f}"
            f"{rps_ratio:>11}{p99_ratio:>11}"
        )
    lines.append("")
    for m in services:
        checks = [
            ("rps/techo", m.rps / ceiling.rps, TARGET_RPS_RATIO, m.rps / ceiling.rps >= TARGET_RPS_RATIO),
            ("p99/techo", m.p99_ms / ceiling.p99_ms if ceiling.p99_ms else 0, TARGET_P99_RATIO, ceiling.p99_ms > 0 and m.p99_ms <= TARGET_P99_RATIO * ceiling.p99_ms),
            ("pico MB", m.peak_mb, TARGET_PEAK_MB, m.peak_mb <= TARGET_PEAK_MB),
        ]  # fmt: skip
        verdicts = ", ".join(
            f"{name} {value:.2f} ({'ok' if good else 'NO'} {target:g})" for name, value, target, good in checks
        )
        # Past `rows` requests the ids wrap round and the answers are already_processed.
        durable = (m.rows_updated or 0) + (m.spooled or 0) >= min(m.ok, options.rows)
        lines.append(f"{m.name}: {verdicts}; 2xx duraderos: {'sí' if durable else 'NO'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse options, measure the ceiling and each database, print the table."""
    parser = argparse.ArgumentParser(description="Benchmark de sam-callback frente al techo ASGI puro")
    parser.add_argument("--duration", type=float, default=15.0, help="segundos de carga por servidor")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rows", type=int, default=200_000, help="filas de Ejecuciones precargadas")
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="sqlite")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--quick", action="store_true", help="prueba de humo: 2000 filas, 3 s")
    parser.add_argument("--no-pin", action="store_true", help="no fijar CPU con taskset")
    parser.add_argument("--json", type=Path, default=None, help="escribe también los resultados en JSON")
    parser.add_argument("--workdir", type=Path, default=None, help="carpeta para ficheros temporales")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.duration = min(args.rows, 2000), min(args.duration, 3.0)
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    options = LoadOptions(client=client, connections=args.connections, duration=args.duration, rows=args.rows, pin=pin)
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    with tempfile.TemporaryDirectory(prefix="sam-bench-", dir=args.workdir) as temporary:
        work = Path(temporary)
        ceiling = measure_ceiling(work, options)
        services = [measure_service(work, db, options) for db in dbs]
    lines = report(ceiling, services, options)
    print("\n".join(lines))
    if args.json is not None:
        results = {
            "options": asdict(options),
            "ceiling": asdict(ceiling) | {"cpu_us_per_request": ceiling.cpu_us_per_request},
            "services": [asdict(s) | {"cpu_us_per_request": s.cpu_us_per_request} for s in services],
        }
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
