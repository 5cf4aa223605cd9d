"""Fault injection: the server is killed with SIGKILL under load and restarted on the same files."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from sam.callback.settings import DEFAULT_FINAL_STATES
from sam.callback.spool import Spool
from tests.faults_support import (
    FINAL,
    OTHER_FINAL,
    Answer,
    TcpProxy,
    all_runs,
    callback_body,
    check_first_final_kept,
    insert_runs,
    running_then_two_finals,
    send_chains,
    spool_backlog,
    summary,
)
from tests.utils import ServerProcess, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL no existe en Windows"),
]


@pytest.mark.parametrize("database", ["up", "cut"])
def test_kill_9_under_load_loses_no_acknowledged_callback(
    server_factory: Callable[..., ServerProcess], pg_url: str, database: str
) -> None:
    """1300 callbacks from 16 clients, SIGKILL midway, restart: every 2xx is applied, once.

    With `cut`, PostgreSQL is also out of reach from before the kill until after the restart,
    so the kill lands while callbacks are being written to the spool.
    """
    present = [f"kill-{i:04d}" for i in range(400)]
    # Rows that only appear after the restart: their callbacks wait in the spool at the kill.
    late = [f"kill-late-{i:03d}" for i in range(50)]
    insert_runs(pg_url, present)
    chains = [running_then_two_finals(d) for d in present] + [
        [(FINAL, callback_body(d, FINAL)), (OTHER_FINAL, callback_body(d, OTHER_FINAL))] for d in late
    ]
    random.Random(3).shuffle(chains)
    total = sum(len(chain) for chain in chains)

    with TcpProxy(5432) as proxy:
        # The proxy lives in this busy test process: only the "cut" case pays for it.
        server = server_factory(SAM_DATABASE_URL=proxy.url_for(pg_url) if database == "cut" else pg_url).start()
        gate = threading.Event()
        gate.set()
        answers: list[Answer] = []
        load = threading.Thread(
            target=send_chains,
            args=(server.callback_url, chains),
            kwargs={"clients": 16, "gate": gate, "answers": answers},
        )
        load.start()
        if database == "cut":
            wait_for(lambda: len(answers) >= total // 6, timeout=60, what="un sexto de la carga respondida")
            proxy.cut()
        wait_for(lambda: len(answers) >= total // 3, timeout=60, what="un tercio de la carga respondida")
        gate.clear()
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        assert server.process.wait(10) == -signal.SIGKILL
        at_kill = len(answers)

        server.start()  # same port, database and spool
        gate.set()
        if database == "cut":
            wait_for(lambda: len(answers) >= 2 * total // 3, timeout=60, what="dos tercios de la carga respondida")
            proxy.restore()
        load.join(120)
        assert not load.is_alive()
        insert_runs(pg_url, late)
        wait_for(lambda: spool_backlog(server.base_url) == 0, timeout=60, what="spool vacío tras el reinicio")

    assert at_kill < total, "el kill debía llegar con carga en curso"
    assert len(answers) == total
    codes = summary(answers)
    assert all(a.http_status is None or 200 <= a.http_status < 300 for a in answers), codes
    assert sum(a.acknowledged for a in answers) >= total // 2, codes
    runs = all_runs(pg_url)
    assert check_first_final_kept(answers, runs, DEFAULT_FINAL_STATES) == []
    # Never applied twice: at most one final callback of a run was answered "updated".
    updated_finals = Counter(a.deployment_id for a in answers if a.code == "updated" and a.status != "RUNNING")
    assert max(updated_finals.values()) == 1
    for deployment_id in late:
        assert runs[deployment_id]["Estado"] in DEFAULT_FINAL_STATES, runs[deployment_id]
    assert server.stop() == 0, server.console()[-3000:]


LEASE_HOLDER = """
import sys, time
from pathlib import Path
from sam.callback.spool import Spool
spool = Spool(Path(sys.argv[1]))
spool.open()
assert spool.claim_lease()
print("held", flush=True)
time.sleep(120)
"""


def test_drain_lease_of_a_killed_process_is_free_at_once(tmp_path: Path) -> None:
    """A drainer killed with SIGKILL does not keep the other processes from draining."""
    path = tmp_path / "spool.db"
    with subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(path)], stdout=subprocess.PIPE) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == b"held"
            spool = Spool(path)
            spool.open()
            assert spool.claim_lease() is False  # a live holder keeps it
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
            assert spool.claim_lease() is True  # no expiry to wait for
            spool.close()
        finally:
            if holder.poll() is None:
                holder.kill()
