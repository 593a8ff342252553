"""The sliding-window limiter: the window holds, lanes take turns, cancellation leaves no trace."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.clock import ManualClock
from bridge.limiter import Grant, LocalWindow, SlidingWindowLimiter

START = 1_000_000.0


async def settle(rounds: int = 50) -> None:
    """Let every runnable task run (the waiter hand-over takes one loop turn per grant)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def window_violations(grants: list[float], max_calls: int, window: float) -> list[tuple[float, float]]:
    """Pairs of grants max_calls apart that both fall inside one half-open window."""
    ordered = sorted(grants)
    return [
        (ordered[i], ordered[i + max_calls])
        for i in range(len(ordered) - max_calls)
        if ordered[i + max_calls] < ordered[i] + window
    ]


class Recorder:
    """Runs acquire() calls as tasks and records who got a slot, in order, and when."""

    def __init__(self, limiter: SlidingWindowLimiter, clock: ManualClock) -> None:
        self.limiter = limiter
        self.clock = clock
        self.order: list[str] = []
        self.times: dict[str, float] = {}

    def start(self, name: str, lane: str = "", delay: float = 0.0) -> asyncio.Task[None]:
        return asyncio.create_task(self._run(name, lane, delay))

    async def _run(self, name: str, lane: str, delay: float) -> None:
        if delay:
            await self.clock.sleep(delay)
        await self.limiter.acquire(lane)
        self.order.append(name)
        self.times[name] = self.clock.monotonic()


def test_window_check_helper_sees_a_violation() -> None:
    # The property test below is only as good as this helper.
    assert window_violations([0.0, 1.0, 9.9], 2, 10.0) == [(0.0, 9.9)]
    assert window_violations([0.0, 1.0, 10.0], 2, 10.0) == []


async def run_to_completion(
    clock: ManualClock, tasks: list[asyncio.Task[None]], moments: Callable[[], Iterable[float]]
) -> None:
    """Run the tasks, moving the clock straight to the next moment at which something can happen.

    (ManualClock's autojump only jumps when a new sleeper arrives, so several tasks asleep at
    once, as here, would stall it.)
    """
    for _ in range(10_000):
        await settle()
        clock.advance(0)  # wakes sleepers whose time is now (a sleep too short to move a float)
        await settle()
        if all(task.done() for task in tasks):
            return
        now = clock.monotonic()
        upcoming = [moment for moment in moments() if moment > now]
        assert upcoming, "requests still wait, yet nothing can ever happen"
        clock.advance(min(upcoming) - now)
    raise AssertionError("the limiter never finished")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_calls=st.integers(min_value=1, max_value=6),
    window=st.sampled_from([1.0, 7.5, 60.0]),
    arrivals=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=200.0, allow_nan=False), st.sampled_from("abc")),
        min_size=1,
        max_size=40,
    ),
)
def test_no_rolling_window_ever_exceeds_max_calls(
    max_calls: int, window: float, arrivals: list[tuple[float, str]]
) -> None:
    arrived: dict[int, float] = {}
    granted: dict[int, float] = {}

    async def scenario() -> None:
        clock = ManualClock(START)
        limiter = SlidingWindowLimiter(max_calls, window, clock=clock)

        async def request(index: int, at: float, lane: str) -> None:
            await clock.sleep(at)
            arrived[index] = clock.monotonic()
            await limiter.acquire(lane)
            granted[index] = clock.monotonic()

        tasks = [asyncio.create_task(request(i, at, lane)) for i, (at, lane) in enumerate(arrivals)]

        def moments() -> Iterable[float]:
            # Arrivals, and the moments older grants leave the window.
            yield from (START + at for at, _ in arrivals)
            yield from (at + window for at in granted.values())

        await run_to_completion(clock, tasks, moments)
        assert limiter.waiting == 0

    asyncio.run(scenario())
    assert len(granted) == len(arrivals)  # everyone was eventually served
    assert window_violations(list(granted.values()), max_calls, window) == []
    grants = sorted(granted.values())
    for index, at in granted.items():
        assert at >= arrived[index]
        if at > arrived[index]:
            # Nobody waited needlessly: just before the grant the window was full.
            busy = [g for g in grants if at - window - 1e-5 <= g < at]
            assert len(busy) >= max_calls, (index, at, busy)


