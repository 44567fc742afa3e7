"""The SSE response at the ASGI level: stalled clients are dropped, disconnects end the stream,
and the body's cleanup always runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from starlette.types import Message

from jobstream.sendwatch import EventStreamResponse, SendWatch

SCOPE = {"type": "http", "method": "GET", "path": "/", "headers": []}


def test_stalledSend_whenClientStopsReading_thenResponseIsDroppedAndBodyClosed() -> None:
    closed = asyncio.Event()

    async def body() -> AsyncGenerator[bytes]:
        try:
            while True:
                yield b"data: x\n\n"
        finally:
            closed.set()

    async def scenario() -> int:
        watch = SendWatch(timeout_s=0.2)
        await watch.start()
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()  # the client's socket never drains

        async def receive() -> Message:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        await asyncio.wait_for(EventStreamResponse(body(), watch=watch)(SCOPE, receive, send), 5)
        await watch.close()
        assert closed.is_set()
        return watch.dropped

    assert asyncio.run(scenario()) == 1


def test_disconnect_whenClientLeaves_thenStreamEndsAndBodyClosed() -> None:
    closed = asyncio.Event()

    async def body() -> AsyncGenerator[bytes]:
        try:
            while True:
                await asyncio.sleep(0.01)  # on purpose: a body that pings now and then, as an idle stream does
                yield b": ping\n\n"
        finally:
            closed.set()

    async def scenario() -> None:
        watch = SendWatch(timeout_s=30)
        left = asyncio.Event()

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body" and message["body"]:
                left.set()

        async def receive() -> Message:
            await left.wait()
            return {"type": "http.disconnect"}

        await asyncio.wait_for(EventStreamResponse(body(), watch=watch)(SCOPE, receive, send), 5)
        assert closed.is_set()

    asyncio.run(scenario())
