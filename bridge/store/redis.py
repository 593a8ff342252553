"""The shared store: one Redis for several bridge replicas, every read-modify-write one Lua script.

Keys live under a prefix (`icb:` by default), so one Redis can hold several bridges (and
tests isolate by prefix). Every script builds its keys from the prefix it is given, also
for ids it finds in an index, so the target is one Redis (or a primary with replicas,
Sentinel), not Redis Cluster.

Time is the store's injected clock, passed to each script: expiries and leases are stored
as data and compared on read (a value past its expiry is absent), and a real Redis TTL
(the time left plus TTL_MARGIN) lets Redis free the memory. Leases are compared with the
replicas' own clocks, so replicas need their clocks in sync within seconds (NTP), far
inside the leases (60 s for jobs, 30 s for conversation locks, 120 s per outbox attempt).

Chat jobs and the outbox are hashes indexed by sorted sets: open jobs by lease expiry
(`jobs:leases`), undelivered items by due time (`outbox:due`), with the lease a field of
each item. A replica takes an item for one attempt with a script that checks and sets that
lease, and a dead replica's items are due again once their lease ran out. Redis Streams
(consumer groups, XAUTOCLAIM) would hand a dead consumer's messages over too, but cannot
hold a message back until a later time: the outbox retries with backoff, keeps a
destination's items in order behind a failing one, and makes a platform's items due at
once when it is back; a sorted set by due time does all three with one ZADD.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import RedisError, ResponseError

from bridge.clock import Clock, SystemClock
from bridge.store.locks import LocalLocks
from bridge.store.protocols import StoreError
from bridge.store.recent import remember
from bridge.store.records import (
    DAY,
    FACTS_KEPT,
    FOLLOW_LAG,
    LOCK_LEASE,
    ChatJob,
    Fact,
    JobState,
    NewDelivery,
    NewJob,
    NewRecord,
    OutboxItem,
    RecordRef,
    ReplyKind,
    Versioned,
    inbound_from_json,
    inbound_to_json,
)
from bridge.store.wire import Script, Wire

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PREFIX = "icb:"
DELIVERED_KEPT = 7 * DAY  # as in SQLite: finished jobs' identities and delivered items (dedupe)
# Redis frees a key this long after its stored expiry: after the hourly prune has taken it
# out of its indexes, and well past any difference between the replicas' clocks.
TTL_MARGIN = 3 * 3600.0
# Shorter than the job lease (60 s): a job taken over from a dead replica finds its
# conversation free by then. The holder renews every third of it.
LOCK_POLL = 0.1  # a waiter tries again after about this long (jittered, so waiters do not march in step)
# ... but first sooner: a holder on another replica is most often just posting its answer, and the
# delivery frees the lock (outbox_done) a round trip later.
LOCK_POLL_FIRST = 0.02
TIMEOUT = 5.0  # connect and each command: a Redis that does not answer is a StoreError, not a hang
PRUNE_BATCH = 500  # ids per prune script, so one prune never blocks Redis for long
FACTS_PAGE = 2000  # facts read per script by the report
_CAS_TRIES = 20  # append's merge of a list written by put: retried while other writers collide
FOLLOWED_KNOWN = 10_000  # followed threads remembered per replica (the oldest forgotten first)

_STATES = tuple(state.value for state in JobState)
_OPEN = tuple(state.value for state in JobState if state.open)

# --- Lua -----------------------------------------------------------------------------------------
# Every script gets the key prefix as ARGV[1]. Python computes every time and passes it as
# text, so Lua only compares and stores them (Lua's tostring would round them to 14 digits).
# A script that fails halfway keeps the writes it made, so each one checks everything first.

_LUA_JOBS = """
local STATES = {'accepted', 'asked', 'answered', 'delivered', 'failed'}

-- Forget a job: its hash, its message key (unless it names a newer job) and its index entries.
local function forget_job(P, id)
  local job = P .. 'job:' .. id
  local key = redis.call('HGET', job, 'key')
  if key and redis.call('GET', P .. 'job-key:' .. key) == id then redis.call('DEL', P .. 'job-key:' .. key) end
  redis.call('DEL', job)
  for _, index in ipairs({'leases', 'finished', 'texts'}) do redis.call('ZREM', P .. 'jobs:' .. index, id) end
  for _, state in ipairs(STATES) do redis.call('SREM', P .. 'jobs:' .. state, id) end
end

-- Whether a job still exists: one finished before kept_after is past its dedupe window.
local function live_job(P, id, kept_after)
  local f = redis.call('HMGET', P .. 'job:' .. id, 'key', 'finished_at')
  if not f[1] then return false end
  if f[2] and tonumber(f[2]) < kept_after then forget_job(P, id) return false end
  return true
end

-- Move a job to another state (and its state set: those give the counts).
local function move_job(P, id, from, to)
  redis.call('SREM', P .. 'jobs:' .. from, id)
  redis.call('SADD', P .. 'jobs:' .. to, id)
  redis.call('HSET', P .. 'job:' .. id, 'state', to)
  if to ~= 'accepted' and to ~= 'asked' then redis.call('ZREM', P .. 'jobs:leases', id) end
end

-- A job's reply was delivered or refused: finished, its texts kept for keep_text, the rest for 7 days.
local function finish_job(P, id, state, now, ttl_ms)
  local job = P .. 'job:' .. id
  local f = redis.call('HMGET', job, 'state', 'key')
  if not f[1] then return end
  move_job(P, id, f[1], state)
  redis.call('HSET', job, 'finished_at', now)
  redis.call('ZADD', P .. 'jobs:finished', now, id)
  redis.call('ZADD', P .. 'jobs:texts', now, id)
  redis.call('PEXPIRE', job, ttl_ms)
  redis.call('PEXPIRE', P .. 'job-key:' .. f[2], ttl_ms)
end
"""

_LUA_ITEMS = """
-- Forget an outbox item: its hash, its key (unless it names a newer item), its index entries.
local function forget_item(P, id)
  local item = P .. 'item:' .. id
  local key = redis.call('HGET', item, 'key')
  if key and redis.call('GET', P .. 'item-key:' .. key) == id then redis.call('DEL', P .. 'item-key:' .. key) end
  redis.call('DEL', item)
  for _, index in ipairs({'due', 'pending', 'ended'}) do redis.call('ZREM', P .. 'outbox:' .. index, id) end
end

-- The id of the item queued under `key`, or nil; one that ended before kept_after is past its dedupe window.
local function live_item(P, key, kept_after)
  local id = redis.call('GET', P .. 'item-key:' .. key)
  if not id then return nil end
  local f = redis.call('HMGET', P .. 'item:' .. id, 'key', 'ended_at')
  if not f[1] then return nil end
  if f[2] and tonumber(f[2]) < kept_after then forget_item(P, id) return nil end
  return id
