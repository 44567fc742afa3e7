"""The hub's one pub/sub connection, read by exactly one task.

redis-py's ``PubSub`` reads its socket from whichever coroutine happens to need a reply: its health
check (a PING sent with the next command after ``health_check_interval`` of quiet) and its
reconnects read from the task that sends, while the hub's reader task is already blocked reading
the same socket. After a quiet half-minute the first reader to join then hit "read() called while
another coroutine is already waiting for incoming data". So the hub does not use ``PubSub``: it
holds one plain connection, and

- only the reader task connects, reads and reconnects (``open``, ``read``);
- one other task (the hub's writer) *sends* (SUBSCRIBE, UNSUBSCRIBE, PING), and only while the
  link is ``live``: connected and past the handshake. A send while the link is down is skipped,
  since the hub subscribes every followed channel when it is back;
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

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from jobstream.connection import COMMAND_TIMEOUT_S, RedisClient


class Link:
    """One subscription connection (see the module docstring for who may do what with it)."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self._pool: ConnectionPool | None = None  # where the connection goes back (one Redis)
        self._connection: AbstractConnection | None = None
        self._node: tuple[str, int] | None = None  # a cluster node's address
        #: Connected and past the handshake: commands may be sent (the hub then re-subscribes
        #: every followed channel).
        self.live = False

    def __repr__(self) -> str:
        return f"Link(live={self.live}, connection={self._connection!r})"

    async def open(self, *, failed: bool) -> None:
        """Connect (the reader task only). After a failure on a cluster, to another node."""
        self.live = False
        if isinstance(self._client, RedisCluster):
            if failed or self._connection is None:
                await self._release()
                self._connection = self._cluster_connection(self._client, failed=failed)
        elif self._connection is None:
            self._pool = self._client.connection_pool
            self._connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        # The hub pings on its own tick: redis-py's check would read from the sending task.
        self._connection.health_check_interval = 0
        await self._connection.connect()

    async def read(self) -> Any:
        """The next reply or message, waiting as long as it takes (the reader task only)."""
        assert self._connection is not None
        return await self._connection.read_response(timeout=math.inf, push_request=True)

    async def send(self, *args: str) -> bool:
        """Send a command if the link is live (the hub's writer task); False if it was skipped or
        failed. A failed send closes the connection (redis-py does), which ends the reader's read:
        the reader reconnects and re-subscribes."""
        connection = self._connection
        if not self.live or connection is None or not connection.is_connected:
            return False
        try:
            await connection.send_command(*args, check_health=False)
        except Exception:  # also redis-py's AttributeError when the connection was dropped meanwhile
            if connection is self._connection:  # not a late failure on a connection since replaced
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
        connection, pool = self._connection, self._pool
        self._connection = self._pool = None
        if connection is None:
            return
        with contextlib.suppress(RedisError, OSError):
            await connection.disconnect(nowait=True)
            if pool is not None:
                await pool.release(connection)

    def _cluster_connection(self, cluster: RedisCluster, *, failed: bool) -> AbstractConnection:
        """A connection of its own to one node picked at random, other than the last one if it
        ``failed`` (the topology may still list it), with the cluster's own settings (credentials,
        TLS) and no reconnect loop against a node that may be gone for good: the link moves instead."""
        # Before the client has met the cluster it knows only the node it was given.
        nodes = cluster.get_nodes() or list(cluster.nodes_manager.startup_nodes.values())
        if failed and self._node is not None:
            nodes = [node for node in nodes if (node.host, int(node.port)) != self._node] or nodes
        node = random.choice(nodes)
        self._node = (node.host, int(node.port))
        kwargs = {**node.connection_kwargs, "retry": Retry(NoBackoff(), 0), "socket_timeout": COMMAND_TIMEOUT_S}
        connection: AbstractConnection = node.connection_class(**kwargs)
        return connection
