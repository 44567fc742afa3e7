"""Logging set-up: plain or JSON lines, each carrying the request id and job id it belongs to,
with read tokens kept out. Import-safe (nothing happens until a function is called)."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import logging.config
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from jobstream import sentry
from jobstream.redaction import redact

logger = logging.getLogger("jobstream.jobs")

#: Set on an exception once it has been logged (an attribute: exceptions take no weak references).
_LOGGED = "_jobstream_logged"


#: The request (X-Request-ID) and the job a log line belongs to, wherever it is logged from.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

#: LogRecord attributes that are not extra fields.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


def job_transition(transition: str, job: str, **fields: Any) -> None:
    """A step of a job's life (created, started, completed, failed, cancelled, reclaimed): one log
    line, and a breadcrumb for Sentry."""
    logger.info("job %s %s", job, transition, extra={"event": f"job.{transition}", "job_id": job, **fields})
    sentry.job_breadcrumb(transition, job, **fields)


class RedactTokens(logging.Filter):
    """Keep credentials out of log lines: uvicorn's access lines carry each request's query, where
    EventSource passes its read token (``?token=``) and a careless client may pass anything else
    (``?api_key=``, ``?tok%65n=``). Every string argument is redacted, and a message that came
    without arguments (already formatted) too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        elif not record.args and isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def mark_logged(exc: BaseException) -> None:
    """Note that ``exc`` has been logged with its request's context (see SkipLoggedErrors)."""
    with contextlib.suppress(Exception):
        setattr(exc, _LOGGED, True)


class SkipLoggedErrors(logging.Filter):
    """On uvicorn's error logger: skip its "Exception in ASGI application" for an exception the
    app already logged. Starlette re-raises every unhandled exception after its handler answered
    500 (errors.handle_unexpected, which logs it with the request id), so that the server may log
    it; once is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not getattr(exc, _LOGGED, False)


class ContextIds(logging.Filter):
    """Stamp each record with the current request id and job id (an explicit ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the ids, and any ``extra`` fields.
    uvicorn's access lines become method, path, status and client fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = json_fields(
            record.created, record.msecs, record.levelname, record.name, record.getMessage(), record.args
        )
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRIBUTES and value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return JSON_ENCODER.encode(line)


#: ``json.dumps(line, default=str)``, without building an encoder for each line.
JSON_ENCODER = json.JSONEncoder(default=str)


def json_fields(created: float, msecs: float, level: str, name: str, message: str, args: object) -> dict[str, Any]:
    line: dict[str, Any] = {
        "time": utc_second(created) + f".{int(msecs):03d}Z",
        "level": level.lower(),
        "logger": name,
        "message": message,
    }
    if name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
        client, method, path, _, status = args
        line |= {"event": "request", "method": method, "path": path, "status": status, "client": client}
    return line


#: The line format of PlainFormatter (the access fast path writes it only when it is this one).
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class PlainFormatter(logging.Formatter):
    """The classic line, with the ids appended when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        return with_ids(super().format(record), getattr(record, "request_id", None), getattr(record, "job_id", None))


def with_ids(text: str, request: object, job: object) -> str:
    if request:
        return f"{text} [request_id={request} job_id={job}]" if job else f"{text} [request_id={request}]"
    return f"{text} [job_id={job}]" if job else text


class _SecondText:
    """``time.strftime(fmt, convert(t))`` kept for the second it was made for: consecutive lines
    nearly always share their second. One (second, text) pair, replaced whole (threads log too)."""

    def __init__(self, fmt: str, convert: Callable[[float], time.struct_time]) -> None:
        self._fmt, self._convert = fmt, convert
        self._cached: tuple[int, str] = (-1, "")

    def __call__(self, created: float) -> str:
        second, text = self._cached
        if int(created) != second:  # what localtime/gmtime truncate to
            text = time.strftime(self._fmt, self._convert(created))
            self._cached = (int(created), text)
        return text


#: logging's default formatTime without its milliseconds (local time), and the JSON lines' (UTC).
local_second = _SecondText("%Y-%m-%d %H:%M:%S", time.localtime)
utc_second = _SecondText("%Y-%m-%dT%H:%M:%S", time.gmtime)


class BatchedStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, written in batches: one line per request made a write (a system call) per request,
    a sizeable share of a plain request's cost. Lines wait at most FLUSH_S (or until BATCH_BYTES
    pile up); a WARNING or worse is written at once, with what waited before it, and whatever
    waits is written at exit (logging's own shutdown flushes every handler). A process killed
    outright loses at most the last FLUSH_S of INFO lines."""

    FLUSH_S = 0.1
    BATCH_BYTES = 64 * 1024

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self._pending: list[str] = []
        self._size = 0
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with the handler's lock held
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._add(line, record.levelno)

    def write_line(self, line: str, levelno: int = logging.INFO) -> None:
        """A line formatted elsewhere (the access log's fast path, AccessLog), batched as ``emit``
        batches its own."""
        with self.lock if self.lock is not None else contextlib.nullcontext():
            self._add(line + self.terminator, levelno)

    def _add(self, line: str, levelno: int) -> None:
        self._pending.append(line)
        self._size += len(line)
        if levelno >= logging.WARNING or self._size >= self.BATCH_BYTES:
            self._write_out()
        elif not self._wake.is_set():
            self._wake.set()
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_soon, name="log-flusher", daemon=True)
                self._flusher.start()

    def flush(self) -> None:
        with self.lock if self.lock is not None else contextlib.nullcontext():
            self._write_out()

    def _write_out(self) -> None:
        if self._pending:
            lines, self._pending, self._size = "".join(self._pending), [], 0
            with contextlib.suppress(ValueError, OSError):  # stderr closed at exit
                self.stream.write(lines)
                self.stream.flush()

    def _flush_soon(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.FLUSH_S)
            self._wake.clear()
            self.flush()


def configure_logging(level: str, log_format: str = "plain") -> None:
    """A process's logging, once, before anything logs: ``log_config``, and records without what
    no line of jobstream's shows (the caller's file and line, thread, process and task names):
    logging's own documented switches, which take a fifth off every line."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12+
        logging.logAsyncioTasks = False
    logging.config.dictConfig(log_config(level, log_format))


def log_config(level: str, log_format: str = "plain") -> dict[str, Any]:
    """The logging dictConfig of `serve`, `worker` and `dev` (configure_logging applies it)."""
    formatter = {"()": JsonFormatter} if log_format == "json" else {"()": PlainFormatter, "format": PLAIN_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "redact": {"()": RedactTokens},
            "ids": {"()": ContextIds},
            "skip_logged": {"()": SkipLoggedErrors},
        },
        "formatters": {"line": formatter},
        "handlers": {
            "stderr": {"()": BatchedStderr, "formatter": "line", "filters": ["redact", "ids"]},
        },
        "loggers": {
            "jobstream": {"level": level.upper()},
            "uvicorn": {"level": level.upper()},
            "uvicorn.error": {"filters": ["skip_logged"]},
            "uvicorn.access": {"level": level.upper(), "filters": ["redact"]},
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }
