"""Lua scripts that change a job atomically. Each touches only keys of one job (one hash tag)."""

from __future__ import annotations

from jobstream.outbox import OUTBOX_TTL_S

#: A batch its producer sent before (it lost the reply: a timeout, a Redis restart, redis-py's own
#: retry of the script) is not added twice, and its producer learns how it went: this comes before
#: the check that the job has not ended, since the batch that ends a job is the one most worth
#: retrying. KEYS: meta. ARGV[8]: the batch ('' = none). Returns {'repeat', status}.
_REPEAT = """
if ARGV[8] ~= '' and redis.call('HGET', KEYS[1], 'batch') == ARGV[8] then
  return {'repeat', redis.call('HGET', KEYS[1], 'status')}
end
"""

#: Refuses a job that has ended; after a fragment that leaves the job's status in ``status``.
_NOT_ENDED = """
if status == 'completed' or status == 'failed' or status == 'cancelled' then return {'ended', status} end
"""

#: The job must exist and not have ended. KEYS: meta. Leaves its status in ``status``.
_UNENDED = (
    """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'gone'} end
"""
    + _NOT_ENDED
)

#: The checks of a write on a caller's behalf, in the order the HTTP API answers them (404, 403,
#: 409): the job must exist, belong to ARGV[9] ('' = anyone: a worker's own write) and, when
#: ARGV[10] is '1' (an append over HTTP), be an `external` job, then not have ended. Nothing is
#: written, and nothing of the job told, before they pass. KEYS: meta. Leaves ``status``.
_CHECKED = (
    """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'gone'} end
if ARGV[9] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[9] then return {'forbidden'} end
if ARGV[10] == '1' and redis.call('HGET', KEYS[1], 'type') ~= 'external' then return {'not_external'} end
"""
    + _NOT_ENDED
)

#: Append events and move the status in one step, so status and its event never disagree, then
#: publish them for the gateways' hubs (id, type and data joined by \x1e, events by \x1f).
#: An accepted cancel wins: once the job's cancel flag is set, an ending that says completed or
#: failed is written as cancelled, without its result or failure event (nor their meta fields).
#: A job created with a snapshot bound (meta output_max, bytes) keeps its snapshot here: every event
#: but `done` is covered by it (output_id: the last covered), each delta's text appended to the
#: output key (output_len: its length), as long as the text stays within the bound; a delta that
#: would pass it freezes the snapshot where it is (output_progress: the progress it covers), and
#: every later event is replayed after it. Never unfrozen: it grows only while output_id is the
#: job's last event id.
#: KEYS: meta, events, output.
#: ARGV: now_ms, maxlen, retention_s, failed_retention_s, new_status ('' = unchanged), channel,
#:       nfields, batch ('' = none: a producer's id of this batch, one it may retry), owner and
#:       external-only (see _CHECKED), nfields field/value pairs for the meta hash, then type/data
#:       pairs of the events.
#: Leaves {'ok', status, started_ms, owner, expires_ms, outbox_ms, id...} in ``ids`` (status: the
#: job's status after the append; started_ms: when it started running, '' if it has not; owner and
#: expires_ms: when the append moved the job's status, its owner and new expiry, else ''; outbox_ms:
#: when it wrote an outbox record, its time, else '') for the script to return.
_WRITE = (
    """
local now = tonumber(ARGV[1])
local maxlen = ARGV[2]
local new_status = ARGV[5]
local nfields = tonumber(ARGV[7])
local batch = ARGV[8]
local first = 11 + 2 * nfields
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
local started_here = false
local FS, ES = string.char(30), string.char(31)
-- The snapshot grows only while it covers every event so far: once behind, it stays frozen.
local out = redis.call('HMGET', KEYS[1], 'output_max', 'output_id', 'last_event_id')
local out_max = tonumber(out[1]) or 0
local out_open, out_id, out_len, out_progress = out_max > 0 and out[2] == out[3], nil, nil, nil
if status == 'pending' and ARGV[first] ~= 'status' and ARGV[first] ~= 'done' then
  -- A producer's first event starts the job: readers always see 'running' before output.
  local running = '{"status":"running"}'
  last = redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 't', 'status', 'd', running)
  published[1] = last .. FS .. 'status' .. FS .. running
  started_here = true
  if out_open then out_id = last end
  if new_status == '' then new_status = 'running' end
end
local ids = {'ok', '', '', '', '', ''}
for i = first, #ARGV, 2 do
  local kind, data = ARGV[i], ARGV[i + 1]
  if not dropped_events[kind] then
    if cancel_wins and kind == 'done' then data = '{"status":"cancelled"}' end
    last = redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 't', kind, 'd', data)
    ids[#ids + 1] = last
    published[#published + 1] = last .. FS .. kind .. FS .. data
    if out_open and kind ~= 'done' then
      if kind == 'delta' then
        local ok, decoded = pcall(cjson.decode, data)
        local text = ok and type(decoded) == 'table' and decoded.text
        if type(text) == 'string' and text ~= '' then
          local len = redis.call('APPEND', KEYS[3], text)
          if len > out_max then
            -- Past the bound: take this text back, and freeze the snapshot before this delta
            -- with the progress it covers (the meta's is not written yet: it is the batch's).
            out_len, out_open = len - #text, false
            if out_len > 0 then
              redis.call('SET', KEYS[3], redis.call('GETRANGE', KEYS[3], 0, out_len - 1))
            else
              redis.call('DEL', KEYS[3])
            end
            out_progress = out_progress or redis.call('HGET', KEYS[1], 'progress') or 'null'
            redis.call('HSET', KEYS[1], 'output_progress', out_progress)
          else
            out_len = len
          end
        end
      elseif kind == 'progress' then
        out_progress = data
      end
      if out_open then out_id = last end
    end
  end
end
if out_id then
  if out_len then redis.call('HSET', KEYS[1], 'output_id', out_id, 'output_len', out_len)
  else redis.call('HSET', KEYS[1], 'output_id', out_id) end
end
-- Remember once the MAXLEN cap has dropped events, so readers need not ask the stream each time.
if redis.call('HINCRBY', KEYS[1], 'appended', #published) > redis.call('XLEN', KEYS[2]) then
  redis.call('HSET', KEYS[1], 'trimmed', '1')
end
for i = 11, first - 1, 2 do
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
local expires = now + ttl * 1000
-- When Redis lets the job go (its keys' TTL, its owner's index): a job to archive that ends is
-- kept until the archive holds it, at most as long as its outbox record lives (archiver.py then
-- lets it go at kept_ms: its expires_ms, the expiry its status document shows throughout).
local held = expires
if effective ~= status and (effective == 'completed' or effective == 'failed' or effective == 'cancelled')
    and redis.call('HGET', KEYS[1], 'archived') == '0' then
  redis.call('HSET', KEYS[1], 'kept_ms', expires)
  ttl = math.max(ttl, """
    + str(OUTBOX_TTL_S)
    + """)
  held = now + ttl * 1000
end
if status == 'pending' and effective == 'running' then
  redis.call('HSET', KEYS[1], 'started_ms', now)
end
redis.call('HSET', KEYS[1], 'status', effective, 'updated_ms', now, 'last_event_id', last,
  'expires_ms', expires)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
if out_max > 0 then redis.call('EXPIRE', KEYS[3], ttl) end
-- What must follow the move (outbox.py): a record of each status the job passed through that its
-- outbox's consumers want (meta 'outbox': statuses, comma-joined), with the job's metadata as it
-- now is (but its input), in the same step: no move without its record. The outbox key is named
-- from the meta key's (same hash tag, same slot) rather than declared: a declared key that does
-- not exist yet fails every write of a job whose slot is migrating (TRYAGAIN), and most jobs have
-- no outbox.
local wanted = effective ~= status and redis.call('HGET', KEYS[1], 'outbox')
if wanted then
  local outbox = string.sub(KEYS[1], 1, -5) .. 'outbox'
  wanted = ',' .. wanted .. ','
  local passed = {effective}
  if started_here and effective ~= 'running' then passed = {'running', effective} end
  local written = false
  for _, moved in ipairs(passed) do
    if string.find(wanted, ',' .. moved .. ',', 1, true) then
      local meta, fields = redis.call('HGETALL', KEYS[1]), {}
      for i = 1, #meta, 2 do if meta[i] ~= 'input' then fields[meta[i]] = meta[i + 1] end end
      if moved ~= effective then  -- started and ended in one step: the job as it was when it started
        fields['status'], fields['completed_ms'], fields['result'], fields['error'] = moved, nil, nil, nil
      end
      redis.call('XADD', outbox, '*', 'status', moved, 'at', now, 'meta', cjson.encode(fields))
      -- Whom to nudge (a job from before `consumers` was kept had webhooks alone).
      if ids[6] == '' then ids[6] = now .. ':' .. (redis.call('HGET', KEYS[1], 'consumers') or 'webhook') end
      written = true
    end
  end
  if written then redis.call('EXPIRE', outbox, """
    + str(OUTBOX_TTL_S)
    + """) end
end
redis.call('PUBLISH', ARGV[6], table.concat(published, ES))
ids[2] = effective
ids[3] = redis.call('HGET', KEYS[1], 'started_ms') or ''
if effective ~= status then  -- for the owner's job index (jobindex.py), kept in the owner's slot
  ids[4] = redis.call('HGET', KEYS[1], 'owner')
  ids[5] = tostring(held)
end
"""
)

#: A producer's append (see _WRITE). Returns {'ok', status, started_ms, owner, expires_ms, outbox_ms,
#: id...} | {'gone'} |
#: {'forbidden'} | {'not_external'} | {'ended', status} | {'repeat', status} (the batch was appended
#: before: status is the job's now, which for the batch that ended the job is how it ended).
APPEND = _REPEAT + _CHECKED + _WRITE + "return ids\n"

#: Accept a cancel, or refuse it once the job has ended. The flag is set in the same step as the
#: status is checked, so any ending written after an accepted cancel is cancelled (see APPEND). A
#: job no worker holds (pending, or external) is ended here at once: the events to write are the
#: `done` of a cancelled job. KEYS and ARGV: as APPEND (ARGV[9]: the caller, who must own the job).
#: Returns {'cancelling'} (its worker stops it) | {'cancelled', type, started_ms, owner, expires_ms,
#: outbox_ms} (ended here: the job's type, when it started running, '' if it had not, and as APPEND's) |
#: APPEND's refusals.
REQUEST_CANCEL = (
    _CHECKED
    + """
redis.call('HSET', KEYS[1], 'cancel', '1')
local job_type = redis.call('HGET', KEYS[1], 'type')
if status == 'running' and job_type ~= 'external' then return {'cancelling'} end
"""
    + _WRITE
    + """
return {'cancelled', job_type, ids[3], ids[4], ids[5], ids[6]}
"""
)

#: Start one run of a job by a worker, taken from one queue entry. The first run records its
#: entry; an entry of a job that another entry started is a duplicate (a job that waited for a
#: running slot may be put back onto the queue twice, see fairness.py), which must neither run the
#: job again nor end it. A reclaimed entry is the one that started the job, and runs it again.
#: KEYS: meta. ARGV: the entry's id.
#: Returns {'ok', attempt} | {'gone'} | {'ended', status} | {'duplicate'} | {'cancelled'}.
START_ATTEMPT = (
    _UNENDED
    + """
local entry = redis.call('HGET', KEYS[1], 'entry')
if entry and entry ~= ARGV[1] then return {'duplicate'} end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return {'cancelled'} end
redis.call('HSET', KEYS[1], 'entry', ARGV[1])
return {'ok', redis.call('HINCRBY', KEYS[1], 'attempt', 1)}
"""
)

#: ``snapshot_of()``, the job's snapshot (see _WRITE), in a script with KEYS: meta, events, output:
#: {} if the job keeps none, else {id, text, progress}, id '' when it covers no event yet or when
#: its text is not all there (the output key evicted on its own), progress as JSON.
_SNAPSHOT = """
local function snapshot_of()
  local out = redis.call('HMGET', KEYS[1], 'output_max', 'output_id', 'output_len', 'progress', 'output_progress')
  if not out[1] then return {} end
  local text = redis.call('GET', KEYS[3]) or ''
  if not out[2] or #text ~= (tonumber(out[3]) or 0) then return {'', '', 'null'} end
  return {out[2], text, out[5] or out[4] or 'null'}
end
"""

