"""Prometheus metrics, correct with one process or several (prometheus-client multiprocess mode)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .domain import ResultCode
from .spool import SpoolError, SpoolStats

# Status labels are kept to the states A360 and SAM use: a free-form status must not be able
# to grow the number of time series without bound.
KNOWN_STATUSES = frozenset(
    {
        "COMPLETED", "RUN_COMPLETED", "RUN_FAILED", "RUN_ABORTED", "RUN_TIMED_OUT", "DEPLOY_FAILED",
        "RUNNING", "RUN_STARTED", "DEPLOYED", "QUEUED", "PENDING_EXECUTION", "UPDATE", "RUN_PAUSED", "UNKNOWN",
    }
)  # fmt: skip
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _SpoolCollector(Collector):
    """Reads the spool when scraped, so every process reports the same shared backlog."""

    def __init__(self, stats: Callable[[], SpoolStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self.stats()
        except SpoolError:
            return []
        age = 0.0 if stats.oldest_received_at is None else max(0.0, time.time() - stats.oldest_received_at)
        backlog = GaugeMetricFamily(
            "sam_callback_spool_backlog",
            "Callbacks en el spool pendientes de aplicar",
            labels=["kind"],
        )
        backlog.add_metric(["queued"], stats.queued)
        backlog.add_metric(["pending_match"], stats.pending)
        return [
            backlog,
            GaugeMetricFamily(
                "sam_callback_spool_oldest_age_seconds",
                "Antigüedad del callback más antiguo del spool",
                value=age,
            ),
            GaugeMetricFamily(
                "sam_callback_unmatched",
                "Callbacks sin ejecución tras la ventana de espera",
                value=stats.unmatched,
            ),
        ]


class Metrics:
    """Every metric the service exposes."""

    def __init__(self, spool_stats: Callable[[], SpoolStats]) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # In multiprocess mode samples live in shared files and are gathered at scrape time;
        # registering them in a registry too would report one process's view twice.
        own = None if self.multiprocess else CollectorRegistry(auto_describe=True)
        self.callbacks = Counter(
            "sam_callback_callbacks",
            "Callbacks recibidos por resultado y estado",
            ["result", "status"],
            registry=own,
        )
        self.spool_applied = Counter(
            "sam_callback_spool_applied",
            "Callbacks aplicados desde el spool",
            ["result"],
            registry=own,
        )
        self.auth_failures = Counter(
            "sam_callback_auth_failures",
            "Fallos de autenticación por motivo",
            ["reason"],
            registry=own,
        )
        self.db_errors = Counter(
            "sam_callback_database_errors",
            "Errores de la base de datos por origen",
            ["where"],
            registry=own,
        )
        self.latency = Histogram(
            "sam_callback_request_duration_seconds",
            "Duración de las peticiones de callback",
            ["code"],
            buckets=_LATENCY_BUCKETS,
            registry=own,
        )
        self.registry = own if own is not None else CollectorRegistry(auto_describe=True)
        if own is None:
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        self.registry.register(_SpoolCollector(spool_stats))
        self.started_at = time.time()
        self._callback_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def observe_callback(self, *, code: ResultCode, status: str | None, seconds: float) -> None:
        """Count one answered callback."""
        label = status if status in KNOWN_STATUSES else ("OTHER" if status else "-")
        key = (code, label)
        children = self._callback_children.get(key)
        if children is None:
            # labels() validates and locks on every call; the few (code, status) pairs are kept.
            children = self._callback_children[key] = (
                self.callbacks.labels(code.value, label),
                self.latency.labels(code.value),
            )
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
