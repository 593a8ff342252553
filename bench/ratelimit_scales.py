"""Rate-limit use at several window / latency scales, next to the W / (W + d) bound: `python -m bench.ratelimit_scales`.

Part 3 of `bench.run` (limiter and emulator 55 per window, a first burst, then a flood from
5 channels), run at each scale and with the emulator counting each request at a chosen point
of its latency: on arrival, at the answer, or anywhere in between (drawn per request). A safe
limiter holds a slot from its request's send to one window after its answer, so at best one
slot serves one request per window + latency: W / (W + d) of the budget. See bench/README.md,
"The whole budget".
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from typing import Any

from bench.relay import FULL, rate_limit_use

# (window s, latency s, where the emulator counts): the part's own scale first.
SCALES: tuple[tuple[float, float, float | str | None], ...] = (
    (6.0, 0.5, None),
    (6.0, 0.5, 0.0),
    (6.0, 0.5, "random"),
    (6.0, 0.25, None),
    (6.0, 1.0, None),
    (3.0, 0.5, None),
    (12.0, 0.5, None),
)
QUICK = ((3.0, 0.5, None), (3.0, 0.5, 0.0))


def _where(count_at: float | str | None) -> str:
    if count_at is None:
        return "at the answer"
    if count_at == "random":
        return "anywhere (random)"
    return "on arrival" if float(count_at) == 0.0 else f"{float(count_at):.0%} into the latency"


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| window / latency | emulator counts | requests | budget used (span) | slot cycle s | use by cycle | "
        "bound W/(W+d) | emulator 429s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['window']:g} s / {r['latency'] * 1000:.0f} ms | {_where(r['count_at'])} | {r['requests']} | "
            f"{r['used']:.1%} | {r['cycle']:.3f} | {r['cycle_used']:.1%} | {r['bound']:.1%} | {r['http_429']} |"
        )
    return "\n".join(out)


async def run(scales: tuple[tuple[float, float, float | str | None], ...]) -> list[dict[str, Any]]:
    rows = []
    for window, latency, count_at in scales:
        sizes = dataclasses.replace(FULL, rl_window=window, latency=latency)
        where = _where(count_at)
        print(f"window {window:g} s, latency {latency:g} s, counted {where} ...", file=sys.stderr, flush=True)
        row = await rate_limit_use(sizes, count_at=count_at)
        rows.append(row | {"window": window})
        print(f"  used {row['used']:.1%}, by cycle {row['cycle_used']:.1%}, 429s {row['http_429']}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit_scales", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two short scales: checks the harness, not the figures")
    parser.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    args = parser.parse_args(argv)
    rows = asyncio.run(run(QUICK if args.quick else SCALES))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0 if all(r["http_429"] == 0 and r["lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
