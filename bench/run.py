"""Run the benchmarks and print the tables:
`python -m bench.run [--quick] [--only PARTS] [--json FILE] [--before REV]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from bench import durability, relay, webhooks
from bench.common import machine_facts, ms
from bench.relay import FULL, QUICK, Sizes

PARTS = ("relay", "baseline", "ratelimit", "webhooks", "memory", "durability")
THROUGHPUT_BAR = 0.90  # our reading of "limited only by upstream latency": at least 90% of concurrency / latency
P99_BARS = {50: 0.010, 500: 0.050}  # seconds of p99 overhead, by concurrency (issue 7)
DURABILITY_P50_BAR = 0.001  # seconds: what durable chat jobs may add to the p50 overhead of an answer
BASELINE_STEPS = ("baseline", "baseline_bolt64", "baseline_floor", "baseline_bolt64_socket")  # part 2, in order
PLATFORM_NAMES = {"slack": "slack (Socket Mode)", "discord": "discord"}


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x * 100:.0f}%"


def _cpu(row: dict[str, Any]) -> str:
    """Server, harness and other CPU as % of one core; "other" is the machine's remaining load."""
    return f"{_pct(row['cpu_sut'])} / {_pct(row['cpu_harness'])} / {_pct(row['cpu_other'])}"


def _verdict(misses: list[str]) -> str:
    return "pass" if not misses else "**MISS**: " + "; ".join(misses)


def _per_answer(row: dict[str, Any]) -> str:
    """CPU milliseconds of the process under test per answer."""
    value = row.get("cpu_per_answer", float("nan"))
    return "n/a" if math.isnan(value) else f"{value * 1000:.2f}"


def _machine(row: dict[str, Any]) -> str:
    """The machine's 1-minute load average at the end of the row (the CPU columns' *other* is the rest of it)."""
    load = row.get("load", float("nan"))
    return "n/a" if math.isnan(load) else f"{load:.2f}"


def _doubled(row: dict[str, Any]) -> str:
    """A question answered more than once is a failure of the system measured, whatever its speed."""
    return f"**FAIL: {row['doubled']} questions answered more than once** " if row.get("doubled") else ""


def doubled_rows(results: dict[str, Any]) -> list[str]:
    """Every row of the run in which some question was answered more than once."""
    found = []
    for name, rows in results.items():
        if isinstance(rows, list):
            found += [
                f"{name}: {r['platform']} at {r['concurrent']}: {r['doubled']} doubled"
                for r in rows
                if isinstance(r, dict) and r.get("doubled")
            ]
    return found


# --- tables -------------------------------------------------------------------------------------