end

-- Queue a new item, due now; `job` names the chat job whose reply it is ('' for none).
local function add_item(P, key, destination, payload, now, job)
  local id = redis.call('INCR', P .. 'outbox:ids')
  local item = P .. 'item:' .. id
  redis.call('HSET', item, 'id', id, 'key', key, 'destination', destination, 'payload', payload,
    'attempts', 0, 'started', 0, 'created_at', now, 'next_attempt_at', now, 'lease_until', 0)
  if job ~= '' then redis.call('HSET', item, 'job', job) end
  redis.call('SET', P .. 'item-key:' .. key, id)
  redis.call('ZADD', P .. 'outbox:due', now, id)
  redis.call('ZADD', P .. 'outbox:pending', now, id)
  return id
end

-- An item was delivered or refused: out of the queue, kept 7 days (its key still dedupes).
local function end_item(P, id, now, ttl_ms)
  local item = P .. 'item:' .. id
  redis.call('HSET', item, 'ended_at', now, 'lease_until', 0)
  redis.call('HINCRBY', item, 'attempts', 1)
  redis.call('ZREM', P .. 'outbox:due', id)
  redis.call('ZREM', P .. 'outbox:pending', id)
  redis.call('ZADD', P .. 'outbox:ended', now, id)
  redis.call('PEXPIRE', item, ttl_ms)
  redis.call('PEXPIRE', P .. 'item-key:' .. redis.call('HGET', item, 'key'), ttl_ms)
end
"""

_LUA_RECORDS = """
-- A record's revision while it is there and not expired, else false.
local function live_revision(P, kind, key, now)
  local f = redis.call('HMGET', P .. 'record:' .. kind .. ':' .. key, 'revision', 'expires')
  if f[1] and (f[2] == '' or tonumber(f[2]) >= tonumber(now)) then return f[1] end
  return false
end

-- Write a record: a new revision each time; expires '' and ttl_ms '' keep it for good.
local function put_record(P, kind, key, value, expires, ttl_ms)
  local record = P .. 'record:' .. kind .. ':' .. key
  redis.call('HSET', record, 'value', value, 'expires', expires)
  redis.call('HDEL', record, 'parts')  -- the element texts of a list kept by _APPEND_RECORD, now stale
  redis.call('HINCRBY', record, 'revision', 1)
  if ttl_ms == '' then redis.call('PERSIST', record) else redis.call('PEXPIRE', record, ttl_ms) end
