"""Logs: SAM's text layout, JSON lines, request ids on every line, uvicorn's records, daily rotation."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from sam.callback.app import create_app
from sam.callback.logs import (
    _BURST_LINES,
    _MAYBE_SECRET,
    LoggingHandle,
    SharedTimedRotatingFileHandler,
    _BurstListener,
    _maybe_secret,
    log_fields,
    setup_logging,
)
from sam.callback.settings import Settings
from tests.utils import TOKEN, ServerProcess, auth_headers, insert_run, wait_for

# SAM's layout: "2024-05-01 10:00:00 - PID:123 - sam.callback.http - INFO - [rid] - message"
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d - PID:\d+ - [\w.]+ - [A-Z]+ - \[[^\]]+\] - .*$")


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


@pytest.fixture
def logging_handle(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., tuple[Settings, LoggingHandle]]]:
    """Set up the real log pipeline for given settings; always detached afterwards."""
    handles: list[LoggingHandle] = []

    def build(**overrides: object) -> tuple[Settings, LoggingHandle]:
        settings = make_settings(**overrides)
        handle = setup_logging(settings, [TOKEN])
        handles.append(handle)
        return settings, handle

    yield build
    for handle in handles:
        handle.close()


def test_text_layout_carries_the_request_id_on_every_line_of_a_request(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/api/callback",
            json={"deploymentId": "d-1", "status": "RUN_COMPLETED"},
            headers={**auth_headers("wrong-token-wrong-token"), "X-Request-ID": "req-text-1"},
        )
        assert answer.status_code == 401
    lines = _lines(settings.log_file)
    assert lines and all(TEXT_LINE.match(line) for line in lines), lines
    ours = [line for line in lines if "[req-text-1]" in line]
    # the warning with the reason, then the one line per callback
    assert any("Autenticación fallida" in line for line in ours)
    assert any("callback cliente=" in line and "resultado=unauthorized" in line for line in ours)
    assert all("wrong-token" not in line for line in lines)


def test_json_lines_with_structured_callback_fields_and_exceptions(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(log_format="json")
    insert_run(settings.resolved_database_url(), "d-json")
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/api/callback",
            json={"deploymentId": "d-json", "status": "RUN_COMPLETED"},
            headers={**auth_headers(), "X-Request-ID": "req-json-1"},
        )
        assert answer.json()["code"] == "updated"
        try:
            raise ValueError(f"multi\nline with {TOKEN}")
        except ValueError:
            logging.getLogger("sam.callback").exception("fallo de prueba\ncon salto")
    lines = _lines(settings.log_file)
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    callback = next(e for e in entries if e["message"].startswith("callback "))
    assert callback["request_id"] == "req-json-1"
    assert callback["client"] == "testclient"
    assert callback["deploymentId"] == "d-json"
    assert callback["status"] == "RUN_COMPLETED"
    assert callback["result"] == "updated"
    assert isinstance(callback["duration_ms"], float)
    failure = next(e for e in entries if e["message"].startswith("fallo de prueba"))
    assert failure["level"] == "ERROR"
    assert "ValueError" in failure["message"] + failure.get("exception", "")
    assert TOKEN not in "\n".join(lines)


def test_uvicorn_records_go_through_the_same_json_handlers(
    logging_handle: Callable[..., tuple[Settings, LoggingHandle]],
) -> None:
    settings, handle = logging_handle(log_format="json")
    # The shapes uvicorn emits: access records carry their fields as args, errors may carry exc_info.
    access = logging.getLogger("uvicorn.access")
    access.info('%s - "%s %s HTTP/%s" %d', "10.0.0.1:5000", "GET", "/health", "1.1", 200)
    try:
        raise OSError("[Errno 98] Address already in use")
    except OSError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application\n")
    handle.close()
    entries = [json.loads(line) for line in _lines(settings.log_file)]
    loggers = {e["logger"] for e in entries}
    assert {"uvicorn.access", "uvicorn.error"} <= loggers
    access_lines = [e["message"] for e in entries if e["logger"] == "uvicorn.access"]
    # (the real server writes none for callbacks: test_real_server_routes_uvicorn_logs_to_the_file...)
    assert access_lines == ['10.0.0.1:5000 - "GET /health HTTP/1.1" 200']
    error = next(e for e in entries if e["logger"] == "uvicorn.error")
    assert "Address already in use" in error["message"] + error.get("exception", "")


def test_rotation_is_daily_with_the_configured_backup_count_and_keeps_writing(
    logging_handle: Callable[..., tuple[Settings, LoggingHandle]],
) -> None:
    settings, handle = logging_handle(log_backup_count=2)
    file_handler = next(h for h in handle.handlers if isinstance(h, logging.handlers.TimedRotatingFileHandler))
    assert isinstance(file_handler, SharedTimedRotatingFileHandler)
    assert (file_handler.when, file_handler.interval, file_handler.backupCount) == ("MIDNIGHT", 86400, 2)
    assert Path(file_handler.baseFilename) == settings.log_file.resolve()
    # older rotated days, beyond the backup count
    for day in ("2020-01-01", "2020-01-02", "2020-01-03"):
        (settings.log_directory / f"{settings.log_filename}.{day}").write_text("viejo\n")
    log = logging.getLogger("sam.callback")
    log.info("antes de medianoche")
    wait_for(lambda: "antes de medianoche" in settings.log_file.read_text(), what="línea escrita")
    file_handler.acquire()  # the listener thread may be writing
    try:
        file_handler.doRollover()
    finally:
        file_handler.release()
    log.info("después de medianoche")
    handle.close()
    assert "después de medianoche" in settings.log_file.read_text()
    rotated = sorted(p.name for p in settings.log_directory.glob(f"{settings.log_filename}.*"))
    assert len(rotated) == 2
    assert "antes de medianoche" in (settings.log_directory / rotated[-1]).read_text()


def test_rotation_at_midnight_happens_on_the_next_line_written(
    logging_handle: Callable[..., tuple[Settings, LoggingHandle]],
) -> None:
    settings, handle = logging_handle()
    file_handler = next(h for h in handle.handlers if isinstance(h, SharedTimedRotatingFileHandler))
    log = logging.getLogger("sam.callback")
    log.info("línea de ayer")
    wait_for(lambda: "línea de ayer" in settings.log_file.read_text(), what="línea escrita")
    file_handler.acquire()
    try:
        file_handler.rolloverAt = int(time.time())  # midnight has just passed
    finally:
        file_handler.release()
    log.info("línea de hoy")
    handle.close()
    rotated = list(settings.log_directory.glob(f"{settings.log_filename}.*"))
    assert len(rotated) == 1 and "línea de ayer" in rotated[0].read_text()
    assert "línea de hoy" in settings.log_file.read_text() and "ayer" not in settings.log_file.read_text()


class _BrokenConsole(io.StringIO):
    """A console that went away (a closed pipe, a detached service window)."""

    def write(self, text: str) -> int:
        raise OSError(32, "Broken pipe")


def test_a_burst_reaches_file_and_console_whole_and_in_order(
    logging_handle: Callable[..., tuple[Settings, LoggingHandle]],
) -> None:
    settings, handle = logging_handle()
    console = io.StringIO()
    handle.handlers[1].setStream(console)  # type: ignore[attr-defined]
    log = logging.getLogger("sam.callback")

    def burst(name: str) -> None:
        for n in range(500):
            log.info("%s-%03d", name, n)

    threads = [threading.Thread(target=burst, args=(name,)) for name in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    handle.close()
    for text in (settings.log_file.read_text(encoding="utf-8"), console.getvalue()):
        lines = [line.rsplit(" - ", 1)[1] for line in text.splitlines() if re.search(r" - [abc]-\d{3}$", line)]
        assert len(lines) == 1500
        for name in ("a", "b", "c"):
            assert [line for line in lines if line.startswith(name)] == [f"{name}-{n:03d}" for n in range(500)]


def test_a_queue_that_never_empties_still_has_its_lines_written() -> None:
    """A long burst is written every _BURST_LINES lines, not held in memory until it ends."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    console = io.StringIO()
    listener = _BurstListener(records, logging.Formatter("%(message)s"), logging.StreamHandler(console))
    for n in range(_BURST_LINES * 3):
        records.put(logging.makeLogRecord({"msg": f"línea {n}"}))
    for _ in range(_BURST_LINES + 1):  # the listener's own loop, with more always waiting
        listener.handle(records.get())
    assert console.getvalue().splitlines() == [f"línea {n}" for n in range(_BURST_LINES)]


def test_lines_still_queued_at_stop_are_written() -> None:
    """The stop sentinel behind the last lines: they were formatted but not yet written."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    console = io.StringIO()
    listener = _BurstListener(records, logging.Formatter("%(message)s"), logging.StreamHandler(console))
    for n in range(10):
        records.put(logging.makeLogRecord({"msg": f"línea {n}"}))
    listener.enqueue_sentinel()  # the queue is never empty while the ten lines are handled
    listener.start()
    listener.stop()
    assert console.getvalue().splitlines() == [f"línea {n}" for n in range(10)]


def test_a_line_that_cannot_be_formatted_costs_only_itself(
    logging_handle: Callable[..., tuple[Settings, LoggingHandle]], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, handle = logging_handle(log_format="json")
    log = logging.getLogger("sam.callback")
    log_fields(log, logging.INFO, "antes", fields={})
    log_fields(log, logging.INFO, "rota", fields={"valor": object()})  # not JSON: its line fails
    log_fields(log, logging.INFO, "después", fields={})
    handle.close()
    messages = [json.loads(line)["message"] for line in _lines(settings.log_file)]
    assert "antes" in messages and "después" in messages and "rota" not in messages
    assert "--- Logging error ---" in capsys.readouterr().err


def test_a_line_utf8_cannot_hold_is_escaped_not_lost_with_its_burst(
    logging_handle: Callable[..., tuple[Settings, LoggingHandle]],
) -> None:
    settings, handle = logging_handle()
    log = logging.getLogger("sam.callback")
    for n in range(5):
        # A lone surrogate, as os.fsdecode gives for a path that is not UTF-8.
        log.info("ruta %s", f"/datos/\udcff{n}" if n == 2 else f"/datos/{n}")
    handle.close()
    text = settings.log_file.read_text(encoding="utf-8")
    assert [f"/datos/{n}" in text for n in (0, 1, 3, 4)] == [True] * 4
    assert "/datos/\\udcff2" in text


def test_a_broken_console_costs_the_file_no_line(
    logging_handle: Callable[..., tuple[Settings, LoggingHandle]], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, handle = logging_handle()
    handle.handlers[1].setStream(_BrokenConsole())  # type: ignore[attr-defined]
    log = logging.getLogger("sam.callback")
    for n in range(3):
        log.info("línea %d", n)
        wait_for(lambda n=n: f"línea {n}" in settings.log_file.read_text(encoding="utf-8"), what=f"línea {n}")
    handle.close()
    assert "Broken pipe" in capsys.readouterr().err  # reported as logging reports a failed write


def test_rotation_shared_by_two_processes_loses_nothing(make_settings: Callable[..., Settings]) -> None:
    """Two handlers on one file stand for two workers: the second must not clobber the first's day."""
    settings = make_settings()
    settings.log_directory.mkdir(parents=True)
    first, second = (
        SharedTimedRotatingFileHandler(settings.log_file, when="midnight", backupCount=5, encoding="utf-8")
        for _ in range(2)
    )
    try:
        for handler, text in ((first, "ayer-1"), (second, "ayer-2")):
            handler.emit(logging.makeLogRecord({"msg": text}))
        first.doRollover()  # worker 1 reaches midnight first
        first.emit(logging.makeLogRecord({"msg": "hoy-1"}))
        second.doRollover()  # worker 2 a moment later
        second.emit(logging.makeLogRecord({"msg": "hoy-2"}))
    finally:
        first.close()
        second.close()
    rotated = list(settings.log_directory.glob(f"{settings.log_filename}.*"))
    assert len(rotated) == 1
    assert rotated[0].read_text().split() == ["ayer-1", "ayer-2"]
    assert settings.log_file.read_text().split() == ["hoy-1", "hoy-2"]


