"""The manual clock tests rely on: it moves only when told, or jumps when everyone sleeps."""

from __future__ import annotations

import asyncio

from bridge.clock import ManualClock


async def test_advance_wakes_due_sleepers_only() -> None:
    clock = ManualClock()
    woke: list[str] = []

    async def nap(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(nap("short", 5)), asyncio.create_task(nap("long", 50))]
    await asyncio.sleep(0)
    clock.advance(10)
    await asyncio.sleep(0)
    assert woke == ["short"]
    clock.advance(40)
    await asyncio.gather(*tasks)
    assert woke == ["short", "long"]


async def test_autojump_wakes_every_sleeper_even_if_none_sleeps_again() -> None:
    clock = ManualClock(autojump=True)
    start = clock.monotonic()
    await asyncio.wait_for(asyncio.gather(clock.sleep(10), clock.sleep(20), clock.sleep(30)), timeout=2)
    assert clock.monotonic() - start == 30
