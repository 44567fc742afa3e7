"""The fan-out hub on a real Redis: gap-free joins under concurrent appends, O(1) Redis work per
batch, bounded buffers, clean unsubscribes, and recovery from a lost connection."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import pytest

from jobstream import keys
from jobstream.connection import MAX_CONNECTIONS, create_client
from jobstream.hub import Hub, JobGone, SubscriberOverflow
from jobstream.store import JobRecord, JobStore, OutgoingEvent, StoredEvent
from tests.conftest import SyncRedis, make_settings, server_nodes, subscribed_channels
from tests.helpers import wait_until_async

pytestmark = pytest.mark.on_cluster


@asynccontextmanager
async def hub_and_store(redis_url: str, **hub_options: Any) -> AsyncIterator[tuple[Hub, JobStore]]:
    settings = make_settings(redis_url)
    client = create_client(settings)
    store = JobStore(client, settings)
    hub = Hub(client, store, **hub_options)
    await hub.start()
    try:
        yield hub, store
    finally:
        started = time.monotonic()
        await hub.close()
        await client.aclose()
        # Regression: a cancellation swallowed inside a redis-py call kept the tick loop alive and close() hung.
        assert time.monotonic() - started < 5, "Hub.close() must return promptly"


async def new_job(store: JobStore) -> str:
    job_id = str(uuid.uuid4())
    await store.create(JobRecord.new(job_id=job_id, owner="alice", job_type="external", input={}, ttl_s=60))
    return job_id


def delta(text: str) -> OutgoingEvent:
    return OutgoingEvent("delta", '{"text":"' + text + '"}')


def run(scenario: Callable[[], Awaitable[None]], timeout_s: float = 40) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout_s))


async def collect(
    hub: Hub, job_id: str, after: str, until: int, on_batch: Callable[[], object] | None = None
) -> list[StoredEvent]:
    """Follow until ``until`` events arrived (ticks ignored). ``on_batch`` runs on every batch a tick
    included: once it has run, the follower has joined and read the history."""
    received: list[StoredEvent] = []
    async with aclosing(hub.follow(job_id, after)) as batches:
        async for batch in batches:
            received += batch
            if on_batch is not None:
                on_batch()
            if len(received) >= until:
                break
    return received


async def wait_subscribed(rdb: SyncRedis, job_id: str) -> None:
    """Until Redis has the job's channel subscribed: published events now reach the hub."""
    await wait_until_async(
        lambda: subscribed_channels(rdb, keys.live_channel(job_id)),
        message=f"the hub never subscribed to job {job_id}'s channel",
    )


def test_join_whenAppendsRunConcurrently_thenEverySubscriberGetsExactSequence(redis_url: str) -> None:
    async def scenario() -> None:
        async with hub_and_store(redis_url) as (hub, store):
            job_id = await new_job(store)
            total = 600
            appended: list[str] = []

            async def produce() -> None:
                for index in range(total):
                    appended.extend(await store.append(job_id, [delta(str(index))]))
                    if index % 20 == 0:
                        await asyncio.sleep(0.001)  # on purpose: appends spread out, for joins to fall between them

            async def join_later(rng: random.Random) -> tuple[str, list[StoredEvent]]:
                await asyncio.sleep(rng.random() * 0.3)  # on purpose: each reader joins at its own moment
                # Resume from a random id already seen (or from the start).
                after = rng.choice(["0-0", *appended]) if appended else "0-0"
                expected_count = total + 1 - (appended.index(after) + 2 if after != "0-0" else 0)
                return after, await collect(hub, job_id, after, expected_count)

            rng = random.Random(7)
            producer = asyncio.create_task(produce())
            results = await asyncio.gather(*(join_later(random.Random(rng.random())) for _ in range(40)))
            await producer
            stream = await store.read(job_id, "0-0", 10_000)
            ids = [event.id for event in stream]
            for after, received in results:
                start = 0 if after == "0-0" else ids.index(after) + 1
                assert [event.id for event in received] == ids[start:], f"gap or duplicate after {after}"

    run(scenario)


