"""Work per callback in CPU instructions (valgrind's callgrind): a figure that machine noise does not move.

Usage: uv run python bench/instructions.py [--callbacks 1000] [--connections 16] [--rows 50000]
       [--python PATH] [--json FILE]

On a shared virtual machine, requests per second move by 20-50 % from one run to the next with
the same code. Instructions do not: callgrind counts what the process executes, whatever else
the machine does. The ceiling (bench/ceiling.py) and the service are each started under
callgrind, warmed up, sent exactly N requests by a fixed-count client, and their counters read
per thread. `--python` runs another checkout's interpreter (its own `sam.callback`), to compare
two versions of the service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import run as bench  # noqa: E402 - the benchmark's helpers, next to this file
from loadgen import callback_body  # noqa: E402

STARTUP_TIMEOUT = 600.0  # imports under callgrind run some 50 times slower
WARMUP = 200


@dataclass
class Count:
    """Instructions one server executed for N requests, by thread."""

    name: str
    requests: int
    statuses: dict[int, int]
    threads: dict[str, int] = field(default_factory=dict)
    # Threads whose work follows the clock, not the requests (the operator page's publisher,
    # once a second): under callgrind a second holds ~50 times fewer requests, so they are
    # shown apart and left out of the per-request figure.
    periodic: dict[str, int] = field(default_factory=dict)

    @property
    def per_request(self) -> float:
        """Instructions per request, every thread but the periodic ones."""
        return sum(self.threads.values()) / self.requests


async def _send(port: int, path: str, first: int, total: int, connections: int, statuses: Counter[int]) -> None:
    numbers = iter(range(first, first + total))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"X-Authorization: {bench.TOKEN}\r\n"
    ).encode()

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for n in numbers:
            body = callback_body(bench.PREFIX, n)
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            answer = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", answer)
            await reader.readexactly(int(length.group(1)) if length else 0)
            statuses[int(answer.split(b" ", 2)[1])] += 1
        writer.close()
        await writer.wait_closed()

    await asyncio.gather(*(one_connection() for _ in range(connections)))


def send(port: int, path: str, first: int, total: int, connections: int) -> dict[int, int]:
    """Exactly `total` requests over keep-alive connections; the count of each status."""
    statuses: Counter[int] = Counter()
    asyncio.run(_send(port, path, first, total, connections, statuses))
    return dict(statuses)


def _thread_files(out: Path) -> list[Path]:
    # callgrind_control -d writes <out>.1-NN, one file per thread (NN = valgrind's thread number).
    return sorted(out.parent.glob(out.name + ".1-*"))


def _total(path: Path) -> int:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    return 0


def _kind(path: Path) -> str:
    if path.name.endswith("-01"):
        return "bucle principal"
    text = path.read_text(encoding="utf-8", errors="replace")
    if "sqlite3_step" in text or "psycopg" in text:
        return "escritor"
    if "encoder_listencode_obj" in text:  # json.dumps of the recent events, once a second
        return "panel"
    return "otros hilos"


def measure(
    name: str, command: list[str], env: dict[str, str], cwd: Path, *, path: str, ready: str, args: argparse.Namespace
) -> Count:
    """Start `command` under callgrind, warm it up, count N requests, stop it."""
    out = cwd / "callgrind.out"
    log = cwd / f"{name}.log"
    valgrind = ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}"]
    with log.open("wb") as sink:
        process = subprocess.Popen([*valgrind, *command], cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        bench.wait_ready(ready, process, log, timeout=STARTUP_TIMEOUT)
        send(args.port, path, args.rows - WARMUP, WARMUP, args.connections)
        subprocess.run(["callgrind_control", "-z", str(process.pid)], check=True, capture_output=True)
        statuses = send(args.port, path, 0, args.callbacks, args.connections)
        subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True, capture_output=True)
    finally:
        bench.stop(process)
    count = Count(name=name, requests=args.callbacks, statuses=statuses)
    for thread in _thread_files(out):
        instructions = _total(thread)
        if not instructions:
            continue
        kind = _kind(thread)
        bucket = count.periodic if kind == "panel" else count.threads
        bucket[kind] = bucket.get(kind, 0) + instructions
    return count


def main(argv: list[str] | None = None) -> int:
    """Count the ceiling and the service on SQLite; print instructions per request and their ratio."""
    parser = argparse.ArgumentParser(description="Instrucciones por callback (callgrind), servicio frente al techo")
    parser.add_argument("--callbacks", type=int, default=1000, help="peticiones contadas por servidor")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rows", type=int, default=50_000, help="filas de Ejecuciones precargadas")
    parser.add_argument("--python", default=sys.executable, help="intérprete con el sam.callback que se mide")
    parser.add_argument("--json", type=Path, default=None, help="escribe también los resultados en JSON")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"falta {', '.join(missing)} (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sam-instr-") as temporary:
        work = Path(temporary)
        args.port = bench.free_port()
        ceiling_dir = work / "techo"
        ceiling_dir.mkdir()
        ceiling = measure(
            "techo (ASGI puro)",
            [args.python, "-m", "uvicorn", "ceiling:app", "--app-dir", str(BENCH_DIR), "--host", "127.0.0.1",
             "--port", str(args.port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
             "--log-level", "warning"],
            dict(os.environ), ceiling_dir, path="/", ready=f"http://127.0.0.1:{args.port}/", args=args,
        )  # fmt: skip
        service_dir = work / "servicio"
        service_dir.mkdir()
        url = bench.prefill_sqlite(service_dir / "sam.db", args.rows)
        args.port = bench.free_port()
        env = bench.service_environment(url, service_dir, args.port)
        service = measure(
            "sam-callback (sqlite)", [args.python, "-m", "sam.callback"], env, service_dir,
            path=bench.CALLBACK_PATH, ready=f"http://127.0.0.1:{args.port}/health", args=args,
        )  # fmt: skip
    print(f"peticiones contadas por servidor: {args.callbacks} ({args.connections} conexiones keep-alive)")
    print(f"{'servidor':<24}{'instr./petición':>16}  por hilo")
    for count in (ceiling, service):
        threads = ", ".join(f"{kind} {value / count.requests:,.0f}" for kind, value in count.threads.items())
        print(f"{count.name:<24}{count.per_request:>16,.0f}  {threads}  respuestas {count.statuses}")
    for kind, value in service.periodic.items():
        print(f"  aparte ({kind}, periódico, no cuenta): {value / service.requests:,.0f} por petición bajo callgrind")
    print(f"techo/servicio: {ceiling.per_request / service.per_request:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"ceiling": asdict(ceiling), "service": asdict(service)}, indent=2))
    return 0 if all(c.statuses.get(200, 0) + c.statuses.get(202, 0) == c.requests for c in (ceiling, service)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
