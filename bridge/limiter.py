"""A sliding-window rate limiter (never more than N grants in any window) with round-robin fairness across lanes."""

from __future__ import annotations

import asyncio
import logging
import math
import random as _random
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Protocol

from bridge.clock import Clock, SystemClock

logger = logging.getLogger(__name__)


class Grant:
    """One granted slot, counted against the window from `at`.

    A held grant (a request still on its way, `acquire(hold=True)`) counts until it is
    settled, and from the moment it is settled: the service may count the request at any
    time before its answer, so its slot is freed only one window after the answer.
    """

    __slots__ = ("at", "held")

    def __init__(self, at: float, held: bool) -> None:
        self.at = at
        self.held = held


class SharedWindow(Protocol):
    """A window kept outside this process (bridge.budget.RedisWindow): every replica's grants count in it.

    Only the head of each replica's queue asks it, so each replica keeps its own fair queue
    in front of the one budget. Nothing wakes a head when another replica's slot frees:
    `take` says how long to sleep before asking again.
    """

    @property
    def max_calls(self) -> int: ...

    @property
    def window(self) -> float: ...

    async def take(self, hold: bool) -> Grant | float:
        """A slot taken now, or the seconds to wait before asking again. Raises StoreError when unreachable."""

    def settle(self, grant: Grant) -> None:
        """The held request was answered (or failed): its slot counts from now on."""

    def penalize(self, until: float) -> None:
        """No replica gets a slot before clock.monotonic() >= until."""

    def estimated_wait(self, ahead: int) -> float:
        """Seconds until the slot after `ahead` queued requests of this replica, from what the window last said."""

    async def aclose(self) -> None:
        """Finish the writes still on their way; release the connection."""


class LocalWindow:
    """The in-memory window: who may take a slot now and when the next frees, for this process alone.

    Every question costs constant amortised time, whatever the window holds. A slot starts
    counting from "now" (a grant without hold, or a held grant's settle), so the moments are
    appended in order: the settled slots are a sorted list, the oldest dropped from its front
    as they leave the window, and the held slots are a count (each counts as +inf).
    """

    def __init__(self, max_calls: int, window: float, clock: Clock) -> None:
        self._max_calls = max_calls
        self._window = window
        self._clock = clock
        # When each settled slot started counting, oldest first, from index _head on (the
        # slots before it have left the window; cut off once they are half the list).
        self._settled: list[float] = []
        self._head = 0
        self._held = 0
        self._penalty_until = float("-inf")

    def take(self, hold: bool) -> Grant:
        now = self._clock.monotonic()
        if hold:
            self._held += 1
        else:
            self._settled.append(now)
        return Grant(now, hold)

    def settle(self, grant: Grant) -> None:
        """A held grant was answered: from now on it counts as a settled slot."""
        if not grant.held:
            return
        now = self._clock.monotonic()
        grant.held = False
        grant.at = max(grant.at, now)
        self._held -= 1
        self._settled.append(now)

    def penalize(self, until: float) -> None:
        if until > self._penalty_until:
            self._penalty_until = until
            logger.info("rate limiter paused for %.1fs after an upstream 429", until - self._clock.monotonic())

    def _expire(self) -> int:
        """Drop the settled slots that left the window; returns how many still count."""
        cutoff = self._clock.monotonic() - self._window
        settled, head = self._settled, self._head
        while head < len(settled) and settled[head] <= cutoff:
            head += 1
        if head > 32 and head * 2 > len(settled):
            del settled[:head]
            head = 0
        self._head = head
        return len(settled) - head

    def _counted(self, index: int) -> float:
        """The `index`-th oldest slot that still counts (call _expire first); a held slot is +inf."""
        position = self._head + index
        return self._settled[position] if position < len(self._settled) else math.inf

    def counting(self) -> list[float]:
        """When each slot that still counts was taken, oldest first; a held slot is +inf."""
        self._expire()
        return self._settled[self._head :] + [math.inf] * self._held

    def next_free_at(self) -> float | None:
        """The earliest moment the next grant may happen; None while held slots fill the window."""
        count = self._expire() + self._held
        if count < self._max_calls:
            return self._penalty_until
        # The next grant waits until this many of the counted slots have left the window.
        blocking = self._counted(count - self._max_calls)
        if blocking == math.inf:
            return None
        return max(self._penalty_until, blocking + self._window)

    def grant_time(self, ahead: int) -> float:
        """When the grant after `ahead` others could happen, if nothing else changes.

        Held slots are taken as answered now: it is an estimate, for the queue notice.
        Grant j waits for the slot max_calls grants before it to leave the window, so
        with j = q * max_calls + r it comes q windows after grant r (closed form, no loop).
        """
        now = self._clock.monotonic()
        count = self._expire() + self._held
        rounds, r = divmod(ahead, self._max_calls)
        at = max(now, self._penalty_until)
        index = count + r - self._max_calls  # the counted slot grant r waits for, if any
        if index >= 0:
            at = max(at, min(self._counted(index), now) + self._window)
        return at + rounds * self._window


