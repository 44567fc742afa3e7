"""The access line's fast path (accesslog.AccessLog): byte for byte the line the logging path
writes, taken with jobstream's own logging configuration and only then."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from jobstream.accesslog import AccessLog, access_logger
from jobstream.observability import BatchedStderr, job_id, log_config, request_id
from tests.helpers import serve_one

#: uvicorn's access line (RequestResponseCycle.send).
ACCESS = '%s - "%s %s HTTP/%s" %d'
#: A fixed clock: a second's last millisecond, where the float arithmetic of msecs is delicate.
NOW_NS = 1_767_225_599_999_499_000
#: Loggers whose state log_config sets, restored after each test.
LOGGERS = ("", "jobstream", "uvicorn", "uvicorn.error", "uvicorn.access")


@dataclass
class Logs:
    format: str
    handler: BatchedStderr
    stream: io.StringIO
    stock: logging.Logger
    fast: AccessLog
    records: list[str]  # names of the loggers that made a LogRecord

    def lines(self) -> list[str]:
        self.handler.flush()
        lines = self.stream.getvalue().splitlines()
        self.stream.seek(0)
        self.stream.truncate()
        return lines

    def both(self, msg: str, *args: object) -> str:
        """The line the logging path writes and the one the fast path writes, which must be one."""
        self.stock.info(msg, *args)
        assert self.records == ["uvicorn.access"]
        self.fast.info(msg, *args)
        assert self.records == ["uvicorn.access"], "the fast path made a LogRecord"
        self.records.clear()
        stock, fast = self.lines()
        assert fast == stock
        return fast


@pytest.fixture(params=["plain", "json", "plain-twice"])
def logs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Logs]:
    """Logging configured as `serve` configures it (log_config applied once; "twice" as a
    configuration applied again leaves it: each filter on the logger twice), stderr replaced by a
    buffer, the clock fixed, LogRecords counted.

    pytest adds its capture handlers to the root logger for each test's call: with them the
    configuration is not jobstream's, and the fast path rightly steps aside. They are kept out
    here (the caplog test adds one on purpose)."""
    saved = {name: _logger_state(logging.getLogger(name)) for name in LOGGERS}
    root = logging.getLogger()

    def add_handler(handler: logging.Handler) -> None:
        if not _pytests(handler):
            logging.Logger.addHandler(root, handler)

    root.addHandler = add_handler  # type: ignore[method-assign,assignment]
    # dictConfig would close every handler in the process (pytest's own among them); this keeps them open.
    monkeypatch.setattr(logging.config, "_clearExistingHandlers", lambda: None)
    try:
        for name in LOGGERS:  # as a new process has them (a LiveStack leaves uvicorn's own config behind)
            _restore(logging.getLogger(name), (logging.NOTSET, [], [], True, False))
        log_format, _, twice = request.param.partition("-")
        for _ in range(2 if twice else 1):
            logging.config.dictConfig(log_config("info", log_format))
        [handler] = root.handlers
        assert isinstance(handler, BatchedStderr)
        stream = io.StringIO()
        handler.setStream(stream)
        monkeypatch.setattr(time, "time_ns", lambda: NOW_NS)
        monkeypatch.setattr(time, "time", lambda: NOW_NS / 1e9)
        records: list[str] = []
        make_record = logging.Logger.makeRecord

        def counting(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
            records.append(self.name)
            return make_record(self, *args, **kwargs)

        monkeypatch.setattr(logging.Logger, "makeRecord", counting)
        stock = logging.getLogger("uvicorn.access")
        yield Logs(log_format, handler, stream, stock, AccessLog(stock), records)
        handler.flush()
    finally:
        del root.addHandler
        for name, state in saved.items():
            _restore(logging.getLogger(name), state)


def _pytests(handler: logging.Handler) -> bool:
    return type(handler).__module__.startswith("_pytest")


def _logger_state(logger: logging.Logger) -> tuple[Any, ...]:
    handlers = [handler for handler in logger.handlers if not _pytests(handler)]  # pytest removes its own
    return logger.level, handlers, list(logger.filters), logger.propagate, logger.disabled


def _restore(logger: logging.Logger, state: tuple[Any, ...]) -> None:
    level, handlers, filters, logger.propagate, logger.disabled = state
    logger.setLevel(level)
    logger.handlers[:], logger.filters[:] = handlers, filters


def _args(
    path: str = "/v1/jobs/8d3c2a9e-4b1f-4e55-9a6b-0c1d2e3f4a5b",
    query: bytes = b"",
    client: tuple[str, int] | None = ("127.0.0.1", 53412),
    method: str = "GET",
    status: int = 200,
) -> tuple[object, ...]:
    """uvicorn's arguments for the access line of a request (RequestResponseCycle.send)."""
    scope: Any = {"path": path, "query_string": query, "client": client}
    return get_client_addr(scope), method, get_path_with_query_string(scope), "1.1", status


