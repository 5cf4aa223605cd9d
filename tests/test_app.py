"""The application as a process: the event loop never waits on the database, and locks are retried."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.utils import TOKEN, ServerProcess, fetch_run, insert_run, wait_for


def test_a_locked_database_neither_blocks_the_loop_nor_loses_the_callback(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory().start()
    db_url = server.env["SAM_DATABASE_URL"]
    insert_run(db_url, "locked-1", "RUNNING")
    # Another writer holds SAM's database for longer than the busy timeout.
    holder = sqlite3.connect(tmp_path / "sam.db", isolation_level=None, timeout=1)
    holder.execute("BEGIN EXCLUSIVE")
    answers: list[httpx.Response] = []

    def send() -> None:
        answers.append(
            httpx.post(
                server.callback_url,
                json={"deploymentId": "locked-1", "status": "RUN_COMPLETED"},
                headers={"X-Authorization": TOKEN},
                timeout=60,
            )
        )

    sender = threading.Thread(target=send)
    sender.start()
    try:
        # The writer waits on the lock for seconds; meanwhile the loop keeps answering.
        answered_while_waiting = 0
        while sender.is_alive():
            assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
            answered_while_waiting += sender.is_alive()
        sender.join(60)
        assert answered_while_waiting >= 2
        assert answers and answers[0].status_code == 202 and answers[0].json()["code"] == "queued"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_for(
        lambda: (fetch_run(db_url, "locked-1") or {}).get("Estado") == "RUN_COMPLETED", what="aplicado desde el spool"
    )
    assert server.stop() == 0
