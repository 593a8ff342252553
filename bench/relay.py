"""Chat benchmarks: relay overhead per platform, the baseline bot, rate-limit use, memory."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench.common import Child, peak_rss_mb, rss_mb
from bench.harness import (
    CONVERSATIONS,
    DiscordSender,
    Harness,
    Level,
    MentionPairSender,
    Sender,
    SlackSender,
    answered,
    burst,
    closed_loop,
    harness,
)
from tests.fakes.slack_api import APP_TOKEN

# "No limit" for the overhead runs: a budget far above any load here. The limiter holds each
# slot until its answer, so the count also bounds the requests in flight.
UNLIMITED = {"rate_limit": 100_000, "rate_window": 0.001}
SETTLE = 1.0  # seconds after a part's last answer in which a doubled answer would still be counted


@dataclass(frozen=True)
class Baseline:
    """What a team runs instead of the bridge, on the same fakes and load: a module of bench/baselines/."""

    label: str
    module: str
    env: tuple[tuple[str, str], ...] = ()
    socket: bool = False  # Slack Socket Mode, each mention as the message + app_mention pair; else HTTP


BASELINES = {
    "bolt": Baseline("Bolt bot, 5 listener threads (Bolt's default)", "bench.baselines.bolt_sync_bot"),
    "bolt64": Baseline(
        "Bolt bot, 64 listener threads", "bench.baselines.bolt_sync_bot", (("LISTENER_THREADS", "64"),)
    ),
    "bolt64_socket": Baseline(
        "Bolt bot, 64 listener threads, Socket Mode", "bench.baselines.bolt_sync_bot",
        (("LISTENER_THREADS", "64"), ("SLACK_APP_TOKEN", APP_TOKEN)), socket=True,
    ),
    "floor": Baseline("minimal aiohttp relay", "bench.baselines.aiohttp_relay"),
}


@dataclass(frozen=True)
class Sizes:
    latency: float  # the emulator's fixed upstream latency, seconds
    levels: tuple[int, ...]  # concurrent conversations
    duration: dict[int, float]  # seconds of sending per level
    warmup: int  # messages at the start of each process, not measured
    rl_limit: int
    rl_window: float
    rl_channels: int
    rl_per_channel: int
    mem_in_flight: int
    mem_messages: int
    wh_count: int
    wh_concurrency: int
    dur_concurrency: int  # (6) conversations, before and after durable jobs
    dur_pairs: int  # (6) quiet before/after pairs of load slices wanted (alternating order)
    dur_max_pairs: int  # (6) pairs at most, quiet or not
    dur_slice: float  # (6) seconds of sending per slice
    dur_patience: float  # (6) seconds a pair waits, at most, for the rest of the machine to be quiet
    dur_count_duration: float  # (6) seconds of sending in the traced round (store writes)


FULL = Sizes(
    latency=0.5, levels=(1, 50, 500), duration={1: 15.0, 50: 10.0, 500: 10.0}, warmup=40,
    rl_limit=55, rl_window=6.0, rl_channels=5, rl_per_channel=44,
    mem_in_flight=1000, mem_messages=10_000, wh_count=10_000, wh_concurrency=32,
    dur_concurrency=50, dur_pairs=10, dur_max_pairs=24, dur_slice=4.0, dur_patience=5.0, dur_count_duration=4.0,
)
QUICK = Sizes(
    latency=0.2, levels=(1, 10, 50), duration={1: 3.0, 10: 3.0, 50: 3.0}, warmup=10,
    rl_limit=10, rl_window=1.0, rl_channels=3, rl_per_channel=10,
    mem_in_flight=200, mem_messages=1000, wh_count=400, wh_concurrency=32,
    dur_concurrency=10, dur_pairs=2, dur_max_pairs=2, dur_slice=2.0, dur_patience=0.0, dur_count_duration=2.0,
)


def level_row(platform: str, level: Level, answers: Counter[str] | None = None) -> dict[str, Any]:
    """One row of figures; `answers`: posts per question token, to count doubled answers (None: not counted)."""
    cpu_sut = level.cpu.get("sut", float("nan"))
    throughput = level.throughput
    return {
        "platform": platform,
        "concurrent": level.concurrency,
        "answered": len(level.answered),
        "lost": level.lost,
        "doubled": sum(1 for s in level.samples if answers[s.token] > 1) if answers is not None else 0,
        "throughput": throughput,
        "ideal": level.ideal,
        "overhead_p50": level.overhead(50),
        "overhead_p99": level.overhead(99),
        "e2e_p99": level.e2e(99),
        "inbound_p50": level.inbound(50),
        "outbound_p50": level.outbound(50),
        "inbound_p99": level.inbound(99),
        "outbound_p99": level.outbound(99),
        "ack_p99": level.ack(99),
        "acks_over_3s": sum(1 for s in level.samples if s.acked is None or s.acked - s.sent > 3.0),
        "cpu_sut": cpu_sut,
        "cpu_harness": level.cpu.get("harness", float("nan")),
        "cpu_other": level.cpu.get("other", float("nan")),
        # Seconds of the process's CPU per answer: both figures are taken over the same window.
        "cpu_per_answer": cpu_sut / throughput if throughput > 0 else float("nan"),
        "load": level.load,
        "rss": level.rss,
    }


async def _warm(sender: Sender, sizes: Sizes) -> None:
    """First connections, lazy imports and SQLite pages: paid once per process, not per message."""
    await burst(sender, ["C0WARM"] * sizes.warmup)


async def _levels(h: Harness, sender: Sender, child: Child, sizes: Sizes, error_mark: str) -> list[tuple[Level, int]]:
    """The closed loop at each concurrency level, against one process; each level with its log's error count."""
    levels = []
    for concurrency in sizes.levels:
        level = await closed_loop(
            sender, concurrency=concurrency, duration=sizes.duration[concurrency], latency=sizes.latency, pid=child.pid
        )
        h.mark_upstream(level.samples)
        levels.append((level, child.log_count(error_mark)))
    return levels


