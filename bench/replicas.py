"""Replicas on one Redis against one bridge on SQLite: `python -m bench.replicas [--quick] [--json FILE]`.

Throughput rows: Slack Socket Mode (the fake Slack spreads envelopes round robin over the
replicas' sockets), the limiter raised out of the way, 1/2/3 replicas on Redis and 1 on
SQLite, every set-up running at once and measured in short interleaved slices (the machine
is shared). Then the Discord failover: 2 replicas, SIGKILL the gateway leader, time until
the next answer is posted. See bench/REPLICAS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.common import Child, cpu_seconds, free_port, machine_busy_seconds, machine_facts, ms, percentile
from bench.fakes import GatedEmulator, TimedDiscord, TimedSlack
from bench import harness as bench_harness
from bench.harness import BOT, CONVERSATIONS, DiscordSender, Harness, Level, Sample, SlackSender, burst, closed_loop
from bench.relay import UNLIMITED
from tests.fakes import discord_api as fd
from tests.fakes.slack_api import APP_TOKEN

TOKEN_RE = re.compile(r"q\d+k\d+z")
BARS = {"cpu_ratio": 1.3, "p50_over_ms": 2.0, "failover_s": 20.0}


@dataclass(frozen=True)
class Sizes:
    latency: float
    levels: tuple[int, ...]
    duration: float  # seconds of sending per slice
    rounds: int  # every set-up x level, this many times, interleaved
    warmup: int


FULL = Sizes(latency=0.5, levels=(50, 500), duration=5.0, rounds=2, warmup=40)
QUICK = Sizes(latency=0.2, levels=(10, 50), duration=2.0, rounds=1, warmup=10)


# --- Redis of our own: its counters and its CPU are this run's alone ------------------------------


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = aioredis.Redis.from_url(self.url)

    async def ready(self) -> None:
        for _ in range(100):
            try:
                await self.client.ping()
                return
            except Exception:
                await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not answer")

    async def commands(self) -> int:
        """Commands processed so far, not counting this INFO."""
        return int((await self.client.info("stats"))["total_commands_processed"])

    async def stop(self) -> None:
        await self.client.aclose()
        self.proc.kill()
        self.proc.wait(5)


# --- set-ups ------------------------------------------------------------------------------------


@dataclass
class Setup:
    """One Slack fake, N bridge replicas on it (and on a Redis of their own, or SQLite)."""

    name: str
    slack: TimedSlack
    replicas: list[Child]
    redis: RedisServer | None
    h: Harness
    rows: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    samples: dict[int, list[Sample]] = field(default_factory=dict)


def config(
    folder: Path, emulator_url: str, *, redis_url: bool, prefix: str, platform: str, slack_api: str = ""
) -> tuple[Path, int]:
    port = free_port()
    lines = [
        "insitechat:",
        f"  base_url: {emulator_url}",
        "  api_key: ${BENCH_IC_KEY}",
        f"  rate_limit: {UNLIMITED['rate_limit']}",
        f"  rate_window: {UNLIMITED['rate_window']}",
        "chatbots:",
        f'  - {{id: {BOT}, name: Bench Bot, webhook_secret: "${{BENCH_WEBHOOK_SECRET}}"}}',
        "state:",
        *(
            ['  redis_url: "${BENCH_REDIS_URL}"', f'  redis_prefix: "{prefix}"']
            if redis_url
            else [f'  sqlite: "{folder / "state.db"}"']
        ),
        f'server: {{listen: "127.0.0.1:{port}"}}',
        "logging: {level: INFO}",
        "routes:",
        f"  - {{platform: {platform}, chatbot: {BOT}, reply: mention}}",
    ]
    if platform == "slack":
        lines += [
            "slack:",
            "  bot_token: ${BENCH_SLACK_BOT_TOKEN}",
            "  app_token: ${BENCH_SLACK_APP_TOKEN}",
            f"  api_url: {slack_api}",
        ]
    else:
        lines += ["discord:", "  token: ${BENCH_DISCORD_TOKEN}", "  message_content_intent: true"]
    path = folder / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path, port


def replica(folder: Path, name: str, cfg: Path, port: int, env: dict[str, str] | None = None) -> Child:
    return Child(
        name,
        ["-m", "bench.bridge_proc", "run", "--config", str(cfg), "--grace", "2"],
        port,
        folder / f"{name}.log",
        {"BENCH_SLACK_APP_TOKEN": APP_TOKEN, **(env or {})},
    )


class SocketSender(SlackSender):
    """Slack in Socket Mode: the same app_mention, pushed as an events_api envelope; acked = envelope acked."""

    async def post(self, conversation: int, k: int, channel: str) -> tuple[Sample, asyncio.Future[float]]:
        raw, root, token = self._body(conversation, k, channel)
        answer = self.h.slack.answers.expect(root, token)
        sample = Sample(channel, time.monotonic(), token)
        envelope = await self.h.slack.send_envelope(json.loads(raw))
        try:
            await asyncio.wait_for(envelope.acked.wait(), 10)
            sample.acked = time.monotonic()
        except TimeoutError:
            pass
        return sample, answer


def answers_per_token(slack: TimedSlack) -> Counter[str]:
    """How many answers each question got (the emulator echoes the question's token)."""
    count: Counter[str] = Counter()
    for call in slack.calls:
        if call.method == "chat.postMessage" and call.ok and call.args.get("thread_ts"):
            # The first token is the question answered; later ones are the conversation's earlier questions.
            first = TOKEN_RE.search(str(call.args.get("text") or ""))
            if first:
                count[first.group()] += 1
    return count


async def slice_(s: Setup, concurrency: int, sizes: Sizes) -> dict[str, Any]:
    """One short closed-loop run on one set-up: throughput, overhead, CPU of its replicas, Redis commands."""
    pids = [c.pid for c in s.replicas]
    redis_pid = s.redis.proc.pid if s.redis else None
    commands0 = await s.redis.commands() if s.redis else 0
    each0 = [cpu_seconds(p, children=True) for p in pids]
    t0, busy0 = time.monotonic(), machine_busy_seconds()
    redis0 = cpu_seconds(redis_pid) if redis_pid else 0.0
    own0 = cpu_seconds()
    level: Level = await closed_loop(
        SocketSender(s.h, ""), concurrency=concurrency, duration=sizes.duration, latency=sizes.latency, pid=None
    )
    wall = time.monotonic() - t0
    each = [cpu_seconds(p, children=True) - c for p, c in zip(pids, each0, strict=True)]
    cpu = sum(each)
    redis_cpu = (cpu_seconds(redis_pid) - redis0) if redis_pid else 0.0
    commands = (await s.redis.commands() - commands0 - 1) if s.redis else 0  # the first INFO counts itself
    busy, own = machine_busy_seconds() - busy0, cpu_seconds() - own0
    s.h.mark_upstream(level.samples)
    s.samples.setdefault(concurrency, []).extend(level.samples)
    n = len(level.answered)
    # This slice's own p50 (reported only; the row's p50 pools both slices' samples, as before).
    over = [x.answered - x.sent - sizes.latency for x in level.answered]  # type: ignore[operator]
    return {
        "p50_slice": percentile(over, 50) if over else float("nan"),
        "setup": s.name,
        "concurrent": concurrency,
        "answered": n,
        "lost": level.lost,
        "throughput": level.throughput,
        "cpu_per_answer": cpu / n if n else float("nan"),
        "replicas_cores": cpu / wall,
        "redis_cpu_per_answer": redis_cpu / n if n else float("nan"),
        "redis_per_answer": commands / n if n and s.redis else float("nan"),
        "split": [round(c / cpu, 2) for c in each] if cpu else [],  # each replica's share: the spread works
        "harness_cores": own / wall,
        "other_cores": max(0.0, busy - cpu - redis_cpu - own) / wall,
        "load1": os.getloadavg()[0],
    }


def summarize(s: Setup, concurrency: int, latency: float) -> dict[str, Any]:
    rows = s.rows[concurrency]
    samples = s.samples[concurrency]
    done = [x for x in samples if x.answered is not None]
    over = [x.answered - x.sent - latency for x in done]  # type: ignore[operator]
    counts = answers_per_token(s.slack)
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {
        "setup": s.name,
        "concurrent": concurrency,
        "questions": len(samples),
        "unanswered": sum(1 for x in samples if counts[x.token] == 0),
        "refused": sum(1 for x in samples if x.acked is None),  # not acked: real Slack would send it again
        "doubled": sum(1 for x in samples if counts[x.token] > 1),
        "throughput": mean("throughput"),
        "throughput_slices": [r["throughput"] for r in rows],
        "p50": percentile(over, 50),
        "p99": percentile(over, 99),
        "p50_slices": [r["p50_slice"] for r in rows],
        "inbound_p50": percentile([x.upstream - x.sent for x in done if x.upstream is not None], 50),
        "cpu_per_answer": mean("cpu_per_answer"),
        "redis_cpu_per_answer": mean("redis_cpu_per_answer"),
        "redis_per_answer": mean("redis_per_answer"),
        "replicas_cores": mean("replicas_cores"),
        "harness_cores": mean("harness_cores"),
        "other_cores": mean("other_cores"),
        "load1": [round(r["load1"], 2) for r in rows],
        "split": [r["split"] for r in rows],
    }


async def throughput(
    sizes: Sizes, tmp: Path, counts: tuple[int, ...] = (1, 2, 3), profile: str = ""
) -> list[dict[str, Any]]:
    emulator = GatedEmulator.sandbox(latency=sizes.latency, rate_limit=10**9, rate_window=60.0, retry_after_header=True)
    await emulator.start()
    setups: list[Setup] = []
    try:
        for name, n in [("sqlite x1", 1)] + [(f"redis x{n}", n) for n in counts]:
            slack = TimedSlack()
            slack.round_robin = True
            await slack.start()
            server = RedisServer() if name.startswith("redis") else None
            if server:
                await server.ready()
            folder = tmp / name.replace(" ", "-")
            folder.mkdir()
            cfg, _ = config(
                folder,
                emulator.base_url,
                redis_url=server is not None,
                prefix=f"bench-{uuid.uuid4().hex[:8]}:",
                platform="slack",
                slack_api=slack.api_url,
            )
            replicas = []
            for i in range(n):
                # One config, one port each: the listen port is the only thing replicas may not share.
                text = cfg.read_text()
                port = free_port()
                own = folder / f"config-{i}.yaml"
                own.write_text(re.sub(r'listen: "127.0.0.1:\d+"', f'listen: "127.0.0.1:{port}"', text))
                env = {"BENCH_REDIS_URL": server.url} if server else {}
                if (
                    profile and i == 0
                ):  # cProfile of the first replica of each set-up (slows it: no numbers from such a run)
                    env["BENCH_PROFILE"] = f"{profile}.{folder.name}"
                replicas.append(replica(folder, f"r{i}", own, port, env))
            setups.append(Setup(name, slack, replicas, server, Harness(folder, emulator, slack, None)))
        for s in setups:
            print(f"starting {s.name} ...", file=sys.stderr, flush=True)
            await asyncio.gather(*(c.start() for c in s.replicas))
            await s.slack.wait_for(lambda s=s: len(s.slack.sockets) >= len(s.replicas), timeout=20)
            await burst(SocketSender(s.h, ""), ["C0WARM"] * sizes.warmup)
        for r in range(sizes.rounds):
            for concurrency in sizes.levels:
                # Rotate the order each round: no set-up always runs first (or after the heaviest).
                for s in setups[r % len(setups) :] + setups[: r % len(setups)]:
                    row = await slice_(s, concurrency, sizes)
                    s.rows.setdefault(concurrency, []).append(row)
                    print(
                        f"  round {r + 1} {s.name} @{concurrency}: {row['throughput']:.0f}/s, "
                        f"{row['cpu_per_answer'] * 1000:.1f} ms CPU/answer, p50 {row['p50_slice'] * 1000:.1f} ms, "
                        f"split {row['split']}, load {row['load1']:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
                    await asyncio.sleep(1.0)  # late answers of this slice land before the next one starts
        await asyncio.sleep(2.0)
        out = [
            summarize(s, c, sizes.latency) | {"errors": sum(x.log_count(" ERROR ") for x in s.replicas)}
            for c in sizes.levels
            for s in setups
        ]
        for s in setups:  # which commands, over the whole run (warm-up included): calls per answer
            if s.redis:
                stats = await s.redis.client.info("commandstats")
                answered = sum(answers_per_token(s.slack).values())
                mix = {k.removeprefix("cmdstat_"): round(v["calls"] / answered, 1) for k, v in stats.items()}
                for r in out:
                    if r["setup"] == s.name:
                        r["command_mix"] = dict(sorted(mix.items(), key=lambda kv: -kv[1])[:8])
    finally:
        await stop_all(setups, emulator)
    return out


async def stop_all(setups: list[Setup], emulator: GatedEmulator) -> None:
    """Every replica, fake, client and Redis the set-ups started, then the emulator."""
    for s in setups:
        await asyncio.gather(*(c.stop() for c in s.replicas))
        await s.slack.stop()
        await s.h.http.close()
        if s.redis:
            await s.redis.stop()
    await emulator.stop()


# --- Discord failover -----------------------------------------------------------------------------


async def failover(tmp: Path, latency: float) -> dict[str, Any]:
    """2 replicas on Redis, Discord only; SIGKILL the gateway leader; time until the next answer is posted."""
    emulator = GatedEmulator.sandbox(latency=latency, rate_limit=10**9, rate_window=60.0, retry_after_header=True)
    discord, server = TimedDiscord(), RedisServer()
    await emulator.start()
    await discord.start()
    await server.ready()
    folder = tmp / "failover"
    folder.mkdir()
    replicas: list[Child] = []
    h: Harness | None = None
    try:
        cfg, _ = config(folder, emulator.base_url, redis_url=True, prefix="bench-failover:", platform="discord")
        env = {"BENCH_DISCORD_URL": discord.base_url, "BENCH_DISCORD_TOKEN": fd.TOKEN, "BENCH_REDIS_URL": server.url}
        for i in range(2):
            port = free_port()
            own = folder / f"config-{i}.yaml"
            own.write_text(re.sub(r'listen: "127.0.0.1:\d+"', f'listen: "127.0.0.1:{port}"', cfg.read_text()))
            replicas.append(replica(folder, f"d{i}", own, port, env))
            await replicas[-1].start()  # one after the other: the first is the leader
        h = Harness(folder, emulator, TimedSlack(), discord)
        sender = DiscordSender(h)
        leader = next(c for c in replicas if c.log_count(f":{c.pid} now holds it"))
        warm = await burst(sender, ["C0WARM"] * 5)
        if any(x.answered is None for x in warm):
            raise RuntimeError("Discord warm-up questions were not answered")
        leader.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        killed = time.monotonic()
        first: float | None = None
        sent = 0
        pending: list[asyncio.Future[float]] = []
        while first is None and time.monotonic() - killed < 60:
            number = next(CONVERSATIONS)
            _, answer = await sender.post(number, 0, "C0FAIL")
            sent += 1
            pending.append(answer)
            await asyncio.sleep(0.25)
            done = [f.result() for f in pending if f.done()]
            first = min(done) if done else None
        return {
            "failover_s": (first - killed) if first is not None else float("nan"),
            "sent_after_kill": sent,
            "answered_after_kill": sum(1 for f in pending if f.done()),
            "leader": leader.name,
            "load1": os.getloadavg()[0],
        }
    finally:
        for c in replicas:
            await c.stop()
        if h is not None:
            await h.http.close()
        await discord.stop()
        await emulator.stop()
        await server.stop()


# --- table ----------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], fo: dict[str, Any] | None, sizes: Sizes) -> str:
    out = [
        (
            f"Slack Socket Mode, upstream latency {sizes.latency * 1000:.0f} ms, limiter out of the way; "
            f"{sizes.rounds} "
            f"interleaved slices of {sizes.duration:g} s per row. "
            "CPU = the replicas' user+system CPU (/proc) / answers; "
            "Redis CPU and commands are the run's own redis-server. Cores = CPU seconds per wall second."
        ),
        "",
        (
            "| set-up | concurrent | questions (unanswered, of which not acked / doubled) | answers/s (per slice) "
            "| overhead p50 / p99 ms "
            "| CPU ms/answer (ratio to SQLite) | Redis CPU ms/answer | Redis cmds/answer "
            "| cores replicas / harness / other "
            "| load 1 min | bar |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    base = {r["concurrent"]: r for r in rows if r["setup"].startswith("sqlite")}
    for r in rows:
        b = base[r["concurrent"]]
        ratio = r["cpu_per_answer"] / b["cpu_per_answer"]
        misses = []
        if r["unanswered"] or r["doubled"]:
            misses.append(f"{r['unanswered']} unanswered, {r['doubled']} doubled")
        if r["setup"].startswith("redis"):
            if ratio > BARS["cpu_ratio"]:
                misses.append(f"CPU {ratio:.2f}x SQLite")
            if (r["p50"] - b["p50"]) * 1000 > BARS["p50_over_ms"]:
                misses.append(f"p50 +{(r['p50'] - b['p50']) * 1000:.1f} ms")
        verdict = "pass" if not misses else "**MISS**: " + "; ".join(misses)
        if r["setup"].startswith("sqlite"):
            verdict = "reference" if not misses else verdict
        slices = ", ".join(f"{t:.0f}" for t in r["throughput_slices"])
        redis_cpu = f"{r['redis_cpu_per_answer'] * 1000:.2f}" if r["setup"].startswith("redis") else "-"
        cmds = f"{r['redis_per_answer']:.1f}" if r["setup"].startswith("redis") else "-"
        out.append(
            f"| {r['setup']} | {r['concurrent']} "
            f"| {r['questions']} ({r['unanswered']}, {r['refused']} / {r['doubled']}) "
            f"| {r['throughput']:.0f} ({slices}) | {ms(r['p50'])} / {ms(r['p99'])} "
            f"| {r['cpu_per_answer'] * 1000:.2f} ({ratio:.2f}x) | {redis_cpu} | {cmds} "
            f"| {r['replicas_cores']:.2f} / {r['harness_cores']:.2f} / {r['other_cores']:.2f} "
            f"| {', '.join(f'{x:.2f}' for x in r['load1'])} | {verdict} |"
        )
    if fo is not None:
        ok = fo["failover_s"] < BARS["failover_s"]
        out += [
            "",
            "| Discord failover (2 replicas on Redis, SIGKILL the gateway leader) | seconds "
            "| questions sent after the kill (answered) | load 1 min | bar |",
            "|---|---:|---:|---:|---|",
            (
                f"| kill -> next answer posted | {fo['failover_s']:.1f} "
                f"| {fo['sent_after_kill']} ({fo['answered_after_kill']}) "
                f"| {fo['load1']:.2f} | {'pass' if ok else '**MISS**'} (< {BARS['failover_s']:.0f} s) |"
            ),
        ]
    return "\n".join(out)


async def run(
    sizes: Sizes, parts: list[str], counts: tuple[int, ...], profile: str = ""
) -> tuple[str, dict[str, Any]]:
    results: dict[str, Any] = {"machine": machine_facts(), "sizes": sizes.__dict__}
    with tempfile.TemporaryDirectory(prefix="insitechat-replicas-") as tmp:
        rows = await throughput(sizes, Path(tmp), counts, profile) if "throughput" in parts else []
        fo = await failover(Path(tmp), sizes.latency) if "failover" in parts else None
    results.update(rows=rows, failover=fo)
    m = results["machine"]
    head = (
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}; "
        f"load average at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())}."
    )
    return head + "\n\n" + (table(rows, fo, sizes) if rows else json.dumps(fo)), results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the harness, not the bars")
    parser.add_argument("--only", default="throughput,failover", help="comma-separated: throughput, failover")
    parser.add_argument("--replicas", default="1,2,3", help="replica counts on Redis (SQLite always runs 1)")
    parser.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    parser.add_argument(
        "--profile", metavar="PREFIX", default="", help="cProfile each set-up's first replica to PREFIX.<set-up>"
    )
    parser.add_argument(
        "--answer-timeout", type=float, default=30.0, help="seconds after which an answer counts as lost"
    )
    parser.add_argument("--rounds", type=int, help="interleaved slices per set-up and level (default 2, quick 1)")
    args = parser.parse_args(argv)
    # Shorter than the harness's 120 s: a slice that loses answers should not stall the interleaving.
    bench_harness.ANSWER_TIMEOUT = args.answer_timeout
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    counts = tuple(int(x) for x in args.replicas.split(","))
    text, results = asyncio.run(run(sizes, parts, counts, args.profile))
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
