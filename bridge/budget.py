"""The InsiteChat rate budget shared by every replica: one sliding window per API key in Redis."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import random as _random
import secrets
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from redis.exceptions import RedisError

from bridge.clock import Clock, SystemClock
from bridge.limiter import Grant
from bridge.store import StoreError
from bridge.store.wire import Script, Wire

logger = logging.getLogger(__name__)

PREFIX = "insitechat-bridge:budget:"
# Longer than any one request can be on its way (connect, write and read timeouts of one
# attempt): a held slot whose replica died counts as answered at this deadline.
DEFAULT_HOLD = 300.0
# Added to every "ask again in" so that replicas woken for the same slot do not all ask at once.
JITTER = 0.05
# After a failed call, asks fail at once for this long: a Redis that hangs would otherwise
# cost every queued request its own socket timeout, one after the other.
DOWN_FOR = 1.0
# Per Redis call (connect, or reply), on a connection of its own (from_url); a shared one has its owner's.
REDIS_TIMEOUT = 2.0
# What aclose() waits at most for settles and penalties still on their way.
CLOSE_WAIT = 2.0

# KEYS: the window (sorted set: grant id -> the moment the slot counts from), the penalty end.
# ARGV: now, window, max_calls, grant id, score (now; for a held grant its hold deadline), key ttl ms.
# Returns {1, now} for a slot taken, or {0, the moment the next slot may free}.
#
# A score is when a slot stops "being taken": a settled slot counts for one window after its
# score. A held slot's score is its hold deadline, in the future while its request is on its
# way; settle() moves it to the answer. A replica that dies never settles: its slot then counts
# as answered at the deadline and leaves the window one window later.
TAKE = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local max_calls = tonumber(ARGV[3])
-- A call retried after a lost reply must not take a second slot.
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then
  return {1, ARGV[1]}
end
-- Numbers go to Redis as strings: Lua's own conversion keeps only 14 digits.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.17g', now - window))
local free_at = now
local count = redis.call('ZCARD', KEYS[1])
if count >= max_calls then
  -- The next slot waits until this many of the counted slots have left the window.
  local blocking = tonumber(redis.call('ZRANGE', KEYS[1], count - max_calls, count - max_calls, 'WITHSCORES')[2])
  if blocking > now then
    -- Held, its answer still to come: it frees one window after that answer, so not before now + window.
    free_at = now + window
  else
    free_at = blocking + window
  end
end
local penalty = tonumber(redis.call('GET', KEYS[2]) or '0')
if penalty > free_at then
  free_at = penalty
end
if free_at > now then
  return {0, string.format('%.17g', free_at)}
end
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[4])
-- The key outlives every slot in it, and then goes by itself.
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[6]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
end
return {1, ARGV[1]}
"""

# KEYS: the window. ARGV: the answer's moment, grant id, key ttl ms.
# Also after the hold deadline (a request slower than the hold): the slot then counts from its
# answer again, as the service may count it then.
SETTLE = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""

# KEYS: the penalty end. ARGV: until, key ttl ms. A shorter penalty never shortens a longer one.
PENALIZE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""


def key_base(api_key: str, prefix: str = PREFIX) -> str:
    """Where one API key's budget lives: a hash of the key, never the key.

    In braces, so that the window and the penalty share one Redis Cluster slot (a script needs that).
    """
    digest = hashlib.sha256(api_key.encode()).hexdigest()[:32]
    return f"{prefix}{{{digest}}}"


class SharedGrant(Grant):
    """A slot of the shared window, known there by `id`."""

    __slots__ = ("id",)

    def __init__(self, at: float, held: bool, grant_id: str) -> None:
        super().__init__(at, held)
        self.id = grant_id


