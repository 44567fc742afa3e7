"""What `Client` and `AsyncClient` share apart from I/O: their options, credential and the
followers their `follow` and `wait` drive."""

from __future__ import annotations

import time
from typing import Any, TypedDict

import httpx

from jobstream.client import protocol
from jobstream.client.follow import DEFAULT_RETRY, Follower, RetryPolicy, Transport

#: A stream is read with this timeout: far longer than the gateway's 15 s between pings.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


class ClientOptions(TypedDict, total=False):
    """``api_key`` (or ``token``: a user JWT, or a read token, which can only read) is sent as a
    Bearer credential; ``timeout`` is httpx's; ``retry`` says how `follow` and `wait` retry."""

    api_key: str | None
    token: str | None
    timeout: httpx.Timeout | float
    retry: RetryPolicy


class ClientBase:
    def __init__(self, base_url: str, options: ClientOptions) -> None:
        self.base_url = base_url
        self.retry = options.get("retry", DEFAULT_RETRY)
        self._headers = protocol.client_headers(options.get("api_key"), options.get("token"))
        self._timeout = options.get("timeout", DEFAULT_TIMEOUT)

    def _http_options(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "headers": self._headers, "timeout": self._timeout}

    def _follower(self, id_or_job: Any, after: str | None, transport: Transport) -> Follower:
        job_id, job_token = protocol.job_ref(id_or_job)
        token = protocol.follow_token(bool(self._headers), job_token)
        return Follower(job_id, token=token, after=after, transport=transport, policy=self.retry)

    def _waiter(self, job_id: str, timeout: float | None) -> Follower:
        """`wait` long-polls: no events to show, and a deadline is kept between requests."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return Follower(job_id, transport="poll", policy=self.retry, deadline=deadline)


def http_arguments(request: protocol.Request) -> dict[str, Any]:
    """``request`` as the arguments of httpx's ``request``."""
    timeout = request.timeout_s if request.timeout_s is not None else httpx.USE_CLIENT_DEFAULT
    return {
        "method": request.method,
        "url": request.path,
        "params": request.params,
        "headers": request.headers,
        "json": request.json,
        "timeout": timeout,
    }
