"""The digest's charts: how long the child process takes, and how long the event loop stalls meanwhile."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from bridge.charts import available, draw, render_charts
from bridge.report import DAY, Report, build_report
from bridge.store import Fact, FactKind

RUNS = 3
TICK = 0.01  # the loop's heartbeat while a child draws: its lateness is the stall


def sample_report() -> Report:
    """A busy week of three chatbots: 300 answers a day, 20 alerts a day claimed within minutes to hours."""
    until = 1_796_029_200.0
    since = until - 7 * DAY
    facts: list[Fact] = []
    for bot in ("bot-a", "bot-b", "bot-c"):
        for i in range(7 * 300):
            facts.append(Fact(FactKind.ANSWERED, f"{bot}-j{i}", since + i * 288.0, bot))
        for i in range(7 * 20):
            raised = since + i * 4320.0
            facts.append(Fact(FactKind.ALERT_RAISED, f"{bot}-a{i}", raised, bot, value="conversation.escalated"))
            facts.append(Fact(FactKind.ALERT_CLAIMED, f"{bot}-a{i}", raised + 30.0 * (i % 60 + 1), bot, actor="ana"))
    facts.sort(key=lambda f: f.at)
    return build_report(facts, since=since, until=until)


async def measure() -> None:
    report = sample_report()
    took: list[float] = []
    stalls: list[float] = []
    for _ in range(RUNS):
        lateness: list[float] = []

        async def heartbeat(lateness: list[float] = lateness) -> None:
            while True:
                start = time.perf_counter()
                await asyncio.sleep(TICK)
                lateness.append(time.perf_counter() - start - TICK)

        ticking = asyncio.get_running_loop().create_task(heartbeat())
        start = time.perf_counter()
        charts = await render_charts(report)
        took.append(time.perf_counter() - start)
        ticking.cancel()
        stalls.append(max(lateness))
        assert len(charts) == 2, "the child drew nothing: see the warning above"
    print(f"child process, {RUNS} runs: median {statistics.median(took):.2f} s (max {max(took):.2f} s)")
    print(f"worst event loop stall meanwhile: {max(stalls) * 1000:.1f} ms")
    start = time.perf_counter()
    draw(report)
    first = time.perf_counter() - start
    start = time.perf_counter()
    draw(report)
    again = time.perf_counter() - start
    print(f"in process instead, the loop would stall: {first:.2f} s the first time (import), {again:.2f} s after")


if __name__ == "__main__":
    if not available():
        sys.exit("the charts extra is not installed: pip install 'insitechat-bridge[charts]'")
    asyncio.run(measure())
