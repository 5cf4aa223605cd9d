"""Fault injection: several processes on one database and one spool, racing on the same runs."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults_support import (
    FINAL,
    OTHER_FINAL,
    Answer,
    all_runs,
    callback_body,
    insert_runs,
    send_chains,
    spool_backlog,
    spool_rows,
    summary,
)
from tests.utils import ServerProcess, wait_for

pytestmark = pytest.mark.slow


def _two_servers(
    server_factory: Callable[..., ServerProcess], pg_url: str, spool: Path, mode: str
) -> list[ServerProcess]:
    env = {"SAM_DATABASE_URL": pg_url, "CALLBACK_SPOOL_PATH": str(spool)}
    if mode == "workers":
        return [server_factory(CALLBACK_SERVER_WORKERS="2", **env).start()]
    return [server_factory(**env).start(), server_factory(**env).start()]


@pytest.mark.parametrize("mode", ["workers", "instances"])
def test_several_processes_apply_each_run_once_with_the_first_final_status(
    server_factory: Callable[..., ServerProcess], pg_url: str, tmp_path: Path, mode: str
) -> None:
    """Concurrent duplicates and late callbacks over two processes: one `updated` per run."""
    spool = tmp_path / "shared-spool" / "spool.db"
    servers = _two_servers(server_factory, pg_url, spool, mode)
    urls = [server.callback_url for server in servers]
    present = [f"multi-{i:03d}" for i in range(80)]
    late = [f"multi-late-{i:03d}" for i in range(20)]  # no row yet: both processes spool them
    insert_runs(pg_url, present)
    # Four final callbacks per run at once, two of each status, each on its own client.
    finals = [
        [(status, callback_body(d, status))]
        for d in present + late
        for status in (FINAL, FINAL, OTHER_FINAL, OTHER_FINAL)
    ]
    random.Random(4).shuffle(finals)
    answers: list[Answer] = send_chains(urls, finals, clients=16)
    # Then non-final callbacks that arrive after the final ones (out of order).
    answers += send_chains(urls, [[("RUNNING", callback_body(d, "RUNNING"))] for d in present + late], clients=16)

    assert {a.code for a in answers} <= {"updated", "already_processed", "pending_match"}, summary(answers)
    updated = Counter(a.deployment_id for a in answers if a.code == "updated")
    assert {d: updated[d] for d in present} == dict.fromkeys(present, 1)
    assert not any(updated[d] for d in late)
    winners = {a.deployment_id: a for a in answers if a.code == "updated"}

    # The spool is one file for every process: its order is the order callbacks arrived in.
    first_spooled: dict[str, str] = {}
    for row in spool_rows(spool):
        first_spooled.setdefault(row["deployment_id"], row["raw"])
    assert set(first_spooled) == set(late)
    insert_runs(pg_url, late)
    for server in servers:
        wait_for(lambda s=server: spool_backlog(s.base_url) == 0, timeout=60, what="spool compartido vacío")

    runs = all_runs(pg_url)
    for deployment_id in present:
        assert runs[deployment_id]["CallbackInfo"] == winners[deployment_id].raw
        assert runs[deployment_id]["Estado"] == winners[deployment_id].status
    for deployment_id in late:
        assert runs[deployment_id]["CallbackInfo"] == first_spooled[deployment_id]
    by_status: dict[str, int] = defaultdict(int)
    for row in runs.values():
        by_status[row["Estado"]] += 1
    assert set(by_status) <= {FINAL, OTHER_FINAL}
    for server in servers:
        assert server.stop() == 0, server.console()[-3000:]
