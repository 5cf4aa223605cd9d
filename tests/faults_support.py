"""Helpers of the fault-injection tests: a TCP proxy to cut PostgreSQL, a load driver, checks."""

from __future__ import annotations

import contextlib
import json
import queue
import random
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from sam.callback.repository import ejecuciones, make_engine
from tests.utils import TOKEN, free_port

FINAL = "RUN_COMPLETED"
OTHER_FINAL = "RUN_FAILED"


def _port_outside_the_ephemeral_range() -> int:
    """A free port below Linux's ephemeral range (32768-60999).

    While the proxy is cut its port is free. An ephemeral port could meanwhile be handed to any
    outgoing connection, or to the service's own reconnect to that very port (TCP connects a
    socket to itself when the source port equals the closed destination), and `restore` would
    find it taken.
    """
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 that a test can cut (every connection dropped, new ones refused)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = _port_outside_the_ephemeral_range()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.accepted = 0

    def __enter__(self) -> TcpProxy:
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()

    def url_for(self, database_url: str) -> str:
        """The same SQLAlchemy URL, reached through this proxy."""
        return database_url.replace(f"{self.target[0]}:{self.target[1]}", f"127.0.0.1:{self.port}")

    def restore(self) -> None:
        """Listen again on the same port."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", self.port))
                listener.listen(128)
            except OSError:
                listener.close()
                raise
            listener.settimeout(0.2)
            self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Close the listener and every open connection: the database "goes away"."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            # close() alone leaves the port listening until the accept thread's poll returns (up
            # to 0.2 s): a restore() in that time would find it taken. shutdown() stops it at once.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in sockets:
            _hard_close(sock)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            with self._lock:
                if self._listener is not listener:
                    return
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _hard_close(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    _hard_close(client)
                    _hard_close(upstream)
                    return
                self._sockets |= {client, upstream}
                self.accepted += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets -= {source, sink}
            _hard_close(source)
            _hard_close(sink)


def _hard_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class Answer:
    """One callback sent and what came back (`http_status` None: no answer, outcome unknown)."""

    deployment_id: str
    position: int
    status: str
    raw: str
    http_status: int | None
    code: str | None
    error: str | None
    sent_at: float

    @property
    def acknowledged(self) -> bool:
        """The service promised to keep it."""
        return self.http_status is not None and 200 <= self.http_status < 300


def running_then_two_finals(deployment_id: str) -> list[tuple[str, str]]:
    """RUNNING, a final status, then another final one that must lose: arrival order matters."""
    return [
        ("RUNNING", callback_body(deployment_id, "RUNNING")),
        (FINAL, callback_body(deployment_id, FINAL)),
        (OTHER_FINAL, callback_body(deployment_id, OTHER_FINAL)),
    ]


def callback_body(deployment_id: str, status: str, **extra: Any) -> str:
    """A raw A360-like callback body, unique through a marker."""
    return json.dumps(
        {
            "deploymentId": deployment_id,
            "status": status,
            "botOutput": {"marker": {"type": "STRING", "string": uuid.uuid4().hex}},
            **extra,
        }
    )


def send_chains(
    url: str | list[str],
    chains: Iterable[list[tuple[str, str]]],
    *,
    clients: int = 16,
    gate: threading.Event | None = None,
    answers: list[Answer] | None = None,
    timeout: float = 120.0,
) -> list[Answer]:
    """Send chains of `(status, raw)` from `clients` threads; each chain in order by one thread.

    A chain stands for one run: its callbacks go one after the other, so their arrival order
    is known. With several URLs, chains go to them in turn. `gate`, when given, pauses the
    clients while it is clear (a restart).
    """
    urls = [url] if isinstance(url, str) else url
    work: queue.SimpleQueue[tuple[str, list[tuple[str, str]]]] = queue.SimpleQueue()
    for index, chain in enumerate(chains):
        work.put((urls[index % len(urls)], chain))
    results = answers if answers is not None else []
    headers = {"X-Authorization": TOKEN, "Content-Type": "application/json"}
    deadline = time.monotonic() + timeout

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < deadline:
                try:
                    target, chain = work.get_nowait()
                except queue.Empty:
                    return
                for position, (status, raw) in enumerate(chain):
                    if gate is not None:
                        gate.wait(max(0.0, deadline - time.monotonic()))
                    deployment_id = json.loads(raw)["deploymentId"]
                    sent_at = time.monotonic()
                    try:
                        response = http.post(target, content=raw, headers=headers)
                        code = response.json().get("code")
                        results.append(
                            Answer(deployment_id, position, status, raw, response.status_code, code, None, sent_at)
                        )
                    except (httpx.HTTPError, ValueError) as exc:
                        results.append(Answer(deployment_id, position, status, raw, None, None, repr(exc), sent_at))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 5)
    assert not any(thread.is_alive() for thread in threads), "los clientes de carga no terminaron a tiempo"
    return results


def all_runs(url: str) -> dict[str, dict[str, Any]]:
    """Every row of `Ejecuciones`, by deploymentId."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(ejecuciones)).mappings().all()
        return {row["DeploymentId"]: dict(row) for row in rows}
    finally:
        engine.dispose()


