"""A sliding-window rate limiter (never more than N grants in any window) with round-robin fairness across lanes."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque

from bridge.clock import Clock, SystemClock

logger = logging.getLogger(__name__)


class _Waiter:
    """One queued acquire(): its lane and the event that tells it it may be next."""

    __slots__ = ("lane", "wakeup")

    def __init__(self, lane: str) -> None:
        self.lane = lane
        self.wakeup = asyncio.Event()


class SlidingWindowLimiter:
    """Grants at most `max_calls` slots in any half-open interval of `window` seconds.

    Waiters queue per lane (a channel or conversation key). Lanes take turns, one grant
    each, in the order they first queued; inside a lane it is first come, first served.
    So one busy channel cannot starve the others.

    There is no background task: the waiter at the head of the queue sleeps on the clock
    until a slot frees, takes it, and wakes the next head. Everyone else waits on an event.
    """

    def __init__(self, max_calls: int = 55, window: float = 60.0, clock: Clock | None = None) -> None:
        if max_calls < 1:
            raise ValueError("max_calls must be at least 1")
        if window <= 0:
            raise ValueError("window must be positive")
        self._max_calls = max_calls
        self._window = window
        self._clock: Clock = clock or SystemClock()
        # Only the last max_calls grants can hold back the next one, so older ones are dropped.
        self._grants: deque[float] = deque(maxlen=max_calls)
        # Lanes in turn order; the first lane's first waiter is the head of the whole queue.
        self._lanes: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self._waiting = 0
        self._penalty_until = float("-inf")

    @property
    def max_calls(self) -> int:
        return self._max_calls

    @property
    def window(self) -> float:
        return self._window

    @property
    def waiting(self) -> int:
        """Requests currently queued."""
        return self._waiting

    async def acquire(self, lane: str = "") -> None:
        """Wait for a slot; returns once the caller may send one request."""
        # Nobody may overtake a queue, even when a slot is free right now: the head may
        # simply not have run yet since it was woken.
        now = self._clock.monotonic()
        if not self._lanes and self._next_free_at() <= now:
            self._grants.append(now)
            return
        waiter = _Waiter(lane)
        self._enqueue(waiter)
        try:
            await self._wait_turn(waiter)
        except BaseException:
            self._withdraw(waiter)
            raise

    def penalize(self, until: float) -> None:
        """Grant nothing before clock.monotonic() >= until (after an upstream 429)."""
        if until > self._penalty_until:
            self._penalty_until = until
            logger.info("rate limiter paused for %.1fs after an upstream 429", until - self._clock.monotonic())
        # The head is asleep towards the old free time; it re-checks when it wakes.

    def position(self, lane: str = "") -> int:
        """How many queued requests would be served before a new one in `lane`."""
        queue = self._lanes.get(lane)
        rounds = len(queue) if queue else 0  # the new request waits this many turns of its lane
        ahead = rounds
        behind_target = False
        for name, other in self._lanes.items():
            if name == lane:
                behind_target = True
                continue
            # Lanes before ours in the turn order get one more turn than we wait; lanes after, as many.
            ahead += min(len(other), rounds if behind_target else rounds + 1)
        return ahead

    def estimated_wait(self, lane: str = "") -> float:
        """Seconds a new request in `lane` would wait right now (0 if a slot is free)."""
        now = self._clock.monotonic()
        return max(0.0, self._grant_time(self.position(lane)) - now)

    def _next_free_at(self) -> float:
        """The earliest moment the next grant may happen."""
        free_at = self._penalty_until
        if len(self._grants) >= self._max_calls:
            free_at = max(free_at, self._grants[0] + self._window)
        return free_at

    def _grant_time(self, ahead: int) -> float:
        """When the grant after `ahead` others could happen, if nothing else changes."""
        recent = deque(self._grants, maxlen=self._max_calls)
        at = max(self._clock.monotonic(), self._penalty_until)
        for _ in range(ahead + 1):
            if len(recent) >= self._max_calls:
                at = max(at, recent[0] + self._window)
            recent.append(at)
        return at

    async def _wait_turn(self, waiter: _Waiter) -> None:
        while True:
            if self._head() is waiter:
                delay = self._next_free_at() - self._clock.monotonic()
                if delay <= 0:
                    # No await between this check and the grant: a cancelled waiter never holds a slot.
                    self._grant_head()
                    return
                await self._clock.sleep(delay)  # then look again: penalize() may have moved the goal
            else:
                waiter.wakeup.clear()
                await waiter.wakeup.wait()

    def _head(self) -> _Waiter | None:
        for queue in self._lanes.values():
            return queue[0]
        return None

    def _enqueue(self, waiter: _Waiter) -> None:
        queue = self._lanes.get(waiter.lane)
        if queue is None:
            # A new lane joins at the back of the turn order.
            queue = self._lanes[waiter.lane] = deque()
        queue.append(waiter)
        self._waiting += 1

    def _grant_head(self) -> None:
        lane, queue = next(iter(self._lanes.items()))
        queue.popleft()
        self._waiting -= 1
        self._grants.append(self._clock.monotonic())
        if queue:
            self._lanes.move_to_end(lane)  # its turn is over; the other lanes go first
        else:
            del self._lanes[lane]
        self._wake_head()

    def _withdraw(self, waiter: _Waiter) -> None:
        """Take a cancelled waiter out of the queue, leaving no hole behind it."""
        queue = self._lanes.get(waiter.lane)
        if queue is None or waiter not in queue:
            return
        was_head = self._head() is waiter
        queue.remove(waiter)
        self._waiting -= 1
        if not queue:
            del self._lanes[waiter.lane]
        if was_head:
            self._wake_head()

    def _wake_head(self) -> None:
        head = self._head()
        if head is not None:
            head.wakeup.set()