class RedisWindow:
    """At most `max_calls` slots in any `window` seconds for one API key, whichever replica takes them.

    A SharedWindow (bridge.limiter) for SlidingWindowLimiter(shared=...): each replica keeps
    its fair queue, and the head of each queue asks here. Held slots count as in the
    in-memory window, up to a hold deadline (`hold` seconds after the grant) after which a
    slot that was never settled (its replica died) counts as answered then.

    Time is the injected clock's wall time, passed to the scripts: the replicas' clocks must
    agree (NTP), with a skew far below the window. A replica ahead of the others frees slots
    early by its skew; one behind waits longer.

    Redis failures: `take` raises StoreError (InsiteChatClient turns it into Unavailable, the
    user's "unavailable" notice). Settles and penalties are written in the background; one
    that fails is logged, and the slot counts until its hold deadline plus one window.
    """

    def __init__(
        self,
        redis: Wire,
        api_key: str,
        max_calls: int = 55,
        window: float = 60.0,
        *,
        clock: Clock | None = None,
        hold: float = DEFAULT_HOLD,
        prefix: str = PREFIX,
        random: Callable[[], float] | None = None,
        owns_redis: bool = False,
    ) -> None:
        if max_calls < 1:
            raise ValueError("max_calls must be at least 1")
        if window <= 0 or hold <= 0:
            raise ValueError("window and hold must be positive")
        self._redis = redis
        self._owns_redis = owns_redis
        self._max_calls = max_calls
        self._window = window
        self._clock: Clock = clock or SystemClock()
        self._hold = hold
        self._random = random or _random.random
        base = key_base(api_key, prefix)
        self._window_key = f"{base}:window"
        self._penalty_key = f"{base}:penalty"
        self._take = Script(TAKE)
        self._settle = Script(SETTLE)
        self._penalize = Script(PENALIZE)
        # Grant ids unique across replicas and restarts.
        self._replica = secrets.token_hex(6)
        self._ids = itertools.count()
        self._pending: set[asyncio.Future[Any]] = set()
        # This replica's view, for estimates and for its own 429 before the write reached Redis.
        self._free_at = float("-inf")
        self._penalty_until = float("-inf")
        self._down_until = float("-inf")
        self._down_reason = ""

    @classmethod
    def from_url(cls, url: str, api_key: str, max_calls: int = 55, window: float = 60.0, **kwargs: Any) -> RedisWindow:
        """A window with a connection of its own, closed by aclose(). The bridge passes the store's instead
        (one connection per replica); a connection that broke is made again by the next call."""
        return cls(Wire(url, timeout=REDIS_TIMEOUT), api_key, max_calls, window, owns_redis=True, **kwargs)

    @property
    def max_calls(self) -> int:
        return self._max_calls

    @property
    def window(self) -> float:
        return self._window

    @property
    def keys(self) -> tuple[str, str]:
        """The Redis keys of this budget: the window and the penalty."""
        return self._window_key, self._penalty_key

    @property
    def in_flight(self) -> int:
        """Redis calls on their way (asks and background writes)."""
        return len(self._pending)

    async def take(self, hold: bool) -> Grant | float:
        """A slot taken now, or the seconds to wait before asking again; StoreError when Redis fails."""
        mono = self._clock.monotonic()
        if mono < self._down_until:
            raise StoreError(self._down_reason)
        if mono < self._penalty_until:
            # Our own 429: no need to ask, and its write may not have reached Redis yet.
            return self._penalty_until - mono + self._jitter()
        now = self._clock.time()
        grant_id = f"{self._replica}:{next(self._ids)}"
        score = now + self._hold if hold else now
        keep_ms = math.ceil((score - now + self._window) * 1000) + 1000
        args = (now, self._window, self._max_calls, grant_id, score, keep_ms)
        call = self._track(self._redis.run(self._take, self.keys, args))
        try:
            # Shielded: a cancelled head must not leave the script's answer unread (see below).
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The script may still grant the slot; nobody will send its request, so it goes back.
            call.add_done_callback(partial(self._give_back, grant_id))
            raise
        except (RedisError, OSError) as exc:
            self._down_until = self._clock.monotonic() + DOWN_FOR
            self._down_reason = f"the shared rate budget in Redis failed: {type(exc).__name__}: {exc}"
            logger.warning("%s", self._down_reason)
            raise StoreError(self._down_reason) from exc
        granted, moment = int(reply[0]), float(reply[1])
        if granted:
            self._free_at = mono
            return SharedGrant(mono, hold, grant_id)
        # The answer is on Redis's terms (wall time); the sleep is on the monotonic clock.
        self._free_at = mono + (moment - now)
        return max(0.0, self._free_at - self._clock.monotonic()) + self._jitter()

    def settle(self, grant: Grant) -> None:
        """The held request was answered: its slot counts from now on (written in the background)."""
        if not grant.held or not isinstance(grant, SharedGrant):
            return
        grant.held = False
        grant.at = max(grant.at, self._clock.monotonic())
        keep_ms = math.ceil(self._window * 1000) + 1000
        self._background(
            "settling a slot (it counts until its hold deadline plus a window)",
            self._redis.run(self._settle, (self._window_key,), (self._clock.time(), grant.id, keep_ms)),
        )

    def penalize(self, until: float) -> None:
        """No replica gets a slot before clock.monotonic() >= until (after an upstream 429)."""
        if until <= self._penalty_until:
            return
        self._penalty_until = until
        seconds = until - self._clock.monotonic()
        logger.info("shared rate budget paused for %.1fs after an upstream 429", seconds)
        keep_ms = max(1, math.ceil((seconds + self._window) * 1000))
        self._background(
            "sharing a 429 pause (other replicas may meet the 429 themselves)",
            self._redis.run(self._penalize, (self._penalty_key,), (self._clock.time() + seconds, keep_ms)),
        )

    def estimated_wait(self, ahead: int) -> float:
        """From what this replica last heard: the next free slot, then the window's pace.

        Other replicas' queues are not seen: an estimate, for the queue notice.
        """
        now = self._clock.monotonic()
        first = max(0.0, self._free_at - now, self._penalty_until - now)
        return first + ahead * self._window / self._max_calls

    async def flush(self) -> None:
        """Wait until the calls on their way are done."""
        while self._pending:
            await asyncio.wait(list(self._pending))

    async def aclose(self) -> None:
        if self._pending:
            # A settle that does not make it counts until its hold deadline: late, not wrong.
            await asyncio.wait(list(self._pending), timeout=CLOSE_WAIT)
        if self._owns_redis:
            await self._redis.aclose()

    def _jitter(self) -> float:
        return JITTER * self._random()

    def _track(self, call: Awaitable[Any]) -> asyncio.Future[Any]:
        future = asyncio.ensure_future(call)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    def _background(self, what: str, call: Awaitable[Any]) -> None:
        self._track(call).add_done_callback(partial(self._written, what))

    def _written(self, what: str, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            logger.warning("shared rate budget: %s failed: %s: %s", what, type(exc).__name__, exc)

    def _give_back(self, grant_id: str, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return  # nothing was granted, or nobody knows: the hold deadline covers it
        if int(future.result()[0]):
            self._background(
                "giving back an unused slot (it counts as taken)", self._redis.call("ZREM", self._window_key, grant_id)
            )
