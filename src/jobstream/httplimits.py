"""Bounds on what a client can make a gateway hold before its request reaches the app: how large a
request head may be, and how long a request may take to arrive.

uvicorn's httptools protocol has neither. httptools keeps an unfinished header in memory however
long it grows (an 8 MB header was answered 200; five connections sending 20 MiB of unfinished
headers each took a gateway from 73 to 205 MB), and a connection that sends half a request line
and stalls stays open for good (uvicorn's keep-alive timeout only runs between requests).

- ``GatewayHttpProtocol`` counts the bytes of each request head as they arrive and, past
  ``MAX_HEAD_BYTES``, answers 431 and closes the connection: httptools never holds more. It
  gives each request ``request_timeout_s`` to arrive whole (line, headers, body), from its first
  byte (from the connection's opening, for the first request): past it, 408 and close (or just
  close, if nothing of the request came).
- ``HeaderLimit`` is the API's own rule, at the app: headers (names and values) over
  ``MAX_HEADER_BYTES`` in all are 431. It holds whatever server runs the app.

``GatewayHttpProtocol`` also hands uvicorn a cheaper access logger (accesslog.AccessLog).
``uvicorn_options(settings)`` are the ``uvicorn.Config`` arguments every launch mode passes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from http import HTTPStatus
from typing import Any, ClassVar

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from jobstream.accesslog import access_logger
from jobstream.errors import PROBLEM_MEDIA_TYPE, problem_response
from jobstream.settings import Settings

logger = logging.getLogger("jobstream.http")

#: Request headers, names and values, in all (API.md): more is 431.
MAX_HEADER_BYTES = 16 * 1024
#: A request head as sent (request line, headers, their framing): past this the connection is
#: answered 431 and closed before the head is complete. Above MAX_HEADER_BYTES by room for a long
#: request line (`/v1/events?jobs=` of 100 ids and a cursor is ~8 KiB), so that what the API
#: allows always reaches the app, and what it refuses is refused by HeaderLimit, with the same answer.
MAX_HEAD_BYTES = 32 * 1024


def _problem_bytes(status: int, slug: str, detail: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole problem+json response that closes the connection, written by the protocol itself."""
    body = json.dumps(
        {
            "type": f"https://jobstream.dev/problems/{slug}",
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
        }
    ).encode()
    head = [STATUS_LINE[status]]
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    head += [
        b"content-type: " + PROBLEM_MEDIA_TYPE.encode() + b"\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + body


class OneSendPerAnswer:
    """The connection's transport as uvicorn's protocol sees it, with one change: a response's
    head is held until its body's first write, or the end of this turn of the event loop, and
    both go out in one send. uvicorn writes them apart, two system calls and two segments (two
    wake-ups of the client) for every plain answer, where one does: a sizeable share of a small
    answer's CPU on a VM. Order is kept whatever comes (held bytes always go first), and only
    writes that begin with a status line are held, so an event stream's frames go out as written."""

    __slots__ = ("_transport", "_held", "_loop")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._loop = loop

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data.startswith(_STATUS_LINE_START):
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._transport, name)


