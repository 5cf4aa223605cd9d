"""Smoke test of the benchmark script: it runs end to end and reports every field (no thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_quick_run_reports_every_field(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--rows", "2000", "--duration", "2",
         "--db", "sqlite", "--json", str(out), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rps/techo" in result.stdout
    results = json.loads(out.read_text())
    ceiling = results["ceiling"]
    (service,) = results["services"]
    for measurement in (ceiling, service):
        for name in ("rps", "p50_ms", "p99_ms", "peak_mb", "ok"):
            assert measurement[name] > 0, name
    assert service["failed"] == 0
    assert service["rows_updated"] > 0
    assert service["extra"]["exit_code"] == 0
