"""The application factory: `create_app(settings)` and the lifespan that owns the resources."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from . import __version__
from .activity import Activity
from .domain import ResultCode
from .endpoint import CallbackEndpoint
from .logs import request_id_var
from .openapi import install_openapi
from .panel import PANEL_OPENAPI, panel_response, start_publisher
from .repository import describe_error
from .responses import envelope, request_id_from
from .runtime import Runtime, close_logging, ensure_logging
from .settings import Settings, load_settings

log = logging.getLogger("sam.callback")

READY_PING_TIMEOUT = 5.0


def _tagging(send: Send, request_id: str) -> Send:
    """`send` that adds `X-Request-ID` to the response's headers."""
    tag = (b"x-request-id", request_id.encode())

    async def tagged(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), tag]
        await send(message)

    return tagged


class CallbackDispatcher:
    """The ASGI application: the callback path to its endpoint, everything else (lifespan too) to FastAPI.

    The endpoint is not a FastAPI route: the framework's stack (error, telemetry and body-limit
    middleware, routing) costs more per callback than the callback's own work. What every request
    needs is done here, in front of both: today its id, in the log lines and in `X-Request-ID`.
    """

    def __init__(self, api: FastAPI, endpoint: CallbackEndpoint, *, path: str, runtime: Runtime) -> None:
        self.api = api
        self.endpoint = endpoint
        self.path = path.rstrip("/")
        # One trailing slash is tolerated (an AA_CALLBACK_URL written with one); more is not the path.
        self._paths = (self.path, self.path + "/")
        self.runtime = runtime
        # Starlette's application state, for whoever holds the app (tests read `state.runtime`).
        self.state = api.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Name an HTTP request, then route it; other scopes (lifespan) go to FastAPI."""
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id")
        request_id = request_id_from(given)
        # The id goes into every log line, mail and page of the request: a client that sends its
        # token as X-Request-ID (or anything shaped like a credential) gets a new one.
        credential = given is not None and self.runtime.names_a_secret(request_id)
        if credential:
            request_id = request_id_from(None)
        request_id_var.set(request_id)
        if credential:
            log.warning("X-Request-ID con forma de credencial: se ignora y se usa un identificador nuevo")
        if scope["path"] in self._paths:
            # The endpoint writes its answers' headers itself, X-Request-ID among them: a send
            # wrapper on the hot path would cost more than the header does. It reads the
            # headers from the dict built here, not from a second one.
            await self.endpoint(scope, receive, send, request_id, headers)
        else:
            if scope["method"] == "HEAD":
                # HEAD wherever GET works (load balancers probe /health with it). FastAPI routes
                # GET only; uvicorn still sees the request as HEAD and sends no body.
                scope = {**scope, "method": "GET"}
            # Outside FastAPI's ServerErrorMiddleware, so its 500 answers are tagged too.
            await self.api(scope, receive, _tagging(send, request_id))


def _json(
    code: ResultCode, *, headers: dict[str, str] | None = None, message: str | None = None, **extra: Any
) -> JSONResponse:
    status, body = envelope(code, request_id_var.get(), message=message, **extra)
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(
    settings: Settings, *, watch_credentials: bool = False, worker_process: bool = False
) -> CallbackDispatcher:
    """Build the ASGI application; nothing is opened until the lifespan starts.

    Args:
        settings: the configuration to serve with.
        watch_credentials: re-read credentials from `.env` and the key file while serving (SPEC 11);
            only for settings that came from the environment, as `serve` builds them.
        worker_process: the app runs in one of uvicorn's worker processes (see `_hold_stop_signals`).
    """
    runtime = Runtime.build(settings)
    # The operator page's record of recent events; each process publishes its own next to the spool.
    activity = Activity(folder=settings.spool_path.parent / "panel")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # CALLBACK_SERVER_THREADS bounds the threads that do blocking work (readiness pings,
        # metrics, start and stop); callbacks themselves go through the one writer thread.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.server_threads
        # Opening the database may block (a slow server, creating the SQLite schema): off the loop.
        await anyio.to_thread.run_sync(runtime.start)
        publisher = start_publisher(activity, runtime)
        if watch_credentials:
            runtime.watch_credentials()
            _reload_on_sighup(runtime)
        # Everything built so far (imports, app, engine) lives as long as the process. Left in the
        # collector, each full collection walked it all: a 40-50 ms pause of every request, a few
        # times a minute under load. Frozen, collections only walk what requests create.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await anyio.to_thread.run_sync(publisher.stop)
            # Stopping joins the writer thread; do it off the loop so the loop stays responsive.
            await anyio.to_thread.run_sync(runtime.stop)
            if worker_process:
                _hold_stop_signals()

    docs = settings.docs_enabled
    api = FastAPI(
        title="sam-callback",
        version=__version__,
        summary="Receptor de callbacks de Automation Anywhere A360 para SAM",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
        # `/health/` is an unknown path (404 in the envelope), not an empty redirect whose
        # Location comes from the caller's Host header.
        redirect_slashes=False,
    )
    api.state.runtime = runtime
    _install_error_handlers(api)
    _install_routes(api, runtime, activity)
    install_openapi(api, settings)
    endpoint = CallbackEndpoint(runtime=runtime, activity=activity)
    return CallbackDispatcher(api, endpoint, path=settings.endpoint_path, runtime=runtime)


def _hold_stop_signals() -> None:
    """Keep the stop signal uvicorn re-raises in a worker from killing it before its log is flushed.

    Once a worker's server has shut down, uvicorn puts the default handlers back and raises the
    stop signal again: the worker died of it before its exit handlers ran, and the last queued log
    lines ("sam-callback detenido", alerts logged at stop) were lost. Blocked in this thread (the
    loop's, which raises it), the signal stays pending and the worker ends normally. POSIX only.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _reload_on_sighup(runtime: Runtime) -> None:
    # POSIX only: Windows has no SIGHUP, and polling notices the change within seconds there.
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is None:
        return
    loop = asyncio.get_running_loop()
    reloader = runtime.reloader
    if reloader is None:
        return

    def reload_now() -> None:
        loop.run_in_executor(None, functools.partial(reloader.check, force=True))

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(hangup, reload_now)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: ResultCode.NOT_FOUND, 405: ResultCode.METHOD_NOT_ALLOWED}
        fallback = ResultCode.INVALID_PAYLOAD if exc.status_code < 500 else ResultCode.INTERNAL_ERROR
        code = codes.get(exc.status_code, fallback)
        headers = dict(exc.headers or {})
        allow = headers.get("Allow") or headers.get("allow")
        if allow is not None and "GET" in allow.split(", ") and "HEAD" not in allow.split(", "):
            # The dispatcher answers HEAD wherever GET works: the 405 says so too.
            headers = {name: value for name, value in headers.items() if name.lower() != "allow"}
            headers["Allow"] = f"{allow}, HEAD"
        return _json(code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(str(p) for p in error.get("loc", ())), "problem": "valor no válido"}
            for error in exc.errors()
        ]
        return _json(ResultCode.INVALID_PAYLOAD, details=details)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("Error interno en %s %s", request.method, request.url.path, exc_info=exc)
        # The dispatcher tags this answer too: it is in front of FastAPI's ServerErrorMiddleware.
        return _json(ResultCode.INTERNAL_ERROR)