_STATUS_LINE_START = b"HTTP/1.1 "


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head and a deadline for each request,
    and a cheaper access line (accesslog.AccessLog)."""

    max_head_bytes: ClassVar[int] = MAX_HEAD_BYTES
    request_timeout_s: ClassVar[float] = 15.0

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # What uvicorn hands each request's cycle for its access line: the same logger, written
        # for a fraction of the cost while logging is configured as jobstream configures it
        # (accesslog.AccessLog). Whether there is an access log at all, uvicorn decided above.
        self.access_logger = access_logger(self.access_logger)  # type: ignore[assignment]
        #: Receiving a request head (rather than a body, or nothing yet), and its bytes so far.
        self._in_head = True
        self._head_bytes = 0
        #: Heads completed on this connection: did the head end within the bytes fed?
        self._heads = 0
        #: The current request has begun (a byte of it arrived); the first one's deadline runs
        #: from the connection's opening, before that.
        self._begun = False
        self._deadline: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(OneSendPerAnswer(transport, self.loop))  # type: ignore[arg-type]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser, but never more than ``max_head_bytes`` of one head: what is left of a
        head then is answered 431. Bytes after a head (a body, a pipelined request) go on as usual;
        a head that begins inside such a chunk is counted from the next chunk on, so httptools
        holds at most one read (256 KiB) past the limit there."""
        view = memoryview(data)
        while view and not self.transport.is_closing():
            if not self._in_head:
                super().data_received(view)  # type: ignore[arg-type]  # httptools takes any buffer
                return
            room = self.max_head_bytes - self._head_bytes
            if len(view) <= room:
                self._head_bytes += len(view)
                super().data_received(view)  # type: ignore[arg-type]
                return
            heads = self._heads
            self._head_bytes += room
            super().data_received(view[:room])  # type: ignore[arg-type]
            if self._heads == heads:
                self._refuse_head()
                return
            view = view[room:]

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._heads += 1
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        # The request is all here: the next byte begins another (whose deadline starts then).
        self._disarm()
        self._in_head, self._head_bytes, self._begun = True, 0, False
        super().on_message_complete()

    # ---- limits

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.flow is not None and self.flow.read_paused:
            # Reading is paused by the gateway itself (a pipelined request waits for the response
            # before it, or the app takes its time with a body): not the client's slowness.
            self._arm()
            return
        if not self._begun:
            # An opened connection that never sent a byte (a browser's preconnect, a scanner).
            self.transport.close()
            return
        logger.info("request not received within %g s from %s: closed", self.request_timeout_s, _peer(self.client))
        self._answer_and_close(
            408, "request-timeout", f"The request did not arrive within {self.request_timeout_s:g} s."
        )

    def _refuse_head(self) -> None:
        if self.transport.is_closing():
            return  # the parser refused it already (400)
        logger.warning("request head over %d bytes from %s: answered 431", self.max_head_bytes, _peer(self.client))
        self._answer_and_close(
            431, "headers-too-large", f"The request line and headers are larger than {self.max_head_bytes} bytes."
        )

    def _answer_and_close(self, status: int, slug: str, detail: str) -> None:
        """Answer ``status`` and close; only close when the answer would not be the next one the
        client reads (an earlier response is still due or on the wire, or the app has started
        answering this request)."""
        self._disarm()
        cycle = self.cycle
        if self._in_head:  # a new request, after those of ``cycle`` and ``pipeline``
            answer = not self.pipeline and (cycle is None or cycle.response_complete)
        else:  # this request's body, for ``cycle``
            answer = not self.pipeline and cycle is not None and not cycle.response_started
            if answer and cycle is not None:
                # The app waits for this body: from now on it gets a disconnect, and whatever it
                # answers is dropped, as after the client hanging up.
                cycle.disconnected = True
                cycle.message_event.set()
        if answer:
            self.transport.write(_problem_bytes(status, slug, detail, self.server_state.default_headers))
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"


def http_protocol(settings: Settings) -> type[GatewayHttpProtocol]:
    """The protocol class for uvicorn, with the settings' request timeout."""

    class ConfiguredProtocol(GatewayHttpProtocol):
        request_timeout_s = settings.request_timeout_s

    return ConfiguredProtocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The ``uvicorn.Config`` arguments of every launch mode (`serve`, `serve --workers N`, `dev`).

    - ``http``: the bounded protocol above.
    - ``timeout_keep_alive``: ``JOBSTREAM_KEEP_ALIVE_S`` (75 s), above the idle timeout of the
      proxies that keep connections to gateways open (nginx upstream keepalive and AWS ALB: 60 s),
      so that the proxy always closes an idle connection first and never sends a request on one
      the gateway is closing (which a proxy answers 502, and cannot retry for a POST).
    - ``ws="none"``: the gateway serves no WebSockets; an upgrade request is plain HTTP to it, and
      never leaves this protocol (and its limits) for another."""
    return {"http": http_protocol(settings), "timeout_keep_alive": settings.keep_alive_s, "ws": "none"}


class HeaderLimit:
    """ASGI middleware: requests whose headers (names and values) are over ``max_bytes`` in all are
    answered 431 before anything else looks at them. ``__call__`` is a plain function returning
    the next app's coroutine, so it adds no frame to requests that stay open for hours (event
    streams, see routes.hotpath)."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_HEADER_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "http" and sum(len(name) + len(value) for name, value in scope["headers"]) > self.max_bytes:
            return self._refuse(scope, receive, send)
        return self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            431, f"The request headers are larger than {self.max_bytes} bytes in all.", slug="headers-too-large"
        )
        await response(scope, receive, send)
