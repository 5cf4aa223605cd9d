"""`sam-callback status`: a short human summary of a running instance."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .settings import Settings


def _base_url(settings: Settings, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    host = "127.0.0.1" if settings.server_host in ("0.0.0.0", "::", "") else settings.server_host  # noqa: S104
    scheme = "https" if settings.ssl_certfile else "http"
    return f"{scheme}://{host}:{settings.server_port}"


def show_status(settings: Settings, url: str | None) -> int:
    """Print health, readiness, spool, unmatched and counts since start; 0 when ready."""
    base = _base_url(settings, url)
    out = print  # noqa: T202 - this module is the CLI's report
    try:
        with httpx.Client(base_url=base, timeout=10, verify=False) as client:  # noqa: S501 - local diagnostics
            health = client.get("/health")
            ready = client.get("/ready")
            metrics = client.get("/metrics")
    except httpx.HTTPError as exc:
        out(f"Instancia en {base}: NO RESPONDE ({type(exc).__name__})")
        return 1
    out(f"Instancia en {base}")
    out(f"  Vivacidad (/health):  {'OK' if health.status_code == 200 else f'HTTP {health.status_code}'}")
    body = ready.json() if ready.headers.get("content-type", "").startswith("application/json") else {}
    database = body.get("database", {})
    spool = body.get("spool", {})
    out(f"  Preparado (/ready):   {'SÍ' if ready.status_code == 200 else 'NO'}")
    out(f"  Base de datos:        {'responde' if database.get('reachable') else 'NO responde'}")
    if spool.get("available", False):
        out(
            f"  Spool:                {spool.get('backlog', 0)} pendientes (en cola {spool.get('queued', 0)}, esperando ejecución {spool.get('pending_match', 0)}), el más antiguo hace {spool.get('oldest_age_seconds', 0)} s"
        )
    else:
        out("  Spool:                NO disponible")
    if spool.get("refused"):
        # Refused for good (SPEC 8): why /ready says no while the database answers.
        out(f"  Rechazados por la base de datos: {spool['refused']} ({database.get('refused_error') or '-'})")
    if ready.status_code != 200 and body.get("message"):
        out(f"  Motivo:               {body['message']}")
    out(f"  No emparejados:       {body.get('unmatched')}")
    out(f"  Modo de autenticación: {body.get('auth_mode')}")
    for warning in body.get("warnings", []):
        out(f"  AVISO: {warning}")
    counts: dict[str, float] = {}
    auth_failures = 0.0
    for family in text_string_to_metric_families(metrics.text):
        for sample in family.samples:
            if sample.name == "sam_callback_callbacks_total":
                counts[sample.labels["result"]] = counts.get(sample.labels["result"], 0) + sample.value
            elif sample.name == "sam_callback_auth_failures_total":
                auth_failures += sample.value
    summary = ", ".join(f"{name}={int(value)}" for name, value in sorted(counts.items())) or "ninguno"
    out(f"  Callbacks desde el arranque: {summary}")
    out(f"  Fallos de autenticación desde el arranque: {int(auth_failures)}")
    return 0 if ready.status_code == 200 else 1