async def test_grants_up_to_max_at_once_then_waits_for_the_oldest_to_leave_the_window() -> None:
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(3, 10.0, clock=clock)
    for _ in range(3):
        await asyncio.wait_for(limiter.acquire(), timeout=1)  # immediate, no clock movement
    rec = Recorder(limiter, clock)
    rec.start("late")
    await settle()
    assert rec.order == []
    # A token bucket refilling 3 per 10 s would let one through after ~3.3 s; a window does not.
    clock.advance(9.999)
    await settle()
    assert rec.order == []
    clock.advance(0.001)
    await settle()
    assert rec.times == {"late": START + 10.0}


async def test_a_burst_at_the_window_edge_does_not_double_the_rate() -> None:
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(2, 10.0, clock=clock)
    clock.advance(9.0)
    await limiter.acquire()
    await limiter.acquire()
    clock.advance(1.0)  # a fresh fixed window would start here and admit two more
    rec = Recorder(limiter, clock)
    rec.start("x")
    rec.start("y")
    await settle()
    assert rec.order == []
    clock.advance(9.0)
    await settle()
    assert rec.order == ["x", "y"]


async def test_a_newcomer_never_overtakes_the_queue_when_a_slot_frees() -> None:
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(2, 10.0, clock=clock)
    await limiter.acquire()
    await limiter.acquire()
    rec = Recorder(limiter, clock)
    rec.start("a1", "A")
    rec.start("b1", "B")
    await settle()
    clock.advance(10.0)
    # Both slots are free now, but a1 and b1 have not run yet: c1 must still queue behind them.
    rec.start("c1", "C")
    await settle()
    assert rec.order == ["a1", "b1"]
    assert limiter.waiting == 1


async def test_a_flooding_lane_cannot_starve_another() -> None:
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(5, 60.0, clock=clock)
    rec = Recorder(limiter, clock)
    tasks = [rec.start(f"a{i}", "A") for i in range(100)]
    await settle()
    clock.advance(1.0)
    tasks.append(rec.start("b", "B"))
    await settle()
    assert limiter.position("B") == 3  # a5 (the head), b, a6, then a new B
    await run_to_completion(clock, tasks, lambda: (START + 60.0 * k for k in range(1, 30)))
    # Five go at once, then B queues behind A's head: at most one more A before it.
    assert rec.order.index("b") <= 6
    assert rec.times["b"] == START + 60.0
    # FIFO inside a lane.
    assert [name for name in rec.order if name != "b"] == [f"a{i}" for i in range(100)]


async def test_lanes_take_turns_one_grant_each() -> None:
    clock = ManualClock(START, autojump=True)
    limiter = SlidingWindowLimiter(1, 1.0, clock=clock)
    await limiter.acquire()
    rec = Recorder(limiter, clock)
    tasks = [rec.start(f"a{i}", "A") for i in range(3)]
    tasks += [rec.start(f"b{i}", "B") for i in range(2)]
    tasks += [rec.start("c0", "C")]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    assert rec.order == ["a0", "b0", "c0", "a1", "b1", "a2"]


async def test_cancelled_head_leaves_no_hole_and_no_slot_used() -> None:
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(1, 10.0, clock=clock)
    await limiter.acquire()
    rec = Recorder(limiter, clock)
    first = rec.start("a1", "A")
    rec.start("a2", "A")
    rec.start("b1", "B")
    await settle()
    assert limiter.waiting == 3
    first.cancel()
    await settle()
    assert limiter.waiting == 2
    clock.advance(10.0)
    await settle()
    # The slot a1 would have had goes to the next in turn, at once, not a window later.
    assert rec.times == {"a2": START + 10.0}
    clock.advance(10.0)
    await settle()
    assert rec.order == ["a2", "b1"]
    assert limiter.waiting == 0


async def test_cancelled_middle_waiter_does_not_block_the_rest() -> None:
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(1, 10.0, clock=clock)
    await limiter.acquire()
    rec = Recorder(limiter, clock)
    rec.start("a1", "A")
    middle = rec.start("b1", "B")
    rec.start("c1", "C")
    await settle()
    middle.cancel()
    await settle()
    assert limiter.waiting == 2
    assert limiter.position("D") == 2
    for _ in range(2):
        clock.advance(10.0)
        await settle()
    assert rec.order == ["a1", "c1"]
    assert rec.times["c1"] == START + 20.0


