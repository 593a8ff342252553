"""Redis round trips per answer, by command and by script: `python -m bench.roundtrips [--answers N]`.

One replica on a redis-server of its own (Slack Socket Mode, the limiter out of the way, as
`bench.replicas`), watched with MONITOR: every command a client sent counts as one round trip
(a MULTI ... EXEC block as one), scripts are named by their SHA1, and the commands that Lua
ran inside a script are not counted. Background traffic (leases, outbox polls) is measured
over an idle stretch as long as the measured one and taken off. Conversations of `--turns`
questions each, one conversation at a time, as the closed loop of `bench.replicas` sends them.
See bench/REPLICAS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.fakes import GatedEmulator, TimedSlack
from bench.harness import CONVERSATIONS, Harness, SocketSender, answered, burst
from bench.replicas import RedisServer, config, replica

MODULES = ("bridge.store.redis", "bridge.budget", "bridge.leader")


def script_names() -> dict[str, str]:
    """SHA1 of every Lua script the bridge registers -> its module-level name."""
    import importlib

    names: dict[str, str] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if isinstance(value, str) and "redis.call" in value:
                names[hashlib.sha1(value.encode()).hexdigest()] = f"{module_name.rsplit('.', 1)[-1]}.{name}"
    return names


class Watch:
    """MONITOR on a connection of its own: round trips by command (EVALSHA by script name)."""

    def __init__(self, url: str) -> None:
        self._client = aioredis.Redis.from_url(url, decode_responses=True)
        self._names = script_names()
        self.counts: Counter[str] = Counter()
        self._in_multi: dict[str, bool] = {}
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        await asyncio.wait_for(self.ready.wait(), 5)

    async def _watch(self) -> None:
        async with self._client.monitor() as monitor:
            self.ready.set()
            async for entry in monitor.listen():
                self._count(entry)

    def _count(self, entry: dict[str, Any]) -> None:
        if entry.get("client_type") == "lua":
            return
        words = str(entry.get("command", "")).split(" ")
        name = words[0].upper()
        client = f"{entry.get('client_address')}:{entry.get('client_port')}"
        if name == "MULTI":
            self._in_multi[client] = True
            return
        if self._in_multi.get(client):
            if name == "EXEC":
                self._in_multi[client] = False
                self.counts["MULTI..EXEC"] += 1
            return
        if name in ("EVALSHA", "EVAL") and len(words) > 1:
            sha = words[1].strip('"') if name == "EVALSHA" else hashlib.sha1(words[1].encode()).hexdigest()
            name = self._names.get(sha, f"EVALSHA {sha[:8]}")
        self.counts[name] += 1

    def take(self) -> Counter[str]:
        counts, self.counts = self.counts, Counter()
        return counts

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.aclose()


async def conversations(sender: SocketSender, count: int, turns: int) -> int:
    """`count` conversations of `turns` questions each, one at a time; returns how many were answered."""
    done = 0
    for _ in range(count):
        number = next(CONVERSATIONS)
        for k in range(turns):
            sample = await answered(sender, number, *await sender.post(number, k, "C0TRIPS"))
            done += sample.answered is not None
    return done


async def measure(answers: int, turns: int, pool: bool) -> tuple[dict[str, float], int, float]:
    emulator = GatedEmulator.sandbox(latency=0.05, rate_limit=10**9, rate_window=60.0, retry_after_header=True)
    await emulator.start()
    slack = TimedSlack()
    await slack.start()
    server = RedisServer()
    await server.ready()
    watch = Watch(server.url)
    with tempfile.TemporaryDirectory(prefix="insitechat-trips-") as tmp:
        folder = Path(tmp)
        cfg, port = config(folder, emulator.base_url, redis_url=True, prefix="trips:", platform="slack",
                           slack_api=slack.api_url)
        child = replica(folder, "r0", cfg, port, {"BENCH_REDIS_URL": server.url})
        h = Harness(folder, emulator, slack, None)
        try:
            await child.start()
            await slack.wait_for(lambda: len(slack.sockets) >= 1, timeout=20)
            sender = SocketSender(h)
            await burst(sender, ["C0WARM"] * 5)
            await watch.start()
            await asyncio.sleep(0.5)
            watch.take()
            t0 = time.monotonic()
            done = await conversations(sender, max(1, answers // turns), turns)
            wall = time.monotonic() - t0
            await asyncio.sleep(0.5)  # the last delivery's writes
            busy = watch.take()
            await asyncio.sleep(wall + 0.5)  # as long again with nothing to answer: the background's share
            idle = watch.take()
        finally:
            await watch.stop()
            await child.stop()
            await h.http.close()
            await slack.stop()
            await server.stop()
            await emulator.stop()
    names = set(busy) | set(idle)
    per_answer = {n: (busy[n] - idle[n]) / done for n in names if done}
    return dict(sorted(per_answer.items(), key=lambda kv: -kv[1])), done, wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roundtrips", description=__doc__)
    parser.add_argument("--answers", type=int, default=100)
    parser.add_argument(
        "--turns", type=int, default=10, help="questions per conversation (the bench's closed loop: ~10)"
    )
    args = parser.parse_args(argv)
    per_answer, done, wall = asyncio.run(measure(args.answers, args.turns, False))
    total = sum(per_answer.values())
    print(f"{done} answers in {wall:.1f} s, {args.turns} per conversation; "
          "round trips per answer (background taken off):")
    print("| command or script | per answer |")
    print("|---|---:|")
    for name, value in per_answer.items():
        if abs(value) >= 0.005:
            print(f"| {name} | {value:.2f} |")
    print(f"| **total** | **{total:.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