def insert_runs(url: str, deployment_ids: Iterable[str], estado: str = "DEPLOYED") -> None:
    """Insert many rows the way SAM's launcher does, in one transaction."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.insert(ejecuciones), [{"DeploymentId": i, "Estado": estado} for i in deployment_ids])
    finally:
        engine.dispose()


def ready(base_url: str) -> tuple[int, dict[str, Any]]:
    """GET /ready: status code and body."""
    response = httpx.get(base_url + "/ready", timeout=10)
    return response.status_code, response.json()


def spool_backlog(base_url: str) -> int | None:
    """Callbacks still waiting in the spool, as /ready reports them (None: no answer)."""
    try:
        _, body = ready(base_url)
    except httpx.HTTPError:
        return None
    return int(body["spool"].get("backlog", -1)) if body["spool"].get("available") else None


def spool_rows(path: Path) -> list[dict[str, Any]]:
    """The spool's entries, oldest first, read straight from the SQLite file."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM entries ORDER BY seq")]
    finally:
        conn.close()


def expected_callback_info(answers: list[Answer], final_states: Iterable[str]) -> dict[str, set[str]]:
    """For each run, the raw bodies that may legitimately be in CallbackInfo.

    Callbacks of one run went in order. The first final one that was acknowledged must be
    the stored one, unless an earlier final one got no answer (it may have been committed
    before the connection died); then that one may be stored instead. Nothing after the first
    acknowledged final callback may be.
    """
    finals = frozenset(final_states)
    by_run: dict[str, list[Answer]] = {}
    for answer in sorted(answers, key=lambda a: (a.deployment_id, a.position)):
        by_run.setdefault(answer.deployment_id, []).append(answer)
    allowed: dict[str, set[str]] = {}
    for deployment_id, chain in by_run.items():
        candidates: set[str] = set()
        for answer in chain:
            if answer.status not in finals:
                continue
            if answer.acknowledged:
                candidates.add(answer.raw)
                break
            if answer.http_status is None:
                candidates.add(answer.raw)
        allowed[deployment_id] = candidates
    return allowed


def check_first_final_kept(
    answers: list[Answer], runs: dict[str, dict[str, Any]], final_states: Iterable[str]
) -> list[str]:
    """Problems found: an acknowledged final callback not applied, or a later one applied."""
    problems = []
    finals = frozenset(final_states)
    acknowledged = {a.deployment_id for a in answers if a.acknowledged and a.status in finals}
    for deployment_id, allowed in expected_callback_info(answers, finals).items():
        if deployment_id not in acknowledged:
            continue  # nothing final was promised for this run
        row = runs.get(deployment_id)
        if row is None or row["Estado"] not in finals:
            problems.append(f"{deployment_id}: callback final confirmado y no aplicado (fila {row})")
        elif row["CallbackInfo"] not in allowed:
            problems.append(f"{deployment_id}: CallbackInfo no es el primer callback final aceptado")
    return problems


def summary(answers: list[Answer]) -> dict[str, int]:
    """Counts by `http_status code` for failure messages."""
    counts: dict[str, int] = {}
    for answer in answers:
        key = f"{answer.http_status} {answer.code}" if answer.http_status else "sin respuesta"
        counts[key] = counts.get(key, 0) + 1
    return counts
