"""One send per plain answer: a response's head goes out with its body (httplimits.OneSendPerAnswer)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tests.helpers import serve_one

App = Callable[[Any, Any, Any], Awaitable[None]]


def _serve(app: App, request: bytes = b"GET / HTTP/1.1\r\nhost: gw\r\n\r\n", *, until: bytes) -> list[bytes]:
    return serve_one(app, request, until=until, access_log=False)


async def _plain(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"7")]})
    await send({"type": "http.response.body", "body": b'{"a":1}'})


async def _stream(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for frame in (b"retry: 1000\n\n", b"data: 1\n\n", b"data: 2\n\n"):
        await send({"type": "http.response.body", "body": frame, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _no_content(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _slow_body(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await asyncio.sleep(0.05)
    await send({"type": "http.response.body", "body": b"ok"})


def test_plainAnswer_whenWritten_thenHeadAndBodyInOneSend() -> None:
    [write] = _serve(_plain, until=b'{"a":1}')
    assert write.startswith(b"HTTP/1.1 200 OK\r\n") and write.endswith(b'\r\n\r\n{"a":1}')


def test_eventStream_whenWritten_thenHeadWithFirstFrameAndEachLaterFrameAsWritten() -> None:
    writes = _serve(_stream, until=b"0\r\n\r\n")
    assert writes[0].startswith(b"HTTP/1.1 200 OK") and writes[0].endswith(b"retry: 1000\n\n\r\n")
    assert [w for w in writes[1:] if w] == [b"9\r\ndata: 1\n\n\r\n", b"9\r\ndata: 2\n\n\r\n", b"0\r\n\r\n"]


def test_headOnlyAnswer_whenNoBodyFollows_thenHeadSentAtTheEndOfTheTurn() -> None:
    writes = _serve(_no_content, until=b"\r\n\r\n")
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 204 No Content")


def test_head_whenBodyComesLater_thenSentFirstWithoutWaitingForIt() -> None:
    writes = _serve(_slow_body, until=b"ok")
    assert writes[0].startswith(b"HTTP/1.1 200 OK") and writes[0].endswith(b"\r\n\r\n")
    assert writes[1:] == [b"ok"]
