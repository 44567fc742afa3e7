"""Each user's job index, in the user's own slot: what ``GET /v1/jobs`` and tags are served from.

A job's own keys live in its slot (``{<job id>}``); a user's index lives in the user's
(``{u:<digest>}``, keys.user_key), so on a Redis Cluster the two are written by separate steps:
the index entry is written before the job (an entry without its job is harmless: listing drops
it), and after a write that moves the job's status, the index's copy of it. A copy that fell behind
(a process died between the two steps) is repaired when a listing reads the job itself.

Keys of one user (all with one hash tag):
- ``jobs``: sorted set, job id -> creation sequence (``seq``, a counter): newest first by creation.
- ``tag:<tag>``: the same for the jobs carrying that tag.
- ``info``: hash, job id -> ``status \\x1f expires_ms \\x1f tag,tag \\x1f type``: what listing
  filters on without touching the job's slot.
- ``exp``: sorted set, job id -> when the job expires, as far as the index knows. Exact once a job
  has ended (it takes no more writes) or while it is pending; a running job's moves with its
  writes, so a running entry past it is only looked at again later.
Every key lives a day beyond the latest expiry it holds, so an idle user's index goes away.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from jobstream import keys, metrics
from jobstream.connection import RedisClient
from jobstream.models import JobStatus
from jobstream.pipelines import ScriptCall

logger = logging.getLogger("jobstream.jobindex")
#: An index key outlives the latest expiry it knows of by this much.
KEY_SLACK_MS = 86_400_000
#: Entries past their expiry forgotten by each create, at most (the rest by later creates).
PRUNE_PER_CREATE = 20
#: Entries one listing step walks at most before answering (with a cursor to continue).
MAX_WALK = 2_000
SEP = "\x1f"

_LUA_COMMON = r"""
local function parse(v)
  local status, expires, tags, kind = string.match(v, '^([^\31]*)\31([^\31]*)\31([^\31]*)\31(.*)$')
  return status, tonumber(expires), tags, kind
end
-- KEYS[1..3] of the caller: jobs, info, exp. tag_prefix: the user's tag keys without the tag.
local function forget(id, tags, tag_prefix)
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  for tag in string.gmatch(tags, '[^,]+') do redis.call('ZREM', tag_prefix .. tag, id) end
end
local function keep(key, ttl_ms)
  local left = redis.call('PTTL', key)
  if left ~= -2 and left < ttl_ms then redis.call('PEXPIRE', key, ttl_ms) end
end
local function keep_all(tags, tag_prefix, ttl_ms)
  for i = 1, 4 do keep(KEYS[i], ttl_ms) end
  for tag in string.gmatch(tags, '[^,]+') do keep(tag_prefix .. tag, ttl_ms) end
end
"""

#: Add a job: first forget a few entries past their expiry, then give the job the next sequence
#: number, its entry and its tags. KEYS: jobs, info, exp, seq. ARGV: now_ms, job id, entry,
#: expires_ms, key ttl ms, tag prefix, tags joined by ','. Returns the job's sequence number.
_ADD = (
    _LUA_COMMON
    + r"""
local now, id, prefix = tonumber(ARGV[1]), ARGV[2], ARGV[6]
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 20)) do
  local v = redis.call('HGET', KEYS[2], old)
  if not v then
    forget(old, '', prefix)
  else
    local status, _, tags = parse(v)
    -- A running job's expiry moves with its writes: look again in an hour (listing drops it if gone).
    if status == 'running' then redis.call('ZADD', KEYS[3], now + 3600000, old) else forget(old, tags, prefix) end
  end