@pytest.fixture
def ids() -> Iterator[Callable[[str | None, str | None], None]]:
    tokens: list[tuple[Any, Any]] = []

    def set_ids(request: str | None, job: str | None) -> None:
        tokens.append((request_id.set(request), job_id.set(job)))

    yield set_ids
    for request_token, job_token in reversed(tokens):
        request_id.reset(request_token)
        job_id.reset(job_token)


# ---- byte for byte


def test_fastPath_whenPlainRequest_thenTheLoggingPathsLine(logs: Logs) -> None:
    line = logs.both(ACCESS, *_args())
    path = "/v1/jobs/8d3c2a9e-4b1f-4e55-9a6b-0c1d2e3f4a5b"
    message = f'127.0.0.1:53412 - "GET {path} HTTP/1.1" 200'
    if logs.format == "plain":
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(NOW_NS // 10**9))
        assert line == f"{stamp},999 INFO uvicorn.access: {message}"
    else:
        assert json.loads(line) == {
            "time": "2025-12-31T23:59:59.999Z",
            "level": "info",
            "logger": "uvicorn.access",
            "message": message,
            "event": "request",
            "method": "GET",
            "path": path,
            "status": 200,
            "client": "127.0.0.1:53412",
        }


JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLW9mLWEtdG9rZW4"


@pytest.mark.parametrize(
    "query",
    [
        f"token={JWT}&last_event_id=1-0".encode(),
        b"after=0-0&api_key=s3cr3t&tok%65n=s3cr3t&Access-Token=s3cr3t&password=s3cr3t&limit=5",
        f"x={JWT}".encode(),
        # Redacting twice (logger and handler) is not redacting once: the JWT in the name goes
        # first, and what is left of the name ("beare" + "REDACTED") names a bearer credential.
        f"beare{JWT}=s3cr3t".encode(),
    ],
)
def test_fastPath_whenCredentialsInQuery_thenRedactedAsTheLoggingPathRedacts(logs: Logs, query: bytes) -> None:
    line = logs.both(ACCESS, *_args(path="/v1/jobs/abc/events", query=query))
    assert "s3cr3t" not in line and JWT not in line and "REDACTED" in line


def test_fastPath_whenMessageHasNoArguments_thenRedactedAsTheLoggingPathRedacts(logs: Logs) -> None:
    line = logs.both("GET /v1/jobs/abc/poll?token=s3cr3t")
    assert "s3cr3t" not in line


@pytest.mark.parametrize(
    ("request_value", "job_value"),
    [("req-abc.123", None), (None, "8d3c2a9e"), ("req-abc.123", "8d3c2a9e"), ("", ""), (None, None)],
)
def test_fastPath_whenRequestAndJobIds_thenTheLoggingPathsIds(
    logs: Logs, ids: Callable[[str | None, str | None], None], request_value: str | None, job_value: str | None
) -> None:
    ids(request_value, job_value)
    line = logs.both(ACCESS, *_args(method="POST", path="/v1/jobs", status=201))
    if request_value:
        assert "req-abc.123" in line


@pytest.mark.parametrize(
    ("path", "query", "client"),
    [
        ("/v1/jobs/é ü/ñ", b"q=%C3%A9&name=Zo%C3%AB", ("127.0.0.1", 1)),  # uvicorn quotes the path
        ('/v1/jobs/"quoted"\\back', b"", ("::1", 59000)),  # IPv6
        ("/healthz", b"", None),  # no client (a Unix socket)
    ],
)
def test_fastPath_whenUnusualPathsAndClients_thenTheLoggingPathsLine(
    logs: Logs, path: str, query: bytes, client: tuple[str, int] | None
) -> None:
    logs.both(ACCESS, *_args(path=path, query=query, client=client, status=404))


@pytest.mark.parametrize("now_ns", [1_767_225_600_000_000_000, 1_767_225_600_000_999_999, 1_700_000_000_123_456_789])
def test_fastPath_whenAnyMillisecond_thenTheLoggingPathsTime(
    logs: Logs, monkeypatch: pytest.MonkeyPatch, now_ns: int
) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: now_ns)
    monkeypatch.setattr(time, "time", lambda: now_ns / 1e9)
    logs.both(ACCESS, *_args())