#: A reader's one round trip: what a reader needs of the job's metadata (not its input, which may
#: be large), where its reading starts and, for the job's owner, the events from there.
#: KEYS: meta, events, output. ARGV: cursor ('' = from the start, '$' = after the newest event,
#: else a stream id to read after), limit (0 = no events), reader (events are read only when the
#: job is this user's: '' = none; the gateway still authorizes what it answers), snapshot ('1':
#: with a cursor of '', the job's snapshot if it keeps one, and reading starts after it; also only
#: for the reader's job).
#: Returns {} (no such job) | {{id, owner, status, last_event_id, tags}, after, oldest, events,
#: snapshot} where ``after`` is the exclusive start, ``oldest`` the oldest kept event id when the
#: stream was trimmed (the append script marks it) and a cursor was given, else '', ``events`` is
#: id, type, data of each, and ``snapshot`` as _SNAPSHOT leaves it ({} when not asked for).
READ = (
    """
local meta = redis.call('HMGET', KEYS[1], 'id', 'owner', 'status', 'last_event_id', 'trimmed', 'tags')
if not meta[3] then return {} end
local cursor, limit = ARGV[1], tonumber(ARGV[2])
local owned = ARGV[3] ~= '' and meta[2] == ARGV[3]
"""
    + _SNAPSHOT
    + """
local snapshot = {}
if ARGV[4] == '1' and owned and cursor == '' then
  snapshot = snapshot_of()
  if snapshot[1] and snapshot[1] ~= '' then cursor = snapshot[1] end
end
local after, oldest = '0-0', ''
if cursor == '$' then
  local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if newest[1] then after = newest[1][1] end
  limit = 0  -- nothing follows the newest event within this step
elseif cursor ~= '' then
  after = cursor
  if meta[5] == '1' then
    local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
    if first[1] then oldest = first[1][1] end
  end
end
local events = {}
if limit > 0 and owned then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '(' .. after, '+', 'COUNT', limit)) do
    local fields, kind, data = entry[2], '', ''
    for j = 1, #fields, 2 do
      if fields[j] == 't' then kind = fields[j + 1] elseif fields[j] == 'd' then data = fields[j + 1] end
    end
    events[#events + 1] = entry[1]
    events[#events + 1] = kind
    events[#events + 1] = data
  end
end
return {{meta[1], meta[2], meta[3], meta[4] or '', meta[6] or ''}, after, oldest, events, snapshot}
"""
)

#: The status document's metadata with the job's snapshot, in one step. KEYS: meta, events, output.
#: Returns {} (no such job) | {metadata as HGETALL gives it, snapshot} (see _SNAPSHOT).
STATUS_WITH_OUTPUT = (
    """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {} end
"""
    + _SNAPSHOT
    + """
return {fields, snapshot_of()}
"""
)

#: Delete a job: its metadata and its stream, then tell the hubs (an empty message), so that open
#: readers close at once. KEYS: meta, events, output. ARGV: owner ('' = anyone; else the job must
#: exist and be theirs), channel. Returns {'gone'} | {'forbidden'} | {'deleted', number of keys
#: removed, owner ('' if there was no job), its ``archived`` flag as it was ('' if none)}: read in
#: the same step, so the caller knows whether the archive holds the job without another round trip.
DELETE = """
local meta = redis.call('HMGET', KEYS[1], 'owner', 'archived')
local owner = meta[1]
if ARGV[1] ~= '' then
  if not owner then return {'gone'} end
  if owner ~= ARGV[1] then return {'forbidden'} end
end
local removed = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[2], '')
return {'deleted', removed, owner or '', meta[2] or ''}
"""

#: Store a new job's metadata with its TTL, in one step; with a second key (the queue, on a single
#: Redis where both share the server) queue the job in the same step; then announce it on the
#: channels of its owner's tag feeds (keys.user_feed: PUBLISH names no key, and reaches every node
#: of a cluster), only once it exists. KEYS: meta[, queue]. ARGV: ttl_s, job id, the announcement,
#: the number of channels, the channels, then field/value pairs of the metadata.
CREATE = """
local nchannels = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5 + nchannels))
redis.call('EXPIRE', KEYS[1], ARGV[1])
if KEYS[2] then redis.call('XADD', KEYS[2], '*', 'job', ARGV[2]) end
for i = 5, 4 + nchannels do redis.call('PUBLISH', ARGV[i], ARGV[3]) end
"""
