"""uvicorn's access line, one a request, without the logging machinery while logging is
configured as ``observability.log_config`` configures it: the same bytes for a fraction of the
CPU (a LogRecord, the caller's lookup, filters and a formatter cost more than the rest of a
plain request's logging). GatewayHttpProtocol installs ``access_logger(...)``."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from jobstream.observability import (
    JSON_ENCODER,
    PLAIN_FORMAT,
    BatchedStderr,
    ContextIds,
    JsonFormatter,
    PlainFormatter,
    RedactTokens,
    job_id,
    json_fields,
    local_second,
    request_id,
    utc_second,
    with_ids,
)
from jobstream.redaction import redact


class AccessLog:
    """uvicorn's access logger (``uvicorn.access``), for a fraction of the cost of a line: with
    jobstream's own logging configuration, the line is formatted here exactly as the logging path
    formats it (the redaction by the logger's and the handler's RedactTokens, the ids, the
    PlainFormatter or JsonFormatter line, the time as a LogRecord takes it) and handed to the
    BatchedStderr handler: no caller lookup, LogRecord, filter or handler chain.
    GatewayHttpProtocol installs it as the ``access_logger`` uvicorn hands each request's cycle,
    which calls only ``info``.

    With any other configuration (another handler or filter, another formatter or level, pytest's
    caplog, a patched ``Logger.callHandlers`` such as Sentry's LoggingIntegration makes for its
    breadcrumbs, a LogRecord factory), or arguments this path does not take (``exc_info``,
    ``extra``, one mapping), it calls the logger itself, so nothing configured is lost. Each line
    checks that the configuration found is still the one in place (identities, levels, flags), so
    configuring logging anew at run time takes effect from the next line."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._route: _Route | None = None

    def __getattr__(self, name: str) -> Any:  # anything else is the logger's
        return getattr(self.logger, name)

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        route = self._route
        if route is None or not route.holds(self.logger):
            route = self._route = _Route.of(self.logger)
        if route is not None and not kwargs and not (len(args) == 1 and isinstance(args[0], Mapping) and args[0]):
            try:
                line = self._line(msg, args, route)
            except Exception:  # the logging path writes it, or reports why it cannot
                pass
            else:
                route.handler.write_line(line)
                return
        self.logger.info(msg, *args, **kwargs)

    def _line(self, msg: object, args: tuple[object, ...], route: _Route) -> str:
        passes = route.redactions  # RedactTokens filters: on the logger (dictConfig adds one each time) and handler
        if args:
            args = tuple([_redact(arg, passes) if isinstance(arg, str) else arg for arg in args])
            message = str(msg) % args
        else:
            message = str(_redact(msg, passes) if isinstance(msg, str) else msg)
        request, job = (request_id.get(), job_id.get()) if route.ids else (None, None)  # ContextIds
        created, msecs = _record_time()
        level, name = logging.getLevelName(logging.INFO), self.logger.name
        if route.plain:  # PLAIN_FORMAT, with logging's default_msec_format
            return with_ids(f"{local_second(created)},{int(msecs):03d} {level} {name}: {message}", request, job)
        stamp = utc_second(created) + f".{int(msecs):03d}Z"
        fast = _json_request_line(stamp, level, name, message, args, request, job)
        if fast is not None:
            return fast
        line = json_fields(created, msecs, level, name, message, args)
        if request is not None:
            line["request_id"] = request
        if job is not None:
            line["job_id"] = job
        return JSON_ENCODER.encode(line)


#: How ``json.dumps`` writes a str (``ensure_ascii``).
_json_str = json.encoder.encode_basestring_ascii


def _json_request_line(
    stamp: str, level: str, name: str, message: str, args: tuple[object, ...], request: object, job: object
) -> str | None:
    """JsonFormatter's line for an access line, as ``json.dumps`` would write its dict, in a
    third of the time; None unless every value is a str (the status an int)."""
    if name != "uvicorn.access" or len(args) != 5:
        return None
    client, method, path, _, status = args
    if not (
        type(client) is str
        and type(method) is str
        and type(path) is str
        and type(status) is int
        and (request is None or type(request) is str)
        and (job is None or type(job) is str)
    ):
        return None
    parts = [
        '{"time": ', _json_str(stamp),
        ', "level": ', _json_str(level.lower()),
        ', "logger": ', _json_str(name),
        ', "message": ', _json_str(message),
        ', "event": "request", "method": ', _json_str(method),
        ', "path": ', _json_str(path),
        ', "status": ', repr(status),
        ', "client": ', _json_str(client),
    ]  # fmt: skip
    if request is not None:
        parts += (', "request_id": ', _json_str(request))
    if job is not None:
        parts += (', "job_id": ', _json_str(job))
    parts.append("}")
    return "".join(parts)


