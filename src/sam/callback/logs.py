"""Logging: SAM's text layout or JSON, daily rotation, request ids, and secret redaction."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import logging.handlers
import os
import queue
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, cast

from .files import unwritable_reason
from .settings import ConfigError, Settings

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# SAM's own services log in this layout; operators grep for it.
TEXT_FORMAT = "%(asctime)s - PID:%(process)d - %(name)s - %(levelname)s - [%(request_id)s] - %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_MANAGED_LOGGERS = ("sam.callback", "uvicorn", "uvicorn.error", "uvicorn.access")

_SECRET_PATTERNS = (
    # user:password@ in URLs and ODBC strings
    (re.compile(r"(://[^:/@\s]+:)[^@\s]+(@)"), r"\1***\2"),
    (re.compile(r"(?i)\b(PWD|PASSWORD)=(\{[^}]*\}|[^;\s]*)"), r"\1=***"),
    (re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(bearer\s+)?)[^\s,\"'}]+"), r"\1***"),
    (re.compile(r"(?i)(x-authorization[\"']?\s*[:=]\s*[\"']?)[^\s,\"'}]+"), r"\1***"),
    # anything shaped like a JWT
    (re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*"), "***"),
)
# Every pattern above needs one of these substrings: one search rules out most lines, so the
# per-callback line does not pay for five substitutions (the log runs on the request's core).
_MAYBE_SECRET = re.compile(r"(?i)://|pwd|password|authorization|eyj")


def _maybe_secret(text: str) -> bool:
    if text.isascii():
        # Same verdict as _MAYBE_SECRET at a fraction of the cost: a case-insensitive regex scan
        # of each line was the largest part of the per-callback log line. Non-ASCII text keeps
        # the regex, whose case folding matches more than str.lower() does.
        lowered = text.lower()
        return (
            "://" in text or "pwd" in lowered or "password" in lowered or "authorization" in lowered or "eyj" in lowered
        )
    return _MAYBE_SECRET.search(text) is not None


class RedactingFilter(logging.Filter):
    """Adds the request id and removes secrets from every record before it is queued."""

    def __init__(self, secrets: Iterable[str] = (), *, fields: bool = False) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
        # With LOG_FORMAT=json a record's `fields` are written as they are: mask them too. The
        # other formats never show them, and the per-callback line does not pay for it there.
        self.fields = fields

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Mask these values too; earlier ones stay masked (an old token is still a secret)."""
        merged = set(self.secrets) | {s for s in secrets if s and len(s) >= 4}
        self.secrets = sorted(merged, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """Mask known secrets and secret-shaped substrings."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        if not _maybe_secret(text):
            return text
        for pattern, replacement in _SECRET_PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        """Render the message now, redacted, so no handler ever sees the raw arguments."""
        record.request_id = request_id_var.get()
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = self.redact(message)
        record.args = None
        fields = getattr(record, "fields", None) if self.fields else None
        if isinstance(fields, dict):
            record.fields = {
                key: self.redact(value) if isinstance(value, str) else value for key, value in fields.items()
            }
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        record.exc_info = None
        return True


def log_fields(logger: logging.Logger, level: int, msg: str, *args: object, fields: dict[str, Any]) -> None:
    """`logger.log(level, msg, *args, extra={"fields": fields})` without looking for the caller.

    Neither log format shows the source line, and finding it walks the stack on every call: the
    per-callback line is written this way. `fields` become top-level keys with LOG_FORMAT=json.
    """
    if logger.isEnabledFor(level):
        logger.handle(
            logger.makeRecord(logger.name, level, "", 0, msg, args, None, "callback", extra={"fields": fields})
        )


class _RenderedQueueHandler(logging.handlers.QueueHandler):
    """Queues records as the redacting filter left them: already rendered, nothing to copy."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """The stock prepare formats and copies each record again; the filter has done that work."""
        return record


class _SecondClock(logging.Formatter):
    """`formatTime` written once per second: every line of a burst shares the same timestamp text.

    The date formats hold whole seconds (time.strftime has nothing finer), so the text of the
    record's second is exact; converting and formatting the time was 40 % of formatting a line.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock: tuple[int, str | None, str] = (-1, None, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        """The record's time in `datefmt`; without one, logging's own (with milliseconds)."""
        if datefmt is None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached_second, cached_format, text = self._clock
        if second != cached_second or datefmt != cached_format:
            text = super().formatTime(record, datefmt)
            self._clock = (second, datefmt, text)
        return text


class JsonFormatter(_SecondClock):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        """Serialise a record."""
        entry: dict[str, Any] = {
            "time": self.formatTime(record, self.datefmt or DATE_FORMAT),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


class SamFormatter(_SecondClock):
    """A %-style format from LOG_FORMATO, as SAM's services use; names the request id when the format does not."""

    def __init__(self, fmt: str, datefmt: str) -> None:
        super().__init__(fmt, datefmt)
        self.shows_request_id = "%(request_id)" in fmt

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - the logging API's name
        """The format's text; lines written while serving a request say which one."""
        request_id = getattr(record, "request_id", "-")
        if self.shows_request_id or request_id == "-":
            return super().formatMessage(record)
        # The record may reach another handler: change a copy of the message, not the record.
        message = record.message
        record.message = f"{message} request_id={request_id}"
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


def make_formatter(settings: Settings) -> logging.Formatter:
    """The formatter LOG_FORMATO asks for: the service's layout, JSON, or SAM's %-style format."""
    if settings.log_format == "json":
        return JsonFormatter(datefmt=settings.log_date_format)
    if settings.log_format == "text":
        return _SecondClock(TEXT_FORMAT, settings.log_date_format)
    return SamFormatter(settings.log_format, settings.log_date_format)


# A queue that never empties (a long burst of callbacks) still has its lines written this often,
# and never holds more than this many formatted lines in memory.
_BURST_LINES = 256


class _BurstListener(logging.handlers.QueueListener):
    """Formats each record once and writes the lines that arrived together with one write per handler.

    The stock listener offers every record to every handler: per record and per handler a
    lock, a format, a rollover check and a write. For the per-callback line that was a tenth
    of the CPU a callback costs (docs/rendimiento.md). Here a record is formatted once; the
    lines of a burst (until the queue is empty, at most `_BURST_LINES`) go to the file and to
    the console in one write and one flush each. A burst is what arrived while the lines
    before it were being written: nothing waits for more.
    """

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord], formatter: logging.Formatter,
                 *handlers: logging.StreamHandler[Any]) -> None:  # fmt: skip
        super().__init__(records, *handlers, respect_handler_level=False)
        self.formatter = formatter
        self._lines: list[str] = []
        self._last: logging.LogRecord | None = None

    def handle(self, record: logging.LogRecord) -> None:
        """Format one record; write the burst once nothing else is waiting."""
        try:
            self._lines.append(self.formatter.format(record))
            self._last = record
        except Exception:
            # What Handler.emit does with a record it cannot format: report it, keep going.
            self.handlers[0].handleError(record)
        if len(self._lines) >= _BURST_LINES or self.queue.empty():  # type: ignore[attr-defined]
            self.write_burst()

    def write_burst(self) -> None:
        """Write the formatted lines not yet written to every handler, and flush."""
        last = self._last
        if not self._lines or last is None:
            return
        lines, self._lines, self._last = self._lines, [], None
        handler: Any
        for handler in self.handlers:
            text = handler.terminator.join(lines) + handler.terminator
            handler.acquire()
            try:
                # The rotation check the stock emit makes per record, made per burst.
                rotating = isinstance(handler, logging.handlers.TimedRotatingFileHandler)
                if rotating and handler.shouldRollover(last):
                    handler.doRollover()
                handler.stream.write(text)
                handler.flush()
            except Exception:
                # A full disk or a closed console: reported on stderr as logging does, and the
                # next burst tries again; the other handler still gets its lines.
                handler.handleError(last)
            finally:
                handler.release()

    def stop(self) -> None:
        """Stop the thread, then write what it had formatted but not written."""
        super().stop()
        self.write_burst()


class SharedTimedRotatingFileHandler(logging.handlers.TimedRotatingFileHandler):
    """Midnight rotation that stays correct when several worker processes share one file."""

    def doRollover(self) -> None:  # noqa: N802 - the logging API's name
        """Rotate, unless another process sharing the file has already done it for this day."""
        done = self._rotated_name()
        # With CALLBACK_SERVER_WORKERS>1 every worker has its own handler on the same file. The
        # stock handler would delete the day another worker already rotated and rename today's
        # file over it; instead, follow the new file. A failed rename (Windows refuses to rename
        # a file another process holds open) must not retry and fail on every record either.
        if not os.path.exists(done):
            try:
                super().doRollover()
                return
            except OSError as exc:
                sys.stderr.write(f"sam-callback: no se pudo rotar {self.baseFilename}: {exc}\n")
        if self.stream:
            self.stream.close()
            self.stream = None
        # FileHandler's own _open() is private: the same open, from its public attributes.
        stream = open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors)  # noqa: SIM115
        self.stream = cast(io.TextIOWrapper, stream)  # a text mode ("a"): a TextIOWrapper
        self.rolloverAt = self.computeRollover(int(time.time()))

    def _rotated_name(self) -> str:
        # The name the stock doRollover gives the closing period, DST correction included.
        start = self.rolloverAt - self.interval
        when = time.gmtime(start) if self.utc else time.localtime(start)
        if not self.utc and time.localtime()[-1] != when[-1]:
            when = time.localtime(start + (3600 if time.localtime()[-1] else -3600))
        return self.rotation_filename(self.baseFilename + "." + time.strftime(self.suffix, when))


