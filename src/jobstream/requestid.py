"""X-Request-ID: taken from the request when it is a sane id (a proxy's or client's), else made
up; put on the response, and on every log line written while the request is served."""

from __future__ import annotations

import itertools
import re
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobstream import observability

HEADER = "X-Request-ID"
_HEADER_KEY = HEADER.lower().encode()
_VALID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
#: Made-up ids: this process's random prefix and a count, unique across processes and restarts
#: without a call for randomness per request (uuid4 was a few percent of a plain request).
_PROCESS = secrets.token_hex(8)
_COUNT = itertools.count(1)


def assign(scope: Scope) -> str:
    """The request's id, set for the log lines written while it is served."""
    given = next((value for name, value in scope["headers"] if name == _HEADER_KEY), b"")
    request_id = given.decode() if _VALID.match(given) else f"{_PROCESS}{next(_COUNT):x}"
    observability.request_id.set(request_id)
    return request_id


class RequestId:
    """For every request but the hot paths (routes.hotpath), which set the header on their own
    responses: wrapping ``send`` adds a call to every message sent (every event, for a stream)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = (_HEADER_KEY, assign(scope).encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