def test_fastPath_whenArgumentsItCannotFormat_thenTheLoggingPathDoes(logs: Logs) -> None:
    logs.fast.info("%(a)s", {"a": 1})  # one mapping: logging's named arguments
    logs.fast.info("with extra", extra={"event": "x"})
    assert logs.records == ["uvicorn.access", "uvicorn.access"]
    assert len(logs.lines()) == 2


# ---- taken only with jobstream's own configuration


def test_fastPath_whenForeignHandler_thenTheLoggingPathAndBothHandlersGetTheLine(logs: Logs) -> None:
    foreign = io.StringIO()
    extra = logging.StreamHandler(foreign)
    for holder in (logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("uvicorn.access")):
        holder.addHandler(extra)
        try:
            logs.fast.info(ACCESS, *_args())
        finally:
            holder.removeHandler(extra)
        assert logs.records == ["uvicorn.access"], holder.name
        logs.records.clear()
        assert len(logs.lines()) == 1
    assert foreign.getvalue().count("GET /v1/jobs/") == 3
    logs.fast.info(ACCESS, *_args())  # the fast path again, once the handler is gone
    assert logs.records == [] and len(logs.lines()) == 1


def test_fastPath_whenCaplog_thenCaplogGetsTheRecord(logs: Logs, caplog: pytest.LogCaptureFixture) -> None:
    logging.Logger.addHandler(logging.getLogger(), caplog.handler)  # past the fixture's guard
    logs.fast.info(ACCESS, *_args())
    logging.getLogger().removeHandler(caplog.handler)
    assert [record.name for record in caplog.records] == ["uvicorn.access"]
    assert len(logs.lines()) == 1


@pytest.mark.parametrize("where", ["logger", "handler"])
def test_fastPath_whenForeignFilter_thenTheLoggingPathAppliesIt(logs: Logs, where: str) -> None:
    def mark(record: logging.LogRecord) -> bool:
        record.msg = "marked " + str(record.msg)
        return True

    holder = logs.stock if where == "logger" else logs.handler
    holder.addFilter(mark)
    try:
        logs.fast.info(ACCESS, *_args())
    finally:
        holder.removeFilter(mark)
    assert logs.records == ["uvicorn.access"]
    assert "marked 127.0.0.1" in logs.lines()[0]


