"""What an open event stream holds and what opening one costs: the reader joins the hub before
the job's read, so that one round trip brings the job and its first page of history (no XRANGE
of its own); the stream's body is a plain object; the client's disconnect is watched without a
task of its own. Each with what it must keep: every event once and in order, disconnects seen,
cancellations that are not the stream's own passed on."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis

from jobstream import keys
from jobstream.hub import HISTORY_PAGE
from jobstream.sendwatch import EventStreamResponse, SendWatch, _DisconnectWatch
from tests.conftest import append, create_job, read_sse
from tests.helpers import redis_commands_of, wait_until, wait_until_async

#: Commands that are not a request's own: connection set-up, health checks, the hub's link.


def test_open_whenHistoryExists_thenTheReadBringsItWithoutARangeOfItsOwn(
    gateway: httpx.Client, rdb: redis.Redis
) -> None:
    job = create_job(gateway)
    append(gateway, job, [{"type": "delta", "data": {"text": "a"}}, {"type": "result", "data": {}}])
    read_sse(gateway, job)  # scripts loaded
    # That stream's lease is released once its reader has its end: not while this one is watched.
    wait_until(lambda: rdb.zcard(keys.token_sse_leases_key(job["id"])) == 0)

    def read() -> None:
        response, events = read_sse(gateway, job)
        assert response.status_code == 200
        assert [event.event for event in events] == ["status", "delta", "result", "done"]

    # The job's read (with its history), the lease, its release: nothing else.
    assert sorted(redis_commands_of(rdb, read, warm_up=False)) == ["evalsha", "evalsha", "zrem"]


def test_history_whenLongerThanAPage_thenEveryEventOnceInOrderThenLive(gateway: httpx.Client) -> None:
    job = create_job(gateway)
    total = HISTORY_PAGE + 120
    for start in range(0, total, 40):
        count = min(40, total - start)
        append(gateway, job, [{"type": "delta", "data": {"text": str(start + i)}} for i in range(count)])
    ids = append(gateway, job, {"type": "result", "data": {}})
    response, events = read_sse(gateway, job)
    assert response.status_code == 200
    deltas = [event.data for event in events if event.event == "delta"]
    assert deltas == [f'{{"text":"{i}"}}' for i in range(total)]
    assert events[-1].event == "done" and events[-2].id == ids[0]
    assert [event.id for event in events] == sorted({event.id for event in events}, key=_id_key)


def _id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


# ---- the disconnect watch, stepped without a task


def test_disconnectWatch_whenReceiveYieldsAndWaits_thenDisconnectSeenOnce() -> None:
    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        gone = loop.create_future()
        calls: list[str] = []
        messages = iter([{"type": "http.request", "body": b"", "more_body": False}])

        async def receive() -> dict[str, Any]:
            calls.append("receive")
            message = next(messages, None)
            if message is not None:
                return message
            await asyncio.sleep(0)  # a bare yield, resumed on the next loop iteration
            await gone  # a future, resumed from its callback
            return {"type": "http.disconnect"}

        seen: list[int] = []
        watch = _DisconnectWatch(receive, lambda: seen.append(1))
        await asyncio.sleep(0.01)
        assert not seen
        gone.set_result(None)
        await asyncio.sleep(0.01)
        watch.stop()
        assert calls == ["receive", "receive"]
        return len(seen)

    assert asyncio.run(scenario()) == 1


def test_disconnectWatch_whenReceiveFails_thenCountedAsGone() -> None:
    async def scenario() -> int:
        async def receive() -> dict[str, Any]:
            await asyncio.sleep(0)
            raise OSError("connection reset")

        seen: list[int] = []
        _DisconnectWatch(receive, lambda: seen.append(1))
        await asyncio.sleep(0.01)
        return len(seen)

    assert asyncio.run(scenario()) == 1


def test_disconnectWatch_whenStopped_thenReceiveClosedAndNothingCalled() -> None:
    async def scenario() -> tuple[bool, int]:
        closed = asyncio.Event()

        async def receive() -> dict[str, Any]:
            try:
                await asyncio.Event().wait()
            finally:
                closed.set()
            raise AssertionError("unreachable")

        seen: list[int] = []
        watch = _DisconnectWatch(receive, lambda: seen.append(1))
        await asyncio.sleep(0.01)
        watch.stop()
        await asyncio.sleep(0.01)
        return closed.is_set(), len(seen)

    assert asyncio.run(scenario()) == (True, 0)


# ---- the response: its own cancellations end it, others go on


def test_response_whenCancelledFromOutside_thenCancellationPropagatesAndBodyClosed() -> None:
    closed = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"retry: 1000\n\n"
            await asyncio.Event().wait()
            yield b"unreachable"
        finally:
            closed.set()

    async def scenario() -> bool:
        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        response = EventStreamResponse(body(), watch=SendWatch(timeout_s=30))
        task = asyncio.create_task(response({"type": "http", "method": "GET"}, receive, send))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        return closed.is_set()

    assert asyncio.run(scenario())


def test_response_whenClientGone_thenEndsQuietlyWithTheTaskUncancelled() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        await asyncio.Event().wait()
        yield b"unreachable"

    async def scenario() -> int:
        left = asyncio.Event()

        async def send(message: Any) -> None:
            if message.get("body"):
                left.set()

        async def receive() -> dict[str, Any]:
            await left.wait()
            return {"type": "http.disconnect"}

        async def request() -> int:
            await EventStreamResponse(body(), watch=SendWatch(timeout_s=30))(
                {"type": "http", "method": "GET"}, receive, send
            )
            await asyncio.sleep(0)  # still runs: the stream's own cancellation was taken back
            task = asyncio.current_task()
            assert task is not None
            return task.cancelling()

        return await asyncio.wait_for(request(), 5)

    assert asyncio.run(scenario()) == 0


class _FinishedJobBody:
    """An event stream over a finished job: every chunk ready at once (no wait), and closing it
    takes a round trip (the slot's release)."""

    def __init__(self) -> None:
        self.chunks = [b"retry: 1000\n\n", b"event: done\ndata: {}\n\n"]
        self.released = False

    def __aiter__(self) -> _FinishedJobBody:
        return self

    async def __anext__(self) -> bytes:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    async def aclose(self) -> None:
        await asyncio.sleep(0.01)
        self.released = True


def test_response_whenClientGoneBeforeItStartsAndBodyNeverWaits_thenEndsQuietlyAndReleases() -> None:
    async def scenario() -> tuple[int, bool]:
        body = _FinishedJobBody()

        async def send(message: Any) -> None:
            pass  # uvicorn's send once the client has gone: returns at once

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}  # gone already

        async def request() -> int:
            await EventStreamResponse(body, watch=SendWatch(timeout_s=30))(
                {"type": "http", "method": "GET"}, receive, send
            )
            await asyncio.sleep(0)
            task = asyncio.current_task()
            assert task is not None
            return task.cancelling()

        return await asyncio.create_task(request()), body.released

    assert asyncio.run(scenario()) == (0, True)


def test_response_whenStartFails_thenBodyClosedAnyway() -> None:
    async def scenario() -> bool:
        body = _FinishedJobBody()

        async def send(message: Any) -> None:
            raise OSError("connection reset")

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        with pytest.raises(OSError):
            await EventStreamResponse(body, watch=SendWatch(timeout_s=30))(
                {"type": "http", "method": "GET"}, receive, send
            )
        return body.released

    assert asyncio.run(scenario())


def test_disconnectWatches_whenLoopsInTwoThreads_thenEachSeesItsDisconnects() -> None:
    seen: list[int] = []
    errors: list[object] = []

    def run() -> None:
        async def main() -> int:
            asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
            count: list[int] = []

            async def receive() -> dict[str, Any]:
                for _ in range(50):
                    await asyncio.sleep(0)
                sum(range(20_000))  # work inside the step, while the other thread steps its own
                return {"type": "http.disconnect"}

            watches = [_DisconnectWatch(receive, lambda: count.append(1)) for _ in range(30)]
            await wait_until_async(lambda: len(count) == len(watches), timeout_s=20)
            return len(count)

        seen.append(asyncio.run(main()))

    threads = [threading.Thread(target=run) for _ in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert seen == [30, 30] and errors == []