async def test_cancelling_every_waiter_empties_the_queue_and_frees_the_fast_path() -> None:
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(1, 10.0, clock=clock)
    await limiter.acquire()
    rec = Recorder(limiter, clock)
    tasks = [rec.start(f"x{i}", "X") for i in range(3)]
    await settle()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert limiter.waiting == 0
    assert limiter.position() == 0
    clock.advance(10.0)
    await asyncio.wait_for(limiter.acquire(), timeout=1)


async def test_penalize_holds_every_grant_until_the_given_time() -> None:
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(10, 60.0, clock=clock)
    limiter.penalize(START + 30.0)
    limiter.penalize(START + 5.0)  # an earlier end never shortens the pause
    assert limiter.estimated_wait() == 30.0
    rec = Recorder(limiter, clock)
    rec.start("p")
    await settle()
    clock.advance(29.0)
    await settle()
    assert rec.order == []
    clock.advance(1.0)
    await settle()
    assert rec.times == {"p": START + 30.0}


async def test_penalize_during_a_wait_extends_it() -> None:
    clock = ManualClock(START, autojump=True)
    limiter = SlidingWindowLimiter(1, 10.0, clock=clock)
    await limiter.acquire()
    rec = Recorder(limiter, clock)
    task = rec.start("w")
    await settle()
    limiter.penalize(START + 25.0)
    await asyncio.wait_for(task, timeout=10)
    assert rec.times["w"] == START + 25.0


async def test_position_and_estimated_wait_follow_the_turn_order() -> None:
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(2, 10.0, clock=clock)
    assert (limiter.position("A"), limiter.estimated_wait("A")) == (0, 0.0)
    await limiter.acquire()
    await limiter.acquire()
    assert (limiter.position("A"), limiter.estimated_wait("A")) == (0, 10.0)
    rec = Recorder(limiter, clock)
    rec.start("a1", "A")
    rec.start("a2", "A")
    rec.start("b1", "B")
    await settle()
    assert limiter.waiting == 3
    # Turn order a1, b1, a2, then: a new A after a2; a new B after a2 too (B had its turn
    # before A's second); a new lane C after a1 and b1 only.
    assert limiter.position("A") == 3
    assert limiter.position("B") == 3
    assert limiter.position("C") == 2
    # Two grants per 10 s: the 3rd and 4th queued go at +20.
    assert limiter.estimated_wait("C") == 20.0
    assert limiter.estimated_wait("A") == 20.0
    promised = limiter.estimated_wait("C")
    rec.start("c1", "C")
    await settle()
    clock.advance(10.0)
    await settle()
    assert rec.order == ["a1", "b1"]
    clock.advance(10.0)
    await settle()
    assert rec.order == ["a1", "b1", "c1", "a2"]
    assert rec.times["c1"] == START + promised


async def test_cancellation_while_sleeping_on_the_clock_releases_the_head_role() -> None:
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(1, 10.0, clock=clock)
    await limiter.acquire()
    head = asyncio.create_task(limiter.acquire("A"))
    await settle()
    assert clock.sleepers == 1  # the head sleeps towards the free slot
    nxt: Awaitable[None] = asyncio.create_task(limiter.acquire("B"))
    await settle()
    head.cancel()
    await settle()
    assert clock.sleepers == 1  # B took over the sleeping
    clock.advance(10.0)
    await asyncio.wait_for(nxt, timeout=1)


