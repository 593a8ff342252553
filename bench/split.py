"""What more processes cost without a shared store: `python -m bench.split` (SQLite split over N processes vs Redis xN).

Not a set-up the bridge supports: each SQLite process has a file of its own and answers only the
share of envelopes the fake Slack sends it (round robin), as if the conversations were split
by hand. It shows what N processes on this machine's cores cost per answer with no shared store
at all, next to N replicas on Redis, at 50 concurrent conversations, in the slices of
`bench.replicas` (same harness, same CPU accounting). See bench/REPLICAS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from bench import replicas as r
from bench.common import free_port
from bench.fakes import GatedEmulator, TimedSlack
from bench.harness import Harness, burst
from bridge.emulator import Emulator

SETUPS = (
    ("sqlite x1", 1), ("sqlite-split x2", 2), ("sqlite-split x3", 3), ("redis x1", 1), ("redis x2", 2), ("redis x3", 3)
)


def _each(rows: list[dict[str, Any]], key: str, scale: float, digits: int) -> str:
    return ", ".join(f"{row[key] * scale:.{digits}f}" for row in rows)


async def build(tmp: Path, emulator: Emulator, name: str, n: int) -> r.Setup:
    slack = TimedSlack()
    slack.round_robin = True
    await slack.start()
    server = r.RedisServer() if name.startswith("redis") else None
    if server:
        await server.ready()
    folder = tmp / name.replace(" ", "-")
    folder.mkdir()
    cfg, _ = r.config(folder, emulator.base_url, redis_url=server is not None,
                      prefix=f"bench-{uuid.uuid4().hex[:8]}:", platform="slack", slack_api=slack.api_url)
    children = []
    for i in range(n):
        port = free_port()
        text = re.sub(r'listen: "127.0.0.1:\d+"', f'listen: "127.0.0.1:{port}"', cfg.read_text())
        own = folder / f"config-{i}.yaml"
        own.write_text(text.replace("state.db", f"state-{i}.db"))  # split: a file of its own per process
        env = {"BENCH_REDIS_URL": server.url} if server else {}
        children.append(r.replica(folder, f"r{i}", own, port, env))
    return r.Setup(name, slack, children, server, Harness(folder, emulator, slack, None))  # type: ignore[arg-type]


async def run(rounds: int) -> list[str]:
    sizes = r.Sizes(latency=0.5, levels=(50,), duration=5.0, rounds=rounds, warmup=40)
    emulator = GatedEmulator.sandbox(latency=sizes.latency, rate_limit=10**9, rate_window=60.0, retry_after_header=True)
    await emulator.start()
    setups: list[r.Setup] = []
    lines = [
        "| set-up | CPU ms/answer (per slice) | ratio to sqlite x1 | answers/s (per slice) | other cores (per slice) |",
        "|---|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="insitechat-split-") as folder:
        try:
            for name, n in SETUPS:
                setups.append(await build(Path(folder), emulator, name, n))
            for s in setups:
                await asyncio.gather(*(c.start() for c in s.replicas))
                def connected(s: r.Setup = s) -> bool:
                    return len(s.slack.sockets) >= len(s.replicas)

                await s.slack.wait_for(connected, timeout=20)
                await burst(r.SocketSender(s.h, ""), ["C0WARM"] * sizes.warmup)
            for round_ in range(rounds):
                for s in setups[round_ % len(setups):] + setups[: round_ % len(setups)]:
                    s.rows.setdefault(50, []).append(await r.slice_(s, 50, sizes))
                    await asyncio.sleep(1.0)
            base = sum(x["cpu_per_answer"] for x in setups[0].rows[50]) / rounds
            for s in setups:
                rows = s.rows[50]
                cpu = sum(x["cpu_per_answer"] for x in rows) / len(rows)
                lines.append(
                    f"| {s.name} | {cpu * 1000:.2f} ({_each(rows, 'cpu_per_answer', 1000, 2)}) | {cpu / base:.2f}x "
                    f"| {_each(rows, 'throughput', 1, 0)} | {_each(rows, 'other_cores', 1, 2)} |"
                )
        finally:
            await r.stop_all(setups, emulator)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.split", description=__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved slices per set-up")
    args = parser.parse_args(argv)
    print("\n".join(asyncio.run(run(args.rounds))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
