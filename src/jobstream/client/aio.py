"""`AsyncClient`: the asyncio shell around `protocol` and `follow`."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx
from httpx_sse import SSEError, aconnect_sse

from jobstream.client import protocol
from jobstream.client.base import ClientBase, ClientOptions, http_arguments
from jobstream.client.follow import Follower, Transport
from jobstream.client.models import CreatedJob, Event, JobPage, JobStatus, ReadToken

T = TypeVar("T")


class AsyncClient(ClientBase):
    """An asyncio client of a jobstream gateway, with `Client`'s methods as coroutines (`follow`:
    an async iterator). Use it as an async context manager, or `aclose()` it."""

    def __init__(
        self,
        base_url: str,
        *,
        http_transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        super().__init__(base_url, options)
        self._http = httpx.AsyncClient(**self._http_options(), transport=http_transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def create(self, type: str, input: Any = None, **options: Unpack[protocol.CreateOptions]) -> CreatedJob:
        return await self._call(protocol.create(type, input, **options))

    async def get(self, id: str) -> JobStatus:
        return await self._call(protocol.get(id))

    async def list(self, **filters: Any) -> JobPage:
        return await self._call(protocol.list_jobs(**filters))

    async def cancel(self, id: str) -> str:
        return await self._call(protocol.cancel(id))

    async def read_token(
        self, jobs: Iterable[str] | None = None, *, tag: str | None = None, ttl: int | None = None
    ) -> ReadToken:
        return await self._call(protocol.read_token(jobs, tag=tag, ttl=ttl))

    async def delete(self, id: str) -> None:
        await self._call(protocol.delete(id))

    async def append(self, id: str, events: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> builtins.list[str]:
        return await self._call(protocol.append(id, events))

    async def follow(
        self, id_or_job: Any, *, after: str | None = None, transport: Transport = "auto"
    ) -> AsyncIterator[Event]:
        async for event in self._drive(self._follower(id_or_job, after, transport)):
            yield event

    async def wait(self, id: str, timeout: float | None = None) -> JobStatus:
        async for _ in self._drive(self._waiter(id, timeout)):
            pass
        return await self.get(id)

    async def _drive(self, follower: Follower) -> AsyncIterator[Event]:
        while not follower.ended:
            request = follower.next_request()
            try:
                if request.stream:
                    async for event in self._stream(follower, request):
                        yield event
                else:
                    response = await self._send(request)
                    for event in follower.take_answer(response.status_code, response.headers, response.content):
                        yield event
            except (httpx.TransportError, SSEError) as exc:
                follower.take_error(exc)
            if not follower.ended:
                await asyncio.sleep(follower.pause())

    async def _stream(self, follower: Follower, request: protocol.Request) -> AsyncIterator[Event]:
        async with aconnect_sse(self._http, request.method, request.path, params=request.params) as source:
            response = source.response
            if response.status_code != 200:
                follower.take_answer(response.status_code, response.headers, await response.aread())
                return
            async for sse in source.aiter_sse():
                if (event := follower.take_sse(sse.event, sse.data, sse.id, sse.retry)) is not None:
                    yield event
                if follower.ended:
                    return
            follower.take_stream_end()

    async def _send(self, request: protocol.Request) -> httpx.Response:
        return await self._http.request(**http_arguments(request))

    async def _call(self, call: protocol.Call[T]) -> T:
        response = await self._send(call.request)
        return call.finish(response.status_code, response.headers, response.content)