def _command_calls(rdb: SyncRedis, name: str) -> int:
    calls = 0
    for node in server_nodes(rdb):
        stats = node.info("commandstats").get(f"cmdstat_{name}")
        calls += int(stats["calls"]) if stats else 0
    return calls


def _client_count(rdb: SyncRedis) -> int:
    return sum(len(node.client_list()) for node in server_nodes(rdb))


def test_fanout_whenManyReaders_thenRedisWorkPerBatchIsConstant(redis_url: str, rdb: SyncRedis) -> None:
    readers = 300

    async def scenario() -> None:
        # Frequent ticks: a reader's first tick tells that it has joined and read the (empty) history.
        async with hub_and_store(redis_url, tick_s=0.05) as (hub, store):
            job_id = await new_job(store)
            clients_before = _client_count(rdb)
            got: list[list[StoredEvent]] = [[] for _ in range(readers)]
            joined: set[int] = set()

            async def reader(slot: int) -> None:
                got[slot] = await collect(hub, job_id, "0-0", 51, lambda: joined.add(slot))  # status + 50 deltas

            tasks = [asyncio.create_task(reader(i)) for i in range(readers)]
            await wait_until_async(lambda: len(joined) == readers, message="not every reader joined")
            reads_before = _command_calls(rdb, "xrange") + _command_calls(rdb, "xread")
            for index in range(50):
                await store.append(job_id, [delta(str(index))])
            await asyncio.gather(*tasks)
            reads_after = _command_calls(rdb, "xrange") + _command_calls(rdb, "xread")
            assert reads_after == reads_before, "live events must not cost a Redis read per reader"
            opened = _client_count(rdb) - clients_before
            assert opened <= MAX_CONNECTIONS + 1, f"{opened} Redis connections for {readers} readers"
            assert all([e.id for e in g] == [e.id for e in got[0]] for g in got)
            # Each event is encoded once per process: every reader got the same object.
            assert all(g[5] is got[0][5] for g in got)

    run(scenario)


def test_slowSubscriber_whenBufferExceeded_thenOnlyItIsDropped(redis_url: str) -> None:
    async def scenario() -> None:
        async with hub_and_store(redis_url, max_events=20, tick_s=0.1) as (hub, store):
            job_id = await new_job(store)
            stalled = hub.follow(job_id, "0-0")
            assert await anext(stalled) == []  # joined; from now on it reads nothing
            healthy_got: list[StoredEvent] = []
            healthy_joined = asyncio.Event()

            async def healthy() -> None:
                healthy_got.extend(await collect(hub, job_id, "0-0", 61, healthy_joined.set))

            task = asyncio.create_task(healthy())
            await asyncio.wait_for(healthy_joined.wait(), 10)  # its first tick: joined
            for index in range(60):
                await store.append(job_id, [delta(str(index))])
                await asyncio.sleep(0)  # a turn for the healthy reader to drain its buffer, as a live one would
            await task
            assert len(healthy_got) == 61
            with pytest.raises(SubscriberOverflow):
                while True:
                    await anext(stalled)
            await stalled.aclose()
            assert hub.channel_count == 0

    run(scenario)