end
"""

_PUT_RECORD = _LUA_RECORDS + """
-- ARGV: prefix, kind, key, value, expires, ttl_ms
put_record(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
"""

_COMPARE_AND_SET_RECORD = _LUA_RECORDS + """
-- Write only if the live revision is still `expected` ('' : only if absent or expired).
-- ARGV: prefix, now, kind, key, value, expires, ttl_ms, expected
local current = live_revision(ARGV[1], ARGV[3], ARGV[4], ARGV[2]) or ''
if current ~= ARGV[8] then return 0 end
put_record(ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
return 1
"""

_APPEND_RECORD = _LUA_RECORDS + """
-- Add elements to the end of a list record and keep its last `keep`. The list's elements are kept
-- as their JSON texts too ('parts'), so that Lua never re-encodes a value (cjson would round
-- numbers and turn [] into {}). A live list without them (written by put) is merged in Python:
-- mode 'append' returns -1 for it; mode 'absent' or a revision writes `texts` as the whole list
-- if the record is still absent or at that revision (else 0).
-- ARGV: prefix, now, kind, key, keep, expires, ttl_ms, mode, texts...
local P, kind, key = ARGV[1], ARGV[3], ARGV[4]
local record = P .. 'record:' .. kind .. ':' .. key
local f = redis.call('HMGET', record, 'revision', 'expires', 'parts')
local live = f[1] and (f[2] == '' or tonumber(f[2]) >= tonumber(ARGV[2]))
local parts = {}
if ARGV[8] == 'append' then
  if live and not f[3] then return -1 end
  if live then parts = cjson.decode(f[3]) end
elseif ARGV[8] ~= (live and f[1] or 'absent') then
  return 0
end
for i = 9, #ARGV do table.insert(parts, ARGV[i]) end
local kept = {}
for i = math.max(1, #parts - tonumber(ARGV[5]) + 1), #parts do table.insert(kept, parts[i]) end
put_record(P, kind, key, '[' .. table.concat(kept, ',') .. ']', ARGV[6], ARGV[7])
if #kept > 0 then redis.call('HSET', record, 'parts', cjson.encode(kept)) end
return 1
"""

_ACCEPT_EVENT = _LUA_RECORDS + _LUA_ITEMS + """
-- Webhook intake: unless a key was seen within its ttl, remember the keys, keep the records
-- and queue every delivery; a delivery key already queued refuses the whole event.
-- ARGV: prefix, now, kept_after, seen_until, seen_ttl_ms, #keys, #records,
--       keys..., records as (kind, key, value, expires, ttl_ms)..., deliveries as (key, destination, payload)...
local P, now = ARGV[1], tonumber(ARGV[2])
local first_record = 8 + tonumber(ARGV[6])
local first_delivery = first_record + 5 * tonumber(ARGV[7])
for i = 8, first_record - 1 do
  local seen = redis.call('GET', P .. 'seen:' .. ARGV[i])
  if seen and tonumber(seen) >= now then return 0 end
end
local queued = {}
for i = first_delivery, #ARGV, 3 do
  if queued[ARGV[i]] or live_item(P, ARGV[i], tonumber(ARGV[3])) then
    return redis.error_reply('delivery ' .. ARGV[i] .. ' is already queued')
  end
  queued[ARGV[i]] = true
end
for i = 8, first_record - 1 do redis.call('SET', P .. 'seen:' .. ARGV[i], ARGV[4], 'PX', ARGV[5]) end
for i = first_record, first_delivery - 1, 5 do
  put_record(P, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
end
for i = first_delivery, #ARGV, 3 do add_item(P, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[2], '') end
return 1
"""

_LUA_LOCKS = """
-- Take a conversation's lock when free (or its holder stopped renewing); returns the generation, or -1.
-- `job` ('' for none) names the job it is taken for: that job's delivery frees it.
local function take_lock(P, conversation, now, token, lock_until, ttl_ms, job)
  local lock = P .. 'lock:' .. conversation
  local held = redis.call('HGET', lock, 'until')
  if held and tonumber(held) >= tonumber(now) then return -1 end
  redis.call('DEL', lock)
  redis.call('HSET', lock, 'token', token, 'until', lock_until)
  if job ~= '' then redis.call('HSET', lock, 'job', job) end
  redis.call('PEXPIRE', lock, ttl_ms)
  return tonumber(redis.call('GET', P .. 'generation:' .. conversation) or '0')
end
"""

_CREATE_JOB = _LUA_JOBS + _LUA_LOCKS + _LUA_RECORDS + """
-- A new job, leased to the caller, unless its platform message has a live job (a duplicate); with a
-- lock token, also the conversation's lock for that job when it is free.
-- Unless the record it is held back by (a human has the conversation) is live: then nothing is stored.
-- ARGV: prefix, kept_after, id, key, state, owner, lease_until, conversation, chatbot, inbound, created_at,
--       now, lock token ('' : no lock), lock until, lock ttl_ms, now, held-by kind and key ('' : none)
-- Returns {1 created / 0 duplicate / 2 held, the generation if the lock was taken else -1}.
local P, id, key, state = ARGV[1], ARGV[3], ARGV[4], ARGV[5]
local existing = redis.call('GET', P .. 'job-key:' .. key)
if existing == id then return {1, -1} end  -- this very job, sent again after its reply was lost
if existing and live_job(P, existing, tonumber(ARGV[2])) then return {0, -1} end
if ARGV[18] ~= '' and live_revision(P, ARGV[17], ARGV[18], ARGV[16]) then return {2, -1} end
redis.call('HSET', P .. 'job:' .. id, 'id', id, 'key', key, 'state', state, 'owner', ARGV[6],
  'lease_until', ARGV[7], 'conversation', ARGV[8], 'chatbot', ARGV[9], 'inbound', ARGV[10],
  'created_at', ARGV[11], 'asks', 0, 'reply_kind', 'answer', 'offer_human', 0)
redis.call('SET', P .. 'job-key:' .. key, id)
redis.call('SADD', P .. 'jobs:' .. state, id)
if state == 'accepted' or state == 'asked' then redis.call('ZADD', P .. 'jobs:leases', ARGV[7], id) end
if ARGV[13] == '' then return {1, -1} end
return {1, take_lock(P, ARGV[8], ARGV[12], ARGV[13], ARGV[14], ARGV[15], id)}
"""

_MARK_JOB_ASKED = _LUA_JOBS + """
-- The InsiteChat call goes out: an open job is asked, one more time.
-- ARGV: prefix, id
local state = redis.call('HGET', ARGV[1] .. 'job:' .. ARGV[2], 'state')
if state ~= 'accepted' and state ~= 'asked' then return 0 end
move_job(ARGV[1], ARGV[2], state, 'asked')
redis.call('HINCRBY', ARGV[1] .. 'job:' .. ARGV[2], 'asks', 1)
return 1
"""

_ANSWER_JOB = _LUA_JOBS + _LUA_ITEMS + """
-- Store the reply and queue its delivery in one step; returns the item's id. With a lease_until
-- ('' for none) the item is held for the caller's first attempt, as _TAKE_ITEM would hold it. With
-- the token of the caller's lock on the conversation (the destination), that lock is now this job's:
-- its delivery frees it.
-- ARGV: prefix, now, kept_after, job id, item key, destination, payload, reply, reply_kind, offer_human,
--       lease_until, lock token
local P, job_id = ARGV[1], ARGV[4]
if live_item(P, ARGV[5], tonumber(ARGV[3])) then
  return redis.error_reply('delivery ' .. ARGV[5] .. ' is already queued')
end
local id = add_item(P, ARGV[5], ARGV[6], ARGV[7], ARGV[2], job_id)
if ARGV[11] ~= '' then redis.call('HSET', P .. 'item:' .. id, 'started', 1, 'lease_until', ARGV[11]) end
if ARGV[12] ~= '' and redis.call('HGET', P .. 'lock:' .. ARGV[6], 'token') == ARGV[12] then
  redis.call('HSET', P .. 'lock:' .. ARGV[6], 'job', job_id)
end
local state = redis.call('HGET', P .. 'job:' .. job_id, 'state')
if state then
  move_job(P, job_id, state, 'answered')
  redis.call('HSET', P .. 'job:' .. job_id, 'reply', ARGV[8], 'reply_kind', ARGV[9], 'offer_human', ARGV[10],
             'outbox_id', id)
end
return id
"""

_TAKE_OVER_JOBS = """
-- Lease to the caller the open jobs whose lease ran out, oldest question first.
-- ARGV: prefix, now, owner, lease_until, limit
local P = ARGV[1]
local leases = P .. 'jobs:leases'
local expired = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', '(' .. ARGV[2])) do
  local created = redis.call('HGET', P .. 'job:' .. id, 'created_at')
  if created then table.insert(expired, {tonumber(created), id}) else redis.call('ZREM', leases, id) end
end
table.sort(expired, function(a, b) if a[1] ~= b[1] then return a[1] < b[1] end return a[2] < b[2] end)
local taken = {}
for i = 1, math.min(#expired, tonumber(ARGV[5])) do
  local id = expired[i][2]
  redis.call('HSET', P .. 'job:' .. id, 'owner', ARGV[3], 'lease_until', ARGV[4])
  redis.call('ZADD', leases, ARGV[4], id)
  taken[i] = redis.call('HGETALL', P .. 'job:' .. id)
end
return taken
"""

_RENEW_JOBS = """
-- Extend the caller's leases on its open jobs; a job another replica took over stays theirs.
-- ARGV: prefix, owner, lease_until, ids...
for i = 4, #ARGV do
  local job, leases = ARGV[1] .. 'job:' .. ARGV[i], ARGV[1] .. 'jobs:leases'
  if redis.call('HGET', job, 'owner') == ARGV[2] and redis.call('ZSCORE', leases, ARGV[i]) then
    redis.call('ZADD', leases, ARGV[3], ARGV[i])
    redis.call('HSET', job, 'lease_until', ARGV[3])
  end
end
return 0
"""

_ADD_ITEM = _LUA_ITEMS + """
-- Queue a delivery unless one with its key exists (delivered or not).
-- ARGV: prefix, now, kept_after, key, destination, payload
if live_item(ARGV[1], ARGV[4], tonumber(ARGV[3])) then return 0 end
add_item(ARGV[1], ARGV[4], ARGV[5], ARGV[6], ARGV[2], '')
return 1
"""

_DUE_ITEMS = """
-- Undelivered items due now that nobody holds, oldest (lowest id) first.
-- ARGV: prefix, now, limit
local P, now = ARGV[1], tonumber(ARGV[2])
local free = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'outbox:due', '-inf', ARGV[2])) do
  local lease = redis.call('HGET', P .. 'item:' .. id, 'lease_until')
  if lease and tonumber(lease) < now then table.insert(free, tonumber(id)) end
end
table.sort(free)
local items = {}
for i = 1, math.min(#free, tonumber(ARGV[3])) do items[i] = redis.call('HGETALL', P .. 'item:' .. free[i]) end
return items
"""

_TAKE_ITEM = """
-- Hold an undelivered item for one attempt unless someone holds it; returns it as it was before.
-- ARGV: prefix, now, lease_until, id
local item = ARGV[1] .. 'item:' .. ARGV[4]
local f = redis.call('HMGET', item, 'lease_until', 'ended_at')
if not f[1] or f[2] or tonumber(f[1]) >= tonumber(ARGV[2]) then return false end
local before = redis.call('HGETALL', item)
redis.call('HSET', item, 'started', 1, 'lease_until', ARGV[3])
return before
"""

_DELIVER_ITEM = _LUA_JOBS + _LUA_ITEMS + """
-- The platform took it (or refused it for good): the item ends, and its chat job with it, and
-- the conversation lock taken for that job (create_job with a lock) is freed: its answer is out.
-- ARGV: prefix, now, ttl_ms, id, outcome ('delivered' or 'failed'), reference or error
-- Returns 0 (no such item, or it ended before), 1, or {conversation, job} when it freed that lock.
local P, id = ARGV[1], ARGV[4]
local f = redis.call('HMGET', P .. 'item:' .. id, 'key', 'job', 'ended_at')
if not f[1] or f[3] then return 0 end
if ARGV[5] == 'delivered' then
  redis.call('HSET', P .. 'item:' .. id, 'delivered_at', ARGV[2], 'reference', ARGV[6])
else
  redis.call('HSET', P .. 'item:' .. id, 'failed_at', ARGV[2], 'last_error', ARGV[6])
end
end_item(P, id, ARGV[2], ARGV[3])
if not f[2] then return 1 end
finish_job(P, f[2], ARGV[5], ARGV[2], ARGV[3])
local conversation = redis.call('HGET', P .. 'job:' .. f[2], 'conversation')
if conversation and redis.call('HGET', P .. 'lock:' .. conversation, 'job') == f[2] then
  redis.call('DEL', P .. 'lock:' .. conversation)
  return {conversation, f[2]}
end
return 1
"""

_RETRY_ITEM = """
-- Try again at next_at and let go of it; an item that was not attempted moves only while nobody holds it.
-- ARGV: prefix, now, next_at, counted (1 or 0), error, id
local item = ARGV[1] .. 'item:' .. ARGV[6]
local f = redis.call('HMGET', item, 'lease_until', 'ended_at')
if not f[1] or f[2] then return 0 end
if ARGV[4] == '0' and tonumber(f[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', item, 'next_attempt_at', ARGV[3], 'last_error', ARGV[5], 'lease_until', 0)
redis.call('HINCRBY', item, 'attempts', tonumber(ARGV[4]))
redis.call('ZADD', ARGV[1] .. 'outbox:due', ARGV[3], ARGV[6])
return 1
"""

_HASTEN_ITEMS = """
-- A platform is back: its undelivered items waiting for a later try are due now.
-- ARGV: prefix, now, destination prefix ('slack:')
local P, count = ARGV[1], 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'outbox:due', '(' .. ARGV[2], '+inf')) do
  local destination = redis.call('HGET', P .. 'item:' .. id, 'destination')
  if destination and string.sub(destination, 1, #ARGV[3]) == ARGV[3] then
    redis.call('HSET', P .. 'item:' .. id, 'next_attempt_at', ARGV[2])
    redis.call('ZADD', P .. 'outbox:due', ARGV[2], id)
    count = count + 1
  end
end
return count
"""

_DROP_TEXTS = """
-- Drop the question and the reply of jobs finished before the cutoff; ids and states stay.
-- ARGV: prefix, cutoff, batch
local P = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', P .. 'jobs:texts', '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  redis.call('HDEL', P .. 'job:' .. id, 'inbound', 'reply')
  redis.call('ZREM', P .. 'jobs:texts', id)
end
return #ids
"""

_FORGET_JOBS = _LUA_JOBS + """
-- Forget jobs finished before the cutoff (their 7 days of dedupe are over).
-- ARGV: prefix, cutoff, batch
local ids = redis.call('ZRANGEBYSCORE', ARGV[1] .. 'jobs:finished', '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do forget_job(ARGV[1], id) end
return #ids
"""

_FORGET_ITEMS = _LUA_ITEMS + """
-- Forget items delivered or refused before the cutoff.
-- ARGV: prefix, cutoff, batch
local ids = redis.call('ZRANGEBYSCORE', ARGV[1] .. 'outbox:ended', '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do forget_item(ARGV[1], id) end
return #ids
"""

_TAKE_LOCK = _LUA_LOCKS + """
-- SET NX PX with the lease on the caller's clock: taken when free, or when its holder stopped renewing.
-- Returns the conversation's generation (read under the lock: the holder needs it next), or -1.
-- ARGV: prefix, conversation, now, token, until, ttl_ms
return take_lock(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], '')
"""

_RENEW_LOCKS = """
-- Extend the leases of this replica's locks, each only for the holder that still has it.
-- ARGV: prefix, until, ttl_ms, (conversation, token, job it was taken for or '')...
-- Returns per lock 1 (renewed), 2 (gone with its job's delivery, on any replica: nobody holds it) or 0 (lost).
local renewed = {}
for i = 4, #ARGV, 3 do
  local lock = ARGV[1] .. 'lock:' .. ARGV[i]
  local token = redis.call('HGET', lock, 'token')
  if token == ARGV[i + 1] then
    redis.call('HSET', lock, 'until', ARGV[2])
    redis.call('PEXPIRE', lock, ARGV[3])
    table.insert(renewed, 1)
  elseif not token and ARGV[i + 2] ~= ''
      and redis.call('HEXISTS', ARGV[1] .. 'job:' .. ARGV[i + 2], 'finished_at') == 1 then
    table.insert(renewed, 2)
  else
    table.insert(renewed, 0)
  end
end
return renewed
"""

_RELEASE_LOCK = """
-- Compare-and-delete: a holder whose lease was taken over must not free the new holder's lock.
-- ARGV: prefix, conversation, token
local lock = ARGV[1] .. 'lock:' .. ARGV[2]
if redis.call('HGET', lock, 'token') == ARGV[3] then return redis.call('DEL', lock) end
return 0
"""

_NOTE_FACTS = """
-- Keep facts for the report: the first of each identity, or the last where it replaces (a vote).
-- ARGV: prefix, then (identity, at, fact, replaces '1'/'0')...
local P = ARGV[1]
for i = 2, #ARGV, 4 do
  if ARGV[i + 3] == '1' or redis.call('HEXISTS', P .. 'facts', ARGV[i]) == 0 then
    redis.call('HSET', P .. 'facts', ARGV[i], ARGV[i + 2])
    redis.call('ZADD', P .. 'facts:at', ARGV[i + 1], ARGV[i])
  end
end
return 1
"""

_FACTS_SINCE = """
-- One page of the facts at or after a time, oldest first. ARGV: prefix, since, offset, count
local P = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', P .. 'facts:at', ARGV[2], '+inf', 'LIMIT', ARGV[3], ARGV[4])
if #ids == 0 then return {} end
return redis.call('HMGET', P .. 'facts', unpack(ids))
"""

_FORGET_FACTS = """
-- Forget facts older than the cutoff. ARGV: prefix, cutoff, batch
local P = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', P .. 'facts:at', '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])
if #ids > 0 then
  redis.call('HDEL', P .. 'facts', unpack(ids))
  redis.call('ZREM', P .. 'facts:at', unpack(ids))
end
return #ids
"""


@dataclass
class _Lock:
    """A conversation lock this replica has in Redis: pre-taken by create_job, or held by a conversation_lock block."""

    token: str
    generation: int  # read when it was taken; only its holder bumps it (protocol), which keeps it current
    job: str = ""  # the job create_job took it for: that job's delivery frees it in Redis
    taken_at: float = 0.0  # monotonic, for a pre-taken lock that nobody entered
    released: bool = False  # gone from Redis (its job's delivery freed it, or it was lost): nothing to renew or free


def _t(seconds: float) -> str:
    """A time as a script argument: every digit (repr), so Lua and Redis compare it exactly."""
    return repr(float(seconds))


def _ttl_ms(seconds: float) -> int:
    """The real Redis TTL for a value that expires in `seconds`: Redis frees it a margin later."""
    return max(1, int((seconds + TTL_MARGIN) * 1000))


def redact_url(url: str) -> str:
    """The URL without its password (in the userinfo or a `password=` query parameter)."""
    url = re.sub(r"(://[^:@/]*):[^@/]*@", r"\1:***@", url)
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)


class RedisStore:
    """The store several replicas share. Nothing of another owner is voided on open: it may be alive.

    Connects lazily, on the first operation: constructing it does no I/O.
    """

    exclusive = False  # live replicas share it: leases are taken over only once they ran out

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Clock | None = None,
        keep_text: float = DAY,
        timeout: float = TIMEOUT,
        lock_lease: float = LOCK_LEASE,
    ) -> None:
        self._clock = clock or SystemClock()
        self._keep_text = keep_text
        self._prefix = prefix
        self._lock_lease = lock_lease
        self._where = redact_url(url)
        self._password = _password_of(url)
        self.owner = uuid.uuid4().hex
        self._closed = False
        self._local = LocalLocks()  # one waiter per conversation per replica polls Redis, in arrival order
        # Conversation locks this replica has in Redis: taken by create_job(lock=True) and not yet
        # entered, and held by a conversation_lock block. One task renews them all in one script.
        self._pretaken: dict[str, _Lock] = {}
        self._held: dict[str, _Lock] = {}
        self._keeper: asyncio.Task[None] | None = None
        # Followed threads this replica wrote or saw: conversation -> (followed until, written at or None).
        # Nothing unfollows a thread before it expires, so a known answer needs no round trip.
        self._followed: dict[str, tuple[float, float | None]] = {}
        try:
            # One connection for every command of this replica, pipelined (bridge.store.wire): a burst of
            # 500 questions is 500 commands on the wire, not 500 connections or a wait for a free one.
            self.wire = Wire(url, timeout=timeout)
        except (ValueError, RedisError) as exc:
            raise StoreError(f"cannot use the Redis URL {self._where}: {self._redact(str(exc))}") from None
        script = Script
        self._put_record = script(_PUT_RECORD)
        self._compare_and_set_record = script(_COMPARE_AND_SET_RECORD)
        self._append_record = script(_APPEND_RECORD)
        self._accept_event = script(_ACCEPT_EVENT)
        self._create_job = script(_CREATE_JOB)
        self._mark_job_asked = script(_MARK_JOB_ASKED)
        self._answer_job = script(_ANSWER_JOB)
        self._take_over_jobs = script(_TAKE_OVER_JOBS)
        self._renew_jobs = script(_RENEW_JOBS)
        self._add_item = script(_ADD_ITEM)
        self._due_items = script(_DUE_ITEMS)
        self._take_item = script(_TAKE_ITEM)
        self._deliver_item = script(_DELIVER_ITEM)
        self._retry_item = script(_RETRY_ITEM)
        self._hasten_items = script(_HASTEN_ITEMS)
        self._drop_texts = script(_DROP_TEXTS)
        self._forget_jobs = script(_FORGET_JOBS)
        self._forget_items = script(_FORGET_ITEMS)
        self._take_lock = script(_TAKE_LOCK)
        self._renew_locks = script(_RENEW_LOCKS)
        self._release_lock = script(_RELEASE_LOCK)
        self._note_facts = script(_NOTE_FACTS)
        self._facts_since = script(_FACTS_SINCE)
        self._forget_facts = script(_FORGET_FACTS)

    # --- running commands -----------------------------------------------------------------------

    async def _do(self, command: Awaitable[T]) -> T:
        """Run one command, script or transaction; every failure of Redis (refused, timed out, a script
        error) is a StoreError, without the password.

        A cancelled caller (a shutdown) returns at once; its command is on the wire already and
        finishes there (its reply is read and dropped), so the other callers' replies stay in step.
        """
        if self._closed:
            if asyncio.iscoroutine(command):
                command.close()
            raise StoreError(f"the Redis store at {self._where} is closed")
        try:
            return await command
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis at {self._where}: {self._redact(str(exc)) or type(exc).__name__}") from None

    def _redact(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    async def _run(self, script: Script, *args: str | int) -> Any:
        return await self._do(self.wire.run(script, args=[self._prefix, *args]))

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    def _now(self) -> float:
        return self._clock.time()

    # --- maintenance ----------------------------------------------------------------------------

    async def prune(self) -> None:
        """Drop kept texts and forget finished jobs and items past their windows (the rest has a Redis TTL)."""
        now = self._now()
        for script, cutoff in (
            (self._drop_texts, now - self._keep_text),
            (self._forget_jobs, now - DELIVERED_KEPT),
            (self._forget_items, now - DELIVERED_KEPT),
            (self._forget_facts, now - FACTS_KEPT),
        ):
            while await self._run(script, _t(cutoff), PRUNE_BATCH) == PRUNE_BATCH:
                pass

    async def ping(self) -> bool:
        """A write, not a read: a Redis that refuses writes (a read-only replica, out of memory) is unready."""
        try:
            await self._do(self.wire.call("SET", self._key("ping"), self.owner, "PX", 60_000))
        except StoreError as exc:
            log.error("state store cannot write: %s", exc)
            return False
        return True

    async def persistence_warning(self) -> str | None:
        """A sentence when this Redis keeps nothing on disk; None when it does, or when CONFIG is not allowed."""
        async def read_config() -> tuple[Mapping[str, str], Mapping[str, str]] | None:
            try:
                return (
                    _fields(await self.wire.call("CONFIG", "GET", "appendonly")),
                    _fields(await self.wire.call("CONFIG", "GET", "save")),
                )
            except ResponseError:
                # Managed Redis often refuses or renames CONFIG (NOPERM, unknown command): say nothing, not a guess.
                return None

        config = await self._do(read_config())
        if config is None:
            return None
        appendonly, save = config
        if appendonly.get("appendonly") == "yes" or (save.get("save") or "").strip():
            return None
        return (
            f"Redis at {self._where} keeps nothing on disk (no AOF, no RDB snapshots): a Redis restart "
            "loses the queued alerts and answers. Turn on appendonly (or RDB saves) for the bridge's state."
        )

    async def close(self) -> None:
        if self._closed:
            return
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        # Pre-taken locks nobody will enter now: free them rather than block their conversations for a lease.
        for conversation, lock in list(self._pretaken.items()):
            with contextlib.suppress(StoreError):  # else it frees itself after its lease
                await self._run(self._release_lock, conversation, lock.token)
        self._pretaken.clear()
        self._closed = True
        try:
            await self.wire.aclose()  # after the replies still on their way (callers that were cancelled)
        except (RedisError, OSError) as exc:
            log.warning("closing the Redis connection failed: %s", self._redact(str(exc)))

    # --- conversation state ---------------------------------------------------------------------

    async def follow(self, conversation: str, ttl: float = 30 * DAY) -> None:
        now = self._now()
        until, written = self._followed.get(conversation, (0.0, None))
        if written is not None and until >= now + ttl - ttl * FOLLOW_LAG:
            return  # this replica wrote it lately: the stored expiry is at most FOLLOW_LAG short
        await self._do(self.wire.call("SET", self._key("followed", conversation), _t(now + ttl), "PX", _ttl_ms(ttl)))
        self._remember_followed(conversation, now + ttl, now)

    async def is_followed(self, conversation: str) -> bool:
        now = self._now()
        known = self._followed.get(conversation)
        if known is not None and known[0] >= now:
            return True
        until = await self._do(self.wire.call("GET", self._key("followed", conversation)))
        if until is None or float(until) < now:
            return False
        self._remember_followed(conversation, float(until), None)
        return True

    def _remember_followed(self, conversation: str, until: float, written: float | None) -> None:
        remember(self._followed, conversation, (until, written), FOLLOWED_KNOWN)

    async def generation(self, conversation: str) -> int:
        lock = self._held.get(conversation)
        if lock is not None and not lock.released:
            return lock.generation  # read when the lock was taken; only a holder bumps it
        value = await self._do(self.wire.call("GET", self._key("generation", conversation)))
        return int(value) if value is not None else 0

    async def bump_generation(self, conversation: str) -> int:
        value = int(await self._do(self.wire.call("INCR", self._key("generation", conversation))))
        lock = self._held.get(conversation)
        if lock is not None:
            lock.generation = value
        return value

    def _lock_args(self, token: str) -> tuple[str, str, str, int]:
        now = self._now()
        return _t(now), token, _t(now + self._lock_lease), _ttl_ms(self._lock_lease)

    @asynccontextmanager
    async def conversation_lock(self, conversation: str) -> AsyncIterator[None]:
        """Held across replicas: a lock in Redis under a lease, renewed while held, released by its holder only."""
        async with self._local.hold(conversation):
            # A lock create_job took for this conversation is this replica's: whoever enters next uses it.
            lock = self._pretaken.pop(conversation, None)
            if lock is not None and lock.released:
                lock = None  # freed already (its lease ran out unrenewed): take it again
            token = f"{self.owner}:{uuid.uuid4().hex}"
            poll = LOCK_POLL_FIRST
            while lock is None:
                attempt = asyncio.ensure_future(self._run(self._take_lock, conversation, *self._lock_args(token)))
                try:
                    generation = int(await asyncio.shield(attempt))
                except asyncio.CancelledError:
                    # The take goes on without us and may succeed: then free it, or it blocks
                    # the conversation for a whole lease.
                    attempt.add_done_callback(lambda done: self._release_if_taken(done, conversation, token))
                    raise
                if generation >= 0:
                    lock = _Lock(token, generation)
                    break
                await self._clock.sleep(poll * (0.5 + random.random()))
                poll = min(poll * 2, LOCK_POLL)
                lock = self._pretaken.pop(conversation, None)  # taken by a create_job meanwhile: ours
            self._held[conversation] = lock
            self._keep_locks()
            try:
                yield
            finally:
                if self._held.get(conversation) is lock:
                    del self._held[conversation]
                self._stop_keeper_when_idle()
                if not lock.released:
                    try:
                        await self._run(self._release_lock, conversation, lock.token)
                    except StoreError as exc:
                        log.warning(
                            "conversation %s: its lock was not released (%s); it frees itself after its lease",
                            conversation, exc,
                        )

    def _release_if_taken(self, attempt: asyncio.Future[Any], conversation: str, token: str) -> None:
        if attempt.cancelled() or attempt.exception() is not None or int(attempt.result()) < 0 or self._closed:
            return
        release = asyncio.ensure_future(self._run(self._release_lock, conversation, token))
        release.add_done_callback(lambda done: done.cancelled() or done.exception())

    def _keep_locks(self) -> None:
        if self._keeper is None and not self._closed:
            self._keeper = asyncio.get_running_loop().create_task(self._keeping(), name="conversation-locks")

    def _stop_keeper_when_idle(self) -> None:
        # Nothing to renew: no task left sleeping on the clock (tests count the sleepers).
        if self._keeper is not None and not self._held and not self._pretaken:
            self._keeper.cancel()
            self._keeper = None

    async def _keeping(self) -> None:
        """Renew every lock this replica has, in one script each third of a lease; free pre-taken ones
        that nobody entered."""
        while True:
            await self._clock.sleep(self._lock_lease / 3)
            stale = self._clock.monotonic() - self._lock_lease / 3
            for conversation, lock in list(self._pretaken.items()):
                if lock.taken_at < stale and conversation not in self._local:
                    del self._pretaken[conversation]  # its job never came to answer (a bug, a shutdown)
                    await self._free(conversation, lock)
            if not self._held and not self._pretaken:
                self._keeper = None
                return
            locks = [(c, lock) for c, lock in (*self._held.items(), *self._pretaken.items()) if not lock.released]
            if not locks:
                continue
            args = [part for conversation, lock in locks for part in (conversation, lock.token, lock.job)]
            try:
                renewed = await self._run(
                    self._renew_locks, _t(self._now() + self._lock_lease), _ttl_ms(self._lock_lease), *args
                )
            except StoreError as exc:
                log.warning("renewing %d conversation lock(s) failed: %s; trying again", len(locks), exc)
                continue
            for (conversation, lock), ok in zip(locks, renewed, strict=False):  # one answer per lock
                if int(ok) == 1 or lock.released:
                    continue
                # 2: gone with its job's delivery (here, while this renewal was on its way, or on
                # another replica that took the reply over): let go, not lost.
                lock.released = True  # nothing to renew or free any more
                if not int(ok):
                    # Held past its lease without a renewal (this process stalled): another replica
                    # may answer there now.
                    log.error("conversation %s: its lock was lost to another holder", conversation)

    async def _free(self, conversation: str, lock: _Lock) -> None:
        try:
            await self._run(self._release_lock, conversation, lock.token)
        except StoreError as exc:
            log.warning(
                "conversation %s: its lock was not released (%s); it frees itself after its lease", conversation, exc
            )

    # --- records ----------------------------------------------------------------------------------

    def _record_key(self, kind: str, key: str) -> str:
        if ":" in kind:
            raise ValueError(f"a record kind has no ':' ({kind!r})")  # it would blur with the key
        return self._key("record", kind, key)

    async def get(self, kind: str, key: str) -> Any | None:
        found = await self.get_versioned(kind, key)
        return found.value if found is not None else None

    async def get_versioned(self, kind: str, key: str) -> Versioned | None:
        value, revision, expires = await self._do(
            self.wire.call("HMGET", self._record_key(kind, key), "value", "revision", "expires")
        )
        if value is None or revision is None or (expires and float(expires) < self._now()):
            return None
        return Versioned(json.loads(value), int(_text(revision)))

    def _record_args(self, record: NewRecord, now: float) -> list[str | int]:
        self._record_key(record.kind, record.key)
        if record.ttl is None:
            return [record.kind, record.key, json.dumps(record.value), "", ""]
        return [record.kind, record.key, json.dumps(record.value), _t(now + record.ttl), _ttl_ms(record.ttl)]

    async def put(self, kind: str, key: str, value: Any, ttl: float | None = None) -> None:
        await self._run(self._put_record, *self._record_args(NewRecord(kind, key, value, ttl), self._now()))

    async def put_if(self, kind: str, key: str, value: Any, *, revision: int | None, ttl: float | None = None) -> bool:
        now = self._now()
        kind_, key_, *rest = self._record_args(NewRecord(kind, key, value, ttl), now)
        expected = "" if revision is None else str(revision)
        return bool(await self._run(self._compare_and_set_record, _t(now), kind_, key_, *rest, expected))

    async def append(self, kind: str, key: str, values: Sequence[Any], *, keep: int, ttl: float | None = None) -> None:
        if keep < 1:
            raise ValueError("keep at least one element")
        now = self._now()
        kind_, key_, _, *expiry = self._record_args(NewRecord(kind, key, None, ttl), now)
        texts = [json.dumps(value) for value in values]
        for _ in range(_CAS_TRIES):
            if await self._run(self._append_record, _t(now), kind_, key_, keep, *expiry, "append", *texts) == 1:
                return
            # A list written by put: merged here once, then its element texts are kept.
            found = await self.get_versioned(kind, key)
            current = found.value if found is not None else []
            if not isinstance(current, list):
                raise ValueError(f"{kind} {key} holds no list")
            merged = [json.dumps(value) for value in [*current, *values][-keep:]]
            mode = str(found.revision) if found is not None else "absent"
            if await self._run(self._append_record, _t(now), kind_, key_, keep, *expiry, mode, *merged) == 1:
                return
        raise StoreError(f"{kind} {key} kept changing under concurrent updates")

    async def delete(self, kind: str, key: str) -> None:
        await self._do(self.wire.call("DEL", self._record_key(kind, key)))

    # --- webhook intake -------------------------------------------------------------------------

    async def accept(
        self,
        keys: Sequence[str],
        deliveries: Sequence[NewDelivery],
        *,
        ttl: float = DAY,
        records: Sequence[NewRecord] = (),
    ) -> bool:
        now = self._now()
        args: list[str | int] = [
            _t(now), _t(now - DELIVERED_KEPT), _t(now + ttl), _ttl_ms(ttl), len(keys), len(records), *keys,
        ]
        for record in records:
            args += self._record_args(record, now)
        for delivery in deliveries:
            args += [delivery.key, delivery.destination, json.dumps(delivery.payload)]
        return bool(await self._run(self._accept_event, *args))

    # --- chat jobs ------------------------------------------------------------------------------

    async def create_job(
        self, job: ChatJob, *, lease: float, lock: bool = False, unless: RecordRef | None = None
    ) -> NewJob:
        if job.inbound is None:
            raise ValueError("a new job carries its question")
        conversation = job.conversation
        token = f"{self.owner}:{uuid.uuid4().hex}" if lock and self._may_pretake(conversation) else ""
        now = self._now()
        if unless is not None:
            self._record_key(unless.kind, unless.key)  # the kind's rule
        created, generation = await self._run(
            self._create_job, _t(now - DELIVERED_KEPT), job.id, job.key, job.state.value, self.owner,
            _t(now + lease), conversation, job.chatbot, json.dumps(inbound_to_json(job.inbound)), _t(job.created_at),
            *(self._lock_args(token) if token else ("", "", "", 0)),
            _t(now), *((unless.kind, unless.key) if unless is not None else ("", "")),
        )
        if int(generation) >= 0:
            if conversation in self._pretaken:  # another create_job took it first (it cannot: Redis said free)
                await self._free(conversation, _Lock(token, int(generation)))
            else:
                self._pretaken[conversation] = _Lock(token, int(generation), job.id, self._clock.monotonic())
                self._keep_locks()
        return {1: NewJob.CREATED, 0: NewJob.DUPLICATE}.get(int(created), NewJob.HELD)

    async def job_asked(self, job_id: str) -> None:
        await self._run(self._mark_job_asked, job_id)

    def _may_pretake(self, conversation: str) -> bool:
        """Nobody here waits for the conversation, so the new job's worker is the next to enter it.

        A holder in its block counts as gone: it is finishing its answer, and Redis refuses the take
        while its lock is held (its delivery frees it, and that is often on the wire already, ahead of
        the take: then the take succeeds and the next worker needs no round trip of its own)."""
        if conversation in self._pretaken:
            return False
        if conversation not in self._local:
            return True
        return self._local.users(conversation) == 1 and conversation in self._held

    async def job_answered(self, job: ChatJob, *, lease: float | None = None) -> OutboxItem:
        now = self._now()
        delivery = NewDelivery(job.delivery_key, job.conversation, {"kind": "chat", "job": job.id})
        # Answered under this replica's lock on its conversation: the reply's delivery frees that lock.
        holder = self._held.get(job.conversation)
        token = holder.token if holder is not None and not holder.released else ""
        item_id = await self._run(
            self._answer_job, _t(now), _t(now - DELIVERED_KEPT), job.id, delivery.key, delivery.destination,
            json.dumps(delivery.payload), job.reply, job.reply_kind.value, int(job.offer_human),
            _t(now + lease) if lease is not None else "", token,
        )
        if holder is not None and token:
            holder.job = job.id
        return OutboxItem(
            int(item_id), delivery.key, delivery.destination, delivery.payload, 0, now, now, held=lease is not None
        )

    async def get_job(self, job_id: str) -> ChatJob | None:
        return self._job(_fields(await self._do(self.wire.call("HGETALL", self._key("job", job_id)))))

    async def job_by_key(self, key: str) -> tuple[ChatJob, JobState] | None:
        job_id = await self._do(self.wire.call("GET", self._key("job-key", key)))
        job = await self.get_job(_text(job_id)) if job_id is not None else None
        return (job, job.state) if job is not None else None

    async def take_over_jobs(self, *, lease: float, limit: int = 100) -> list[ChatJob]:
        now = self._now()
        taken = await self._run(self._take_over_jobs, _t(now), self.owner, _t(now + lease), limit)
        return [job for job in (self._job(_fields(flat)) for flat in taken) if job is not None]

    async def renew_jobs(self, job_ids: Sequence[str], *, lease: float) -> None:
        if job_ids:
            await self._run(self._renew_jobs, self.owner, _t(self._now() + lease), *job_ids)

    async def job_counts(self) -> dict[JobState, int]:
        counts = await self._do(self.wire.transaction([("SCARD", self._key("jobs", state)) for state in _STATES]))
        return {JobState(state): int(count) for state, count in zip(_STATES, counts, strict=False) if count}

    def _job(self, fields: Mapping[str, str]) -> ChatJob | None:
        """A job as its hash holds it; past its windows (as if pruned) it is gone, or its texts are."""
        if not fields:
            return None
        now = self._now()
        finished = float(fields["finished_at"]) if "finished_at" in fields else None
        if finished is not None and finished < now - DELIVERED_KEPT:
            return None
        texts = finished is None or finished >= now - self._keep_text
        inbound = fields.get("inbound") if texts else None
        return ChatJob(
            id=fields["id"],
            inbound=inbound_from_json(json.loads(inbound)) if inbound else None,
            key=fields["key"],
            conversation=fields["conversation"],
            chatbot=fields["chatbot"],
            created_at=float(fields["created_at"]),
            state=JobState(fields["state"]),
            reply=fields.get("reply", "") if texts else "",
            reply_kind=ReplyKind(fields.get("reply_kind", ReplyKind.ANSWER.value)),
            offer_human=fields.get("offer_human") == "1",
            asks=int(fields.get("asks", 0)),
        )

    # --- outbox ---------------------------------------------------------------------------------

    async def outbox_add(self, key: str, destination: str, payload: dict[str, Any]) -> bool:
        now = self._now()
        return bool(await self._run(
            self._add_item, _t(now), _t(now - DELIVERED_KEPT), key, destination, json.dumps(payload)
        ))

    async def outbox_due(self, limit: int = 50) -> list[OutboxItem]:
        items = await self._run(self._due_items, _t(self._now()), limit)
        return [_item(_fields(flat)) for flat in items]

    async def outbox_take(self, item_id: int, *, lease: float) -> OutboxItem | None:
        now = self._now()
        before = await self._run(self._take_item, _t(now), _t(now + lease), item_id)
        return _item(_fields(before)) if before else None

    async def outbox_done(self, item_id: int, reference: str) -> None:
        await self._end_item(item_id, "delivered", reference)

    async def _end_item(self, item_id: int, outcome: str, text: str) -> None:
        ended = await self._run(self._deliver_item, _t(self._now()), _ttl_ms(DELIVERED_KEPT), item_id, outcome, text)
        if isinstance(ended, list):  # it freed the lock taken for its job: its holder has nothing to free
            conversation, job_id = ended
            for lock in (self._held.get(conversation), self._pretaken.get(conversation)):
                if lock is not None and lock.job == job_id:
                    lock.released = True

    async def outbox_retry(self, item_id: int, delay: float, error: str, *, count: bool = True) -> None:
        now = self._now()
        await self._run(self._retry_item, _t(now), _t(now + delay), int(count), error[:500], item_id)

    async def outbox_fail(self, item_id: int, error: str) -> None:
        await self._end_item(item_id, "failed", error[:500])

    async def outbox_hasten(self, platform: str) -> int:
        return int(await self._run(self._hasten_items, _t(self._now()), platform + ":"))

    async def outbox_depth(self) -> tuple[int, float | None]:
        pending = self._key("outbox", "pending")
        count, oldest = await self._do(
            self.wire.transaction([("ZCARD", pending), ("ZRANGE", pending, 0, 0, "WITHSCORES")])
        )
        return int(count), (self._now() - float(oldest[1])) if oldest else None


    # --- facts for the report -------------------------------------------------------------------

    async def note_facts(self, facts: Sequence[Fact]) -> None:
        if not facts:
            return
        args: list[str | int] = []
        for fact in facts:
            args += [fact.identity, _t(fact.at), fact.to_json(), int(fact.replaces)]
        await self._run(self._note_facts, *args)

    async def facts_since(self, since: float) -> list[Fact]:
        found: list[Fact] = []
        offset = 0
        while True:  # in pages, so that one script never holds Redis for long
            page = await self._run(self._facts_since, _t(since), offset, FACTS_PAGE)
            found += [Fact.from_json(_text(text)) for text in page if text is not None]
            offset += len(page)
            if len(page) < FACTS_PAGE:
                return found


def _password_of(url: str) -> str:
    found = re.search(r"://[^:@/]*:([^@/]*)@", url) or re.search(r"(?i)[?&]password=([^&]*)", url)
    return found.group(1) if found else ""


def _text(value: bytes | str) -> str:
    """A reply as text (the client decodes replies; the types allow bytes too)."""
    return value.decode() if isinstance(value, bytes) else value


def _fields(flat: Sequence[str]) -> dict[str, str]:
    """HGETALL as a script returns it (name, value, name, value...) as a mapping."""
    return dict(zip(flat[::2], flat[1::2], strict=False))  # an odd tail (never sent) is dropped, as before


def _item(fields: Mapping[str, str]) -> OutboxItem:
    return OutboxItem(
        int(fields["id"]),
        fields["key"],
        fields["destination"],
        json.loads(fields["payload"]),
        int(fields["attempts"]),
        float(fields["created_at"]),
        float(fields["next_attempt_at"]),
        fields.get("started") == "1",
    )
