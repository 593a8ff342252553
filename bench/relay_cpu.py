"""The bridge's CPU per answer at one concurrency, per platform: `python -m bench.relay_cpu [--conversations N]`.

Part 1 of `bench.run` at a single level (50 conversations by default, 10 s): the bridge's CPU
seconds over the answers it posted. With `BENCH_PROFILE=FILE` each platform's bridge writes
its cProfile to FILE.slack / FILE.discord (profiling slows the bridge: take no timing from
such a run; divide call counts by the answers, e.g. by the calls of InsiteChatClient._handle).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys

from bench.relay import FULL, relay_overhead


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_cpu", description=__doc__)
    parser.add_argument("--platforms", default="slack,discord", help="comma-separated: slack, discord")
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0, help="of sending, after a warm-up")
    args = parser.parse_args(argv)
    sizes = dataclasses.replace(FULL, levels=(args.conversations,), duration={args.conversations: args.seconds})
    profile = os.environ.get("BENCH_PROFILE")
    print(
        "| platform | conversations | answered (lost) | answers/s | overhead p50 / p99 ms | "
        "event->upstream / answer->post p99 ms | bridge CPU ms per answer | CPU bridge / other |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for platform in args.platforms.split(","):
        if profile:
            os.environ["BENCH_PROFILE"] = f"{profile}.{platform}"  # the bridge child reads it
        row = (asyncio.run(relay_overhead(platform, sizes)))[0]
        per_answer = row["cpu_sut"] * 1000 / row["throughput"] if row["throughput"] else float("nan")
        print(
            f"| {platform} | {row['concurrent']} | {row['answered']} ({row['lost']}) | {row['throughput']:.1f} | "
            f"{row['overhead_p50'] * 1000:.1f} / {row['overhead_p99'] * 1000:.1f} | "
            f"{row['inbound_p99'] * 1000:.1f} / {row['outbound_p99'] * 1000:.1f} | {per_answer:.2f} | "
            f"{row['cpu_sut']:.0%} / {row['cpu_other']:.0%} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