class _Route:
    """Where a logger's INFO lines go when AccessLog may write them itself: the one BatchedStderr
    handler they reach, configured as ``log_config`` configures it, and what must stay as it was
    found for that to hold."""

    def __init__(self, logger: logging.Logger, chain: list[logging.Logger], handler: BatchedStderr) -> None:
        self.handler = handler
        self.plain = type(handler.formatter) is not JsonFormatter
        filters = [*logger.filters, *handler.filters]
        self.redactions = sum(type(f) is RedactTokens for f in filters)
        self.ids = any(type(f) is ContextIds for f in filters)
        self._filters = list(logger.filters)
        #: Each logger a line passes (the logger, then those it propagates to), the next one (None
        #: for the last), and its handlers.
        self._links = [
            (node, above, list(node.handlers)) for node, above in zip(chain, [*chain[1:], None], strict=True)
        ]
        self._handler_filters = list(handler.filters)
        self._formatter = handler.formatter

    @classmethod
    def of(cls, logger: logging.Logger) -> _Route | None:
        if (
            _CALL_HANDLERS is None
            or logging.Logger.callHandlers is not _CALL_HANDLERS
            or logging.getLogRecordFactory() is not logging.LogRecord
            or type(logger) is not logging.Logger
            or logger.disabled
            or not logger.isEnabledFor(logging.INFO)
            or not _own_filters(logger)
        ):
            return None
        chain = [logger]
        while chain[-1].propagate and chain[-1].parent is not None:
            chain.append(chain[-1].parent)
        handlers = [handler for node in chain for handler in node.handlers]
        handler = handlers[0] if len(handlers) == 1 else None
        if (
            type(handler) is not BatchedStderr
            or handler.level > logging.INFO
            or not _own_filters(handler)
            or not (type(handler.formatter) is JsonFormatter or _plain_as_configured(handler.formatter))
        ):
            return None
        return cls(logger, chain, handler)

    def holds(self, logger: logging.Logger) -> bool:
        """Whether the logger's lines still go there alone, and as they did (cheap: once a line)."""
        if not (
            logging.Logger.callHandlers is _CALL_HANDLERS
            and logging.getLogRecordFactory() is logging.LogRecord
            and logger.isEnabledFor(logging.INFO)
            and not logger.disabled
            and logger.filters == self._filters
        ):
            return False
        for node, above, handlers in self._links:
            if node.handlers != handlers:
                return False
            if above is None:
                if node.propagate and node.parent is not None:
                    return False
            elif not node.propagate or node.parent is not above:
                return False
        handler = self.handler
        return (
            handler.level <= logging.INFO
            and handler.filters == self._handler_filters
            and handler.formatter is self._formatter
        )


def _plain_as_configured(formatter: logging.Formatter | None) -> bool:
    return (
        type(formatter) is PlainFormatter
        and formatter._fmt == PLAIN_FORMAT
        and type(formatter._style) is logging.PercentStyle
        and not getattr(formatter._style, "_defaults", None)
        and formatter.datefmt is None
        and formatter.converter is time.localtime
        and formatter.default_time_format == "%Y-%m-%d %H:%M:%S"
        and formatter.default_msec_format == "%s,%03d"
    )


def _own_filters(filterer: logging.Filterer) -> bool:
    """Only jobstream's filters, which AccessLog applies itself (in any order: they touch different
    fields; ContextIds more than once is once)."""
    return all(type(f) is RedactTokens or type(f) is ContextIds for f in filterer.filters)


#: Texts that redaction leaves as they are (methods, versions, clients, most paths), so that the
#: next line sharing them skips it; bounded. Only texts written as they are, so no secret is kept.
_UNREDACTED: set[str] = set()
_UNREDACTED_MAX = 4096


def _redact(text: str, passes: int) -> str:
    """``redact`` applied ``passes`` times, as that many RedactTokens filters apply it. A second
    pass is not always idle: redacting can make a parameter's name credential-like
    (``?beareeyJ.a.b=x`` becomes ``?beareREDACTED=x``, and its value goes too)."""
    if not passes or text in _UNREDACTED:
        return text
    redacted = redact(text)
    if redacted == text:
        if len(_UNREDACTED) >= _UNREDACTED_MAX:
            _UNREDACTED.clear()
        _UNREDACTED.add(text)
        return text
    for _ in range(passes - 1):
        again = redact(redacted)
        if again == redacted:
            break
        redacted = again
    return redacted


if sys.version_info >= (3, 13):

    def _record_time() -> tuple[float, float]:
        """``created`` and ``msecs`` as LogRecord takes them."""
        ns = time.time_ns()
        created, msecs = ns / 1e9, (ns % 1_000_000_000) // 1_000_000 + 0.0
        if msecs == 999.0 and int(created) != ns // 1_000_000_000:
            msecs = 0.0
        return created, msecs

else:

    def _record_time() -> tuple[float, float]:
        """``created`` and ``msecs`` as LogRecord takes them."""
        created = time.time()
        return created, int((created - int(created)) * 1000) + 0.0


#: The standard library's ``Logger.callHandlers`` (None if something patched it before this import).
_CALL_HANDLERS = logging.Logger.callHandlers if logging.Logger.callHandlers.__module__ == "logging" else None


#: One AccessLog per logger, shared by every connection.
_access_logs: dict[logging.Logger, AccessLog] = {}


def access_logger(logger: logging.Logger) -> AccessLog:
    """The AccessLog standing in for ``logger`` (uvicorn's ``uvicorn.access``)."""
    access = _access_logs.get(logger)
    if access is None:
        access = _access_logs.setdefault(logger, AccessLog(logger))
    return access