def test_real_server_routes_uvicorn_logs_to_the_file_with_request_ids(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory(LOG_BACKUP_COUNT="7").start()
    answer = httpx.get(server.base_url + "/health", headers={"X-Request-ID": "req-uvicorn-1"})
    assert answer.headers["x-request-id"] == "req-uvicorn-1"
    callback = httpx.post(
        server.callback_url,
        json={"deploymentId": "d-srv", "status": "RUN_COMPLETED"},
        headers={**auth_headers(), "X-Request-ID": "req-uvicorn-2"},
    )
    assert callback.status_code == 202
    log_file = tmp_path / "logs" / "sam_callback_server.log"
    wait_for(lambda: "[req-uvicorn-2]" in log_file.read_text(), what="línea del callback en el fichero")
    assert server.stop() == 0
    lines = _lines(log_file)
    assert all(TEXT_LINE.match(line) for line in lines), lines
    assert any(" - uvicorn.error - INFO - " in line and "Application startup complete" in line for line in lines)
    assert any(f"Escuchando en http://127.0.0.1:{server.port} (1 proceso(s))" in line for line in lines)
    assert any(" - uvicorn.access - " in line and "[req-uvicorn-1]" in line and "GET /health" in line for line in lines)
    assert not any(" - uvicorn.access - " in line and "/api/callback" in line for line in lines)
    assert any("sam-callback detenido" in line for line in lines)


@pytest.mark.parametrize(
    "text",
    [
        "callback cliente=10.0.0.1 deploymentId=d-1 estado=RUN_COMPLETED resultado=updated duracion_ms=1.2",
        "postgresql://sam:secreto@db/sam",
        "Driver=x;PwD={a;b};Server=y",
        "AUTHORIZATION: Bearer abc",
        "token eyJhbGciOi.eyJzdWIi.firma",
        "EYJ en mayúsculas",
        "contraseña PaſſWORD=x",  # long s: the regex's case folding matches it to "s"
        "authorızation: x",  # dotless i
        "ñandú sin secretos",
    ],
)
def test_the_quick_secret_check_agrees_with_the_regex(text: str) -> None:
    assert _maybe_secret(text) == (_MAYBE_SECRET.search(text) is not None)


SAM_FORMAT = "%(asctime)s - PID:%(process)d - %(levelname)s - %(name)s - %(funcName)s - %(message)s"


def _one_callback(settings: Settings, request_id: str) -> list[str]:
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/api/callback",
            json={"deploymentId": "d-fmt", "status": "RUN_COMPLETED"},
            headers={**auth_headers(), "X-Request-ID": request_id},
        )
        assert answer.status_code == 202
    return _lines(settings.log_file)


