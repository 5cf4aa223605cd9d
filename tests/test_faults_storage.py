"""Fault injection: database down and nowhere to keep the callback: 503, never a 2xx."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.faults_support import FINAL, callback_body, ready, spool_rows
from tests.utils import TOKEN, ServerProcess, free_port

pytestmark = pytest.mark.slow

HEADERS = {"X-Authorization": TOKEN, "Content-Type": "application/json"}


def _down_database() -> str:
    # Nothing listens there: every connection is refused at once.
    return f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere"


def _post(server: ServerProcess, deployment_id: str) -> httpx.Response:
    return httpx.post(server.callback_url, content=callback_body(deployment_id, FINAL), headers=HEADERS, timeout=30)


def test_unusable_spool_and_database_down_answer_503_with_retry_after(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The spool's folder cannot be created (a file is in the way): 503 + Retry-After, no 2xx."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    server = server_factory(
        SAM_DATABASE_URL=_down_database(), CALLBACK_SPOOL_PATH=str(blocker / "spool" / "spool.db")
    ).start()
    for index in range(5):
        response = _post(server, f"nowhere-{index}")
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "unavailable"
        assert int(response.headers["Retry-After"]) > 0
    status, body = ready(server.base_url)
    assert status == 503
    assert body["spool"]["available"] is False
    assert server.stop() == 0


@pytest.mark.skipif(sys.platform != "linux", reason="prlimit sobre otro proceso solo existe en Linux")
def test_spool_full_at_runtime_answers_503_then_recovers(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The disk fills up while the database is down: 503 instead of 202; room again: 202."""
    import resource

    server = server_factory(SAM_DATABASE_URL=_down_database()).start()
    response = _post(server, "full-before")
    assert (response.status_code, response.json()["code"]) == (202, "queued")
    assert server.process is not None
    pid = server.process.pid
    original = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    # RLIMIT_FSIZE makes every write past one byte fail with EFBIG, as on a full disk.
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, original[1]))
    try:
        for index in range(5):
            response = _post(server, f"full-{index}")
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "unavailable"
            assert int(response.headers["Retry-After"]) > 0
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, original)
    response = _post(server, "full-after")
    assert (response.status_code, response.json()["code"]) == (202, "queued")
    kept = [row["deployment_id"] for row in spool_rows(server.cwd / "spool" / "spool.db")]
    assert kept == ["full-before", "full-after"]
    assert server.stop() == 0
