"""One send per plain answer: a response's head goes out with its body (httplimits.OneSendPerAnswer)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from jobstream.httplimits import GatewayHttpProtocol
from tests.helpers import wait_until_async

App = Callable[[Any, Any, Any], Awaitable[None]]


class _Transport:
    """What uvicorn's protocol uses of a transport, recording each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _serve(app: App, request: bytes = b"GET / HTTP/1.1\r\nhost: gw\r\n\r\n", *, until: bytes) -> list[bytes]:
    async def scenario() -> list[bytes]:
        config = uvicorn.Config(app, log_config=None, lifespan="off", proxy_headers=False, access_log=False)
        protocol = GatewayHttpProtocol(config, ServerState(), {}, asyncio.get_running_loop())
        transport = _Transport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(request)
        await wait_until_async(lambda: b"".join(transport.writes).endswith(until), timeout_s=30)
        protocol.connection_lost(None)
        return transport.writes

    return asyncio.run(scenario())


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
