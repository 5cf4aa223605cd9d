"""`GET /panel`: the operator page, one self-contained HTML document rendered on the server."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import socket
import time
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from . import __version__
from .activity import MINUTES_KEPT, Activity, ActivityPublisher, CallbackEvent, ProcessActivity, RefusedEvent
from .domain import ResultCode
from .logs import request_id_var
from .network import in_networks
from .rejected import RejectedStoreError
from .responses import envelope

if TYPE_CHECKING:
    from .runtime import Runtime
    from .spool import SpoolStats

log = logging.getLogger("sam.callback.panel")

PING_TIMEOUT = 5.0
REFRESH_SECONDS = 15
ROWS_SHOWN = 100
FILTER_MAX = 50
_COMMON_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# How the route is documented in /openapi.json: an HTML page, or the 403 envelope.
PANEL_OPENAPI: dict[str, Any] = {
    "response_class": HTMLResponse,
    "responses": {
        403: {
            "description": "La dirección de origen no está en CALLBACK_ADMIN_ALLOWED_IPS",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}},
        }
    },
    "openapi_extra": {
        "parameters": [
            {
                "name": "deploymentId",
                "in": "query",
                "required": False,
                "description": "Muestra solo los callbacks cuyo deploymentId contiene este texto",
                "schema": {"type": "string"},
            }
        ]
    },
}


@dataclass(frozen=True, slots=True)
class PanelView:
    """Everything the page shows, gathered before rendering."""

    now: float
    database_up: bool
    database_since: float
    database_error: str | None
    auth_mode: str
    warnings: list[str]
    spool: SpoolStats | None
    rejected: int | None
    counts: dict[str, int]
    processes: list[ProcessActivity]
    deployment_filter: str


def start_publisher(activity: Activity, runtime: Runtime) -> ActivityPublisher:
    """Start publishing this process's events for the pages served by the other processes."""
    publisher = ActivityPublisher(
        activity,
        database_state=lambda: runtime.recorder_.database_state if runtime.recorder_ else None,
    )
    publisher.start()
    return publisher


async def panel_response(request: Request, runtime: Runtime, activity: Activity) -> Response:
    """The page for allowed addresses; the 403 envelope for everybody else."""
    peer = request.client.host if request.client else "-"
    # Every X-Forwarded-For line, joined: the first alone may be the client's own forgery.
    forwarded = request.headers.getlist("x-forwarded-for")
    client = runtime.resolver.client_address(peer, ", ".join(forwarded) if forwarded else None)
    if not in_networks(client, runtime.settings.admin_allowed_networks):
        log.warning("Panel: la dirección %s no está en CALLBACK_ADMIN_ALLOWED_IPS", client)
        status, body = envelope(
            ResultCode.FORBIDDEN,
            request_id_var.get(),
            message="La dirección de origen no puede abrir el panel (CALLBACK_ADMIN_ALLOWED_IPS)",
        )
        return JSONResponse(body, status_code=status, headers=_COMMON_HEADERS)
    database_error = None
    try:
        await asyncio.wait_for(anyio.to_thread.run_sync(_ping, runtime), PING_TIMEOUT)
    except Exception as exc:  # any failure to answer is "not answering"; the page names its kind
        database_error = type(exc).__name__
    activity.note_database(database_error is None)
    deployment_filter = request.query_params.get("deploymentId", "").strip()[:FILTER_MAX]
    view = await anyio.to_thread.run_sync(_gather, runtime, activity, database_error, deployment_filter)
    nonce = secrets.token_urlsafe(16)
    headers = _COMMON_HEADERS | {
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'nonce-{nonce}'; img-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'"
        )
    }
    return HTMLResponse(render_page(view, nonce=nonce), headers=headers)


def _ping(runtime: Runtime) -> None:
    if runtime.repository is None:
        raise RuntimeError("sin base de datos")
    runtime.repository.ping()