end
local seq = redis.call('INCR', KEYS[4])
redis.call('ZADD', KEYS[1], seq, id)
redis.call('HSET', KEYS[2], id, ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], id)
for tag in string.gmatch(ARGV[7], '[^,]+') do redis.call('ZADD', prefix .. tag, seq, id) end
keep_all(ARGV[7], prefix, tonumber(ARGV[5]))
return seq
"""
)

#: A job's status moved: its entry takes the new status and expiry (an ended job's entry never
#: moves back: writes of one job may land here out of order). KEYS: jobs, info, exp, seq.
#: ARGV: job id, status, expires_ms, key ttl ms, tag prefix, terminal statuses joined by ','.
_STATUS = (
    _LUA_COMMON
    + r"""
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return 0 end
local status, _, tags, kind = parse(v)
if string.find(',' .. ARGV[6] .. ',', ',' .. status .. ',', 1, true) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. '\31' .. ARGV[3] .. '\31' .. tags .. '\31' .. kind)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
keep_all(tags, ARGV[5], tonumber(ARGV[4]))
return 1
"""
)

#: Forget jobs: deleted ones (ARGV[2] = ''), or ones a listing found gone (ARGV[2] = now_ms: only
#: those past the expiry the index knows, since a job being created has its entry before it
#: exists). KEYS: jobs, info, exp. ARGV: tag prefix, now_ms or '', job ids.
_REMOVE = (
    _LUA_COMMON
    + r"""
local now = tonumber(ARGV[2])
for i = 3, #ARGV do
  local v = redis.call('HGET', KEYS[2], ARGV[i])
  local tags, expires = '', 0
  if v then
    local _
    _, expires, tags = parse(v)
  end
  if not now or expires <= now then forget(ARGV[i], tags, ARGV[1]) end
end
return #ARGV - 2
"""
)

#: One page of a listing, newest first: walks ``source`` (the jobs or one tag's set) from the
#: cursor down, keeps the entries that pass the filters, forgets those past their expiry.
#: KEYS: jobs, info, exp, source. ARGV: now_ms, cursor ('' = the newest), limit, statuses
#: (',a,b,' or '' = any), type filter on ('1') and its value, most entries to walk, tag prefix.
#: Returns {id, seq, unsure ('1': a running entry past its known expiry), ... of up to limit + 1
#: matches, then the last seq walked ('' = the end)}.
_PAGE = (
    _LUA_COMMON
    + r"""
