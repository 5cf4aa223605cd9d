"""Spool kinds: stored as the text older files have, ordered by an explicit priority, drained by the real app."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from sam.callback.app import create_app
from sam.callback.domain import SpoolKind
from sam.callback.settings import Settings
from sam.callback.spool import Spool
from tests.faults_support import callback_body
from tests.utils import auth_headers, fetch_run, insert_run, wait_for

# The first release's table: no `refused`, no `window_from`, the kind as TEXT.
OLD_SCHEMA = """
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, deployment_id TEXT NOT NULL, status TEXT NOT NULL,
    raw TEXT NOT NULL, request_id TEXT NOT NULL DEFAULT '', received_at REAL NOT NULL, kind TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, last_error TEXT,
    unmatched INTEGER NOT NULL DEFAULT 0
);
"""


def _old_spool(path: Path, rows: list[tuple[str, str, str]]) -> None:
    """A spool file as the previous version left it: `(deploymentId, status, kind)` rows, all due."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = sqlite3.connect(path)
    old.executescript(OLD_SCHEMA)
    now = time.time()
    old.executemany(
        "INSERT INTO entries (deployment_id, status, raw, request_id, received_at, kind, next_attempt_at) "
        "VALUES (?, ?, ?, 'req-antiguo', ?, ?, ?)",
        [(dep, status, callback_body(dep, status), now - 5, kind, now - 1) for dep, status, kind in rows],
    )
    old.commit()
    old.close()


def test_kinds_of_an_old_file_are_read_and_a_mixed_run_gives_its_newcomer_pending_match(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    _old_spool(
        path,
        [
            ("solo-cola", "RUN_COMPLETED", "queued"),
            ("mixta", "RUN_COMPLETED", "pending_match"),
            ("mixta", "RUN_FAILED", "queued"),
        ],
    )
    spool = Spool(path)
    try:
        assert [entry.kind for entry in spool.entries()] == [
            SpoolKind.QUEUED,
            SpoolKind.PENDING_MATCH,
            SpoolKind.QUEUED,
        ]
        # By priority, not by how the names sort: the run whose row was missing waits for it.
        assert spool.waiting_kinds(["solo-cola", "mixta", "nueva"]) == {
            "solo-cola": SpoolKind.QUEUED,
            "mixta": SpoolKind.PENDING_MATCH,
        }
        stats = spool.stats()
        assert (stats.queued, stats.pending) == (2, 1)
    finally:
        spool.close()
    # Still stored as text: the previous version can read what this one writes.
    with sqlite3.connect(path) as conn:
        assert {kind for (kind,) in conn.execute("SELECT kind FROM entries")} == {"queued", "pending_match"}


def test_an_old_spool_file_drains_into_the_database(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    url = settings.resolved_database_url()
    for deployment_id in ("antiguo-1", "antiguo-2"):
        insert_run(url, deployment_id, "DEPLOYED")
    _old_spool(
        settings.spool_path,
        [("antiguo-1", "RUN_COMPLETED", "queued"), ("antiguo-2", "RUN_FAILED", "pending_match")],
    )
    with TestClient(create_app(settings)) as api:
        wait_for(
            lambda: (
                [(fetch_run(url, d) or {}).get("Estado") for d in ("antiguo-1", "antiguo-2")]
                == ["RUN_COMPLETED", "RUN_FAILED"]
            ),
            what="el spool antiguo aplicado",
        )
        ready = api.get("/ready").json()
        assert ready["spool"]["backlog"] == 0
        # A newcomer for a run with nothing waiting goes straight to the database.
        insert_run(url, "nuevo", "DEPLOYED")
        answer = api.post("/api/callback", content=callback_body("nuevo", "RUN_COMPLETED"), headers=auth_headers())
        assert answer.json()["code"] == "updated"