def _gather(runtime: Runtime, activity: Activity, database_error: str | None, deployment_filter: str) -> PanelView:
    stats = runtime.spool_stats()
    warnings = runtime.warnings(stats)
    if database_error is None and runtime.recorder_ is not None and runtime.recorder_.last_db_error:
        warnings.append(f"Último error de la base de datos: {runtime.recorder_.last_db_error}")
    counts: dict[str, int] = {}
    # In multiprocess mode this registry sums the counters of every worker.
    for family in runtime.metrics.registry.collect():
        if family.name == "sam_callback_callbacks":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    result = sample.labels["result"]
                    counts[result] = counts.get(result, 0) + int(sample.value)
    return PanelView(
        now=time.time(),
        database_up=database_error is None,
        database_since=activity.database_since,
        database_error=database_error,
        auth_mode=runtime.settings.auth_mode,
        warnings=warnings,
        spool=stats,
        rejected=_rejected_count(runtime),
        counts=counts,
        processes=[activity.snapshot(), *activity.others()],
        deployment_filter=deployment_filter,
    )


def _rejected_count(runtime: Runtime) -> int | None:
    try:
        return runtime.rejected.count()
    except RejectedStoreError:
        return None


# Characters HTML escaping leaves as they are but a page must not carry (NUL above all).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _e(value: Any) -> str:
    text = "-" if value is None else str(value)
    return escape(_CONTROL.sub(lambda match: f"\\u{ord(match.group()):04x}", text), quote=True)


def _clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _time_of_day(at: float, now: float) -> str:
    # Today's events need only the time: narrower tables on a phone.
    stamp = _clock(at)
    return stamp[11:] if stamp[:10] == _clock(now)[:10] else stamp


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def render_page(view: PanelView, *, nonce: str) -> str:
    """The whole HTML document; every value in it goes through `escape`."""
    several = len(view.processes) > 1
    started = min(process.started_at for process in view.processes)
    callbacks: list[tuple[int, CallbackEvent]] = sorted(
        ((process.pid, event) for process in view.processes for event in process.callbacks),
        key=lambda item: item[1][0],
        reverse=True,
    )
    needle = view.deployment_filter.casefold()
    if needle:
        callbacks = [item for item in callbacks if item[1][2] is not None and needle in item[1][2].casefold()]
    refused: list[tuple[int, RefusedEvent]] = sorted(
        ((process.pid, event) for process in view.processes for event in process.refused),
        key=lambda item: item[1][0],
        reverse=True,
    )
    if view.database_up:
        database = f'<span class="ok">responde</span> <small>desde {_e(_clock(view.database_since))}</small>'
    else:
        database = (
            f'<span class="bad">NO responde</span> ({_e(view.database_error)}) '
            f"<small>desde {_e(_clock(view.database_since))}, hace {_e(_ago(view.now - view.database_since))}</small>"
        )
    state_rows = [
        ("Base de datos", database),
        ("Autenticación", _e(view.auth_mode)),
        ("Versión", _e(__version__)),
        ("En marcha", f"{_e(_ago(view.now - started))} <small>desde {_e(_clock(started))}</small>"),
        ("Procesos", _e(", ".join(str(process.pid) for process in view.processes))),
        ("Equipo", _e(socket.gethostname())),
    ]
    warnings = "".join(f'<p class="warn">{_e(warning)}</p>' for warning in view.warnings)
    callback_table = _callback_table(callbacks[:ROWS_SHOWN], now=view.now, several=several)
    callback_table += _shown(len(callbacks), filterable=True)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="es"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        "<title>sam-callback · panel</title>",
        f'<style nonce="{_e(nonce)}">{_CSS}</style></head><body>',
        f"<header><h1>sam-callback</h1><p>Panel de operación · {_e(_clock(view.now))} · "
        f"se actualiza cada {REFRESH_SECONDS} s</p></header><main>",
        '<section class="cards">',
        _card("Estado", _pairs([(_e(label), value) for label, value in state_rows]) + warnings),
        _card("Spool", _spool(view)),
        _card("Callbacks desde el arranque", _counts(view.counts)),
        "</section>",
        _card("Callbacks por minuto, última hora", _plot(view)),
        _card("Últimos callbacks recibidos", _filter_form(view.deployment_filter) + callback_table),
        _card(
            "Últimas peticiones rechazadas",
            _refused_table(refused[:ROWS_SHOWN], now=view.now, several=several) + _shown(len(refused)),
        ),
        "</main></body></html>",
    ]
    return "\n".join(parts)