class LoggingHandle:
    """The running log pipeline; `close()` flushes and detaches it."""

    def __init__(
        self,
        listener: logging.handlers.QueueListener,
        handlers: list[logging.Handler],
        queue_handler: logging.Handler,
    ) -> None:
        self.listener = listener
        self.handlers = handlers
        self.queue_handler = queue_handler
        self.closed = False
        self._record_flags = (logging.logThreads, logging.logMultiprocessing)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Mask more values in every record from now on."""
        values = list(secrets)
        for record_filter in self.queue_handler.filters:
            if isinstance(record_filter, RedactingFilter):
                record_filter.add_secrets(values)

    def close(self) -> None:
        """Flush queued records and close the files; a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        for name in _MANAGED_LOGGERS:
            logger = logging.getLogger(name)
            if self.queue_handler in logger.handlers:
                logger.removeHandler(self.queue_handler)
        self.listener.stop()
        logging.logThreads, logging.logMultiprocessing = self._record_flags
        for handler in self.handlers:
            handler.flush()
            handler.close()


def log_file_problem(settings: Settings, *, create: bool = True) -> str | None:
    """Why the log file cannot be created or appended to, or None.

    With `create` (serving) its folders and the file are created; without (`check`), nothing is.
    """
    reason: str | None
    if create:
        try:
            settings.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(settings.log_file, "a", encoding="utf-8"):
                pass
            reason = None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
    else:
        reason = unwritable_reason(settings.log_file)
    if reason is None:
        return None
    return f"LOG_DIRECTORIO/LOG_ARCHIVO_CALLBACK: no se puede escribir el log '{settings.log_file}' ({reason})"


def setup_logging(settings: Settings, secrets: Iterable[str] = ()) -> LoggingHandle:
    """Console plus a midnight-rotated file, fed through a queue so requests never wait on I/O.

    Raises ConfigError when the log file cannot be written (a folder that is a file, a drive
    that does not exist, no permission): one line and exit code 2, not a traceback.
    """
    problem = log_file_problem(settings)
    if problem is not None:
        raise ConfigError([problem])
    formatter = make_formatter(settings)
    file_handler = SharedTimedRotatingFileHandler(
        settings.log_file,
        when="midnight",
        backupCount=settings.log_backup_count,
        # A line UTF-8 cannot hold (a lone surrogate from a path decoded by the OS) is written
        # with an escape, as the console does, instead of failing the write of its whole burst.
        errors="backslashreplace",
        encoding="utf-8",
        delay=False,
    )
    console = logging.StreamHandler(sys.stderr)
    for handler in (file_handler, console):
        handler.setFormatter(formatter)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    queue_handler = _RenderedQueueHandler(records)
    queue_handler.addFilter(RedactingFilter(secrets, fields=settings.log_format == "json"))
    listener = _BurstListener(records, formatter, file_handler, console)
    handle = LoggingHandle(listener, [file_handler, console], queue_handler)
    # Documented switches (logging's "Optimization" notes): neither format shows thread or
    # process names, and every record would look them up. LoggingHandle.close puts them back.
    # A SAM %-format may show them; then they stay on.
    logging.logThreads = "%(thread" in settings.log_format
    logging.logMultiprocessing = "%(processName)" in settings.log_format
    listener.start()
    level = getattr(logging, settings.log_level)
    for name in _MANAGED_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.setLevel(level)
        if name in ("sam.callback", "uvicorn"):
            logger.addHandler(queue_handler)
        logger.propagate = name not in ("sam.callback", "uvicorn")
    # No filter for uvicorn's access line of a callback: the HTTP protocol (protocols.py, in every
    # mode) switches it off per request, since the endpoint writes its own line.
    return handle


def secrets_of(settings: Settings) -> list[str]:
    """Values that must never appear in a log line."""
    values = [*settings.tokens, settings.sql_pwd or "", *settings.gateway_client_ids]
    values.append(settings.email_password or "")
    return [value for value in values if value]
