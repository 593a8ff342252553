"""Injectable time: the real clock for production, a manual one for tests that must never sleep."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    """What every time-dependent part of the bridge asks of time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for deadlines and windows)."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (for stored expiries and timestamps)."""

    async def sleep(self, seconds: float) -> None:
        """Wait this long."""


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that only moves when told to, or when every waiter is asleep on it.

    `sleep()` parks the caller until `advance()` moves time past its wake-up point.
    With `autojump=True` the clock jumps straight to the earliest wake-up whenever a
    sleeper arrives and nothing else is runnable, so code full of backoffs runs instantly.
    """

    def __init__(self, start: float = 1_000_000.0, *, autojump: bool = False) -> None:
        self._now = start
        self._epoch_offset = 1_700_000_000.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self.autojump = autojump
        self._jump_scheduled = False

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._epoch_offset + self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), future))
        if self.autojump and not self._jump_scheduled:
            self._jump_scheduled = True
            asyncio.get_running_loop().call_soon(self._autojump_step)
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose time has come."""
        self._now += seconds
        self._wake_due()

    def _wake_due(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    def _autojump_step(self) -> None:
        # Let already-runnable callbacks go first by re-queuing a few times; then jump.
        self._jump_scheduled = False
        self._drop_cancelled()
        if not self._sleepers:
            return
        loop = asyncio.get_running_loop()
        ready = len(getattr(loop, "_ready", ()))
        if ready:
            self._jump_scheduled = True
            loop.call_soon(self._autojump_step)
            return
        self._now = max(self._now, self._sleepers[0][0])
        self._wake_due()
        if self._sleepers:
            # Other sleepers must not depend on the woken task sleeping again.
            self._jump_scheduled = True
            loop.call_soon(self._autojump_step)

    def _drop_cancelled(self) -> None:
        self._sleepers = [s for s in self._sleepers if not s[2].done()]
        heapq.heapify(self._sleepers)

    @property
    def sleepers(self) -> int:
        """How many tasks are waiting on this clock."""
        self._drop_cancelled()
        return len(self._sleepers)
