"""A leadership lease in Redis: one replica holds it and renews it, the others wait to take over once it runs out."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from typing import Any

from bridge.clock import Clock, SystemClock
from bridge.store.wire import Script, Wire

log = logging.getLogger(__name__)

LEASE = 10.0  # seconds: a dead holder is replaced within this plus one standby poll
STANDBY_POLL = 1.0  # seconds between a standby's tries, at most: a released lease is taken within this
CONNECTION_TIMEOUT = 5.0  # a connection of its own (from_url); each call here also waits at most renew_every

# Compare-and-extend: only the holder's own token renews. The answer is 1 when renewed, else
# the token that holds the key now (nil: nobody), so a refused holder learns who took over.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return holder
"""

# Compare-and-delete: a holder that lost the lease (and did not notice) never removes another's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def replica_name() -> str:
    """This replica as people read it in /readyz and in Redis: hostname:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _name_of(token: str) -> str:
    # The stored token is "<name>#<random>": the random part tells two holders with one name
    # apart (pid 1 in two containers, two leases in one test process).
    name, sep, _ = token.rpartition("#")
    return name if sep else token


class RedisLease:
    """One job: hold, renew and give up one leadership lease in Redis (a bridge.ports.GatewayLease).

    `SET key token NX PX lease` takes it; the holder renews it every `renew_every` (lease/3)
    with a compare-and-extend script; `stop()` releases it with a compare-and-delete, so a
    standby takes over at its next poll instead of after the lease runs out.

    The lease itself runs on Redis's clock (PX). Locally, leadership ends the moment a
    renewal finds another token on the key, or once no renewal succeeded within `lease`
    counted from when the last good one was *sent*: Redis's expiry is never earlier than
    that, so this replica lets go before another can take it (the clocks tick at one rate).
    Renewals are scheduled with the injected Clock's sleep.
    """

    def __init__(
        self,
        redis: Wire,
        key: str,
        *,
        name: str | None = None,
        lease: float = LEASE,
        renew_every: float | None = None,
        retry_every: float | None = None,
        clock: Clock | None = None,
        owns_client: bool = False,
    ) -> None:
        if lease <= 0:
            raise ValueError("the lease must be longer than 0 s")
        self._redis = redis
        self.key = key
        self.name = name or replica_name()
        self.lease = lease
        self.renew_every = renew_every if renew_every is not None else lease / 3
        self.retry_every = retry_every if retry_every is not None else min(STANDBY_POLL, lease / 3)
        self._clock = clock or SystemClock()
        self._owns_client = owns_client
        self._token = f"{self.name}#{secrets.token_hex(6)}"
        self._lease_ms = max(1, round(lease * 1000))
        self._renew = Script(_RENEW)
        self._release = Script(_RELEASE)
        self._leader = False
        self._deadline = 0.0  # monotonic time by which a renewal must have succeeded
        self._holder: str | None = None  # who holds it, as last seen
        self.error = ""  # why Redis could not be asked the last time ("" once it answered)
        self._changed: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, key: str, **options: Any) -> RedisLease:
        """A lease on a connection of its own, closed by stop(). The bridge passes the store's instead."""
        return cls(Wire(url, timeout=CONNECTION_TIMEOUT), key, owns_client=True, **options)

    # --- what others read ----------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._leader

    def holder(self) -> str | None:
        """Which replica holds the lease: this one's name while leader, else the last seen holder.

        None: nobody, or unknown.
        """
        return self.name if self._leader else self._holder

    async def wait_changed(self) -> None:
        """Return the next time this replica becomes leader or stops being it."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._changed)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Try once (so a lone replica leads from its first moment), then keep at it in the background."""
        if self._task is not None:
            return
        await self._acquire()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"lease-{self.key}")

    async def stop(self, *, release: bool = True) -> None:
        """No more renewals. A held lease is released unless `release` is False: then it runs out
        on Redis by itself, which is what a crash leaves behind (tests of a takeover use that)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._leader:
            if release:
                try:
                    async with asyncio.timeout(self.renew_every):
                        await self._redis.run(self._release, [self.key], [self._token])
                    log.info("lease %s: released by %s", self.key, self.name)
                except Exception as exc:  # it runs out by itself; a standby takes over then
                    log.warning(
                        "lease %s: could not release it (%s); it runs out within %.0f s",
                        self.key,
                        _why(exc),
                        self.lease,
                    )
            self._set_leader(False)
        self._holder = None
        if self._owns_client:
            self._owns_client = False  # stop() twice closes it once
            await self._redis.aclose()

    # --- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self._leader:
                # Wake at the deadline at the latest: a lease that cannot be renewed is given up on time.
                await self._clock.sleep(max(0.0, min(self.renew_every, self._deadline - self._clock.monotonic())))
                await self._keep()
            else:
                await self._clock.sleep(self.retry_every)
                await self._acquire()

    async def _acquire(self) -> None:
        sent = self._clock.monotonic()
        try:
            async with asyncio.timeout(self.renew_every):
                taken = await self._redis.call("SET", self.key, self._token, "NX", "PX", self._lease_ms)
            # Refused: ours after all (an earlier SET whose answer was lost) is renewed; else who holds it.
            answer = 1
            if not taken:
                async with asyncio.timeout(self.renew_every):
                    answer = await self._redis.run(self._renew, [self.key], [self._token, self._lease_ms])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis unreachable, slow or failing: stay a standby and try again
            self._unanswered(exc)
            self._holder = None
            return
        self._answered()
        if answer == 1:
            self._deadline = sent + self.lease
            self._set_leader(True)
            log.info("lease %s: %s now holds it (lease %.1f s)", self.key, self.name, self.lease)
            return
        holder = _name_of(_text(answer)) if answer is not None else None
        if holder != self._holder:
            log.info("lease %s: held by %s; %s stands by", self.key, holder or "nobody", self.name)
        self._holder = holder

    async def _keep(self) -> None:
        """One renewal; leadership ends when Redis names another holder, or at the deadline."""
        sent = self._clock.monotonic()
        if sent >= self._deadline:
            self._lose(f"no renewal succeeded within the {self.lease:.1f} s lease ({self.error or 'no answer'})")
            return
        try:
            async with asyncio.timeout(self._deadline - sent):
                answer = await self._redis.run(self._renew, [self.key], [self._token, self._lease_ms])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # tried again before the deadline; given up at it
            self._unanswered(exc)
            return
        self._answered()
        if answer == 1:
            self._deadline = sent + self.lease
            return
        self._holder = _name_of(_text(answer)) if answer is not None else None
        self._lose(f"Redis says it is held by {self._holder}" if self._holder else "it ran out on Redis")

    def _lose(self, reason: str) -> None:
        log.warning("lease %s: %s no longer holds it: %s", self.key, self.name, reason)
        self._set_leader(False)

    def _unanswered(self, exc: BaseException) -> None:
        reason = _why(exc)
        if reason != self.error:  # once per kind of failure, not every poll
            log.warning("lease %s: cannot reach Redis: %s", self.key, reason)
        self.error = reason

    def _answered(self) -> None:
        if self.error:
            log.info("lease %s: Redis answers again", self.key)
        self.error = ""

    def _set_leader(self, leader: bool) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "Redis did not answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
