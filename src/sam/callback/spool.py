"""The local durable spool: callbacks kept on disk until SAM's database has them."""

from __future__ import annotations

import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .domain import Callback, SpoolKind

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

log = logging.getLogger("sam.callback.spool")

# The kind is stored as its code ('queued', 'pending_match'), as spool files always had it.
_QUEUED = SpoolKind.QUEUED.code.value
_PENDING = SpoolKind.PENDING_MATCH.code.value

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment_id TEXT NOT NULL,
    status TEXT NOT NULL,
    raw TEXT NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    kind TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    unmatched INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    window_from REAL
);
CREATE INDEX IF NOT EXISTS entries_chain ON entries (unmatched, deployment_id, seq);
"""
_COLUMNS = (
    "seq, deployment_id, status, raw, request_id, received_at, kind, attempts, next_attempt_at, last_error, unmatched, "
    "refused, window_from"
)
# Columns added after the first release: a spool file written by an older version gets them.
_ADDED_COLUMNS = {"refused": "INTEGER NOT NULL DEFAULT 0", "window_from": "REAL"}


def open_durable(path: Path, schema: str) -> sqlite3.Connection:
    """A connection to a SQLite file in WAL mode with synchronous=FULL, with `schema` applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the commit is on disk before the 2xx leaves, even if the machine loses power.
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(schema)
    except sqlite3.Error:
        conn.close()
        raise
    return conn


class SpoolError(Exception):
    """The spool cannot keep a callback (disk full, read-only folder, corrupt file)."""


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One callback waiting in the spool."""

    seq: int
    deployment_id: str
    status: str
    raw: str
    request_id: str
    received_at: float
    kind: SpoolKind
    attempts: int
    next_attempt_at: float
    last_error: str | None
    unmatched: bool
    # The database refused it for a reason retrying cannot fix (SPEC 8); `last_error` says why.
    refused: bool = False
    # When an operator gave an unmatched callback a new match window (received_at stays the arrival).
    window_from: float | None = None

    @property
    def window_start(self) -> float:
        """Start of the match window: the arrival, or the operator's retry."""
        return self.received_at if self.window_from is None else self.window_from

    @property
    def callback(self) -> Callback:
        """The callback to apply."""
        return Callback(deployment_id=self.deployment_id, status=self.status, raw=self.raw)


@dataclass(frozen=True, slots=True)
class NewEntry:
    """A callback to keep: why it waits, and the request that brought it."""

    callback: Callback
    request_id: str
    kind: SpoolKind


@dataclass(frozen=True, slots=True)
class RefusedEntry:
    """A callback the database refused for good, with the reason (no secret in it)."""

    callback: Callback
    request_id: str
    error: str


@dataclass(frozen=True, slots=True)
class Reschedule:
    """What one try of entry `seq` left: when to try again, its kind, the error, whether it gave up."""

    seq: int
    next_attempt_at: float
    kind: SpoolKind
    last_error: str | None
    unmatched: bool = False


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """Backlog figures for /ready, /metrics and `spool list`."""

    queued: int
    pending: int
    unmatched: int
    oldest_received_at: float | None
    # Callbacks the database refused for good, and the latest reason (part of `queued`).
    refused: int = 0
    refused_error: str | None = None

    @property
    def backlog(self) -> int:
        """Callbacks still to be applied (queued plus waiting for their row)."""
        return self.queued + self.pending


