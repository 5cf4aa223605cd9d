"""What the operator page shows of recent traffic: bounded in-memory records, shared between processes."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from .domain import AuthFailure, DatabaseState, describe

log = logging.getLogger("sam.callback.panel")

CALLBACKS_KEPT = 500
REFUSED_KEPT = 200
PUBLISH_SECONDS = 1.0
# A process rewrites its file at least this often, so a file that stops changing is a process gone.
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 20.0
MINUTES_KEPT = 60

# (time, seq, deploymentId, status, result, client, request id)
CallbackEvent = tuple[float, int, str | None, str | None, str, str, str]
# (time, client, reason)
RefusedEvent = tuple[float, str, str]


@dataclass(frozen=True, slots=True)
class ProcessActivity:
    """One process's recent events, as the page reads them."""

    pid: int
    started_at: float
    written_at: float
    callbacks: list[CallbackEvent]
    refused: list[RefusedEvent]
    per_minute: dict[int, int]


@dataclass
class Activity:
    """The recent events of this process; the callback path only appends to bounded deques."""

    folder: Path
    started_at: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)
    callbacks: deque[CallbackEvent] = field(default_factory=lambda: deque(maxlen=CALLBACKS_KEPT))
    refused_events: deque[RefusedEvent] = field(default_factory=lambda: deque(maxlen=REFUSED_KEPT))
    database_up: bool = True
    database_since: float = field(default_factory=time.time)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _per_minute: dict[int, int] = field(default_factory=dict)
    _counted_seq: int = -1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def callback(
        self, deployment_id: str | None, status: str | None, result: str, client: str, request_id: str
    ) -> None:
        """Note one answered callback (called on the hot path: one append)."""
        self.callbacks.append((time.time(), next(self._seq), deployment_id, status, result, client, request_id))

    def refused(self, client: str, status: int, reasons: tuple[AuthFailure, ...]) -> None:
        """Note one refused request (401, 403 or 429) with its reasons, never a credential."""
        # Kept as text: other processes read it from the published file.
        text = describe(reasons)
        if status == HTTPStatus.TOO_MANY_REQUESTS:
            text = f"limitado (429): {text}"
        elif status == HTTPStatus.FORBIDDEN:
            text = f"{text} (403)"
        self.refused_events.append((time.time(), client, text))

    def note_database(self, up: bool, now: float | None = None) -> None:
        """Record what was seen of the database; the time is kept when the state changes."""
        if up != self.database_up:
            self.database_up = up
            self.database_since = time.time() if now is None else now
        elif now is not None and now < self.database_since:
            # The page's own ping may have seen the change first; the writer knows when it began.
            self.database_since = now

    def per_minute(self) -> dict[int, int]:
        """Callbacks per minute (minute = epoch seconds // 60) over the last hour."""
        # copy() runs in C without letting the event loop's thread in: a consistent snapshot.
        events = self.callbacks.copy()
        with self._lock:
            fresh = [event for event in events if event[1] > self._counted_seq]
            if fresh:
                # Events the deque already dropped count in the minute of the oldest one still kept.
                dropped = fresh[0][1] - self._counted_seq - 1
                first_minute = int(fresh[0][0] // 60)
                self._per_minute[first_minute] = self._per_minute.get(first_minute, 0) + dropped
                for event in fresh:
                    minute = int(event[0] // 60)
                    self._per_minute[minute] = self._per_minute.get(minute, 0) + 1
                self._counted_seq = fresh[-1][1]
            oldest = int(time.time() // 60) - MINUTES_KEPT
            for minute in [minute for minute in self._per_minute if minute <= oldest]:
                del self._per_minute[minute]
            return dict(self._per_minute)

    def snapshot(self) -> ProcessActivity:
        """This process's events now."""
        return ProcessActivity(
            pid=self.pid,
            started_at=self.started_at,
            written_at=time.time(),
            callbacks=list(self.callbacks.copy()),
            refused=list(self.refused_events.copy()),
            per_minute=self.per_minute(),
        )

    @property
    def own_file(self) -> Path:
        """Where this process publishes its events for the other processes' pages."""
        return self.folder / f"{self.pid}.json"

    def publish(self) -> None:
        """Write this process's events atomically (temporary file, then rename)."""
        snapshot = self.snapshot()
        document = {
            "pid": snapshot.pid,
            "started_at": snapshot.started_at,
            "written_at": snapshot.written_at,
            "callbacks": snapshot.callbacks,
            "refused": snapshot.refused,
            "per_minute": snapshot.per_minute,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.folder / f".{self.pid}.json.tmp"
        temporary.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
        os.replace(temporary, self.own_file)

    def others(self) -> list[ProcessActivity]:
        """Events published by the other live processes of this instance."""
        found: list[ProcessActivity] = []
        now = time.time()
        try:
            paths = list(self.folder.glob("*.json"))
        except OSError:
            return found
        for path in paths:
            if path == self.own_file:
                continue
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
                written_at = float(document["written_at"])
                if now - written_at > STALE_SECONDS:
                    continue
                found.append(
                    ProcessActivity(
                        pid=int(document["pid"]),
                        started_at=float(document["started_at"]),
                        written_at=written_at,
                        callbacks=[_callback_event(item) for item in document["callbacks"]],
                        refused=[(float(t), str(client), str(reason)) for t, client, reason in document["refused"]],
                        per_minute={int(minute): int(count) for minute, count in document["per_minute"].items()},
                    )
                )
            except (OSError, ValueError, KeyError, TypeError):
                # Being replaced right now (Windows), or left half-written by a crash: skip it.
                continue
        return found


def _callback_event(item: list[Any]) -> CallbackEvent:
    at, seq, deployment_id, status, result, client, request_id = item
    return (
        float(at),
        int(seq),
        None if deployment_id is None else str(deployment_id),
        None if status is None else str(status),
        str(result),
        str(client),
        str(request_id),
    )


class ActivityPublisher:
    """Background thread that publishes this process's events when there are new ones."""

    def __init__(self, activity: Activity, *, database_state: Callable[[], DatabaseState | None]) -> None:
        self.activity = activity
        # The writer's view of the database, with the time it changed: the page's "since when".
        self.database_state = database_state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Remove files left by processes that died, then publish every second."""
        now = time.time()
        with contextlib.suppress(OSError):
            for path in self.activity.folder.glob("*.json"):
                with contextlib.suppress(OSError):
                    if now - path.stat().st_mtime > STALE_SECONDS:
                        path.unlink()
        self._thread = threading.Thread(target=self._run, name="sam-callback-panel", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop publishing and remove this process's file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        with contextlib.suppress(OSError):
            self.activity.own_file.unlink()

    def _run(self) -> None:
        published_seq = published_refused = -1.0
        published_at = 0.0
        failing = False
        while not self._stop.wait(PUBLISH_SECONDS):
            activity = self.activity
            database = self.database_state()
            if database is not None:
                activity.note_database(database.available, now=database.since)
            last_seq = activity.callbacks[-1][1] if activity.callbacks else -1
            last_refused = activity.refused_events[-1][0] if activity.refused_events else -1.0
            now = time.monotonic()
            unchanged = (last_seq, last_refused) == (published_seq, published_refused)
            if unchanged and now - published_at < HEARTBEAT_SECONDS:
                continue
            try:
                activity.publish()
            except OSError as exc:
                # Once per spell of failures (a read-only folder would otherwise log every second).
                if not failing:
                    log.warning("Panel: no se pudo publicar la actividad de este proceso (%s)", exc)
                failing = True
                continue
            failing = False
            published_seq, published_refused, published_at = last_seq, last_refused, now