def test_unsubscribe_whenTenThousandCycles_thenNothingLeftBehind(redis_url: str, rdb: SyncRedis) -> None:
    async def scenario() -> None:
        async with hub_and_store(redis_url) as (hub, store):
            jobs = [await new_job(store) for _ in range(20)]
            for job_id in jobs:
                await store.append(job_id, [delta("x")])

            async def cycle(index: int) -> None:
                follower = hub.follow(jobs[index % len(jobs)], "0-0")
                try:
                    await anext(follower)
                    if index % 3 == 0:
                        raise RuntimeError("the reader went away")
                except RuntimeError:
                    pass
                finally:
                    await follower.aclose()

            await asyncio.gather(*(cycle(i) for i in range(500)))  # warm up allocations
            # Settled: the warm-up's unsubscribes done (this check's own Redis connections opened too,
            # before the measurement rather than within it).
            await wait_until_async(
                lambda: not subscribed_channels(rdb, keys.live_channel("*")), message="the warm-up stayed subscribed"
            )
            gc.collect()
            tasks_before = len(asyncio.all_tasks())
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            for start in range(0, 10_000, 500):
                await asyncio.gather(*(cycle(i) for i in range(start, start + 500)))
            # A turn of the loop lets the finished cycles' tasks go (their last callbacks run in it); the
            # unsubscribes are tasks of their own: until they are done and Redis has them.
            await asyncio.sleep(0)
            await wait_until_async(
                lambda: (
                    not subscribed_channels(rdb, keys.live_channel("*")) and len(asyncio.all_tasks()) <= tasks_before
                ),
                message="channels still subscribed, or unsubscribe tasks still running",
            )
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
            assert hub.channel_count == 0
            assert len(asyncio.all_tasks()) <= tasks_before
            assert subscribed_channels(rdb, keys.live_channel("*")) == []
            assert grown < 512 * 1024, f"{grown} bytes retained after 10,000 cycles"

    run(scenario, timeout_s=120)


def test_lostConnection_whenPubsubKilled_thenReadersResumeWithoutGap(redis_url: str, rdb: SyncRedis) -> None:
    async def scenario() -> None:
        async with hub_and_store(redis_url) as (hub, store):
            job_id = await new_job(store)
            got: list[StoredEvent] = []

            async def reader() -> None:
                got.extend(await collect(hub, job_id, "0-0", 101))

            task = asyncio.create_task(reader())
            await wait_subscribed(rdb, job_id)
            for index in range(100):
                await store.append(job_id, [delta(str(index))])
                if index == 30:
                    assert sum(node.client_kill_filter(_type="pubsub") for node in server_nodes(rdb)) == 1
                await asyncio.sleep(0.005)  # on purpose: appends keep coming while the connection is down
            await asyncio.wait_for(task, 15)
            ids = [event.id for event in await store.read(job_id, "0-0", 1000)]
            assert [event.id for event in got] == ids
            assert hub.resets >= 1

    run(scenario)


