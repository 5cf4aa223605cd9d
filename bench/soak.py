"""Soak test: a real server under a steady callback rate; reports memory at start and end, and errors.

    uv run python bench/soak.py --duration 600 --rate 50
    uv run python bench/soak.py --duration 60 --rate 50 --database-url postgresql+psycopg://postgres@127.0.0.1:5432/db

It starts `python -m sam.callback` on a free port of 127.0.0.1 with its own spool and logs in a
temporary folder (SQLite database there too, unless --database-url is given), plays SAM's
launcher (inserts rows) and A360 (callbacks: RUNNING, a final status, a duplicate; one run in ten
calls back before its row exists), then checks that every run ended with its first final
callback. Prints a JSON report; exit code 1 on any error, unapplied callback or memory growth
above --max-growth-mb.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from sam.callback.repository import ejecuciones, make_engine, metadata

FINAL = "RUN_COMPLETED"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process and its children (workers), in MiB; None where unknown."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(child) for child in children.read_text().split()]
    total = 0.0
    for one in pids:
        status = Path(f"/proc/{one}/status")
        if not status.exists():
            try:
                import psutil  # type: ignore[import-not-found]
            except ImportError:
                return None
            return float(psutil.Process(pid).memory_info().rss) / 1_048_576
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return round(total, 1)


@dataclass
class Tally:
    """What the load saw, shared by the sender threads."""

    codes: Counter[str] = field(default_factory=Counter)
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, code: str, error: str | None = None) -> None:
        """Count one answer (or failure)."""
        with self.lock:
            self.codes[code] += 1
            if error is not None:
                self.failures += 1
                if len(self.errors) < 20:
                    self.errors.append(error)


def _start_server(workdir: Path, database_url: str, token: str, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLBACK_", "SAM_DATABASE_URL", "LOG_"))}
    env |= {
        "CALLBACK_SERVER_HOST": "127.0.0.1",
        "CALLBACK_SERVER_PORT": str(port),
        "CALLBACK_SERVER_WORKERS": str(workers),
        "CALLBACK_TOKEN": token,
        "SAM_DATABASE_URL": database_url,
        "CALLBACK_SPOOL_PATH": str(workdir / "spool" / "spool.db"),
        "LOG_DIRECTORY": str(workdir / "logs"),
    }
    with (workdir / "server.out").open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "sam.callback"], cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"el servidor terminó al arrancar:\n{(workdir / 'server.out').read_text(errors='replace')}"
            )
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("el servidor no arrancó en 60 s")


def _stop_server(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.CTRL_BREAK_EVENT if sys.platform == "win32" else signal.SIGTERM)  # type: ignore[attr-defined]
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(10)


def soak(
    *, duration: float, rate: float, database_url: str | None, workers: int, max_growth_mb: float
) -> dict[str, Any]:
    """Run the soak and return the report."""
    token = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="sam-soak-") as folder:
        workdir = Path(folder)
        url = database_url or f"sqlite:///{(workdir / 'sam.db').as_posix()}"
        engine = make_engine(url)
        metadata.create_all(engine, checkfirst=True)
        process, base = _start_server(workdir, url, token, workers)
        callback_url = base + "/api/callback"
        tally = Tally()
        finals: dict[str, str] = {}  # deploymentId -> the first final body sent
        late_rows: queue.SimpleQueue[str] = queue.SimpleQueue()
        # One job is one run's callbacks, sent in order by one client: A360 sends a run's
        # callbacks one after another, and "first final" must mean first in time.
        work: queue.Queue[tuple[str, list[str], bool] | None] = queue.Queue(maxsize=10_000)
        prefix = uuid.uuid4().hex[:8]

        def sender() -> None:
            headers = {"X-Authorization": token, "Content-Type": "application/json"}
            with httpx.Client(timeout=30) as http:
                while (job := work.get()) is not None:
                    deployment_id, bodies, late = job
                    for raw in bodies:
                        try:
                            response = http.post(callback_url, content=raw, headers=headers)
                            code = response.json().get("code", "?")
                            ok = 200 <= response.status_code < 300
                            tally.note(
                                code if ok else f"{response.status_code} {code}", None if ok else response.text[:200]
                            )
                        except (httpx.HTTPError, ValueError) as exc:
                            tally.note("sin respuesta", repr(exc))
                    if late:
                        late_rows.put(deployment_id)

        def insert_late_rows() -> None:
            """Rows SAM's launcher commits after a fast bot has already called back."""
            while True:
                try:
                    late_id = late_rows.get_nowait()
                except queue.Empty:
                    return
                with engine.begin() as conn:
                    conn.execute(sa.insert(ejecuciones).values(DeploymentId=late_id, Estado="DEPLOYED"))

        senders = [threading.Thread(target=sender, daemon=True) for _ in range(16)]
        for thread in senders:
            thread.start()

        samples: list[tuple[float, float | None]] = []
        started = time.monotonic()
        warmup = min(10.0, duration / 6)
        memory_start: float | None = None
        interval = 3.0 / rate  # three callbacks per run
        next_at = started
        run = 0
        sent = 0
        while time.monotonic() - started < duration:
            run += 1
            deployment_id = f"soak-{prefix}-{run:07d}"
            late = run % 10 == 0
            if not late:
                with engine.begin() as conn:
                    conn.execute(sa.insert(ejecuciones).values(DeploymentId=deployment_id, Estado="DEPLOYED"))
            final = json.dumps({"deploymentId": deployment_id, "status": FINAL, "botOutput": {"n": run}})
            finals[deployment_id] = final  # the first final callback each run sends
            duplicate = json.dumps({"deploymentId": deployment_id, "status": FINAL, "duplicate": True})
            running = json.dumps({"deploymentId": deployment_id, "status": "RUNNING"})
            work.put((deployment_id, [running, final, duplicate], late))
            sent += 3
            insert_late_rows()
            elapsed = time.monotonic() - started
            if memory_start is None and elapsed >= warmup:
                memory_start = rss_mb(process.pid)
            if not samples or elapsed - samples[-1][0] >= 10:
                samples.append((round(elapsed, 1), rss_mb(process.pid)))
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        for _ in senders:
            work.put(None)
        for thread in senders:
            thread.join(60)
        insert_late_rows()
        memory_end = rss_mb(process.pid)

        backlog = -1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                backlog = int(httpx.get(base + "/ready", timeout=10).json()["spool"].get("backlog", -1))
            except (httpx.HTTPError, ValueError, KeyError):
                backlog = -1
            if backlog == 0:
                break
            time.sleep(0.5)
        with engine.connect() as conn:
            rows = {
                row.DeploymentId: (row.Estado, row.CallbackInfo)
                for row in conn.execute(
                    sa.select(ejecuciones.c.DeploymentId, ejecuciones.c.Estado, ejecuciones.c.CallbackInfo).where(
                        ejecuciones.c.DeploymentId.like(f"soak-{prefix}-%")
                    )
                )
            }
        engine.dispose()
        wrong = [d for d, body in finals.items() if rows.get(d) != (FINAL, body)]
        exit_code = _stop_server(process)

    growth = (memory_end - memory_start) if memory_start is not None and memory_end is not None else None
    problems = []
    if tally.failures:
        problems.append(f"{tally.failures} respuestas no 2xx o sin respuesta")
    if wrong:
        problems.append(f"{len(wrong)} ejecuciones sin su primer callback final (p. ej. {wrong[:3]})")
    if backlog != 0:
        problems.append(f"el spool no se vació (pendientes: {backlog})")
    if exit_code != 0:
        problems.append(f"el servidor terminó con código {exit_code}")
    if growth is not None and growth > max_growth_mb:
        problems.append(f"la memoria creció {growth:.1f} MiB (máximo {max_growth_mb})")
    return {
        "duration_s": duration,
        "rate_per_s": rate,
        "callbacks_sent": sent,
        "runs": run,
        "answers": dict(tally.codes),
        "failures": tally.failures,
        "errors": tally.errors,
        "memory_mb": {"start": memory_start, "end": memory_end, "growth": growth, "samples": samples},
        "spool_backlog_at_end": backlog,
        "server_exit_code": exit_code,
        "problems": problems,
        "ok": not problems,
    }


def main() -> int:
    """Parse the options, run the soak, print the JSON report."""
    parser = argparse.ArgumentParser(description="Prueba de resistencia de sam-callback a ritmo constante")
    parser.add_argument("--duration", type=float, default=600, help="segundos de carga (por defecto 600)")
    parser.add_argument("--rate", type=float, default=50, help="callbacks por segundo (por defecto 50)")
    parser.add_argument("--database-url", default=None, help="URL SQLAlchemy (por defecto, SQLite temporal)")
    parser.add_argument("--workers", type=int, default=1, help="CALLBACK_SERVER_WORKERS")
    parser.add_argument("--max-growth-mb", type=float, default=64, help="crecimiento de memoria tolerado")
    args = parser.parse_args()
    report = soak(
        duration=args.duration,
        rate=args.rate,
        database_url=args.database_url,
        workers=args.workers,
        max_growth_mb=args.max_growth_mb,
    )
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