def test_fastPath_whenCallHandlersPatched_thenTheLoggingPathFeedsThePatch(
    logs: Logs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Sentry's LoggingIntegration patches it, to make breadcrumbs of log lines."""
    seen: list[str] = []
    call_handlers = logging.Logger.callHandlers

    def patched(self: logging.Logger, record: logging.LogRecord) -> None:
        call_handlers(self, record)
        seen.append(record.getMessage())

    monkeypatch.setattr(logging.Logger, "callHandlers", patched)
    logs.fast.info(ACCESS, *_args())
    assert len(seen) == 1 and len(logs.lines()) == 1


def test_fastPath_whenOtherFormatterOrRecordFactory_thenTheLoggingPath(logs: Logs) -> None:
    formatter = logs.handler.formatter
    logs.handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    try:
        logs.fast.info(ACCESS, *_args())
    finally:
        logs.handler.setFormatter(formatter)
    assert logs.lines()[0].startswith("INFO 127.0.0.1")
    factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(lambda *args, **kwargs: factory(*args, **kwargs))
    try:
        logs.fast.info(ACCESS, *_args())
    finally:
        logging.setLogRecordFactory(factory)
    assert logs.records == ["uvicorn.access", "uvicorn.access"] and len(logs.lines()) == 1


def test_fastPath_whenLevelAboveInfoOrLoggingDisabled_thenNoLine(logs: Logs) -> None:
    logs.stock.setLevel(logging.WARNING)
    logs.fast.info(ACCESS, *_args())
    logs.stock.setLevel(logging.INFO)
    logging.disable(logging.INFO)
    try:
        logs.fast.info(ACCESS, *_args())
    finally:
        logging.disable(logging.NOTSET)
    assert logs.lines() == [] and logs.records == []


def test_fastPath_whenWarningLoggedAfter_thenTheAccessLineIsWrittenFirst(logs: Logs) -> None:
    logs.fast.info(ACCESS, *_args())
    logging.getLogger("jobstream.test").warning("after the request")
    first, second = logs.stream.getvalue().splitlines()  # no flush: a warning writes what waited
    assert "GET /v1/jobs/" in first and "after the request" in second


# ---- through uvicorn's protocol


async def _app(scope: Any, receive: Any, send: Any) -> None:
    request_id.set("req-through-uvicorn")  # as the app's RequestId middleware sets it
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _serve_one(request: bytes, *, stock: bool = False, **config: Any) -> bytes:
    """One request through GatewayHttpProtocol, as uvicorn runs it (with the stock logger if ``stock``)."""
    stock_logger = logging.getLogger("uvicorn.access") if stock else None
    writes = serve_one(_app, request, until=b"ok", peer=("::1", 59000), access_logger=stock_logger, **config)
    return b"".join(writes)


REQUEST = b"GET /v1/jobs/abc/events?token=s3cr3t&after=0-0 HTTP/1.1\r\nhost: gw\r\n\r\n"


def test_protocol_whenRequestAnswered_thenTheFastPathWritesTheStockLine(logs: Logs) -> None:
    assert _serve_one(REQUEST).startswith(b"HTTP/1.1 200 OK")
    assert logs.records == []  # no LogRecord, for the access line or anything else
    [fast] = logs.lines()
    _serve_one(REQUEST, stock=True)
    assert logs.records == ["uvicorn.access"]
    [stock] = logs.lines()
    assert fast == stock
    assert "::1:59000" in fast and "token=REDACTED&after=0-0" in fast and "req-through-uvicorn" in fast


def test_protocol_whenAccessLogOff_thenNoLine(logs: Logs) -> None:
    assert _serve_one(REQUEST, access_log=False).startswith(b"HTTP/1.1 200 OK")
    assert logs.lines() == [] and logs.records == []


def test_accessLogger_isOnePerLogger_andDelegatesTheRest() -> None:
    logger = logging.getLogger("uvicorn.access")
    assert access_logger(logger) is access_logger(logger)
    assert access_logger(logger).name == "uvicorn.access"
    assert access_logger(logger).hasHandlers() == logger.hasHandlers()
    assert access_logger(logging.getLogger("tests.other")) is not access_logger(logger)