def test_readerLoop_whenABugRaisesInside_thenItCarriesOnAndReadersMissNothing(
    redis_url: str, rdb: SyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with hub_and_store(redis_url) as (hub, store):
            job_id = await new_job(store)
            publish = hub._publish
            calls = 0

            def flaky(name: str, payload: str) -> None:
                nonlocal calls
                calls += 1
                if calls == 10:
                    raise KeyError("a bug in message handling")
                publish(name, payload)

            monkeypatch.setattr(hub, "_publish", flaky)
            task = asyncio.create_task(collect(hub, job_id, "0-0", 41))
            await wait_subscribed(rdb, job_id)  # every append below is published to the hub
            for index in range(40):
                await store.append(job_id, [delta(str(index))])
                await asyncio.sleep(0.005)  # on purpose: appends keep coming while the reader loop recovers
            got = await asyncio.wait_for(task, 15)
            assert [event.id for event in got] == [event.id for event in await store.read(job_id, "0-0", 1000)]
            assert hub.resets == 1

    run(scenario)


def test_wait_whenEventArrives_thenReturnsIt_andTimesOutOtherwise(redis_url: str, rdb: SyncRedis) -> None:
    async def scenario() -> None:
        async with hub_and_store(redis_url) as (hub, store):
            job_id = await new_job(store)
            assert await hub.wait(job_id, "0-0", 0.2) == []
            await wait_until_async(
                lambda: not subscribed_channels(rdb, keys.live_channel(job_id)),
                message="the timed-out wait left its channel subscribed",
            )
            waiter = asyncio.create_task(hub.wait(job_id, "0-0", 10))
            await wait_subscribed(rdb, job_id)  # the waiter is waiting: the event arrives live
            ids = await store.append(job_id, [delta("late")])
            events = await waiter
            assert [e.type for e in events] == ["status", "delta"] and events[-1].id == ids[-1]
            assert hub.channel_count == 0

    run(scenario)


def test_ticks_whenIdle_thenEmptyBatches_andDeletedJobEndsFollowers(redis_url: str) -> None:
    async def scenario() -> None:
        async with hub_and_store(redis_url, tick_s=0.1) as (hub, store):
            job_id = await new_job(store)
            follower = hub.follow(job_id, "0-0")
            assert await anext(follower) == []  # a tick: nothing happened
            await store.delete(job_id)
            with pytest.raises(JobGone):
                while True:
                    await anext(follower)
            await follower.aclose()
            expiring = await new_job(store)
            follower = hub.follow(expiring, "0-0")
            await anext(follower)
            await store._redis.delete(keys.meta_key(expiring))  # as if its TTL ran out
            with pytest.raises(JobGone):
                while True:
                    await anext(follower)
            await follower.aclose()

    run(scenario)


def test_join_whenManyNewChannelsAtOnce_thenEveryOneIsLive(redis_url: str) -> None:
    """Regression: concurrent first subscribes on a fresh hub each opened a pub/sub connection,
    and only the last one was read; readers of the other jobs waited forever."""

    async def scenario() -> None:
        async with hub_and_store(redis_url) as (_, store):
            jobs = [await new_job(store) for _ in range(30)]
            # A hub on a client that has not connected yet: its first subscribes all open connections.
            settings = make_settings(redis_url)
            fresh = create_client(settings)
            hub = Hub(fresh, JobStore(fresh, settings), tick_s=0.05)
            await hub.start()
            try:
                joined: set[str] = set()
                followers = [
                    asyncio.create_task(collect(hub, job_id, "0-0", 2, lambda job_id=job_id: joined.add(job_id)))
                    for job_id in jobs
                ]
                # Each one's first tick: its channel is live. (With the bug, most never got that far.)
                await wait_until_async(lambda: len(joined) == len(jobs), message="not every follower joined")
                for job_id in jobs:
                    await store.append(job_id, [delta("live")])
                results = await asyncio.wait_for(asyncio.gather(*followers), 10)
                assert all([e.type for e in got] == ["status", "delta"] for got in results)
            finally:
                await hub.close()
                await fresh.aclose()

    run(scenario)


def test_wait_whenTimeoutTiny_thenAnswersAtOnceAndLeavesNothing(redis_url: str, rdb: SyncRedis) -> None:
    """Regression: a deadline that passed while the join sent its SUBSCRIBE (redis-py wraps the
    send in asyncio.wait_for, which on Python 3.11 can swallow the cancellation) was lost, and
    the wait went on until the next event."""

    async def scenario() -> None:
        async with hub_and_store(redis_url) as (hub, store):
            job_id = await new_job(store)
            for timeout_s in (1e-9, 1e-6, 1e-4, 1e-3):
                started = time.monotonic()
                assert await asyncio.wait_for(hub.wait(job_id, "0-0", timeout_s), 5) == []
                assert time.monotonic() - started < 1
            await wait_until_async(
                lambda: hub.channel_count == 0 and not subscribed_channels(rdb, keys.live_channel(job_id)),
                message="a tiny wait left its channel behind",
            )

    run(scenario)


def test_wait_whenCancelledWhileJoining_thenNoChannelLeftBehind(redis_url: str, rdb: SyncRedis) -> None:
    async def scenario() -> None:
        async with hub_and_store(redis_url) as (hub, store):
            jobs = [await new_job(store) for _ in range(20)]
            for index, job_id in enumerate(jobs):
                waiter = asyncio.create_task(hub.wait(job_id, "0-0", 10))
                for _ in range(index % 4):
                    await asyncio.sleep(0)  # on purpose: cancelled at a different step each time
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
            assert hub.channel_count == 0
            await wait_until_async(
                lambda: not subscribed_channels(rdb, keys.live_channel("*")),
                message="cancelled joins left channels subscribed",
            )

    run(scenario)
