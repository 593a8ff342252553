"""The supervisor on a scripted platform and a manual clock: backoff, refusals, reconnects, halting."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from bridge.clock import ManualClock
from bridge.ports import PlatformRefused
from bridge.backoff import Backoff
from bridge.supervisor import State, Supervisor


class Scripted:
    """A platform whose attempts fail or succeed as told; `end()` ends a live connection."""

    name = "chat"

    def __init__(self, clock: ManualClock, *outcomes: Exception | None) -> None:
        self.clock = clock
        self.outcomes = list(outcomes)  # one per attempt: an exception to raise, or None to connect
        self.starts: list[float] = []  # clock time of each attempt
        self.stops = 0
        self.live = False
        self._ended: asyncio.Future[Exception] | None = None

    async def start(self) -> None:
        self.starts.append(self.clock.monotonic())
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        self.live = True
        self._ended = asyncio.get_running_loop().create_future()

    async def stop(self) -> None:
        self.stops += 1
        self.live = False

    async def wait_ended(self) -> Exception:
        assert self._ended is not None
        return await asyncio.shield(self._ended)

    def end(self, reason: Exception) -> None:
        assert self._ended is not None
        self._ended.set_result(reason)

    @property
    def gaps(self) -> list[float]:
        return [round(b - a, 3) for a, b in itertools.pairwise(self.starts)]


async def settle(supervisor: Supervisor, clock: ManualClock, state: State) -> None:
    """Let the supervisor run until it reaches `state` (it never sleeps for real)."""
    for _ in range(200):
        if supervisor.state is state:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{supervisor.name} is {supervisor.state}, not {state}")


def test_backoff_doubles_up_to_the_cap_and_jitter_takes_off_at_most_half() -> None:
    backoff = Backoff(base=1.0, cap=60.0)
    assert [backoff.delay(n, 1.0) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.delay(2, 0.0) == 2.0 and backoff.delay(2, 0.5) == 3.0
    assert backoff.delay(40, 0.0) == 30.0


async def test_failed_attempts_back_off_until_one_succeeds() -> None:
    clock = ManualClock(autojump=True)
    error = ConnectionError("cannot reach the chat API")
    platform = Scripted(clock, *[error] * 7)
    supervisor = Supervisor(platform, clock, backoff=Backoff(base=1.0, cap=10.0), jitter=lambda: 1.0)
    supervisor.start()
    await asyncio.wait_for(supervisor.wait_up(), 5)
    assert platform.gaps == [1, 2, 4, 8, 10, 10, 10]
    assert platform.stops == 7  # each failed attempt is cleaned up before the next
    assert supervisor.readiness() is None and supervisor.was_up and platform.live
    await supervisor.halt()
    assert platform.live  # a live connection is left for the owner to stop


async def test_readiness_names_the_attempt_the_wait_and_the_reason() -> None:
    clock = ManualClock()
    platform = Scripted(clock, ConnectionError("cannot reach the chat API"), ConnectionError("still down"))
    supervisor = Supervisor(platform, clock, backoff=Backoff(base=4.0, cap=60.0), jitter=lambda: 1.0)
    assert supervisor.readiness() == "not connected"
    supervisor.start()
    await settle(supervisor, clock, State.WAITING)
    assert supervisor.readiness() == "connecting (attempt 2, next in 4.0 s): cannot reach the chat API"
    clock.advance(1.5)
    assert supervisor.readiness() == "connecting (attempt 2, next in 2.5 s): cannot reach the chat API"
    clock.advance(2.5)
    await settle(supervisor, clock, State.CONNECTING)
    await settle(supervisor, clock, State.WAITING)
    assert supervisor.readiness() == "connecting (attempt 3, next in 8.0 s): still down"
    clock.advance(8)
    await settle(supervisor, clock, State.UP)
    assert supervisor.readiness() is None and len(platform.starts) == 3
    await supervisor.halt()


async def test_a_refusal_at_start_is_final() -> None:
    clock = ManualClock(autojump=True)
    platform = Scripted(clock, ConnectionError("down"), PlatformRefused("the token was refused"))
    refused: list[Supervisor] = []
    supervisor = Supervisor(platform, clock, backoff=Backoff(base=1.0), jitter=lambda: 0.0, on_refused=refused.append)
    supervisor.start()
    with pytest.raises(PlatformRefused, match="the token was refused"):
        await asyncio.wait_for(supervisor.wait_up(), 5)
    assert refused == [supervisor] and not supervisor.was_up
    assert supervisor.readiness() == "refused: the token was refused"
    await clock.sleep(3600)  # an hour later: still no new attempt
    assert len(platform.starts) == 2 and platform.stops == 2
    await supervisor.halt()
    assert supervisor.state is State.REFUSED


async def test_an_ended_connection_is_made_again_and_a_refusal_later_says_it_came_mid_run() -> None:
    clock = ManualClock(autojump=True)
    platform = Scripted(clock)
    refused: list[bool] = []
    supervisor = Supervisor(
        platform, clock, backoff=Backoff(base=1.0), jitter=lambda: 1.0, on_refused=lambda s: refused.append(s.was_up)
    )
    supervisor.start()
    await asyncio.wait_for(supervisor.wait_up(), 5)
    platform.end(RuntimeError("the client died on a frame"))
    await settle(supervisor, clock, State.WAITING)
    assert supervisor.readiness() == "connecting (attempt 1, next in 1.0 s): the client died on a frame"
    assert platform.stops == 1 and not platform.live  # the dead client is closed before a new one starts
    await asyncio.wait_for(supervisor.wait_up(), 5)
    assert len(platform.starts) == 2 and platform.live
    platform.end(PlatformRefused("the token was reset"))
    await settle(supervisor, clock, State.REFUSED)
    assert refused == [True] and supervisor.readiness() == "refused: the token was reset"
    assert len(platform.starts) == 2


async def test_a_connection_that_keeps_dying_backs_off_and_a_stable_one_starts_afresh() -> None:
    clock = ManualClock(autojump=True)
    platform = Scripted(clock)
    supervisor = Supervisor(platform, clock, backoff=Backoff(base=1.0, cap=60.0), jitter=lambda: 1.0)
    supervisor.start()
    for _ in range(4):  # dies right after connecting, every time
        await asyncio.wait_for(supervisor.wait_up(), 5)
        platform.end(RuntimeError("boom"))
        await settle(supervisor, clock, State.WAITING)
    await asyncio.wait_for(supervisor.wait_up(), 5)
    assert platform.gaps == [1, 2, 4, 8]
    await clock.sleep(61)  # up for longer than the longest backoff
    platform.end(RuntimeError("boom"))
    await settle(supervisor, clock, State.WAITING)
    await asyncio.wait_for(supervisor.wait_up(), 5)
    assert platform.gaps[-1] == 61 + 1
    await supervisor.halt()


async def test_halt_abandons_the_attempts() -> None:
    clock = ManualClock()
    platform = Scripted(clock, ConnectionError("down"))
    supervisor = Supervisor(platform, clock, backoff=Backoff(base=1.0), jitter=lambda: 1.0)
    supervisor.start()
    await settle(supervisor, clock, State.WAITING)
    await supervisor.halt()
    assert supervisor.state is State.STOPPED and supervisor.readiness() == "stopped"
    clock.advance(3600)
    await asyncio.sleep(0)
    assert len(platform.starts) == 1 and platform.stops == 2  # after the failure, and once more: safe twice
    with pytest.raises(RuntimeError, match="halted"):
        await supervisor.wait_up()


async def test_halt_returns_when_the_connection_completed_as_it_was_cancelled() -> None:
    # Python 3.11's wait_for (the Slack adapter's Socket Mode connect) returns the result,
    # swallowing the cancellation, when the inner call finished in the same loop turn: the
    # supervisor then ran on into "up" and waited for the connection to end, and halt() (so
    # SIGTERM) never returned. The subprocess crash tests hit it now and then.
    clock = ManualClock()
    connected = asyncio.get_running_loop().create_future()

    class ConnectsAsItIsCancelled(Scripted):
        async def start(self) -> None:
            await asyncio.wait_for(connected, 30)
            await super().start()

    platform = ConnectsAsItIsCancelled(clock)
    supervisor = Supervisor(platform, clock)
    supervisor.start()
    await settle(supervisor, clock, State.CONNECTING)
    await asyncio.sleep(0)  # into wait_for
    connected.set_result(None)  # the connection completes...
    await asyncio.wait_for(supervisor.halt(), 2)  # ...as halt() cancels the attempt
    assert supervisor.state in (State.UP, State.STOPPED)
    if supervisor.state is State.UP:
        assert platform.live  # left up for the owner to stop, as any live connection at halt()


async def test_halt_returns_when_the_attempt_failed_as_it_was_cancelled() -> None:
    # The same race with a failed attempt: without care it waited out a backoff and tried again.
    clock = ManualClock()
    failed = asyncio.get_running_loop().create_future()

    class FailsAsItIsCancelled(Scripted):
        async def start(self) -> None:
            self.starts.append(self.clock.monotonic())
            await asyncio.wait_for(failed, 30)

    platform = FailsAsItIsCancelled(clock)
    supervisor = Supervisor(platform, clock)
    supervisor.start()
    await settle(supervisor, clock, State.CONNECTING)
    await asyncio.sleep(0)
    failed.set_exception(ConnectionError("refused"))
    await asyncio.wait_for(supervisor.halt(), 2)
    assert supervisor.state is State.STOPPED
    assert len(platform.starts) == 1 and platform.stops >= 1  # no second attempt; the first one cleaned up
