"""`GET /metrics`: Prometheus text with callbacks, auth failures, latency, spool, unmatched, db errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from sam.callback.app import create_app
from sam.callback.settings import Settings
from tests.utils import TOKEN, ServerProcess, auth_headers, free_port, insert_run, wait_for


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples by (name, labels), parsed with prometheus-client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_callbacks_auth_failures_latency_and_spool(settings: Settings) -> None:
    insert_run(settings.resolved_database_url(), "d-metrics")
    with TestClient(create_app(settings)) as client:
        post = client.post
        body = {"deploymentId": "d-metrics", "status": "RUN_COMPLETED"}
        assert post("/api/callback", json=body, headers=auth_headers()).json()["code"] == "updated"
        assert post("/api/callback", json=body, headers=auth_headers()).json()["code"] == "already_processed"
        early = {"deploymentId": "d-not-yet", "status": "RUN_FAILED"}
        assert post("/api/callback", json=early, headers=auth_headers()).json()["code"] == "pending_match"
        free_form = {"deploymentId": "d-odd", "status": "SOMETHING_NEW"}
        assert post("/api/callback", json=free_form, headers=auth_headers()).status_code == 202
        assert post("/api/callback", json=body).status_code == 401
        assert post("/api/callback", json=body, headers=auth_headers("not-the-token-xx")).status_code == 401
        assert post("/api/callback", content=b"[1]", headers=auth_headers()).status_code == 400
        answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    samples = scrape(answer.text)
    callbacks = "sam_callback_callbacks_total"
    assert value(samples, callbacks, result="updated", status="RUN_COMPLETED") == 1
    assert value(samples, callbacks, result="already_processed", status="RUN_COMPLETED") == 1
    assert value(samples, callbacks, result="pending_match", status="RUN_FAILED") == 1
    # a status outside the known set is folded into one label: no unbounded series
    assert value(samples, callbacks, result="pending_match", status="OTHER") == 1
    assert value(samples, callbacks, result="unauthorized", status="-") == 2
    assert value(samples, callbacks, result="invalid_payload", status="-") == 1
    failures = "sam_callback_auth_failures_total"
    assert value(samples, failures, reason="missing_credentials") == 1
    assert value(samples, failures, reason="invalid_token") == 1
    histogram = "sam_callback_request_duration_seconds"
    assert value(samples, histogram + "_count", code="updated") == 1
    assert value(samples, histogram + "_bucket", code="unauthorized", le="+Inf") == 2
    assert value(samples, histogram + "_sum", code="updated") > 0
    assert value(samples, "sam_callback_spool_backlog", kind="pending_match") == 2
    assert value(samples, "sam_callback_spool_backlog", kind="queued") == 0
    assert value(samples, "sam_callback_spool_oldest_age_seconds") >= 0
    assert value(samples, "sam_callback_unmatched") == 0
    assert not any(name == "sam_callback_database_errors_total" and v for (name, _), v in samples.items())


def test_database_errors_and_queued_backlog(make_settings: Callable[..., Settings]) -> None:
    # A PostgreSQL URL on a port where nobody listens: every connection is refused at once.
    settings = make_settings(database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/sam")
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/api/callback", json={"deploymentId": "d-q", "status": "RUN_FAILED"}, headers=auth_headers()
        )
        assert answer.json()["code"] == "queued"
        samples = scrape(client.get("/metrics").text)
    # Found by the writer's look at the idle database (probe) or by the callback's own write.
    errors = sum(value(samples, "sam_callback_database_errors_total", where=where) for where in ("probe", "callback"))
    assert errors >= 1
    assert value(samples, "sam_callback_spool_backlog", kind="queued") == 1
    assert value(samples, "sam_callback_callbacks_total", result="queued", status="RUN_FAILED") == 1


def _stale_metrics(folder: Path) -> None:
    """What a previous run leaves in an operator-chosen PROMETHEUS_MULTIPROC_DIR."""
    code = (
        "from prometheus_client import Counter\n"
        "c = Counter('sam_callback_callbacks', 'x', ['result', 'status'], registry=None)\n"
        "c.labels('pending_match', 'RUN_COMPLETED').inc(1000)\n"
    )
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(folder)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert list(folder.glob("*.db"))


def test_two_workers_sum_their_counters(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    _stale_metrics(metrics_dir)
    server = server_factory(CALLBACK_SERVER_WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    # Two fresh interpreters import the whole stack: on a loaded machine that takes a while.
    server.start(wait=False)
    wait_for(server._healthy, timeout=120, what="arranque de los dos workers")
    log_file = tmp_path / "logs" / "sam_callback_server.log"
    sent = 0

    def workers_seen() -> set[str]:
        text = log_file.read_text(encoding="utf-8") if log_file.exists() else ""
        return set(re.findall(r"PID:(\d+) - sam\.callback\.http - INFO - .* resultado=pending_match", text))

    def send_some() -> bool:
        nonlocal sent
        for _ in range(4):
            # a new connection each time, so the kernel hands them to either worker
            answer = httpx.post(
                server.callback_url,
                json={"deploymentId": f"d-w{sent}", "status": "RUN_COMPLETED"},
                headers={"X-Authorization": TOKEN},
                timeout=30,
            )
            assert answer.status_code == 202
            sent += 1
        return len(workers_seen()) == 2

    wait_for(send_some, timeout=60, what="callbacks atendidos por los dos workers")
    wait_for(lambda: _logged(log_file) == sent, timeout=60, what="líneas en el log")
    for _ in range(6):  # any worker may answer the scrape; each must report the sum
        samples = scrape(httpx.get(server.base_url + "/metrics", timeout=30).text)
        assert value(samples, "sam_callback_callbacks_total", result="pending_match", status="RUN_COMPLETED") == sent
        assert value(samples, "sam_callback_spool_backlog", kind="pending_match") == sent
    access = [line for line in log_file.read_text().splitlines() if "uvicorn.access" in line]
    assert not any("/api/callback" in line for line in access)  # one line per callback, in every worker
    assert server.stop() == 0


def _logged(log_file: Path) -> int:
    return log_file.read_text(encoding="utf-8").count("resultado=pending_match")