def _shown(total: int, *, filterable: bool = False) -> str:
    """A note under a table that shows only the newest ROWS_SHOWN of `total` rows."""
    if total <= ROWS_SHOWN:
        return ""
    hint = " (el filtro busca en todos)" if filterable else ""
    return f'<p class="axis">Solo se muestran las {ROWS_SHOWN} filas más recientes de {_e(total)}{hint}.</p>'


def _card(title: str, body: str) -> str:
    return f'<section class="card"><h2>{_e(title)}</h2>{body}</section>'


def _pairs(rows: list[tuple[str, str]]) -> str:
    """Rows of (label, value), both HTML already escaped."""
    return "<dl>" + "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in rows) + "</dl>"


def _spool(view: PanelView) -> str:
    stats = view.spool
    if stats is None:
        return '<p class="bad">El spool no está disponible</p>'
    oldest = "-" if stats.oldest_received_at is None else f"hace {_ago(view.now - stats.oldest_received_at)}"
    rows = [
        ("Pendientes de aplicar", _e(stats.backlog)),
        ("En cola (base de datos)", _e(stats.queued)),
        ("Esperando su ejecución", _e(stats.pending)),
        ("El más antiguo", _e(oldest)),
        ("Sin emparejar", _number(stats.unmatched)),
    ]
    detail = f" <small>{_e(stats.refused_error)}</small>" if stats.refused and stats.refused_error else ""
    rows.append(("Rechazados por la base de datos", _number(stats.refused) + detail))
    labelled = [(_e(label), value) for label, value in rows]
    if view.rejected is not None:
        # The command is one unit: a narrow screen must not break it after "--".
        command = '<span class="command">(spool list --rejected)</span>'
        labelled.append((f"Rechazados por cuerpo no válido {command}", _number(view.rejected)))
    return _pairs(labelled)


def _number(value: int) -> str:
    return f'<span class="{"bad" if value else "ok"}">{_e(value)}</span>'