def relay_table(rows: list[dict[str, Any]], latency: float) -> str:
    out = [
        (f"Upstream latency {latency * 1000:.0f} ms (emulator), limiter and emulator limits raised out of the way "
         "(limiter 100,000 per 1 ms, emulator 10^9 per 60 s). Overhead = (event sent -> answer posted on the fake) "
         "- upstream latency. Socket Mode: each mention arrives as Slack sends it, a `message` and an `app_mention` "
         "envelope for the same post, both acked (ack = the later ack). CPU ms per answer = the bridge process's "
         "CPU seconds over the measured window / the answers in it; load = the machine's 1-minute load average at "
         "the end of the row."),
        "",
        ("| platform | concurrent | answered (lost) | answers/s (ideal) | of ideal | overhead p50 / p99 ms "
         "| event->upstream / answer->post p50 ms | Slack ack p99 ms | CPU bridge / harness / other "
         "| bridge CPU ms per answer | load | bar |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        misses = []
        share = r["throughput"] / r["ideal"]
        if share < THROUGHPUT_BAR:
            misses.append(f"throughput {_pct(share)} of ideal")
        bar = P99_BARS.get(r["concurrent"])
        if bar is not None and not r["overhead_p99"] < bar:
            misses.append(f"p99 {ms(r['overhead_p99'])} ms >= {bar * 1000:.0f}")
        if r["lost"]:
            misses.append(f"{r['lost']} unanswered")
        notes = []
        if r.get("acks_over_3s"):
            notes.append(f"{r['acks_over_3s']} acks over 3 s (Slack would retry)")
        if r.get("errors"):
            notes.append(f"{r['errors']} ERROR lines in the log")
        note = f" ({'; '.join(notes)})" if notes else ""
        ack = ms(r["ack_p99"]) if r["platform"] != "discord" else "-"
        out.append(
            f"| {r['platform']} | {r['concurrent']} | {r['answered']} ({r['lost']}) "
            f"| {r['throughput']:.1f} ({r['ideal']:.0f}) "
            f"| {_pct(share)} | {ms(r['overhead_p50'])} / {ms(r['overhead_p99'])} "
            f"| {ms(r['inbound_p50'])} / {ms(r['outbound_p50'])} | {ack} "
            f"| {_cpu(r)} | {_per_answer(r)} | {_machine(r)} | {_doubled(r)}{_verdict(misses)}{note} |"
        )
    return "\n".join(out)


def baseline_table(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> str:
    """The bridge's Slack rows next to the baselines', level by level; ratios to the bridge on the same transport."""
    out = [
        ("Same fakes, same load, each system in its own process. HTTP rows take signed `app_mention` events; "
         "Socket Mode rows take each mention as the `message` + `app_mention` pair. "
         "*bridge / this* = the bridge's answers/s (CPU ms per answer) on the same transport over this row's: "
         "below 1, this row answers more (spends more CPU per answer). "
         "CPU ms per answer = CPU seconds of this system's process over the measured window / the answers in it. "
         "CPU this / harness / other: shares of one core over that window; *other* is everything else on the "
         "machine, and load its 1-minute load average at the end of the row: a row taken while they are high "
         "is noisy."),
        "",
        ("| system | concurrent | answered (lost) | answers/s | bridge / this | overhead p50 / p99 ms "
         "| ack p99 ms | CPU ms per answer | bridge / this CPU | RSS MB | CPU this / harness / other | load |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    bridge = {(r.get("transport", "http"), r["concurrent"]): r for r in ours}
    rows = sorted(ours + theirs, key=lambda r: r["concurrent"])  # stable: the systems keep their order per level
    for r in rows:
        mine = any(r is x for x in ours)
        o = bridge.get((r.get("transport", "http"), r["concurrent"]))
        name = f"bridge, {r['platform']}" if mine else r["platform"]
        ratio = cpu_ratio = "-"
        if o is not None and not mine and r["throughput"] > 0:
            ratio = f"{o['throughput'] / r['throughput']:.2f}"
            cpu_ratio = f"{o['cpu_per_answer'] / r['cpu_per_answer']:.2f}" if r["cpu_per_answer"] > 0 else "-"
        rss = "n/a" if math.isnan(r.get("rss", float("nan"))) else f"{r['rss']:.0f}"
        out.append(
            f"| {_doubled(r)}{name} | {r['concurrent']} | {r['answered']} ({r['lost']}) | {r['throughput']:.1f} "
            f"| {ratio} | {ms(r['overhead_p50'])} / {ms(r['overhead_p99'])} | {ms(r['ack_p99'])} "
            f"| {_per_answer(r)} | {cpu_ratio} | {rss} | {_cpu(r)} | {_machine(r)} |"
        )
    return "\n".join(out)


def ratelimit_table(rows: list[dict[str, Any]], latency: float) -> str:
    out = [
        (f"A first burst takes every slot of the window, then a flood arrives channel after channel; upstream latency "
         f"{latency * 1000:.0f} ms. Budget used = fastest span the limiter's budget allows / actual span of the "
         "successful requests. Fairness = longest / shortest per-channel mean wait."),
        "",
        ("| limiter / emulator | messages | budget used (ideal / actual span s) | emulator 429s "
         "| per-channel mean wait s | fairness | bar |"),
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        waits = ", ".join(f"{w:.1f}" for w in r["channel_mean_wait"].values())
        if r["same_limit"]:
            misses = []
            if not r["used"] >= 0.95:
                misses.append(f"{_pct(r['used'])} of the budget used")
            if r["http_429"]:
                misses.append(f"{r['http_429']} x 429")
            if not r["fairness"] <= 2.0:
                misses.append(f"fairness {r['fairness']:.2f}")
            if r["lost"]:
                misses.append(f"{r['lost']} unanswered")
            verdict = _verdict(misses)
        else:
            verdict = "not a bar: the shipped margin (55 of 60), scaled"
        out.append(
            f"| {r['limiter']} / {r['service']} | {r['messages']} "
            f"| {_pct(r['used'])} ({r['ideal_span']:.1f} / {r['span']:.1f}) "
            f"| {r['http_429']} | {waits} | {r['fairness']:.2f} | {verdict} |"
        )
    return "\n".join(out)


def webhook_table(result: dict[str, Any]) -> str:
    ours, bare = result["bridge"], result["bare"]
    share = ours["per_second"] / bare["per_second"]
    misses = []
    if ours["per_second"] < 1000:
        misses.append(f"{ours['per_second']:.0f}/s < 1000")
    if not ours["ack_p99"] < 0.050:
        misses.append(f"p99 {ms(ours['ack_p99'])} ms >= 50")
    if share < 1 / 3:
        misses.append(f"{_pct(share)} of the bare handler < 33%")
    if ours["accepted"] != ours["posted"]:
        misses.append(f"{ours['posted'] - ours['accepted']} not accepted {ours['other']}")
    return "\n".join([
        (f"{ours['posted']} distinct signed `conversation.escalated` webhooks, {result['concurrency']} keep-alive "
         f"connections each sending its next as soon as answered; the bridge verifies, stores in SQLite (WAL) and "
         f"queues an alert to Slack ({ours['alerts_posted']} alert cards reached the fake Slack during the run)."),
        "",
        ("| server | accepted/s | ack p50 ms | ack p99 ms | CPU server / client / other "
         "| server CPU ms per webhook | bar |"),
        "|---|---:|---:|---:|---:|---:|---|",
        (f"| bridge | {ours['per_second']:.0f} | {ms(ours['ack_p50'])} | {ms(ours['ack_p99'])} "
         f"| {_cpu(ours)} | {_per_webhook(ours)} "
         f"| {_verdict(misses) if misses else f'pass ({_pct(share)} of bare)'} |"),
        (f"| bare aiohttp, returns 200 | {bare['per_second']:.0f} | {ms(bare['ack_p50'])} | {ms(bare['ack_p99'])} "
         f"| {_cpu(bare)} | {_per_webhook(bare)} | ceiling |"),
    ])


def _per_webhook(row: dict[str, Any]) -> str:
    return f"{row['cpu_sut'] / row['per_second'] * 1000:.2f}" if row["per_second"] > 0 else "n/a"


def memory_table(r: dict[str, Any]) -> str:
    (half, half_rss), (full, full_rss) = sorted(r["after"].items())
    bar = _verdict([] if r["in_flight"] < 150 else [f"{r['in_flight']:.0f} MB >= 150"])
    return "\n".join([
        "Resident memory (VmRSS from /proc) of the bridge process, Slack HTTP mode, SQLite state.",
        "",
        "| state | RSS MB | bar |",
        "|---|---:|---|",
        f"| idle, after start and a warm-up | {r['idle']:.1f} | |",
        (f"| {r['in_flight_n']} conversations in flight ({r['in_flight_held_upstream']} at the emulator, the rest "
         f"queued in the bridge) | {r['in_flight']:.1f} | {bar} (< 150 MB) |"),
        f"| after {half} more messages handled | {half_rss:.1f} | |",
        (f"| after {full} more messages handled | {full_rss:.1f} "
         f"| growth over the second half: {full_rss - half_rss:+.1f} MB |"),
        f"| peak (VmHWM) | {r['peak']:.1f} | |",
    ])


def _signed(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:+.2f}"


def _load(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def _spread(values: list[float], show: Callable[[float], str] = ms) -> str:
    """Median (lowest to highest) of per-slice figures."""
    return f"{show(statistics.median(values))} ({show(min(values))} to {show(max(values))})"


def _pairs_used(part: dict[str, Any]) -> str:
    quiet, pairs = len(part["quiet_pairs"]), part["pairs"]
    return f"{quiet} quiet of {pairs}" if part["verdict"] else f"all {pairs} ({quiet} quiet)"


def _durability_row(platform: str, label: str, part: dict[str, Any]) -> str:
    r = part["timed"][label]
    ack = ms(r["ack_p99"]) if platform == "slack" else "-"
    errors = f" ({r['errors']} ERROR lines)" if r["errors"] else ""
    return (
        f"| {PLATFORM_NAMES[platform]} | {label} | {_pairs_used(part)} | {r['answered']} ({r['lost']}){errors} "
        f"| {ms(r['overhead_p50'])} / {ms(r['overhead_p99'])} | {_spread(r['slice_p50'])} "
        f"| {ms(r['inbound_p50'])} / {ms(r['outbound_p50'])} | {ack} | {r['cpu_per_answer'] * 1000:.2f} "
        f"| {_cpu(r)} | {_load(r['load'])} | |"
    )


def durability_growth(before: dict[str, Any], after: dict[str, Any]) -> list[float]:
    """Each pair's p50 growth: slice i after - slice i before (next to each other in time)."""
    return [a - b for a, b in zip(after["slice_p50"], before["slice_p50"], strict=False)]


def _durability_verdict(part: dict[str, Any], grew: float) -> str:
    limit = f"+{DURABILITY_P50_BAR * 1000:.0f}"
    before, after = part["timed"]["before"], part["timed"]["after"]
    if not part["verdict"]:
        return f"no verdict: only {len(part['quiet_pairs'])} of {part['pairs']} pairs quiet, the machine was busy"
    misses = [] if grew < DURABILITY_P50_BAR else [f"p50 {_signed(grew)} ms >= {limit}"]
    if before["lost"] or after["lost"]:
        misses.append(f"{before['lost'] + after['lost']} unanswered")
    return f"pass: p50 {_signed(grew)} ms < {limit}" if not misses else _verdict(misses)


def _durability_delta(platform: str, part: dict[str, Any]) -> str:
    before, after = part["timed"]["before"], part["timed"]["after"]
    pairs = durability_growth(before, after)
    ack = _signed(after["ack_p99"] - before["ack_p99"]) if platform == "slack" else "-"
    return (
        f"| {PLATFORM_NAMES[platform]} | **after - before** | | "
        f"| {_signed(after['overhead_p50'] - before['overhead_p50'])} "
        f"/ {_signed(after['overhead_p99'] - before['overhead_p99'])} "
        f"| **{_spread(pairs, _signed)}** "
        f"| {_signed(after['inbound_p50'] - before['inbound_p50'])} "
        f"/ {_signed(after['outbound_p50'] - before['outbound_p50'])} "
        f"| {ack} | {(after['cpu_per_answer'] - before['cpu_per_answer']) * 1000:+.2f} | | "
        f"| {_durability_verdict(part, statistics.median(pairs))} |"
    )


def durability_table(result: dict[str, Any]) -> str:
    platforms = result["platforms"]
    out = [
        (f"Before: `{result['before']}`. After: `{result['after']}`. {result['concurrency']} concurrent "
         f"conversations, upstream latency {result['latency'] * 1000:.0f} ms, limits raised as in (1). Both bridges "
         f"run at once, each on its own fakes; the load goes to one at a time in {result['slice']:g} s slices, in "
         "pairs, in the order before, after, after, before, ..., until enough pairs were quiet: "
         f"the rest of the machine used under {durability.QUIET:.0%} of a core in both slices. "
         "The figures are over the quiet pairs when there "
         f"are {durability.MIN_QUIET} or more, else over all (and no verdict). Slice p50 = the median (lowest to "
         "highest) of the slices' p50s; in the after - before row, of each pair's difference: the bar. Load = the "
         "machine's 1-minute load average after each slice."),
        "",
        ("| platform | code | pairs | answered (lost) | overhead p50 / p99 ms | slice p50 ms | "
         "event->upstream / answer->post p50 ms | Slack ack p99 ms | bridge CPU ms per answer "
         "| CPU bridge / harness / other | load | bar |"),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for platform, part in platforms.items():
        out += [_durability_row(platform, "before", part), _durability_row(platform, "after", part)]
        out.append(_durability_delta(platform, part))
    out += [
        "",
        ("Store statements per answer, from a separate process per tree with every SQL statement traced (no timing "
         "taken from it), over the same load. Writes = statements that changed a row; commits = transactions that "
         "changed a row (a write outside BEGIN...COMMIT is one)."),
        "",
        "| platform | code | answers counted | statements | writes | commits | empty transactions |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for platform, part in platforms.items():
        for label in ("before", "after"):
            c = part["store"][label]
            out.append(
                f"| {PLATFORM_NAMES[platform]} | {label} | {c['answers']} | {c['statements']:.2f} | {c['writes']:.2f} "
                f"| {c['commits']:.2f} | {c['empty_transactions']:.2f} |"
            )
    columns = [(p, label) for p in platforms for label in ("before", "after")]
    kinds = sorted({k for p, label in columns for k in platforms[p]["store"][label]["kinds"]})
    out += [
        "",
        "Writes per answer, by statement:",
        "",
        "| statement | " + " | ".join(f"{p} {label}" for p, label in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for kind in kinds:
        cells = [platforms[p]["store"][label]["kinds"].get(kind, 0.0) for p, label in columns]
        out.append(f"| `{kind}` | " + " | ".join(f"{c:.2f}" if c else "-" for c in cells) + " |")
    return "\n".join(out)


# --- running --------------------------------------------------------------------------------------


async def run(
    parts: list[str], sizes: Sizes, mode: str, *, before: str = durability.BEFORE, after: str | None = None
) -> tuple[str, dict[str, Any]]:
    durations = {str(k): v for k, v in sizes.duration.items()}
    sizes_used = sizes.__dict__ | {"duration": durations}
    results: dict[str, Any] = {"mode": mode, "machine": machine_facts(), "sizes": sizes_used}
    started = time.monotonic()

    async def step(name: str, make: Callable[[], Awaitable[Any]]) -> Any:
        print(f"[{time.monotonic() - started:6.1f}s] {name} ...", file=sys.stderr, flush=True)
        value = await make()
        results[name] = value
        results.setdefault("load", {})[name] = os.getloadavg()[0]  # for the parts whose rows carry none
        return value

    if "relay" in parts:
        await step("relay_slack", lambda: relay.relay_overhead("slack", sizes))
        await step("relay_slack_socket", lambda: relay.relay_overhead("slack", sizes, slack_mode="socket"))
        await step("relay_discord", lambda: relay.relay_overhead("discord", sizes))
    if "baseline" in parts:
        await step("baseline", lambda: relay.baseline(sizes, "bolt"))
        await step("baseline_bolt64", lambda: relay.baseline(sizes, "bolt64"))
        await step("baseline_floor", lambda: relay.baseline(sizes, "floor"))
        await step("baseline_bolt64_socket", lambda: relay.baseline(sizes, "bolt64_socket"))
    if "ratelimit" in parts:
        same = await step("ratelimit_same", lambda: relay.rate_limit_use(sizes))
        margin_limit = round(sizes.rl_limit * 60 / 55)
        margin = await step("ratelimit_margin", lambda: relay.rate_limit_use(sizes, service_limit=margin_limit))
        results["ratelimit"] = [same, margin]
    if "webhooks" in parts:
        await step("webhooks", lambda: webhooks.webhook_intake(sizes.wh_count, sizes.wh_concurrency))
    if "memory" in parts:
        await step("memory", lambda: relay.memory(sizes))
    if "durability" in parts:
        await step("durability", lambda: durability.durability_cost(sizes, before=before, after=after))
    results["elapsed_s"] = time.monotonic() - started
    return render(results, sizes), results


def _load_line(results: dict[str, Any], *steps: str) -> list[str]:
    """The machine's 1-minute load average at the end of each of a part's steps (none in older results)."""
    loads = [results.get("load", {}).get(name) for name in steps]
    if any(value is None for value in loads):
        return []
    return ["", "Machine load (1-minute average) at the end: " + ", ".join(f"{value:.2f}" for value in loads) + "."]


def render(results: dict[str, Any], sizes: Sizes) -> str:
    m = results["machine"]
    out = [
        (f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, mode {results['mode']}, {results['elapsed_s']:.0f} s. "
         f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Linux {m['kernel']}, Python {m['python']} "
         f"({m['libraries']}). The bridge runs as its own process (`insitechat-bridge run`); the emulator, the fake "
         "Slack/Discord and the load share a second process."),
    ]
    slack = results.get("relay_slack", []) + results.get("relay_slack_socket", [])
    if "relay_slack" in results:
        relay = relay_table(slack + results["relay_discord"], sizes.latency)
        out += ["", "#### 1. Relay overhead", "", relay]
    if "baseline" in results:
        theirs = [r for name in BASELINE_STEPS for r in results[name]]
        out += ["", "#### 2. Against the baselines", "", baseline_table(slack, theirs)]
    doubled = doubled_rows(results)
    if doubled:
        out += ["", "**Bench failure: questions answered more than once**: " + "; ".join(doubled)]
    if "ratelimit" in results:
        out += ["", "#### 3. Rate-limit use", "", ratelimit_table(results["ratelimit"], sizes.latency)]
        out += _load_line(results, "ratelimit_same", "ratelimit_margin")
    if "webhooks" in results:
        out += ["", "#### 4. Webhook intake", "", webhook_table(results["webhooks"])]
        out += _load_line(results, "webhooks")
    if "memory" in results:
        out += ["", "#### 5. Memory", "", memory_table(results["memory"])]
        out += _load_line(results, "memory")
    if "durability" in results:
        out += ["", "#### 6. Cost of durability", "", durability_table(results["durability"])]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (about a minute): checks the harness, not the bars"
    )
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {','.join(PARTS)}")
    parser.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    parser.add_argument(
        "--before", default=durability.BEFORE, metavar="REV",
        help=f"durability: the revision before durable chat jobs ({durability.BEFORE}), "
        "checked out in a temporary worktree",
    )
    parser.add_argument(
        "--after", metavar="REV", help="durability: the revision after (default: this checkout as it is)"
    )
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    sizes, mode = (QUICK, "quick") if args.quick else (FULL, "full")
    table, results = asyncio.run(run(parts, sizes, mode, before=args.before, after=args.after))
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    doubled = doubled_rows(results)
    if doubled:
        print("bench failure: questions answered more than once: " + "; ".join(doubled), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
