"""Client CPU per Redis command, redis-py's pool against the store's wire: `python -m bench.wire [--commands N]`.

One process, one redis-server of its own; the store's kind of command (EVALSHA of a small
script) from 1, 5 and 50 callers at once, redis-py (`Redis.from_url`, its connection pool)
and `bridge.store.wire.Wire` (one redis-py `Connection`, pipelined) taking turns, 3 rounds.
Both parse with hiredis when it is installed, else with redis-py's Python parser: the output
says which; run it with and without (`pip install hiredis` / `pip uninstall hiredis`). CPU is
this process's user+system time (getrusage), so the machine's other load moves it less than
wall time. See bench/REPLICAS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.utils import HIREDIS_AVAILABLE

from bench.replicas import RedisServer
from bridge.store.wire import Script, Wire

SCRIPT = "return ARGV[1]"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(command: Callable[[int, int], Awaitable[object]], callers: int, each: int) -> float:
    """ms of CPU per command, `callers` at once, each sending `each` one after the other."""

    async def caller(i: int) -> None:
        for k in range(each):
            await command(i, k)

    await caller(0)  # connected, the script cached
    before = cpu()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    return 1000 * (cpu() - before) / (callers * each)


async def run(commands: int, rounds: int) -> str:
    server = RedisServer()
    await server.ready()
    results: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(rounds):
            for callers in (1, 5, 50):
                each = max(1, commands // callers)
                client = aioredis.Redis.from_url(server.url, decode_responses=True)
                script = client.register_script(SCRIPT)
                results.setdefault(("redis-py (pool)", callers), []).append(
                    await measure(lambda i, k, script=script: script(args=["p", i, k]), callers, each)
                )
                await client.aclose()
                wire = Wire(server.url, timeout=5.0)
                own = Script(SCRIPT)
                results.setdefault(("wire", callers), []).append(
                    await measure(lambda i, k, wire=wire, own=own: wire.run(own, args=("p", i, k)), callers, each)
                )
                await wire.aclose()
    finally:
        await server.stop()
    parser = "hiredis" if HIREDIS_AVAILABLE else "redis-py's Python parser"
    out = [
        f"replies parsed by {parser}",
        "| client | callers at once | ms CPU per command (median; each round) |",
        "|---|---:|---|",
    ]
    for (name, callers), values in results.items():
        rounds_text = ", ".join(f"{v:.3f}" for v in values)
        out.append(f"| {name} | {callers} | {statistics.median(values):.3f} ({rounds_text}) |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wire", description=__doc__)
    parser.add_argument("--commands", type=int, default=5000, help="commands per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(asyncio.run(run(args.commands, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
