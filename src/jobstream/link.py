"""The hub's one pub/sub connection, read by exactly one task.

redis-py's ``PubSub`` reads its socket from whichever coroutine happens to need a reply: its health
check (a PING sent with the next command after ``health_check_interval`` of quiet) and its
reconnects read from the task that sends, while the hub's reader task is already blocked reading
the same socket. After a quiet half-minute the first reader to join then hit "read() called while
another coroutine is already waiting for incoming data". So the hub does not use ``PubSub``: it
holds one plain connection, and

- only the reader task connects, reads and reconnects (``open``, ``read``);
- any task may *send* (SUBSCRIBE, UNSUBSCRIBE, PING), and only while the link is ``live``: connected,
  past the handshake, with every followed channel re-subscribed by the reader task. A send while
  the link is down is skipped, since the reader subscribes every followed channel when it is back;
- the connection has no redis-py health check: the hub pings it on its own tick and the PONG is
  read by the reader task like any other reply.

On a Redis Cluster a plain PUBLISH reaches every node, so the link connects to one node picked at
random (spreading a deploy's processes across the cluster); after a failure it moves to another
node, since the one it had may be gone for good. One Redis, direct or through Sentinel, is
reconnected to on the same connection (Sentinel's connection asks for the current master).
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from jobstream.connection import COMMAND_TIMEOUT_S, CONNECT_TIMEOUT_S, RedisClient


class Link:
    """One subscription connection (see the module docstring for who may do what with it)."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self._node_client: aioredis.Redis | None = None  # a cluster node's own client
        self._pool: ConnectionPool | None = None
        self._connection: AbstractConnection | None = None
        self._last_node: tuple[str, int] | None = None
        #: Connected and every followed channel re-subscribed: other tasks may send.
        self.live = False

    def __repr__(self) -> str:
        return f"Link(live={self.live}, connection={self._connection!r})"

    async def open(self, *, failed: bool) -> None:
        """Connect (the reader task only). After a failure on a cluster, on another node."""
        self.live = False
        if isinstance(self._client, RedisCluster) and (failed or self._node_client is None):
            await self._release()
            self._pool = self._cluster_node_pool(self._client, failed=failed)
        elif self._pool is None:
            assert isinstance(self._client, aioredis.Redis)
            self._pool = self._client.connection_pool
        if self._connection is None:
            self._connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            # The hub pings on its own tick: redis-py's check would read from the sending task.
            self._connection.health_check_interval = 0
        await self._connection.connect()

    async def read(self) -> Any:
        """The next reply or message, waiting as long as it takes (the reader task only)."""
        assert self._connection is not None
        return await self._connection.read_response(timeout=math.inf, push_request=True)

    async def send(self, *args: str) -> bool:
        """Send a command if the link is live (any task); False if it was skipped or failed.

        A failed send closes the connection (redis-py does), which ends the reader's read: the
        reader reconnects and re-subscribes.
        """
        connection = self._connection
        if not self.live or connection is None or not connection.is_connected:
            return False
        try:
            await connection.send_command(*args, check_health=False)
        except (RedisError, OSError):
            self.live = False
            return False
        return True

    async def drop(self) -> None:
        """Close the connection without reading (any task): the reader's read fails and it reconnects."""
        self.live = False
        if self._connection is not None:
            await self._connection.disconnect(nowait=True)

    async def close(self) -> None:
        self.live = False
        await self._release()

    async def _release(self) -> None:
        connection, pool, node_client = self._connection, self._pool, self._node_client
        self._connection = self._pool = self._node_client = None
        with contextlib.suppress(RedisError, OSError):
            if connection is not None and pool is not None:
                await connection.disconnect(nowait=True)
                await pool.release(connection)
            if node_client is not None:
                await node_client.aclose()

    def _cluster_node_pool(self, cluster: RedisCluster, *, failed: bool) -> ConnectionPool:
        """A client of one node, picked at random, other than the last one if it ``failed`` (the
        topology may still list it)."""
        # Before the client has met the cluster it knows only the node it was given.
        nodes = cluster.get_nodes() or list(cluster.nodes_manager.startup_nodes.values())
        if failed and self._last_node is not None:
            nodes = [node for node in nodes if (node.host, int(node.port)) != self._last_node] or nodes
        node = random.choice(nodes)
        self._last_node = (node.host, int(node.port))
        self._node_client = aioredis.Redis(
            host=node.host,
            port=int(node.port),
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=COMMAND_TIMEOUT_S,
            # No reconnect loop against a node that may be gone for good: the link moves instead.
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        return self._node_client.connection_pool