def test_sam_percent_format_with_its_date_format(make_settings: Callable[..., Settings]) -> None:
    """LOG_FORMATO as SAM's services write it: every line in that layout, and the callback names its request id."""
    settings = make_settings(log_format=SAM_FORMAT, log_date_format="%d/%m/%Y %H.%M.%S", log_filename="sam_cb.log")
    lines = _one_callback(settings, "req-sam-fmt-1")
    sam_line = re.compile(r"^\d\d/\d\d/\d{4} \d\d\.\d\d\.\d\d - PID:\d+ - [A-Z]+ - [\w.]+ - \S+ - .*$")
    assert lines and all(sam_line.match(line) for line in lines), lines
    callback = [line for line in lines if "callback cliente=" in line]
    assert len(callback) == 1 and "request_id=req-sam-fmt-1" in callback[0], callback
    assert settings.log_file.name == "sam_cb.log"


def test_percent_format_with_request_id_field_is_not_repeated(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(log_format="%(levelname)s [%(request_id)s] %(message)s")
    lines = _one_callback(settings, "req-own-field")
    callback = [line for line in lines if "callback cliente=" in line]
    assert callback == [line for line in callback if line.startswith("INFO [req-own-field] callback")]
    assert "request_id=req-own-field" not in callback[0]


def test_json_format_with_date_format(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(log_format="json", log_date_format="%Y%m%dT%H%M%S")
    lines = _one_callback(settings, "req-json-fmt")
    entries = [json.loads(line) for line in lines]
    assert all(re.fullmatch(r"\d{8}T\d{6}", entry["time"]) for entry in entries)
    assert any(
        entry.get("request_id") == "req-json-fmt" and entry.get("result") == "pending_match" for entry in entries
    )


def test_level_and_backup_count_are_honoured(make_settings: Callable[..., Settings]) -> None:
    """LOG_NIVEL=WARNING leaves INFO lines out; LOG_BACKUP_CANTIDAD is the number of rotated files kept."""
    settings = make_settings(log_level="warning", log_backup_count=7)
    handle = setup_logging(settings, [TOKEN])
    try:
        rotating = [h for h in handle.handlers if isinstance(h, logging.handlers.TimedRotatingFileHandler)]
        assert [h.backupCount for h in rotating] == [7]
        logging.getLogger("sam.callback").info("línea informativa")
        logging.getLogger("sam.callback").warning("línea de aviso")
    finally:
        handle.close()
    text = settings.log_file.read_text(encoding="utf-8")
    assert "línea de aviso" in text and "línea informativa" not in text


def test_bad_percent_format_stops_the_start_with_one_line(tmp_path: Path) -> None:
    from tests.utils import run_cli

    result = run_cli(tmp_path, CALLBACK_TOKEN=TOKEN, LOG_FORMATO="%(asctime)s %(campo_inexistente)s %(message)s")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error de configuración: LOG_FORMATO/LOG_FORMAT:"), lines
    assert "campo_inexistente" in lines[0]


@pytest.mark.parametrize("log_format", ["text", "json", "%(asctime)s|%(message)s"])
def test_every_line_carries_its_own_second(make_settings: Callable[..., Settings], log_format: str) -> None:
    """Lines of one second share its timestamp; the next second's line shows the next second."""
    from sam.callback.logs import make_formatter

    formatter = make_formatter(make_settings(log_format=log_format, log_date_format="%d/%m/%Y %H:%M:%S"))
    base = 1764500000.0
    for created in (base + 0.1, base + 0.9, base + 1.0, base + 0.5, base + 61.2):
        record = logging.LogRecord("sam.callback", logging.INFO, "", 0, "hola", None, None)
        record.created = created
        record.request_id = "-"
        expected = time.strftime("%d/%m/%Y %H:%M:%S", time.localtime(created))
        text = formatter.format(record)
        shown = json.loads(text)["time"] if log_format == "json" else text.split(" - ")[0].split("|")[0]
        assert shown == expected, created