@pytest.mark.parametrize(("max_calls", "window"), [(0, 1.0), (1, 0.0)])
def test_rejects_impossible_settings(max_calls: int, window: float) -> None:
    with pytest.raises(ValueError):
        SlidingWindowLimiter(max_calls, window, clock=ManualClock())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_calls=st.integers(min_value=1, max_value=5),
    window=st.sampled_from([1.0, 6.0]),
    requests=st.lists(
        st.tuples(
            # Millisecond steps: sub-float-resolution sleeps are not what this property is about.
            st.integers(min_value=0, max_value=30_000).map(lambda ms: ms / 1000),  # arrival
            st.integers(min_value=0, max_value=3_000).map(lambda ms: ms / 1000),  # time until the answer
        ),
        min_size=1,
        max_size=25,
    ),
)
def test_held_slots_keep_the_service_under_the_limit_wherever_it_counts(
    max_calls: int, window: float, requests: list[tuple[float, float]]
) -> None:
    granted: dict[int, float] = {}
    answered: dict[int, float] = {}

    async def scenario() -> None:
        clock = ManualClock(START)
        limiter = SlidingWindowLimiter(max_calls, window, clock=clock)

        async def request(index: int, at: float, duration: float) -> None:
            await clock.sleep(at)
            grant = await limiter.acquire(hold=True)
            granted[index] = clock.monotonic()
            try:
                await clock.sleep(duration)
            finally:
                answered[index] = clock.monotonic()
                limiter.settle(grant)

        tasks = [asyncio.create_task(request(i, at, d)) for i, (at, d) in enumerate(requests)]

        def moments() -> Iterable[float]:
            yield from (START + at for at, _ in requests)
            yield from (granted[i] + requests[i][1] for i in granted)
            yield from (at + window for at in answered.values())

        await run_to_completion(clock, tasks, moments)

    asyncio.run(scenario())
    assert len(answered) == len(requests)
    # The service may count a request at any moment between send and answer: the worst
    # cases are "all at the send" and "all at the answer". Neither may exceed the limit.
    assert window_violations(list(granted.values()), max_calls, window) == []
    assert window_violations(list(answered.values()), max_calls, window) == []
    # And any mixture: N+1 requests can be counted in one window (t - W, t] exactly when t
    # lies in each one's [send, answer + W). Nowhere may more than max_calls overlap.
    spans = [(granted[i], answered[i] + window) for i in granted]
    assert most_overlapping(spans) <= max_calls


def most_overlapping(spans: list[tuple[float, float]]) -> int:
    """The most half-open intervals [start, end) that share one instant."""
    # At equal times an end comes before a start: [a, b) and [b, c) do not overlap.
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def test_overlap_helper_sees_touching_and_nested_intervals() -> None:
    assert most_overlapping([(0.0, 1.0), (1.0, 2.0)]) == 1
    assert most_overlapping([(0.0, 3.0), (1.0, 2.0), (1.5, 4.0)]) == 3


async def test_a_flood_gets_one_slot_per_window_plus_latency_and_no_more_slack() -> None:
    # A safe limiter can use at most W / (W + d) of the budget (bench/README.md, "The whole
    # budget"); this one reaches it: each slot serves its next request the moment the last
    # one's answer has been a window old.
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(3, 10.0, clock=clock)
    latency = 2.0
    granted: list[float] = []

    async def request() -> None:
        grant = await limiter.acquire(hold=True)
        granted.append(clock.monotonic())
        await clock.sleep(latency)
        limiter.settle(grant)

    tasks = [asyncio.create_task(request()) for _ in range(12)]
    await run_to_completion(clock, tasks, lambda: (START + k * 2.0 for k in range(1, 40)))
    assert granted == [START + k * (10.0 + latency) for k in range(4) for _ in range(3)]


async def test_a_held_slot_frees_one_window_after_its_answer() -> None:
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(1, 10.0, clock=clock)
    first = await limiter.acquire(hold=True)
    waiting = asyncio.create_task(limiter.acquire())
    clock.advance(30)  # long past the window, but the first request is still on its way
    await settle()
    assert not waiting.done()
    limiter.settle(first)  # answered at START + 30
    clock.advance(9.9)
    await settle()
    assert not waiting.done()
    clock.advance(0.1)
    await settle()
    assert waiting.done()
    assert limiter.estimated_wait() == pytest.approx(10.0)


async def test_after_a_pause_the_waiting_requests_are_released_one_by_one_with_jitter() -> None:
    # An upstream 429 means someone else spends this key too: all at once at the pause's end,
    # the waiters would meet the limit again. Spaced at the window's pace, with jitter, they do not.
    clock = ManualClock(START, autojump=True)
    jitter = iter([0.0, 1.0, 0.5, 0.25, 0.0])
    limiter = SlidingWindowLimiter(60, 60.0, clock=clock, random=lambda: next(jitter))
    limiter.penalize(START + 30.0)
    rec = Recorder(limiter, clock)
    tasks = [rec.start(name) for name in "abcde"]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    times = [rec.times[name] - START for name in "abcde"]
    assert times == pytest.approx([30.0, 31.0, 32.5, 33.75, 34.875])  # pace 1 s x (1 + jitter / 2)
    clock.advance(60.0)  # a window after the pause: bursts are allowed again
    await asyncio.wait_for(asyncio.gather(*(rec.start(n) for n in "xyz")), timeout=10)
    assert len({rec.times[n] for n in "xyz"}) == 1