def _answers(h: Harness, platform: str) -> Counter[str]:
    fake = h.discord if platform == "discord" else h.slack
    assert fake is not None
    return fake.answers.counts


async def relay_overhead(platform: str, sizes: Sizes, *, slack_mode: str = "http") -> list[dict[str, Any]]:
    """(1) The bridge with one platform, the limits raised out of the way, at each concurrency level.

    Slack `slack_mode` "socket": Socket Mode, each mention delivered as Slack does, as a
    `message` + `app_mention` pair; every question must be answered once (doubled answers
    are counted per row).
    """
    name = "slack (Socket Mode)" if platform == "slack" and slack_mode == "socket" else platform
    async with harness(latency=sizes.latency, discord=platform == "discord") as h:
        bridge = h.bridge(f"relay-{platform}-{slack_mode}", platforms=(platform,), slack_mode=slack_mode, **UNLIMITED)
        await bridge.start()
        sender: Sender
        if platform == "discord":
            sender = DiscordSender(h)
        elif slack_mode == "socket":
            sender = MentionPairSender(h)
        else:
            sender = SlackSender(h, bridge.url + "/slack/events")
        await _warm(sender, sizes)
        levels = await _levels(h, sender, bridge, sizes, " ERROR ")
        await asyncio.sleep(SETTLE)
        answers = _answers(h, platform)
        return [
            level_row(name, level, answers) | {"errors": errors, "transport": slack_mode} for level, errors in levels
        ]


async def baseline(sizes: Sizes, kind: str = "bolt") -> list[dict[str, Any]]:
    """(2) A baseline of BASELINES on the same fakes and the same load as the bridge's Slack rows."""
    spec = BASELINES[kind]
    async with harness(latency=sizes.latency) as h:
        bot = h.baseline(f"baseline-{kind}", spec.module, dict(spec.env))
        sender: Sender
        if spec.socket:
            await bot.start(until=lambda: bool(h.slack.sockets))
            sender = MentionPairSender(h)
        else:
            await bot.start(ready_path=None)
            sender = SlackSender(h, bot.url + "/slack/events")
        await _warm(sender, sizes)
        levels = await _levels(h, sender, bot, sizes, "Traceback")
        await asyncio.sleep(SETTLE)
        answers = h.slack.answers.counts
        transport = "socket" if spec.socket else "http"
        return [
            level_row(spec.label, level, answers) | {"errors": errors, "transport": transport}
            for level, errors in levels
        ]