local now, limit, max_walk, prefix = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[7]), ARGV[8]
local statuses, by_type, want_type = ARGV[4], ARGV[5] == '1', ARGV[6]
local top = '+inf'
if ARGV[2] ~= '' then top = '(' .. ARGV[2] end
local found, walked, last = {}, 0, ''
while #found < 3 * (limit + 1) and walked < max_walk do
  local chunk = redis.call('ZREVRANGEBYSCORE', KEYS[4], top, '-inf', 'WITHSCORES', 'LIMIT', 0, 100)
  if #chunk == 0 then last = ''; break end
  for i = 1, #chunk, 2 do
    local id, seq = chunk[i], chunk[i + 1]
    walked, last = walked + 1, seq
    local v = redis.call('HGET', KEYS[2], id)
    if not v then
      redis.call('ZREM', KEYS[4], id)
    else
      local status, expires, tags, kind = parse(v)
      -- A running job past the expiry the index knows may have ended without the index hearing
      -- of it: whatever the status filter, the listing reads it (and repairs the entry).
      local unsure = status == 'running' and expires <= now
      if status ~= 'running' and expires <= now then
        forget(id, tags, prefix)
      elseif (unsure or statuses == '' or string.find(statuses, ',' .. status .. ',', 1, true))
          and (not by_type or kind == want_type) then
        found[#found + 1] = id
        found[#found + 1] = seq
        found[#found + 1] = unsure and '1' or ''
        if #found == 3 * (limit + 1) then break end
      end
    end
    if walked >= max_walk then break end
  end
  top = '(' .. last
  if #chunk < 200 then
    if #found < 3 * (limit + 1) and walked < max_walk then last = '' end
    break
  end
end
found[#found + 1] = last
return found
"""
)


@dataclass(frozen=True, slots=True)
class IndexPage:
    """Job ids of one page, newest first, and where the next page starts (None: no more)."""

    job_ids: list[str]
    next_seq: int | None
    #: Running jobs past the expiry the index knows: read whatever the status filter, to repair.
    unsure: frozenset[str] = frozenset()


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"j1:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The sequence a listing cursor names; ValueError for anything no listing gave out."""
    if not 1 <= len(cursor) <= 64:
        raise ValueError("bad cursor")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("bad cursor") from None
    version, _, seq = text.partition(":")
    if version != "j1" or not seq.isdigit() or len(seq) > 18:
        raise ValueError("bad cursor")
    return int(seq)


_TERMINAL = ",".join(status.value for status in JobStatus if status.terminal)


class JobIndex:
    def __init__(self, client: RedisClient) -> None:
        self._redis = client
        self._add = client.register_script(_ADD)
        self._status = client.register_script(_STATUS)
        self._remove = client.register_script(_REMOVE)
        self._page = client.register_script(_PAGE)

    @staticmethod
    def _keys(user: str) -> list[str]:
        return [keys.user_key(user, name) for name in ("jobs", "info", "exp", "seq")]

    def add_call(
        self,
        *,
        user: str,
        job_id: str,
        job_type: str,
        tags: Sequence[str],
        now_ms: int,
        expires_ms: int,
        retention_ms: int,
    ) -> ScriptCall:
        """The add script for one new job (pending), to send with other scripts (pipelines.py)."""
        entry = SEP.join([JobStatus.pending.value, str(expires_ms), ",".join(tags), job_type])
        key_ttl_ms = expires_ms - now_ms + retention_ms + KEY_SLACK_MS
        args: list[str | int] = [now_ms, job_id, entry, expires_ms, key_ttl_ms, _tag_prefix(user), ",".join(tags)]
        return self._add, self._keys(user), args

    def remove_call(self, user: str, job_ids: Sequence[str], *, gone_at_ms: int | None = None) -> ScriptCall:
        """The script that forgets jobs of ``user``'s, to send with others (pipelines.py); with
        ``gone_at_ms``, only those whose known expiry is past by then (found gone by a listing)."""
        when = "" if gone_at_ms is None else gone_at_ms
        return self._remove, self._keys(user)[:3], [_tag_prefix(user), when, *job_ids]

    async def run(self, call: ScriptCall) -> Any:
        script, script_keys, args = call
        return await script(keys=script_keys, args=args)

    async def status_changed(self, user: str, job_id: str, status: str, expires_ms: int, now_ms: int) -> None:
        """Copy a job's new status into its owner's index. The job's own write has landed by now,
        so a failure here is logged and counted, not raised: a copy left behind is repaired when a
        listing reads the job."""
        key_ttl_ms = max(0, expires_ms - now_ms) + KEY_SLACK_MS
        try:
            await self._status(
                keys=self._keys(user), args=[job_id, status, expires_ms, key_ttl_ms, _tag_prefix(user), _TERMINAL]
            )
        except RedisError as exc:
            metrics.redis_errors.labels("job_index").inc()
            logger.warning("job %s: its owner's index missed its status %s (%s)", job_id, status, type(exc).__name__)

    async def remove(self, user: str, job_ids: Sequence[str], *, gone_at_ms: int | None = None) -> None:
        if job_ids:
            await self.run(self.remove_call(user, job_ids, gone_at_ms=gone_at_ms))

    async def page(
        self,
        user: str,
        *,
        now_ms: int,
        after_seq: int | None,
        limit: int,
        statuses: Sequence[str] = (),
        job_type: str | None = None,
        tag: str | None = None,
    ) -> IndexPage:
        """Up to ``limit`` ids of the user's jobs that pass the filters, newest first, after the
        sequence ``after_seq`` (None: from the newest). A page is full whenever more match, unless
        MAX_WALK entries were walked first (then it says where to continue)."""
        index_keys = self._keys(user)
        source = keys.user_key(user, f"tag:{tag}") if tag is not None else index_keys[0]
        wanted = f",{','.join(statuses)}," if statuses else ""
        args: list[str | int] = [
            now_ms,
            "" if after_seq is None else after_seq,
            limit,
            wanted,
            "1" if job_type is not None else "",
            job_type or "",
            MAX_WALK,
            _tag_prefix(user),
        ]
        reply = await self._page(keys=[*index_keys[:3], source], args=args)
        *flat, last = reply
        job_ids = [flat[i] for i in range(0, len(flat), 3)]
        unsure = frozenset(flat[i] for i in range(0, len(flat), 3) if flat[i + 2])
        if len(job_ids) > limit:
            return IndexPage(job_ids[:limit], int(flat[3 * limit - 2]), unsure)
        return IndexPage(job_ids, int(last) if last else None, unsure)


def _tag_prefix(user: str) -> str:
    return keys.user_key(user, "tag:")
