"""Lua scripts that change a job atomically. Each touches only keys of one job (one hash tag)."""

from __future__ import annotations

#: A batch its producer sent before (it lost the reply: a timeout, a Redis restart, redis-py's own
#: retry of the script) is not added twice, and its producer learns how it went: this comes before
#: the check that the job has not ended, since the batch that ends a job is the one most worth
#: retrying. KEYS: meta. ARGV[8]: the batch ('' = none). Returns {'repeat', status}.
_REPEAT = """
if ARGV[8] ~= '' and redis.call('HGET', KEYS[1], 'batch') == ARGV[8] then
  return {'repeat', redis.call('HGET', KEYS[1], 'status')}
end
"""

#: The job must exist and not have ended. KEYS: meta. Leaves its status in ``status``.
_UNENDED = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'gone'} end
if status == 'completed' or status == 'failed' or status == 'cancelled' then return {'ended', status} end
"""

#: Append events and move the status in one step, so status and its event never disagree, then
#: publish them for the gateways' hubs (id, type and data joined by \x1e, events by \x1f).
#: An accepted cancel wins: once the job's cancel flag is set, an ending that says completed or
#: failed is written as cancelled, without its result or failure event (nor their meta fields).
#: KEYS: meta, events.
#: ARGV: now_ms, maxlen, retention_s, failed_retention_s, new_status ('' = unchanged), channel,
#:       nfields, batch ('' = none: a producer's id of this batch, one it may retry), nfields
#:       field/value pairs for the meta hash, then type/data pairs of the events.
#: Returns {'ok', status, id...} (status: the job's status after the append).
_WRITE = """
local now = tonumber(ARGV[1])
local maxlen = ARGV[2]
local new_status = ARGV[5]
local nfields = tonumber(ARGV[7])
local batch = ARGV[8]
local first = 9 + 2 * nfields
-- Remembered so that a retry of this batch is known as one (see _REPEAT).
if batch ~= '' then redis.call('HSET', KEYS[1], 'batch', batch) end
local cancel_wins = (new_status == 'completed' or new_status == 'failed')
  and redis.call('HGET', KEYS[1], 'cancel') == '1'
local dropped_events, dropped_fields = {}, {}
if cancel_wins then
  new_status = 'cancelled'
  dropped_events, dropped_fields = {result = true, failure = true}, {result = true, error = true}
end
local last
local published = {}
local FS, ES = string.char(30), string.char(31)
if status == 'pending' and ARGV[first] ~= 'status' and ARGV[first] ~= 'done' then
  -- A producer's first event starts the job: readers always see 'running' before output.
  local running = '{"status":"running"}'
  last = redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 't', 'status', 'd', running)
  published[1] = last .. FS .. 'status' .. FS .. running
  if new_status == '' then new_status = 'running' end
end
local ids = {'ok', ''}
for i = first, #ARGV, 2 do
  local kind, data = ARGV[i], ARGV[i + 1]
  if not dropped_events[kind] then
    if cancel_wins and kind == 'done' then data = '{"status":"cancelled"}' end
    last = redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 't', kind, 'd', data)
    ids[#ids + 1] = last
    published[#published + 1] = last .. FS .. kind .. FS .. data
  end
end
-- Remember once the MAXLEN cap has dropped events, so readers need not ask the stream each time.
if redis.call('HINCRBY', KEYS[1], 'appended', #published) > redis.call('XLEN', KEYS[2]) then
  redis.call('HSET', KEYS[1], 'trimmed', '1')
end
for i = 9, first - 1, 2 do
  if not dropped_fields[ARGV[i]] then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
local effective = status
if new_status ~= '' then effective = new_status end
local ttl
if effective == 'completed' or effective == 'cancelled' then
  ttl = tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'completed_ms', now)
elseif effective == 'failed' then
  ttl = tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'completed_ms', now)
else
  ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl_s'))
end
if status == 'pending' and effective == 'running' then
  redis.call('HSET', KEYS[1], 'started_ms', now)
end
redis.call('HSET', KEYS[1], 'status', effective, 'updated_ms', now, 'last_event_id', last,
  'expires_ms', now + ttl * 1000)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('PUBLISH', ARGV[6], table.concat(published, ES))
ids[2] = effective
return ids
"""

#: A producer's append (see _WRITE). Returns {'ok', status, id...} | {'gone'} | {'ended', status} |
#: {'repeat', status} (the batch was appended before: status is the job's now, which for the batch
#: that ended the job is how it ended).
APPEND = _REPEAT + _UNENDED + _WRITE

#: Accept a cancel, or refuse it once the job has ended. The flag is set in the same step as the
#: status is checked, so any ending written after an accepted cancel is cancelled (see APPEND). A
#: job no worker holds (pending, or external) is ended here at once: the events to write are the
#: `done` of a cancelled job. KEYS and ARGV: as APPEND.
#: Returns {'cancelling'} (its worker stops it) | APPEND's replies ({'ok', 'cancelled', id}: ended here).
REQUEST_CANCEL = (
    _UNENDED
    + """
redis.call('HSET', KEYS[1], 'cancel', '1')
if status == 'running' and redis.call('HGET', KEYS[1], 'type') ~= 'external' then return {'cancelling'} end
"""
    + _WRITE
)

#: Start one run of a job by a worker. KEYS: meta.
#: Returns {'ok', attempt} | {'gone'} | {'ended', status} | {'cancelled'}.
START_ATTEMPT = (
    _UNENDED
    + """
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return {'cancelled'} end
return {'ok', redis.call('HINCRBY', KEYS[1], 'attempt', 1)}
"""
)
