"""Fallback load generator when wrk is absent: keep-alive HTTP/1.1 POSTs over asyncio protocols."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter


def callback_body(prefix: str, n: int) -> bytes:
    """The same callback body as bench/callback.lua for deploymentId number `n`."""
    return (
        f'{{"deploymentId":"{prefix}{n:07d}","status":"RUN_COMPLETED","deviceId":{1000 + n % 50},'
        f'"userId":{20 + n % 7},"botOutput":{{"resultado":{{"type":"STRING","string":"OK"}},'
        f'"filas":{{"type":"NUMBER","number":"{n % 1000}"}}}}}}'
    ).encode()


class _Load:
    """Shared state of one run: the next id, the deadline and what was measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.next_n = args.offset
        self.deadline = 0.0
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.errors = 0
        self.head = (
            f"POST {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
            f"Content-Type: application/json\r\nX-Authorization: {args.token}\r\n"
        ).encode()

    def request(self) -> bytes:
        n = self.next_n % self.args.rows
        self.next_n += 1
        body = callback_body(self.args.prefix, n)
        return self.head + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection that sends the next request as soon as an answer is complete."""

    def __init__(self, load: _Load, finished: asyncio.Future[None]) -> None:
        self.load = load
        self.finished = finished
        self.buffer = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCP transport is no asyncio.Transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if time.perf_counter() >= self.load.deadline:
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.load.request())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        start = head.find(b"content-length:") + 15
        line_end = head.find(b"\r\n", start)
        length = int(head[start : line_end if line_end >= 0 else len(head)])
        if len(self.buffer) < end + 4 + length:
            return
        self.load.latencies.append(time.perf_counter() - self.sent_at)
        self.load.statuses[int(self.buffer[9:12])] += 1
        self.buffer = self.buffer[end + 4 + length :]
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.load.errors += 1
        if not self.finished.done():
            self.finished.set_result(None)


async def _run(args: argparse.Namespace) -> dict[str, float | int]:
    load = _Load(args)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    load.deadline = started + args.duration
    finished = []
    for _ in range(args.connections):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(lambda done=done: _Connection(load, done), args.host, args.port)
        finished.append(done)
    await asyncio.wait_for(asyncio.gather(*finished), args.duration + 30)
    elapsed = time.perf_counter() - started
    latencies = sorted(load.latencies)

    def percentile(q: float) -> int:
        return int(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6) if latencies else 0

    bad = sum(count for status, count in load.statuses.items() if status >= 400)
    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "p50_us": percentile(0.50),
        "p99_us": percentile(0.99),
        "max_us": int(latencies[-1] * 1e6) if latencies else 0,
        "errors_connect": 0,
        "errors_read": load.errors,
        "errors_write": 0,
        "errors_status": bad,
        "errors_timeout": 0,
    }


def main() -> None:
    """Parse options, run the load, print one BENCH_JSON line like the wrk script does."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/callback")
    parser.add_argument("--token", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--prefix", default="bench-")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is absent on Windows
        runner = asyncio.run
    print("BENCH_JSON " + json.dumps(runner(_run(args))), flush=True)


if __name__ == "__main__":
    main()
