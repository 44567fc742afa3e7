"""`Client`: the blocking shell around `protocol` and `follow`."""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx
from httpx_sse import SSEError, connect_sse

from jobstream.client import protocol
from jobstream.client.base import ClientBase, ClientOptions, http_arguments
from jobstream.client.follow import Follower, Transport
from jobstream.client.models import CreatedJob, Event, JobPage, JobStatus, ReadToken

T = TypeVar("T")


class Client(ClientBase):
    """A blocking client of a jobstream gateway; see `ClientOptions`. Use it as a context
    manager, or `close()` it. ``http_transport`` replaces httpx's own (for tests)."""

    def __init__(
        self, base_url: str, *, http_transport: httpx.BaseTransport | None = None, **options: Unpack[ClientOptions]
    ) -> None:
        super().__init__(base_url, options)
        self._http = httpx.Client(**self._http_options(), transport=http_transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def create(self, type: str, input: Any = None, **options: Unpack[protocol.CreateOptions]) -> CreatedJob:
        """Create a job of ``type``; answers at once, before the job runs."""
        return self._call(protocol.create(type, input, **options))

    def get(self, id: str) -> JobStatus:
        """The job's status document."""
        return self._call(protocol.get(id))

    def list(self, **filters: Any) -> JobPage:
        """A page of the caller's jobs, newest first (``status``, ``type``, ``tag``, ``limit``, ``cursor``)."""
        return self._call(protocol.list_jobs(**filters))

    def cancel(self, id: str) -> str:
        """Ask the job to stop (it ends ``cancelled``); ProblemError 409 once it has ended."""
        return self._call(protocol.cancel(id))

    def read_token(
        self, jobs: Iterable[str] | None = None, *, tag: str | None = None, ttl: int | None = None
    ) -> ReadToken:
        """A read token of several of the caller's jobs, or of every job with ``tag`` (``ttl``
        seconds, at most 3600), to hand to a browser."""
        return self._call(protocol.read_token(jobs, tag=tag, ttl=ttl))

    def delete(self, id: str) -> None:
        """Remove the job and its events."""
        self._call(protocol.delete(id))

    def append(self, id: str, events: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> builtins.list[str]:
        """Append events ``{"type", "data"}`` to an ``external`` job; their ids."""
        return self._call(protocol.append(id, events))

    def follow(self, id_or_job: Any, *, after: str | None = None, transport: Transport = "auto") -> Iterator[Event]:
        """The job's events, each once and in order, until ``done`` (the last one), resuming by
        itself after disconnects (the rules: `jobstream.client.follow`)."""
        yield from self._drive(self._follower(id_or_job, after, transport))

    def wait(self, id: str, timeout: float | None = None) -> JobStatus:
        """The final status document, once the job has ended; TimeoutError after ``timeout`` s."""
        for _ in self._drive(self._waiter(id, timeout)):
            pass
        return self.get(id)

    def _drive(self, follower: Follower) -> Iterator[Event]:
        while not follower.ended:
            request = follower.next_request()
            try:
                if request.stream:
                    yield from self._stream(follower, request)
                else:
                    response = self._send(request)
                    yield from follower.take_answer(response.status_code, response.headers, response.content)
            except (httpx.TransportError, SSEError) as exc:
                follower.take_error(exc)
            if not follower.ended:
                time.sleep(follower.pause())

    def _stream(self, follower: Follower, request: protocol.Request) -> Iterator[Event]:
        with connect_sse(self._http, request.method, request.path, params=request.params) as source:
            response = source.response
            if response.status_code != 200:
                follower.take_answer(response.status_code, response.headers, response.read())
                return
            for sse in source.iter_sse():
                if (event := follower.take_sse(sse.event, sse.data, sse.id, sse.retry)) is not None:
                    yield event
                if follower.ended:
                    return
            follower.take_stream_end()

    def _send(self, request: protocol.Request) -> httpx.Response:
        return self._http.request(**http_arguments(request))

    def _call(self, call: protocol.Call[T]) -> T:
        response = self._send(call.request)
        return call.finish(response.status_code, response.headers, response.content)
