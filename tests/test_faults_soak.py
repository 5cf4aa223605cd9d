"""Soak: the 60-second CI version of bench/soak.py, against the real PostgreSQL server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_soak_60_seconds_at_a_steady_rate(pg_url: str) -> None:
    """60 s at 50 callbacks/s: no error, every run applied once, memory reported start and end."""
    result = subprocess.run(
        [sys.executable, str(SOAK), "--duration", "60", "--rate", "50", "--database-url", pg_url],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["failures"] == 0
    assert report["callbacks_sent"] >= 1000
    assert report["memory_mb"]["start"] is not None
    assert report["memory_mb"]["end"] is not None
    print(json.dumps({k: report[k] for k in ("callbacks_sent", "answers", "memory_mb")}, ensure_ascii=False))