class Spool:
    """SQLite file in WAL mode with synchronous=FULL, shared safely by several processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._lease: IO[bytes] | None = None

    @property
    def lease_path(self) -> Path:
        """The file whose OS lock is the right to drain."""
        return self.path.with_name(self.path.name + ".lease")

    def _connect(self) -> sqlite3.Connection:
        conn = open_durable(self.path, _SCHEMA)
        try:
            present = {str(row[1]) for row in conn.execute("PRAGMA table_info(entries)")}
            for name, definition in _ADDED_COLUMNS.items():
                if name not in present:
                    conn.execute(f"ALTER TABLE entries ADD COLUMN {name} {definition}")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def open(self) -> None:
        """Open (creating folders and file); raise SpoolError when the file cannot be used."""
        with self._lock:
            self._ensure_open()

    def _ensure_open(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self._conn = self._connect()
            except (sqlite3.Error, OSError) as exc:
                raise SpoolError(f"no se puede abrir el spool {self.path}: {exc}") from exc
        return self._conn

    @property
    def is_open(self) -> bool:
        """True when the file is open."""
        return self._conn is not None

    def close(self) -> None:
        """Close the file (and give the drain lease up)."""
        self.release_lease()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._ensure_open()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise SpoolError(f"el spool no pudo guardar: {exc}") from exc

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            conn = self._ensure_open()
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise SpoolError(f"el spool no se pudo leer: {exc}") from exc

    def add(self, items: Iterable[NewEntry], *, now: float, first_delay: float) -> None:
        """Keep callbacks in one durable transaction."""
        pending = SpoolKind.PENDING_MATCH
        rows = [
            (
                item.callback.deployment_id,
                item.callback.status,
                item.callback.raw,
                item.request_id,
                now,
                item.kind.code.value,
                now + (first_delay if item.kind is pending else 0.0),
            )
            for item in items
        ]
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO entries (deployment_id, status, raw, request_id, received_at, kind, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            # A new callback for a run whose row was missing hints that the row may exist now.
            conn.executemany(
                "UPDATE entries SET next_attempt_at = ? WHERE kind = ? AND unmatched = 0 AND next_attempt_at > ? "
                "AND seq = (SELECT MIN(seq) FROM entries e WHERE e.deployment_id = ? AND e.unmatched = 0)",
                [(now, _PENDING, now, row[0]) for row in rows],
            )

    def add_refused(self, items: Iterable[RefusedEntry], *, now: float, retry_at: float) -> None:
        """Keep callbacks the database refused for good."""
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO entries (deployment_id, status, raw, request_id, received_at, kind, next_attempt_at, "
                "attempts, last_error, refused) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, 1)",
                [
                    (
                        item.callback.deployment_id,
                        item.callback.status,
                        item.callback.raw,
                        item.request_id,
                        now,
                        _QUEUED,
                        retry_at,
                        item.error,
                    )
                    for item in items
                ],
            )

    def queued_due_now(self, *, now: float) -> None:
        """Make every queued callback due at once: the database has just come back."""
        # Refused ones are left alone: the database being back does not fix them.
        with self._write() as conn:
            conn.execute(
                "UPDATE entries SET next_attempt_at = ? WHERE kind = ? AND unmatched = 0 AND refused = 0 "
                "AND next_attempt_at > ?",
                (now, _QUEUED, now),
            )

    def waiting_kinds(self, deployment_ids: Iterable[str]) -> dict[str, SpoolKind]:
        """For ids that already wait in the spool, the kind a newcomer inherits (by SpoolKind's priority)."""
        ids = list(set(deployment_ids))
        if not ids:
            return {}
        found: dict[str, SpoolKind] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT DISTINCT deployment_id, kind FROM entries WHERE unmatched = 0 AND deployment_id IN ({marks})"  # noqa: S608 - only '?' marks are interpolated
            for deployment_id, text in self._read(sql, chunk):
                kind = _kind(text)
                key = str(deployment_id)
                found[key] = min(found.get(key, kind), kind)
        return found

    def next_due(self) -> float | None:
        """When the earliest waiting chain is due, or None when nothing waits."""
        rows = self._read("SELECT MIN(next_attempt_at) FROM entries WHERE unmatched = 0")
        value = rows[0][0] if rows else None
        return float(value) if isinstance(value, int | float) else None

    def claim_lease(self) -> bool:
        """Take or keep the right to drain; only one process drains at a time.

        The right is an OS lock on a file next to the spool, not a row with an expiry: the
        operating system frees it the moment its holder dies, even by `kill -9`, so that a
        restarted process drains at once instead of waiting for a dead owner's lease to lapse.
        """
        with self._lock:
            if self._lease is not None:
                return True
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                handle = self.lease_path.open("a+b")
            except OSError as exc:
                raise SpoolError(f"no se puede abrir {self.lease_path}: {exc}") from exc
            try:
                _lock_exclusive(handle)
            except OSError:
                handle.close()
                return False
            self._lease = handle
            return True

    def release_lease(self) -> None:
        """Give the lease up at shutdown so another process can drain at once."""
        with self._lock:
            handle, self._lease = self._lease, None
        if handle is not None:
            handle.close()  # closing the file releases the OS lock

    def due_chains(self, *, now: float, limit: int) -> list[SpoolEntry]:
        """Entries of every run whose oldest waiting callback is due, in arrival order."""
        sql = f"""
            WITH heads AS (
                SELECT deployment_id, MIN(seq) AS head FROM entries WHERE unmatched = 0 GROUP BY deployment_id
            )
            SELECT {", ".join("e." + c.strip() for c in _COLUMNS.split(","))} FROM heads h
            JOIN entries he ON he.seq = h.head
            JOIN entries e ON e.deployment_id = h.deployment_id AND e.unmatched = 0
            WHERE he.next_attempt_at <= ?
            ORDER BY e.seq LIMIT ?
        """  # noqa: S608 - the column list is a constant
        return [_entry(row) for row in self._read(sql, (now, limit))]

    def complete(self, seqs: Iterable[int]) -> None:
        """Forget entries the database now has."""
        with self._write() as conn:
            conn.executemany("DELETE FROM entries WHERE seq = ?", [(seq,) for seq in seqs])

    def reschedule(self, updates: Iterable[Reschedule], *, refused: bool = False) -> None:
        """Note what each try left; `refused` marks a refusal for good."""
        with self._write() as conn:
            conn.executemany(
                "UPDATE entries SET attempts = attempts + 1, next_attempt_at = ?, kind = ?, last_error = ?, "
                "unmatched = ?, refused = ? WHERE seq = ?",
                [
                    (u.next_attempt_at, u.kind.code.value, u.last_error, int(u.unmatched), int(refused), u.seq)
                    for u in updates
                ],
            )

    def stats(self) -> SpoolStats:
        """Counts by kind and the oldest waiting callback."""
        rows = self._read(
            "SELECT SUM(unmatched = 0 AND kind = ?), SUM(unmatched = 0 AND kind = ?), SUM(unmatched), "
            "MIN(CASE WHEN unmatched = 0 THEN received_at END), SUM(unmatched = 0 AND refused = 1), "
            "(SELECT last_error FROM entries WHERE unmatched = 0 AND refused = 1 ORDER BY seq DESC LIMIT 1) "
            "FROM entries",
            (_QUEUED, _PENDING),
        )
        queued, pending, unmatched, oldest, refused, refused_error = rows[0] if rows else (0, 0, 0, None, 0, None)
        return SpoolStats(
            queued=int(queued or 0),  # type: ignore[call-overload]
            pending=int(pending or 0),  # type: ignore[call-overload]
            unmatched=int(unmatched or 0),  # type: ignore[call-overload]
            oldest_received_at=float(oldest) if isinstance(oldest, int | float) else None,
            refused=int(refused or 0),  # type: ignore[call-overload]
            refused_error=None if refused_error is None else str(refused_error),
        )

    def entries(
        self, *, only_unmatched: bool = False, only_refused: bool = False, limit: int = 1000
    ) -> list[SpoolEntry]:
        """Entries for an operator, oldest first."""
        where = "WHERE unmatched = 1" if only_unmatched else ""
        if only_refused:
            where = "WHERE refused = 1 AND unmatched = 0"
        sql = f"SELECT {_COLUMNS} FROM entries {where} ORDER BY seq LIMIT ?"  # noqa: S608 - constant fragments
        return [_entry(row) for row in self._read(sql, (limit,))]

    def retry_now(self, *, only_unmatched: bool = False, only_refused: bool = False) -> int:
        """Make entries due now (unmatched ones get a new match window); return how many.

        The arrival time is kept: it is the end of the run that SAM will record.
        """
        now = time.time()
        where = "WHERE unmatched = 1" if only_unmatched else ("WHERE refused = 1" if only_refused else "")
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE entries SET next_attempt_at = ?, "  # noqa: S608 - constant fragments
                f"window_from = CASE WHEN unmatched = 1 THEN ? ELSE window_from END, unmatched = 0 {where}",
                (now, now),
            )
            return cur.rowcount

    def purge(self, *, only_unmatched: bool = True, older_than: float | None = None) -> int:
        """Delete entries an operator gave up on; return how many."""
        clauses = ["unmatched = 1"] if only_unmatched else []
        params: list[object] = []
        if older_than is not None:
            clauses.append("received_at < ?")
            params.append(older_than)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._write() as conn:
            return conn.execute(f"DELETE FROM entries {where}", params).rowcount  # noqa: S608


def _lock_exclusive(handle: IO[bytes]) -> None:
    """Lock `handle` without waiting; raise OSError when another process holds it."""
    if sys.platform == "win32":
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _entry(row: tuple[object, ...]) -> SpoolEntry:
    (
        seq,
        deployment_id,
        status,
        raw,
        request_id,
        received_at,
        kind,
        attempts,
        due,
        error,
        unmatched,
        refused,
        window_from,
    ) = row
    return SpoolEntry(
        seq=int(seq),  # type: ignore[call-overload]
        deployment_id=str(deployment_id),
        status=str(status),
        raw=str(raw),
        request_id=str(request_id),
        received_at=float(received_at),  # type: ignore[arg-type]
        kind=_kind(kind),
        attempts=int(attempts),  # type: ignore[call-overload]
        next_attempt_at=float(due),  # type: ignore[arg-type]
        last_error=None if error is None else str(error),
        unmatched=bool(unmatched),
        refused=bool(refused),
        window_from=float(window_from) if isinstance(window_from, int | float) else None,
    )


def _kind(text: object) -> SpoolKind:
    try:
        return SpoolKind.from_code(str(text))
    except KeyError:
        # Only this program writes the file; an unknown kind is treated as the safer one.
        return SpoolKind.QUEUED
