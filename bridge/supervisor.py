"""Keeps one platform connected: connects in the background with backoff, and again whenever the connection ends."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Callable

from bridge.backoff import Backoff
from bridge.clock import Clock
from bridge.ports import Platform, PlatformRefused

log = logging.getLogger(__name__)


class State(enum.Enum):
    IDLE = "idle"  # start() not called yet
    CONNECTING = "connecting"  # an attempt is under way
    WAITING = "waiting"  # the last attempt failed or the connection ended; the next one comes after a backoff
    UP = "up"
    DOWN = "down"  # the connection ended; its remains are being cleared away
    REFUSED = "refused"  # the platform refused the bridge for good: no more attempts
    STOPPED = "stopped"  # halted before it was up


class Supervisor:
    """One job: keep one platform connected.

    Each attempt is `platform.start()`. A PlatformRefused ends the supervision and is handed
    to `on_refused` (the owner decides what it means: exit at start, a failing /healthz
    later); any other failure is tried again after a backoff. Once up, `platform.wait_ended()`
    says when the connection is gone for good; the platform is then stopped and connected
    anew the same way.
    """

    def __init__(
        self,
        platform: Platform,
        clock: Clock,
        *,
        backoff: Backoff | None = None,
        jitter: Callable[[], float] = random.random,
        on_refused: Callable[[Supervisor], None] | None = None,
        on_up: Callable[[Supervisor], None] | None = None,
        stable_after: float | None = None,
    ) -> None:
        self.platform = platform
        self.name = platform.name
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._jitter = jitter
        self._on_refused = on_refused
        self._on_up = on_up
        # A connection that lasted this long starts the backoff afresh. One that keeps dying
        # right after connecting (a frame its library chokes on, every time) backs off like
        # a failed attempt instead of reconnecting every second.
        self._stable_after = self._backoff.cap if stable_after is None else stable_after
        self.state = State.IDLE
        self.attempt = 0  # attempts since the platform was last up: the one under way, or the last one
        self.error = ""  # why the last attempt failed or the last connection ended
        self.refused: PlatformRefused | None = None
        self.was_up = False  # connected at least once: a refusal now came mid-run, not at start
        self._failures = 0  # in a row, for the backoff
        self._retry_at = 0.0  # monotonic time of the next attempt while WAITING
        self._changed: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._cleanup: asyncio.Future[None] | None = None
        self._halted = False  # halt() was called: no attempt or wait may outlive it

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting in the background; returns at once."""
        if self._task is None and self.state is State.IDLE:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"supervise-{self.name}")

    async def halt(self) -> None:
        """No more attempts. An attempt under way is abandoned and its platform stopped; a live
        connection stays up, for the owner to stop after the answers in flight went out."""
        self._halted = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._cleanup is not None:
            await asyncio.gather(self._cleanup, return_exceptions=True)
        if self.state in (State.IDLE, State.CONNECTING, State.WAITING, State.DOWN):
            await self._stop_platform()
            self._set(State.STOPPED)

    async def wait_up(self) -> None:
        """Return once connected; raise the refusal if the platform refused the bridge for good."""
        while True:
            if self.refused is not None:
                raise self.refused
            if self.state is State.UP:
                return
            if self.state is State.STOPPED:
                raise RuntimeError(f"{self.name}: halted before it connected")
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._changed)

    def readiness(self) -> str | None:
        """None while up (the platform's own check applies then); else what is going on, in plain words."""
        if self.state is State.UP:
            return None
        if self.state is State.REFUSED:
            return f"refused: {self.error}"
        if self.state is State.WAITING:
            remaining = max(0.0, self._retry_at - self._clock.monotonic())
            return f"connecting (attempt {self.attempt + 1}, next in {_seconds(remaining)}): {self.error}"
        if self.state is State.CONNECTING:
            return f"connecting (attempt {self.attempt})" + (f": {self.error}" if self.error else "")
        if self.state is State.DOWN:
            return f"disconnected: {self.error}"
        return "not connected" if self.state is State.IDLE else "stopped"

    # --- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._halted:
            self.attempt += 1
            self._set(State.CONNECTING)
            try:
                await self.platform.start()
            except PlatformRefused as exc:
                await self._stop_platform()
                self._refuse(exc)
                return
            except Exception as exc:
                await self._stop_platform()
                self._failures += 1
                await self._retry_later(_reason(exc), ended=False)
                continue
            up_since = self._clock.monotonic()
            self.attempt, self.error, self.was_up = 0, "", True
            self._set(State.UP)
            if self._halted:
                # halt() cancelled the attempt, but the connection completed in the same loop
                # turn and start() returned anyway (3.11's wait_for swallows the cancellation
                # then): left up for the owner to stop, as any live connection at halt().
                return
            if self._on_up is not None:
                self._on_up(self)
            ended = await self._wait_ended()
            self.error = _reason(ended)
            self._set(State.DOWN)
            await self._stop_platform()
            if isinstance(ended, PlatformRefused):
                self._refuse(ended)
                return
            if self._clock.monotonic() - up_since >= self._stable_after:
                self._failures = 0
            self._failures += 1
            await self._retry_later(_reason(ended), ended=True)

    async def _wait_ended(self) -> Exception:
        try:
            return await self.platform.wait_ended()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken watcher must not leave the platform unwatched: start afresh
            log.exception("%s: watching the connection failed", self.name)
            return exc

    async def _retry_later(self, reason: str, *, ended: bool) -> None:
        if self._halted:  # the attempt failed as halt() cancelled it: no retry to wait for
            return
        delay = self._backoff.delay(self._failures - 1, self._jitter())
        self.error = reason
        self._retry_at = self._clock.monotonic() + delay
        self._set(State.WAITING)
        if ended:
            log.warning("%s: the connection ended (%s); reconnecting in %s", self.name, reason, _seconds(delay))
        else:
            log.warning(
                "%s: connection attempt %d failed (%s); next attempt in %s",
                self.name,
                self.attempt,
                reason,
                _seconds(delay),
            )
        await self._clock.sleep(delay)

    def _refuse(self, exc: PlatformRefused) -> None:
        self.refused = exc
        self.error = _reason(exc)
        self._set(State.REFUSED)
        # The owner logs the consequence (stopping, or /healthz failing); this is the supervisor's part.
        log.info("%s: refused for good, no more attempts: %s", self.name, self.error)
        if self._on_refused is not None:
            self._on_refused(self)

    async def _stop_platform(self) -> None:
        # Shielded: a halt() during the clean-up waits for it instead of cutting it in half.
        self._cleanup = asyncio.ensure_future(self._stop_quietly())
        await asyncio.shield(self._cleanup)

    async def _stop_quietly(self) -> None:
        try:
            await self.platform.stop()
        except Exception:
            log.exception("%s: stopping the platform failed", self.name)

    def _set(self, state: State) -> None:
        self.state = state
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"