def _install_routes(app: FastAPI, runtime: Runtime, activity: Activity) -> None:
    @app.get("/health", tags=["operación"], summary="Vivacidad del proceso")
    async def health() -> dict[str, Any]:
        return {
            "status": "OK",
            "code": "alive",
            "message": "sam-callback en servicio",
            "request_id": request_id_var.get(),
        }

    @app.get("/ready", tags=["operación"], summary="Preparación: base de datos, spool y pendientes")
    async def ready() -> JSONResponse:
        return await _ready(runtime)

    @app.get("/metrics", tags=["operación"], summary="Métricas en formato Prometheus")
    async def metrics() -> Response:
        body = await anyio.to_thread.run_sync(runtime.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get(
        "/panel",
        tags=["operación"],
        summary="Panel de operación (HTML), solo CALLBACK_ADMIN_ALLOWED_IPS",
        **PANEL_OPENAPI,
    )
    async def panel(request: Request) -> Response:
        return await panel_response(request, runtime, activity)


async def _ready(runtime: Runtime) -> JSONResponse:
    recorder = runtime.recorder
    database: dict[str, Any] = {"reachable": True}
    try:
        await asyncio.wait_for(
            anyio.to_thread.run_sync(runtime.repository.ping if runtime.repository else _no_db),
            READY_PING_TIMEOUT,
        )
    except Exception as exc:  # any failure to answer means "not ready"; the reason is logged
        # The body, open to anyone who reaches /ready, names only the kind of error; the log says
        # what the driver said (a missing ODBC driver, a refused connection), secret-free.
        database = {"reachable": False, "error": type(exc).__name__}
        log.warning("/ready: la base de datos no responde (%s)", describe_error(exc))
    else:
        if not recorder.database_available:
            recorder.wake_database()
    stats = await anyio.to_thread.run_sync(runtime.spool_stats)
    spool: dict[str, Any] = {"available": stats is not None}
    if stats is not None:
        spool |= {
            "backlog": stats.backlog,
            "queued": stats.queued,
            "pending_match": stats.pending,
            "oldest_age_seconds": round(time.time() - stats.oldest_received_at, 1) if stats.oldest_received_at else 0,
            "refused": stats.refused,
        }
    # The same warnings as the operator page's.
    warnings = runtime.warnings(stats)
    if runtime.settings.auth_mode == "none":
        log.warning("/ready: CALLBACK_AUTH_MODE=none, el endpoint no exige autenticación")
    refused = stats.refused if stats is not None else 0
    ok = database["reachable"] and not refused
    if not database["reachable"]:
        message = (
            "La base de datos no responde; los callbacks se guardan en el spool"
            if stats is not None
            else "La base de datos no responde y el spool no está disponible: los callbacks se rechazan con 503"
        )
    elif refused:
        # A refusal for good (SPEC 8) needs a person: the schema or a permission must be fixed.
        message = (
            f"La base de datos rechaza {refused} callbacks de forma permanente ({stats.refused_error if stats else ''}); "
            "quedan en el spool: ejecute `sam-callback check`, corrija la tabla y `sam-callback spool retry`"
        )
        database["refused_error"] = stats.refused_error if stats else None
        log.warning("/ready: %d callbacks rechazados por la base de datos (%s)", refused, database["refused_error"])
    else:
        message = "Servicio listo"
    body = {
        "status": "OK" if ok else "ERROR",
        "code": "ready" if ok else "not_ready",
        "message": message,
        "request_id": request_id_var.get(),
        "database": database,
        "spool": spool,
        "unmatched": stats.unmatched if stats else None,
        "auth_mode": runtime.settings.auth_mode,
        "warnings": warnings,
    }
    return JSONResponse(
        body,
        status_code=200 if ok else 503,
        headers=None if ok else {"Retry-After": "10"},
    )


def _no_db() -> None:
    raise RuntimeError("sin base de datos")


def app_from_environment() -> CallbackDispatcher:
    """Factory for `uvicorn --factory` and worker processes: settings from the environment."""
    settings = load_settings()
    # In a worker process uvicorn logs before the lifespan starts ("Started server process");
    # configure logging now so those lines reach the file, and flush it when the worker exits.
    atexit.register(close_logging, ensure_logging(settings))
    return create_app(settings, watch_credentials=True, worker_process=True)
