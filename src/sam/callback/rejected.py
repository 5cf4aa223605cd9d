"""Rejected callbacks kept for an operator: authenticated bodies answered 400 or 415 (SPEC 10)."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .spool import open_durable

log = logging.getLogger("sam.callback.rejected")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rejected (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    request_id TEXT NOT NULL,
    client TEXT NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    content_type TEXT NOT NULL,
    deployment_id TEXT,
    body BLOB NOT NULL
);
"""
_COLUMNS = "seq, received_at, request_id, client, code, reason, content_type, deployment_id, body"


class RejectedStoreError(Exception):
    """The store cannot be read or written (disk full, read-only folder, corrupt file)."""


@dataclass(frozen=True, slots=True)
class RejectedCallback:
    """One rejected body as it arrived, with why and from whom."""

    seq: int
    received_at: float
    request_id: str
    client: str
    code: str
    reason: str
    content_type: str
    deployment_id: str | None
    body: bytes

    def body_text(self) -> str:
        """The body as text for a terminal; bytes that are not UTF-8 are shown escaped."""
        return self.body.decode("utf-8", errors="backslashreplace")


class RejectedStore:
    """A table in the spool's SQLite file, bounded to the newest `max_entries` bodies.

    It lives in the spool file so that an operator backs up and inspects one file; it has its
    own connection and lock, so a slow write here never holds up the spool's writer.
    """

    def __init__(self, path: Path, *, max_entries: int) -> None:
        self.path = path
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                conn = open_durable(self.path, _SCHEMA)
            except (sqlite3.Error, OSError) as exc:
                raise RejectedStoreError(f"no se puede abrir el registro de rechazados en {self.path}: {exc}") from exc
            self._conn = conn
        return self._conn

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def add(
        self,
        *,
        body: bytes,
        request_id: str,
        client: str,
        code: str,
        reason: str,
        content_type: str,
        deployment_id: str | None,
        received_at: float | None = None,
    ) -> int | None:
        """Keep one rejected body; drop the oldest beyond `max_entries`; return its number.

        With `max_entries` 0 (CALLBACK_REJECTED_MAX=0) nothing is kept, the bodies kept before
        are dropped too, and the answer is None.
        """
        if self.max_entries <= 0:
            self.purge()
            return None
        when = time.time() if received_at is None else received_at
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    cursor = conn.execute(
                        f"INSERT INTO rejected ({_COLUMNS.partition(', ')[2]}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - constant column list
                        (when, request_id, client, code, reason, content_type, deployment_id, body),
                    )
                    seq = int(cursor.lastrowid or 0)
                    conn.execute("DELETE FROM rejected WHERE seq <= ?", (seq - self.max_entries,))
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise RejectedStoreError(f"no se pudo guardar el callback rechazado: {exc}") from exc
        return seq

    def _select(self, where: str, params: tuple[object, ...]) -> list[RejectedCallback]:
        with self._lock:
            conn = self._connection()
            try:
                rows = conn.execute(f"SELECT {_COLUMNS} FROM rejected {where}", params).fetchall()  # noqa: S608 - constant fragments
            except sqlite3.Error as exc:
                raise RejectedStoreError(f"no se pudo leer el registro de rechazados: {exc}") from exc
        return [_entry(row) for row in rows]

    def entries(self, *, limit: int = 1000) -> list[RejectedCallback]:
        """The newest `limit` rejected callbacks, oldest first."""
        newest = self._select("ORDER BY seq DESC LIMIT ?", (limit,))
        return newest[::-1]

    def get(self, seq: int) -> RejectedCallback | None:
        """One rejected callback by number."""
        found = self._select("WHERE seq = ?", (seq,))
        return found[0] if found else None

    def count(self) -> int:
        """How many are kept."""
        with self._lock:
            conn = self._connection()
            try:
                row = conn.execute("SELECT COUNT(*) FROM rejected").fetchone()
            except sqlite3.Error as exc:
                raise RejectedStoreError(f"no se pudo leer el registro de rechazados: {exc}") from exc
        return int(row[0])

    def purge(self) -> int:
        """Forget every rejected callback; return how many."""
        with self._lock:
            conn = self._connection()
            try:
                return int(conn.execute("DELETE FROM rejected").rowcount)
            except sqlite3.Error as exc:
                raise RejectedStoreError(f"no se pudo vaciar el registro de rechazados: {exc}") from exc


def _entry(row: tuple[object, ...]) -> RejectedCallback:
    seq, received_at, request_id, client, code, reason, content_type, deployment_id, body = row
    return RejectedCallback(
        seq=int(seq),  # type: ignore[call-overload]
        received_at=float(received_at),  # type: ignore[arg-type]
        request_id=str(request_id),
        client=str(client),
        code=str(code),
        reason=str(reason),
        content_type=str(content_type),
        deployment_id=None if deployment_id is None else str(deployment_id),
        body=bytes(body),  # type: ignore[call-overload]
    )
