"""The follow rules of jobstream.client against scripted answers (httpx.MockTransport): the
cases a real gateway gives only under faults: 429/503 with Retry-After, a stream cut short, a
proxy that swallows events, truncation, giving up."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from jobstream.client import AsyncClient, Client, FollowError, ProblemError, RetryPolicy
from jobstream.client.follow import is_after

FAST = RetryPolicy(backoff_s=(0.01,), jitter=0, retry_s=0.01, max_failures=4)
JOB = "11111111-1111-4111-8111-111111111111"


def sse(*events: tuple[str, str, dict[str, Any]], retry_ms: int | None = 10) -> httpx.Response:
    blocks = [f"retry: {retry_ms}\n\n"] if retry_ms is not None else []
    blocks += [f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n" for event_id, kind, data in events]
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, text="".join(blocks))


def problem(status: int, retry_after: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/problem+json", **({"retry-after": retry_after} if retry_after else {})}
    body = {"type": "about:blank", "title": f"status {status}", "status": status, "detail": "scripted"}
    return httpx.Response(status, headers=headers, json=body)


class Script:
    """Answers requests in turn, recording each with the time it came."""

    def __init__(self, *answers: httpx.Response | Callable[[httpx.Request], httpx.Response]) -> None:
        self.answers: Iterator[httpx.Response | Callable[[httpx.Request], httpx.Response]] = iter(answers)
        self.requests: list[tuple[float, httpx.Request]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((time.monotonic(), request))
        answer = next(self.answers)
        return answer(request) if callable(answer) else answer

    def paths(self) -> list[str]:
        return [request.url.path.rsplit("/", 1)[-1] for _, request in self.requests]

    def param(self, index: int, name: str) -> str | None:
        return self.requests[index][1].url.params.get(name)

    def gaps(self) -> list[float]:
        times = [at for at, _ in self.requests]
        return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def follow(script: Script, transport: str = "sse", **kwargs: Any) -> list[tuple[str | None, str]]:
    with Client("http://gw", api_key="k", retry=FAST, http_transport=httpx.MockTransport(script)) as client:
        return [(event.id, event.type) for event in client.follow(JOB, transport=transport, **kwargs)]  # type: ignore[arg-type]


DONE = ("1-2", "done", {"status": "completed"})


def test_follow_when429Then503WithRetryAfter_thenWaitsAsToldAndDelivers() -> None:
    script = Script(problem(429, "0.3"), problem(503, "0.2"), sse(("1-1", "delta", {"text": "a"}), DONE))
    assert follow(script) == [("1-1", "delta"), ("1-2", "done")]
    assert script.paths() == ["events"] * 3
    first, second = script.gaps()
    assert first >= 0.3 and second >= 0.2


def test_follow_whenStreamCutShort_thenResumesFromLastIdWithoutDuplicates() -> None:
    first = sse(("1-0", "status", {"status": "running"}), ("1-1", "delta", {"text": "a"}))
    again = sse(("1-1", "delta", {"text": "a"}), DONE)  # a resume that overlaps what was delivered
    script = Script(first, again)
    assert follow(script) == [("1-0", "status"), ("1-1", "delta"), ("1-2", "done")]
    assert script.param(0, "last_event_id") is None and script.param(1, "last_event_id") == "1-1"


def test_follow_when204_thenEndsWithoutEvents() -> None:
    script = Script(httpx.Response(204))
    assert follow(script, after="1-2") == []
    assert script.param(0, "last_event_id") == "1-2"


def test_follow_whenSseSwallowedBeforeAnyEvent_thenLongPolls() -> None:
    page = {"events": [{"id": "1-1", "type": "delta", "data": {"text": "a"}}], "next": "1-1", "done": False}
    last = {"events": [{"id": "1-2", "type": "done", "data": {"status": "completed"}}], "next": "1-2", "done": True}
    script = Script(sse(), httpx.Response(200, json=page), httpx.Response(200, json=last))
    assert follow(script, transport="auto") == [("1-1", "delta"), ("1-2", "done")]
    assert script.paths() == ["events", "poll", "poll"]
    assert script.param(2, "after") == "1-1"


def test_follow_whenPollTruncated_thenTruncatedEventFirst() -> None:
    page = {
        "events": [{"id": "5-0", "type": "done", "data": {"status": "completed"}}],
        "truncated": {"first_id": "5-0"},
        "next": "5-0",
        "done": True,
    }
    assert follow(Script(httpx.Response(200, json=page)), transport="poll", after="1-0") == [
        (None, "truncated"),
        ("5-0", "done"),
    ]


def test_follow_whenAlways503_thenGivesUpWithTheLastProblem() -> None:
    script = Script(*[problem(503, "0")] * FAST.max_failures)
    with pytest.raises(FollowError) as raised:
        follow(script, transport="poll")
    assert isinstance(raised.value.last_error, ProblemError) and raised.value.last_error.status == 503
    assert len(script.requests) == FAST.max_failures


def test_follow_when404_thenProblemErrorAtOnce() -> None:
    script = Script(problem(404))
    with pytest.raises(ProblemError) as raised:
        follow(script, transport="auto")
    assert raised.value.status == 404 and raised.value.problem["detail"] == "scripted"
    assert len(script.requests) == 1


def test_asyncFollow_whenStreamCutShort_thenSameRules() -> None:
    script = Script(problem(503, "0.1"), sse(("1-1", "delta", {"text": "a"})), sse(DONE))

    async def scenario() -> list[tuple[str | None, str]]:
        transport = httpx.MockTransport(script)
        async with AsyncClient("http://gw", api_key="k", retry=FAST, http_transport=transport) as client:
            return [(event.id, event.type) async for event in client.follow(JOB, transport="sse")]

    assert asyncio.run(scenario()) == [("1-1", "delta"), ("1-2", "done")]
    assert script.gaps()[0] >= 0.1
    assert script.param(2, "last_event_id") == "1-1"


def test_isAfter_comparesStreamIdsNumerically() -> None:
    assert is_after("10-0", "9-5") and is_after("9-6", "9-5") and is_after("1-0", None)
    assert not is_after("9-5", "9-5") and not is_after("9-10", "10-0")