class _Waiter:
    """One queued acquire(): its lane and the event that tells it it may be next."""

    __slots__ = ("lane", "wakeup")

    def __init__(self, lane: str) -> None:
        self.lane = lane
        self.wakeup = asyncio.Event()


class SlidingWindowLimiter:
    """Grants at most `max_calls` slots in any half-open interval of `window` seconds.

    Two halves: the window (who may take a slot now, when the next frees) and the queue in
    front of it. The window is in memory (LocalWindow), or `shared` by every replica
    (bridge.budget.RedisWindow), whose own max_calls and window must be the same.

    Waiters queue per lane (a channel or conversation key). Lanes take turns, one grant
    each, in the order they first queued; inside a lane it is first come, first served.
    So one busy channel cannot starve the others.

    There is no background task: the waiter at the head of the queue sleeps on the clock
    until a slot frees, takes it, and wakes the next head. Everyone else waits on an event.

    Held grants make the limit exact at the service, wherever between request and answer
    it counts; they cost throughput of about latency / window.

    After a pause (`penalize`, an upstream 429: someone else spends the key too) the waiters
    are not released all at once: until one window after the pause, grants are spaced by the
    window's pace (window / max_calls), times 1 to 1.5 at random, so that they do not meet
    the upstream limit again together (nor the waiters of other replicas).
    """

    def __init__(
        self,
        max_calls: int = 55,
        window: float = 60.0,
        clock: Clock | None = None,
        *,
        shared: SharedWindow | None = None,
        random: Callable[[], float] | None = None,
    ) -> None:
        if max_calls < 1:
            raise ValueError("max_calls must be at least 1")
        if window <= 0:
            raise ValueError("window must be positive")
        if shared is not None and (shared.max_calls, shared.window) != (max_calls, window):
            raise ValueError("the shared window's max_calls and window differ from the limiter's")
        self._max_calls = max_calls
        self._window_seconds = window
        self._clock: Clock = clock or SystemClock()
        # Exactly one of the two: the in-memory window, or the one every replica shares.
        self._window: LocalWindow | None = LocalWindow(max_calls, window, self._clock) if shared is None else None
        self._shared = shared
        # Lanes in turn order; the first lane's first waiter is the head of the whole queue.
        self._lanes: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self._waiting = 0
        self._random = random or _random.random
        self._paced_until = float("-inf")  # after a pause, grants are spaced until then
        self._next_paced = float("-inf")  # the earliest next grant while they are

    @property
    def max_calls(self) -> int:
        return self._max_calls

    @property
    def window(self) -> float:
        return self._window_seconds

    @property
    def shared(self) -> SharedWindow | None:
        """The window shared with other replicas, if any."""
        return self._shared

    @property
    def waiting(self) -> int:
        """Requests currently queued (in this process)."""
        return self._waiting

    async def acquire(self, lane: str = "", *, hold: bool = False) -> Grant:
        """Wait for a slot; returns once the caller may send one request.

        With `hold=True` the slot counts until `settle(grant)`: call it in a `finally`.
        A shared window that cannot be reached raises StoreError.
        """
        window = self._window
        if window is not None:
            # Nobody may overtake a queue, even when a slot is free right now: the head may
            # simply not have run yet since it was woken.
            free_at = window.next_free_at()
            now = self._clock.monotonic()
            if not self._lanes and free_at is not None and free_at <= now and self._pace_wait() <= 0:
                return self._paced(window.take(hold))
        waiter = _Waiter(lane)
        self._enqueue(waiter)
        try:
            if window is None:
                assert self._shared is not None
                return await self._wait_turn_shared(waiter, self._shared, hold)
            return await self._wait_turn(waiter, window, hold)
        except BaseException:
            self._withdraw(waiter)
            raise

    def settle(self, grant: Grant) -> None:
        """The held request was answered (or failed): its slot counts from now on."""
        if not grant.held:
            return
        if self._window is not None:
            self._window.settle(grant)
            self._wake_head()  # the head may be waiting for exactly this slot
        elif self._shared is not None:
            # The shared head sleeps on the clock: a settle here (or anywhere) frees a slot
            # no sooner than one window from now, which is when a head blocked by it looks again.
            self._shared.settle(grant)

    def penalize(self, until: float) -> None:
        """Grant nothing before clock.monotonic() >= until (after an upstream 429); then space the grants."""
        self._paced_until = max(self._paced_until, until + self._window_seconds)
        if self._window is not None:
            self._window.penalize(until)
        elif self._shared is not None:
            self._shared.penalize(until)
        # The head is asleep towards the old free time; it re-checks when it wakes.

    def position(self, lane: str = "") -> int:
        """How many queued requests would be served before a new one in `lane`."""
        queue = self._lanes.get(lane)
        if not queue:
            return len(self._lanes)  # one turn of every queued lane (no lane is empty), no loop
        rounds = len(queue)  # the new request waits this many turns of its lane
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
        if self._window is None:
            assert self._shared is not None
            return self._shared.estimated_wait(self.position(lane))
        now = self._clock.monotonic()
        return max(0.0, self._window.grant_time(self.position(lane)) - now)

    async def aclose(self) -> None:
        """Let a shared window finish its writes (settles, penalties) and close its connection."""
        if self._shared is not None:
            await self._shared.aclose()

    async def _wait_turn(self, waiter: _Waiter, window: LocalWindow, hold: bool) -> Grant:
        while True:
            if self._head() is waiter:
                free_at = window.next_free_at()
                if free_at is None:
                    # Every slot is held by a request in flight: settle() wakes the head.
                    waiter.wakeup.clear()
                    await waiter.wakeup.wait()
                    continue
                delay = max(free_at - self._clock.monotonic(), self._pace_wait())
                if delay <= 0:
                    # No await between this check and the grant: a cancelled waiter never holds a slot.
                    return self._served(self._paced(window.take(hold)))
                await self._clock.sleep(delay)  # then look again: penalize() may have moved the goal
            else:
                waiter.wakeup.clear()
                await waiter.wakeup.wait()

    async def _wait_turn_shared(self, waiter: _Waiter, shared: SharedWindow, hold: bool) -> Grant:
        while True:
            if self._head() is waiter:
                pace = self._pace_wait()
                if pace > 0:
                    await self._clock.sleep(pace)
                    continue
                # Only the head asks: the other replicas' heads are its only competitors. A head
                # cancelled while asking gives back what the window may have granted (take's job).
                answer = await shared.take(hold)
                if isinstance(answer, Grant):
                    return self._served(self._paced(answer))
                await self._clock.sleep(answer)
            else:
                waiter.wakeup.clear()
                await waiter.wakeup.wait()

    def _pace_wait(self) -> float:
        """Seconds until the next grant may go while grants are spaced after a pause (0: now)."""
        now = self._clock.monotonic()
        return 0.0 if now >= self._paced_until else max(0.0, self._next_paced - now)

    def _paced(self, grant: Grant) -> Grant:
        now = self._clock.monotonic()
        if now < self._paced_until:
            pace = self._window_seconds / self._max_calls
            self._next_paced = now + pace * (1.0 + 0.5 * self._random())
        return grant

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

    def _served(self, grant: Grant) -> Grant:
        """The head got `grant`: it leaves the queue, its lane goes to the back, the next head wakes."""
        lane, queue = next(iter(self._lanes.items()))
        queue.popleft()
        self._waiting -= 1
        if queue:
            self._lanes.move_to_end(lane)  # its turn is over; the other lanes go first
        else:
            del self._lanes[lane]
        self._wake_head()
        return grant

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