def _counts(counts: dict[str, int]) -> str:
    if not counts:
        return "<p>Ninguno todavía.</p>"
    rows = [(_e(result), _e(count)) for result, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    rows.append(("total", f"<strong>{_e(sum(counts.values()))}</strong>"))
    return _pairs(rows)


def _plot(view: PanelView) -> str:
    now_minute = int(view.now // 60)
    totals = [0] * MINUTES_KEPT
    for process in view.processes:
        for minute, count in process.per_minute.items():
            index = MINUTES_KEPT - 1 - (now_minute - minute)
            if 0 <= index < MINUTES_KEPT:
                totals[index] += count
    peak = max(totals) or 1
    width, height, bar = 600, 120, 10
    bars = []
    for index, count in enumerate(totals):
        tall = round(count / peak * (height - 20))
        label = f"{_clock((now_minute - (MINUTES_KEPT - 1 - index)) * 60)[11:16]}: {count}"
        bars.append(
            f'<rect x="{index * bar}" y="{height - tall}" width="{bar - 2}" height="{tall}">'
            f"<title>{_e(label)}</title></rect>"
        )
    return (
        f'<svg class="plot" viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img" '
        f'aria-label="Callbacks por minuto; máximo {_e(max(totals))}">'
        f'<line x1="0" y1="{height - 0.5}" x2="{width}" y2="{height - 0.5}"></line>{"".join(bars)}</svg>'
        f'<p class="axis"><span>hace {MINUTES_KEPT} min</span><span>máximo {_e(max(totals))} por minuto</span>'
        "<span>ahora</span></p>"
        '<p class="axis">Callbacks respondidos; sin las peticiones rechazadas por credenciales o dirección '
        "(401, 403, 429), que sí cuenta «Callbacks desde el arranque».</p>"
    )


def _filter_form(value: str) -> str:
    return (
        '<form method="get" action="/panel" class="filter">'
        '<label for="deploymentId">Filtrar por deploymentId</label> '
        f'<input id="deploymentId" name="deploymentId" maxlength="{FILTER_MAX}" value="{_e(value)}"> '
        '<button type="submit">Filtrar</button> <a href="/panel">Quitar filtro</a></form>'
    )


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f"<p>{_e(empty)}</p>"
    head = "".join(f"<th>{_e(header)}</th>" for header in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _callback_table(events: list[tuple[int, CallbackEvent]], *, now: float, several: bool) -> str:
    headers = ["Hora", "deploymentId", "Estado", "Resultado", "Cliente", "request id"]
    rows = []
    for pid, (at, _seq, deployment_id, status, result, client, request_id) in events:
        kind = "ok" if result in _DONE else ("wait" if result in _WAITING else "bad")
        row = [_e(_time_of_day(at, now)), _e(deployment_id), _e(status), f'<span class="{kind}">{_e(result)}</span>']
        row += [_e(client), f"<code>{_e(request_id)}</code>"]
        rows.append([*row, _e(pid)] if several else row)
    return _table([*headers, "Proceso"] if several else headers, rows, "Ningún callback recibido (con este filtro).")


_DONE = frozenset({ResultCode.UPDATED, ResultCode.ALREADY_PROCESSED})
_WAITING = frozenset({ResultCode.PENDING_MATCH, ResultCode.QUEUED})


def _refused_table(events: list[tuple[int, RefusedEvent]], *, now: float, several: bool) -> str:
    headers = ["Hora", "Cliente", "Motivo"]
    rows = []
    for pid, (at, client, reason) in events:
        row = [_e(_time_of_day(at, now)), _e(client), _e(reason)]
        rows.append([*row, _e(pid)] if several else row)
    return _table([*headers, "Proceso"] if several else headers, rows, "Ninguna petición rechazada.")


# Labels take at most 60 % of a card and wrap; values keep the rest, so a long label (the spool's)
# cannot squeeze a number into one digit per line. Nothing is wider than the screen on a phone.
_CSS = """
:root{color-scheme:light dark;--ok:#17803d;--bad:#b42318;--wait:#a15c07;--line:#8884}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{padding:.8rem 1rem;background:#1f3a5f;color:#fff}
header h1{margin:0;font-size:1.25rem}header p{margin:.2rem 0 0;font-size:.85rem;opacity:.85}
main{padding:.6rem;max-width:80rem;margin:auto}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(18rem,100%),1fr));gap:.6rem;margin-bottom:.6rem}
.card{border:1px solid var(--line);border-radius:.5rem;padding:.6rem .8rem;margin-bottom:.6rem;min-width:0}
.cards .card{margin-bottom:0}
h2{font-size:1rem;margin:0 0 .4rem}
dl{display:grid;grid-template-columns:fit-content(60%) minmax(0,1fr);gap:.15rem .8rem;margin:0}
dt{opacity:.75;overflow-wrap:anywhere}dd{margin:0;overflow-wrap:anywhere;font-variant-numeric:tabular-nums}
.ok{color:var(--ok);font-weight:600}.bad{color:var(--bad);font-weight:600}.wait{color:var(--wait);font-weight:600}
.command{white-space:nowrap}
.warn{background:#fef0c7;color:#4d3300;padding:.3rem .5rem;border-radius:.3rem;margin:.4rem 0 0;overflow-wrap:anywhere}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid var(--line);white-space:nowrap}
td{max-width:22rem;overflow:hidden;text-overflow:ellipsis}
code{font-size:.8rem}
.filter{margin:0 0 .5rem;display:flex;flex-wrap:wrap;gap:.4rem;align-items:center}
.filter input{font:inherit;padding:.2rem .4rem;min-width:12rem}
.plot{display:block;width:100%;height:7rem}
.plot rect{fill:#2f6fb3}.plot line{stroke:var(--line)}
.axis{display:flex;justify-content:space-between;font-size:.8rem;opacity:.75;margin:.1rem 0 0}
"""