class SortedModel:
    """The window as it was first written: every grant kept, filtered and sorted on each question.

    Slow (it grows with the window) but plain: the constant-time LocalWindow must agree with it.
    """

    def __init__(self, max_calls: int, window: float, clock: ManualClock) -> None:
        self.max_calls, self.window, self.clock = max_calls, window, clock
        self.grants: list[list[Any]] = []  # [at, held]
        self.penalty_until = float("-inf")

    def counting(self) -> list[float]:
        cutoff = self.clock.monotonic() - self.window
        self.grants = [g for g in self.grants if g[1] or g[0] > cutoff]
        return sorted(math.inf if held else at for at, held in self.grants)

    def next_free_at(self) -> float | None:
        times = self.counting()
        if len(times) < self.max_calls:
            return self.penalty_until
        blocking = times[len(times) - self.max_calls]
        return None if blocking == math.inf else max(self.penalty_until, blocking + self.window)

    def grant_time(self, ahead: int) -> float:
        now = self.clock.monotonic()
        recent = deque((min(t, now) for t in self.counting()), maxlen=self.max_calls)
        at = max(now, self.penalty_until)
        for _ in range(ahead + 1):
            if len(recent) >= self.max_calls:
                at = max(at, recent[0] + self.window)
            recent.append(at)
        return at


# One step: take (held or not), settle the n-th held grant, move the clock, or a 429 pause.
_steps = st.one_of(
    st.tuples(st.just("take"), st.booleans()),
    st.tuples(st.just("settle"), st.integers(min_value=0, max_value=50)),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.25, 1.0, 2.5, 7.5, 30.0])),
    st.tuples(st.just("penalize"), st.sampled_from([0.5, 5.0, 20.0])),
)


@settings(max_examples=300, deadline=None)
@given(
    max_calls=st.integers(min_value=1, max_value=8),
    window=st.sampled_from([1.0, 7.5, 60.0]),
    steps=st.lists(_steps, max_size=80),
    ahead=st.integers(min_value=0, max_value=30),
)
def test_the_constant_time_window_answers_as_the_sort_everything_model(
    max_calls: int, window: float, steps: list[tuple[str, Any]], ahead: int
) -> None:
    clock = ManualClock(START)
    fast = LocalWindow(max_calls, window, clock)
    model = SortedModel(max_calls, window, clock)
    held: list[tuple[Grant, list[Any]]] = []
    for kind, arg in steps:
        if kind == "take":
            grant = fast.take(arg)
            entry = [clock.monotonic(), arg]
            model.grants.append(entry)
            if arg:
                held.append((grant, entry))
        elif kind == "settle" and held:
            grant, entry = held.pop(arg % len(held))
            fast.settle(grant)
            fast.settle(grant)  # a second settle changes nothing
            entry[:] = [max(entry[0], clock.monotonic()), False]
        elif kind == "advance":
            clock.advance(arg)
        elif kind == "penalize":
            fast.penalize(clock.monotonic() + arg)
            model.penalty_until = max(model.penalty_until, clock.monotonic() + arg)
        assert fast.counting() == model.counting()
        assert fast.next_free_at() == model.next_free_at()
        for n in (0, ahead):
            assert math.isclose(fast.grant_time(n), model.grant_time(n), rel_tol=1e-12), n


def test_the_window_forgets_slots_that_left_it() -> None:
    # Constant memory per slot in the window: what left it is dropped, not kept forever.
    clock = ManualClock(START)
    window = LocalWindow(5, 10.0, clock)
    for _ in range(10_000):
        window.settle(window.take(True))
        clock.advance(1.0)
        window.next_free_at()
    assert len(window.counting()) == 9  # the last 10 s, half-open: the one 10 s old has left
    assert len(window._settled) < 100
