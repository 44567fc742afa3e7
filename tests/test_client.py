"""jobstream.client against a real gateway and worker: every call's round trip, follow over SSE
and long-poll, resuming across a gateway that stops mid-stream, errors as ProblemError."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY

from jobstream import keys
from jobstream.client import AsyncClient, Client, Event, ProblemError, RetryPolicy
from tests.conftest import LiveStack, make_settings
from tests.helpers import wait_until

#: Quick retries: a test waits for a reconnect, not for production's backoff.
FAST = RetryPolicy(backoff_s=(0.05, 0.1, 0.2), jitter=0, retry_s=0.05, max_failures=40, poll_wait_s=5)
DONE = {"type": "done", "data": {"status": "completed"}}


def alice(stack: LiveStack, **options: Any) -> Client:
    return Client(stack.base_url, api_key="key-alice", retry=FAST, **options)


def stored_ids(rdb: redis.Redis, job_id: str) -> list[str]:
    return [entry_id for entry_id, _ in rdb.xrange(keys.events_key(job_id))]


def test_roundTrips_createGetListAppendWaitDelete(stack: LiveStack) -> None:
    with alice(stack) as client:
        job = client.create("external", tags=["chat:7"], metadata={"chat_id": "7"}, ttl=300)
        assert job.status == "pending" and job.token and job.links.events == f"/v1/jobs/{job.id}/events"
        other = client.create("external", tags=["other"])
        assert client.get(job.id).metadata == {"chat_id": "7"}
        assert [listed.id for listed in client.list(tag="chat:7").jobs] == [job.id]
        first = client.list(limit=1)
        assert [listed.id for listed in first.jobs] == [other.id] and first.next_cursor
        assert [listed.id for listed in client.list(limit=1, cursor=first.next_cursor).jobs] == [job.id]
        ids = client.append(job.id, [{"type": "delta", "data": {"text": "hi"}}, {"type": "result", "data": {"n": 1}}])
        assert len(ids) == 2  # a `result` ends the job
        ended = client.wait(job.id, timeout=10)
        assert ended.status == "completed" and ended.ended and ended.result == {"n": 1}
        assert ended.last_event_id is not None and ended.last_event_id > ids[-1]
        client.delete(job.id)
        with pytest.raises(ProblemError) as missing:
            client.get(job.id)
        assert missing.value.status == 404 and missing.value.problem["status"] == 404


def test_cancel_whenRunning_thenWaitAnswersCancelled(stack: LiveStack) -> None:
    with alice(stack) as client:
        job = client.create("test.slow", {"steps": 500, "step_ms": 20})
        wait_until(lambda: client.get(job.id).status == "running", message="the job never started")
        assert client.cancel(job.id) == "cancelling"
        assert client.wait(job.id, timeout=10).status == "cancelled"
        with pytest.raises(ProblemError) as ended:
            client.cancel(job.id)
        assert ended.value.status == 409


def test_errors_areProblemErrorsWithTheProblemDocument(stack: LiveStack) -> None:
    with alice(stack) as client:
        with pytest.raises(ProblemError) as invalid:
            client.create("no.such.type")
        assert invalid.value.status == 422 and invalid.value.problem["errors"]
        with pytest.raises(ProblemError) as unknown:
            list(client.follow("00000000-0000-4000-8000-000000000000"))
        assert unknown.value.status == 404
    with Client(stack.base_url, api_key="wrong") as stranger, pytest.raises(ProblemError) as denied:
        stranger.list()
    assert denied.value.status == 401 and denied.value.problem["title"]


def test_wait_whenJobDoesNotEnd_thenTimeoutError(stack: LiveStack) -> None:
    with alice(stack) as client:
        job = client.create("external")
        with pytest.raises(TimeoutError):
            client.wait(job.id, timeout=0.5)


@pytest.mark.parametrize("transport", ["sse", "poll", "auto"])
def test_follow_whenJobRuns_thenEveryEventOnceInOrderEndingWithDone(
    stack: LiveStack, rdb: redis.Redis, transport: Any
) -> None:
    with alice(stack) as client:
        job = client.create("test.slow", {"steps": 30, "step_ms": 5})
        events = list(client.follow(job, transport=transport))
    assert [event.id for event in events] == stored_ids(rdb, job.id)
    assert events[-1].type == "done" and events[-1].data == {"status": "completed"}
    assert "".join(event.data["text"] for event in events if event.type == "delta") == "".join(
        f"{step} " for step in range(30)
    )


def test_follow_withReadTokenOnly_thenReadsTheJob(stack: LiveStack) -> None:
    with alice(stack) as client:
        job = client.create("test.echo", {"events": [{"type": "delta", "data": {"text": "x"}}]})
    with Client(stack.base_url, retry=FAST) as reader:  # no credential: the job's token in the query
        assert [event.type for event in reader.follow(job)][-1] == "done"
    with Client(stack.base_url, token=job.token, retry=FAST) as reader:
        assert reader.get(job.id).id == job.id


def test_follow_whenAfterGiven_thenOnlyLaterEvents(stack: LiveStack, rdb: redis.Redis) -> None:
    with alice(stack) as client:
        job = client.create("external")
        ids = client.append(job.id, [{"type": "delta", "data": {"text": str(n)}} for n in range(5)] + [DONE])
        assert [event.id for event in client.follow(job.id, after=ids[2])] == ids[3:]
        assert list(client.follow(job.id, after=ids[-1], transport="sse")) == []  # 204: seen the end


@pytest.mark.parametrize("transport", ["sse", "auto"])
def test_follow_whenGatewayStopsMidStream_thenResumesOnAnotherWithoutGapOrDuplicate(
    redis_url: str, rdb: redis.Redis, transport: Any
) -> None:
    first = LiveStack(make_settings(redis_url, retry_ms=50), with_worker=False).start()
    second: LiveStack | None = None
    with alice(first) as client:
        job = client.create("external")
        client.append(job.id, [{"type": "delta", "data": {"text": f"a{n} "}} for n in range(20)])
    seen: list[Event] = []
    reader = threading.Thread(target=_follow_into, args=(first, job.id, transport, seen))
    reader.start()
    try:
        wait_until(lambda: len(seen) >= 20, message="the reader never caught up")
        first.stop()
        # Another gateway on the same Redis and port, as after a restart behind a load balancer.
        second = LiveStack(first.settings, with_worker=False, port=first.port).start()
        with alice(second) as client:
            client.append(job.id, [{"type": "delta", "data": {"text": f"b{n} "}} for n in range(20)] + [DONE])
        reader.join(30)
        assert not reader.is_alive(), "the reader never reached done"
    finally:
        (second or first).stop()
    assert [event.id for event in seen] == stored_ids(rdb, job.id)
    assert sum(event.type == "delta" for event in seen) == 40 and seen[-1].type == "done"


def _follow_into(stack: LiveStack, job_id: str, transport: Any, seen: list[Event]) -> None:
    with alice(stack) as client:
        seen.extend(client.follow(job_id, transport=transport))


def test_asyncClient_roundTripAndFollow(stack: LiveStack, rdb: redis.Redis) -> None:
    async def scenario() -> tuple[str, list[Event], str]:
        async with AsyncClient(stack.base_url, api_key="key-alice", retry=FAST) as client:
            job = await client.create("test.slow", {"steps": 10, "step_ms": 5}, tags=["async"])
            assert [listed.id for listed in (await client.list(tag="async")).jobs] == [job.id]
            events = [event async for event in client.follow(job)]
            ended = await client.wait(job.id, timeout=10)
            external = await client.create("external")
            await client.append(external.id, DONE)
            assert (await client.get(external.id)).status == "completed"
            await client.delete(external.id)
            with pytest.raises(ProblemError):
                await client.cancel(external.id)
            return job.id, events, ended.status

    job_id, events, status = asyncio.run(scenario())
    assert [event.id for event in events] == stored_ids(rdb, job_id)
    assert status == "completed"


def sse_refusals() -> float:
    return REGISTRY.get_sample_value("jobstream_rate_limited_total", {"limit": "sse"}) or 0.0


def test_follow_whenStreamsLimited429_thenRetriesAfterRetryAfterAndDelivers(
    make_stack: Callable[..., LiveStack], rdb: redis.Redis
) -> None:
    stack = make_stack(with_worker=False, max_sse_per_user=1, retry_ms=50)
    with alice(stack) as client, stack.client() as http:
        job = client.create("external")
        client.append(job.id, [{"type": "delta", "data": {"text": "x"}}, DONE])
        busy = client.create("external")  # never ends: its stream holds alice's one slot
        refused_before = sse_refusals()
        with http.stream("GET", f"/v1/jobs/{busy.id}/events", headers={"Authorization": "Bearer key-alice"}):
            seen: list[Event] = []
            reader = threading.Thread(target=_follow_into, args=(stack, job.id, "sse", seen))
            reader.start()
            wait_until(lambda: sse_refusals() > refused_before, message="the follow was never refused")
            refused_at = time.monotonic()
        reader.join(15)
        assert not reader.is_alive(), "the follow never got through"
    # The gateway's Retry-After (1 s) was honoured over the policy's 0.05 s backoff.
    assert 0.9 <= time.monotonic() - refused_at < 10
    assert [event.id for event in seen] == stored_ids(rdb, job.id)


@pytest.mark.parametrize("transport", ["sse", "poll"])
def test_follow_whenResumePointTrimmed_thenTruncatedFirst(
    make_stack: Callable[..., LiveStack], rdb: redis.Redis, transport: Any
) -> None:
    stack = make_stack(with_worker=False, stream_maxlen=10)
    with alice(stack) as client:
        job = client.create("external")
        ids = client.append(job.id, [{"type": "delta", "data": {"text": str(n)}} for n in range(400)])
        client.append(job.id, DONE)
        events = list(client.follow(job.id, after=ids[0], transport=transport))
    truncated, first, *_ = events
    assert truncated == Event(id=None, type="truncated", data={"first_id": first.id})
    assert [event.id for event in events[1:]] == stored_ids(rdb, job.id)
    assert first.id != ids[1] and events[-1].type == "done"