async def rate_limit_use(
    sizes: Sizes, *, service_limit: int | None = None, count_at: float | str | None = None
) -> dict[str, Any]:
    """(3) A flood from several channels through the limiter into the emulator's limit, same window.

    `service_limit` None: the emulator allows exactly what the limiter grants (the issue's set-up);
    else the emulator allows more, as InsiteChat's 60 per minute does against the default 55.
    `count_at`: where in its latency the emulator counts a request (bench.fakes.GatedEmulator).
    The window is already used up when the flood arrives (a first burst from another channel
    takes every slot), and the flood comes channel after channel: first-come-first-served would
    make the last channel wait longest; turns per channel give every channel about the same wait.
    """
    limit, window = sizes.rl_limit, sizes.rl_window
    service = service_limit or limit
    async with harness(latency=sizes.latency, rate_limit=service, rate_window=window) as h:
        h.emulator.count_at = count_at
        bridge = h.bridge("ratelimit", platforms=("slack",), rate_limit=limit, rate_window=window)
        await bridge.start()
        sender = SlackSender(h, bridge.url + "/slack/events")
        await burst(sender, ["C0WARM"] * 3)
        await asyncio.sleep(window + 0.5)  # the warm-up's requests leave the window
        since = time.monotonic()
        flood = [f"C0FLOOD{c}" for c in range(sizes.rl_channels) for _ in range(sizes.rl_per_channel)]
        samples = await burst(sender, ["C0PRIME"] * limit + flood)
        statuses = h.emulator.chat_statuses(since)
        errors = bridge.log_count(" ERROR ")
    ok = sorted(t for t, status in statuses if status == 200)
    too_many = sum(1 for _, status in statuses if status == 429)
    # The fastest the limiter's budget allows: `limit` at once, then `limit` more each window.
    ideal_span = window * ((len(ok) - 1) // limit)
    span = ok[-1] - ok[0] if len(ok) > 1 else float("nan")
    waits: dict[str, list[float]] = {}
    for s in samples:
        if s.channel.startswith("C0FLOOD") and s.answered is not None:
            waits.setdefault(s.channel, []).append(s.answered - s.sent - sizes.latency)
    means = {channel: sum(w) / len(w) for channel, w in sorted(waits.items())}
    # A slot's cycle: from one request's arrival to the arrival of the request `limit` later,
    # which waited for its slot. Unlike the span it does not count how spread out the first
    # burst arrived (the bridge accepts its events one after another). A safe limiter's cycle
    # is at least window + latency (bench/README.md, "The whole budget").
    gaps = [ok[i + limit] - ok[i] for i in range(len(ok) - limit)]
    cycle = sum(gaps) / len(gaps) if gaps else float("nan")
    return {
        "limiter": f"{limit} per {window:g} s",
        "service": f"{service} per {window:g} s",
        "same_limit": service == limit,
        "messages": len(samples),
        "requests": len(ok),
        "ideal_span": ideal_span,
        "span": span,
        "used": ideal_span / span if span > 0 else float("nan"),
        "http_429": too_many,
        "count_at": count_at,
        "latency": sizes.latency,
        "cycle": cycle,
        "cycle_used": window / cycle if gaps else float("nan"),
        "bound": window / (window + sizes.latency),
        "channel_mean_wait": means,
        "fairness": max(means.values()) / min(means.values()) if means and min(means.values()) > 0 else float("nan"),
        "lost": sum(1 for s in samples if s.answered is None),
        "errors": errors,
    }


async def memory(sizes: Sizes) -> dict[str, Any]:
    """(5) Resident memory of the bridge process: idle, with N conversations in flight, after M messages."""
    async with harness(latency=0.0) as h:
        bridge = h.bridge("memory", platforms=("slack",), **UNLIMITED)
        await bridge.start()
        sender = SlackSender(h, bridge.url + "/slack/events")
        await _warm(sender, sizes)
        await asyncio.sleep(0.5)
        idle = rss_mb(bridge.pid, children=True)
        in_flight, in_flight_held = await _hold_in_flight(h, sender, sizes.mem_in_flight, bridge)
        after: dict[int, float] = {}
        await _many(sender, sizes.mem_messages, bridge, after)
        peak = peak_rss_mb(bridge.pid, children=True)
        errors = bridge.log_count(" ERROR ")
    return {
        "idle": idle,
        "in_flight_n": sizes.mem_in_flight,
        "in_flight": in_flight,
        "in_flight_held_upstream": in_flight_held,
        "after": after,
        "peak": peak,
        "errors": errors,
    }


async def _hold_in_flight(h: Harness, sender: SlackSender, count: int, bridge: Child) -> tuple[float, int]:
    """`count` questions accepted and unanswered: the emulator holds every chat request until measured.

    Returns the RSS then and how many of them had reached the emulator (the rest wait inside
    the bridge, for a connection of its HTTP pool).
    """
    h.emulator.gate = asyncio.Event()
    posted = []
    for i in range(count):
        number = next(CONVERSATIONS)
        posted.append((number, *await sender.post(number, 0, f"C0MEM{i % 10}")))
    # Every event is acked; wait until the held requests stop growing: the relay tasks have settled.
    last, stable_since, deadline = -1, time.monotonic(), time.monotonic() + 60
    while time.monotonic() < deadline and not (last > 0 and time.monotonic() - stable_since > 1.0):
        if h.emulator.held != last:
            last, stable_since = h.emulator.held, time.monotonic()
        await asyncio.sleep(0.1)
    rss, held = rss_mb(bridge.pid, children=True), h.emulator.held
    h.emulator.gate.set()
    h.emulator.gate = None
    samples = await asyncio.gather(*(answered(sender, number, sample, answer) for number, sample, answer in posted))
    if any(s.answered is None for s in samples):
        raise RuntimeError("questions held in flight were not all answered")
    return rss, held


async def _many(sender: SlackSender, total: int, bridge: Child, after: dict[int, float]) -> None:
    """`total` more messages, 100 conversations at a time, 10 messages each; RSS at the half and at the end."""
    remaining = total
    done = 0
    checkpoints = {total // 2, total}

    async def worker() -> None:
        nonlocal remaining, done
        while remaining > 0:
            number = next(CONVERSATIONS)
            for k in range(10):
                if remaining <= 0:
                    return
                remaining -= 1
                sample = await answered(sender, number, *await sender.post(number, k, f"C0MEM{number % 10}"))
                if sample.answered is None:
                    raise RuntimeError("a message was not answered during the memory run")
                done += 1
                if done in checkpoints:
                    after[done] = rss_mb(bridge.pid, children=True)

    await asyncio.gather(*(worker() for _ in range(100)))
