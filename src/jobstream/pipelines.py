"""Several Lua scripts in one round trip.

redis-py runs a registered script on a pipeline by first asking Redis whether it knows the script
(``SCRIPT EXISTS``, a round trip of its own, on every ``execute``). Here the scripts are sent by
their digests alone, and any Redis does not know (NOSCRIPT: after a restart, a failover or a
``SCRIPT FLUSH``) are loaded and sent again: the round trip is the common case's only one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

#: A script, its keys and its arguments.
ScriptCall = tuple[AsyncScript, Sequence[str], Sequence[str | int]]


async def run_scripts(client: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """Each script's reply, in order; raises the first error but NOSCRIPT (those scripts run again,
    once loaded, after the rest: no call may depend on running before the next)."""
    replies = await _send(client, calls)
    missing = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        for script in {id(calls[index][0]): calls[index][0] for index in missing}.values():
            await client.script_load(script.script)
        for index, reply in zip(missing, await _send(client, [calls[index] for index in missing]), strict=True):
            replies[index] = reply
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


async def _send(client: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))
