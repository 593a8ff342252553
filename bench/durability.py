"""Durability's cost: relay overhead and store writes per answer, before and after durable chat jobs, side by side."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, Child, cpu_seconds, machine_busy_seconds
from bench.harness import DiscordSender, Harness, Level, Sender, SocketSender, burst, closed_loop, harness
from bench.relay import UNLIMITED, Sizes

BEFORE = "6d2ec10"  # the last revision before durable chat jobs (df07f6f)
SETTLE = 0.5  # seconds after the last answer: the outbox marks a delivery done just after its post
QUIET = 0.5  # of a core: a pair is quiet when the rest of the machine used less than this in both its slices
MIN_QUIET = 3  # quiet pairs needed for a verdict on the bar; with fewer, every pair is reported and no verdict
_LITERAL = re.compile(r"'(?:[^']|'')*'|\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", re.IGNORECASE)
_WRITE = re.compile(r"(INSERT(?: OR \w+)? INTO \w+|DELETE FROM \w+|UPDATE \w+)", re.IGNORECASE)


@dataclass(frozen=True)
class Code:
    """One side of the comparison: its label, the revision it is, and the tree the child imports."""

    label: str  # "before" or "after"
    revision: str  # "<hash> <subject>", and whether the tree has uncommitted changes
    source: Path


# --- the two trees ------------------------------------------------------------------------------


def _git(*args: str, check: bool = True) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """`revision` in a temporary git worktree outside the repository; removed (and pruned) on exit."""
    folder = Path(tempfile.mkdtemp(prefix="insitechat-bench-rev-"))
    tree = folder / "tree"
    try:
        _git("worktree", "add", "--detach", "--quiet", str(tree), revision)
        yield tree
    finally:
        _git("worktree", "remove", "--force", str(tree), check=False)
        shutil.rmtree(folder, ignore_errors=True)
        _git("worktree", "prune", check=False)


@contextmanager
def _tree(revision: str | None) -> Iterator[Path]:
    """A revision's checkout, or None: this checkout as it is (uncommitted changes included)."""
    if revision is None:
        yield ROOT
        return
    with checkout(revision) as tree:
        yield tree


def describe(revision: str | None) -> str:
    if revision is not None:
        return _git("log", "-1", "--format=%h %s", revision)
    dirty = _git("status", "--porcelain", "--", "bridge", "adapters")
    return _git("log", "-1", "--format=%h %s", "HEAD") + (" (with uncommitted changes)" if dirty else "")


# --- the bridges and their load -------------------------------------------------------------------


def _sender(h: Harness, platform: str) -> Sender:
    return SocketSender(h) if platform == "slack" else DiscordSender(h)


def _progress(text: str) -> None:
    print(f"           {text}", file=sys.stderr, flush=True)


async def _start(
    h: Harness, platform: str, code: Code, sizes: Sizes, *, trace: Path | None = None
) -> tuple[Child, Sender]:
    """A bridge from `code`'s tree on `h`'s fakes, Slack over Socket Mode, warmed up."""
    name = f"{code.label}-{platform}" + ("-traced" if trace else "")
    bridge = h.bridge(name, platforms=(platform,), slack_mode="socket", source=code.source, trace=trace, **UNLIMITED)
    await bridge.start()
    sender = _sender(h, platform)
    await burst(sender, ["C0WARM"] * sizes.warmup)
    return bridge, sender


def _quiet(before: Level, after: Level) -> bool:
    return before.cpu["other"] < QUIET and after.cpu["other"] < QUIET


def _rest_of_machine(pids: list[int]) -> float:
    """CPU seconds used so far by everything but this process and `pids` (all cores)."""
    return machine_busy_seconds() - cpu_seconds() - sum(cpu_seconds(pid, children=True) for pid in pids)


async def _wait_quiet(pids: list[int], patience: float) -> float:
    """Wait, at most `patience` s, for a second in which the rest of the machine used under QUIET; the time waited."""
    started = time.monotonic()
    while patience > 0:
        used, at = _rest_of_machine(pids), time.monotonic()
        await asyncio.sleep(1.0)
        if (_rest_of_machine(pids) - used) / (time.monotonic() - at) < QUIET or time.monotonic() - started >= patience:
            break
    return time.monotonic() - started


async def _timed(
    platform: str, codes: tuple[Code, Code], sizes: Sizes
) -> tuple[dict[str, list[tuple[Level, int]]], list[float]]:
    """Both bridges up at once, each on its own fakes; the load goes to one at a time, in alternating slices.

    Slices a few seconds apart see about the same machine, so each before/after pair is
    compared under the same conditions; each pair first waits a little for a quiet second,
    and pairs go on until `dur_pairs` were quiet (at most `dur_max_pairs`). Returns the
    slices of each tree and each pair's wait.
    """
    slices: dict[str, list[tuple[Level, int]]] = {code.label: [] for code in codes}
    waits = []
    discord = platform == "discord"
    async with (
        harness(latency=sizes.latency, discord=discord) as h0,
        harness(latency=sizes.latency, discord=discord) as h1,
    ):
        started = {
            code.label: (h, *await _start(h, platform, code, sizes)) for h, code in zip((h0, h1), codes, strict=True)
        }
        pids = [bridge.pid for _, bridge, _ in started.values()]
        for index in range(sizes.dur_max_pairs):
            if (
                sum(_quiet(b, a) for (b, _), (a, _) in zip(slices["before"], slices["after"], strict=False))
                >= sizes.dur_pairs
            ):
                break
            waits.append(await _wait_quiet(pids, sizes.dur_patience))
            for code in codes if index % 2 == 0 else codes[::-1]:
                h, bridge, sender = started[code.label]
                level = await closed_loop(
                    sender, concurrency=sizes.dur_concurrency, duration=sizes.dur_slice, latency=sizes.latency,
                    pid=bridge.pid,
                )
                level.cpu["load"] = os.getloadavg()[0]
                h.mark_upstream(level.samples)
                slices[code.label].append((level, bridge.log_count(" ERROR ")))
            b, a = slices["before"][-1][0], slices["after"][-1][0]
            _progress(
                f"{platform} pair {index + 1}: p50 before {b.overhead(50) * 1000:.1f} ms, "
                f"after {a.overhead(50) * 1000:.1f} ms; "
                f"rest of the machine {b.cpu['other']:.0%} / {a.cpu['other']:.0%} of a core; "
                f"load {os.getloadavg()[0]:.2f}"
            )
    return slices, waits


async def _count_round(platform: str, code: Code, sizes: Sizes) -> dict[str, Any]:
    """The same load with every SQL statement traced (no timing taken): statements inside the loop per answer."""
    async with harness(latency=sizes.latency, discord=platform == "discord") as h:
        trace = h.tmp / "statements.json"
        bridge, sender = await _start(h, platform, code, sizes, trace=trace)
        await asyncio.sleep(SETTLE)
        since = time.monotonic()
        level = await closed_loop(
            sender,
            concurrency=sizes.dur_concurrency,
            duration=sizes.dur_count_duration,
            latency=sizes.latency,
            pid=None,
        )
        await asyncio.sleep(SETTLE)
        until = time.monotonic()
        if await bridge.stop() != 0:
            raise RuntimeError(f"{bridge.name} did not exit cleanly:\n{bridge.log_tail()}")
        events = json.loads(trace.read_text())
        tables = state_tables(h.tmp / bridge.name / "state.db")
    cost = store_cost(events, (since, until), len(level.answered))
    return cost | {"lost": level.lost, "tables": tables, "errors": bridge.log_count(" ERROR ")}


# --- store writes ----------------------------------------------------------------------------------


def statement_kind(sql: str) -> str:
    """A statement without its values: "UPDATE jobs SET state, asks", "INSERT OR IGNORE INTO jobs"."""
    text = " ".join(_LITERAL.sub("?", sql).split())
    match = _WRITE.match(text)
    if match is None:
        return " ".join(text.split()[:2]).upper()
    kind = match.group(1)
    if kind.upper().startswith("UPDATE"):
        sets = re.search(r"\bSET (.*?)(?: WHERE |$)", text, re.IGNORECASE)
        kind += " SET " + ", ".join(re.findall(r"(\w+)\s*=", sets.group(1) if sets else ""))
    return kind


def store_cost(events: list[list[Any]], window: tuple[float, float], answers: int) -> dict[str, Any]:
    """Statements, writes (statements that changed a row) and commits (transactions that wrote) per answer.

    `events` are the child's [start, connection, SQL, rows changed], in order. A write outside
    BEGIN ... COMMIT is its own transaction (the store runs in autocommit mode); a COMMIT
    counts when its transaction changed a row: a transaction that changed nothing writes
    nothing to the file (counted apart, as empty).
    """
    low, high = window
    statements = writes = commits = empty = unknown = 0
    kinds: Counter[str] = Counter()
    open_txn: dict[int, list[bool]] = {}  # connection -> [inside BEGIN, the transaction changed a row]
    for at, connection, sql, changed in events:
        inside = low <= at <= high
        txn = open_txn.setdefault(connection, [False, False])
        word = (sql.split(None, 1) or [""])[0].upper()
        if word == "BEGIN":
            txn[:] = [True, False]
        elif word in ("COMMIT", "END", "ROLLBACK"):
            if inside and word != "ROLLBACK":
                commits += txn[1]
                empty += not txn[1]
            txn[:] = [False, False]
        elif changed:
            txn[1] = txn[1] or txn[0]
            if inside:
                writes += 1
                commits += not txn[0]
                kinds[statement_kind(sql)] += 1
        if inside:
            statements += 1
            unknown += changed is None
    per = max(answers, 1)
    return {
        "answers": answers,
        "statements": statements / per,
        "writes": writes / per,
        "commits": commits / per,
        "empty_transactions": empty / per,
        "unresolved": unknown,
        "kinds": {kind: count / per for kind, count in kinds.most_common()},
    }


def state_tables(path: Path) -> dict[str, int]:
    """Rows per table in the child's state file, opened read-only after it exited (which schema ran)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [
            r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        ]
        return {name: int(db.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0]) for name in sorted(names)}
    finally:
        db.close()


# --- pooling the slices ------------------------------------------------------------------------------


def pooled(levels: list[tuple[Level, int]]) -> dict[str, Any]:
    """Every slice's answers as one distribution; each slice's p50, CPU and load beside it."""
    slices = [level for level, _ in levels]
    pool = Level(slices[0].concurrency, slices[0].latency, [s for r in slices for s in r.samples], slices[0].window)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    return {
        "slices": len(slices),
        "answered": len(pool.answered),
        "lost": pool.lost,
        "overhead_p50": pool.overhead(50),
        "overhead_p99": pool.overhead(99),
        "inbound_p50": pool.inbound(50),
        "outbound_p50": pool.outbound(50),
        "ack_p99": pool.ack(99),
        "slice_p50": [r.overhead(50) for r in slices],
        "slice_other": [r.cpu["other"] for r in slices],
        "throughput": mean([r.throughput for r in slices]),
        "cpu_per_answer": mean([r.cpu["sut"] / r.throughput for r in slices]),
        "cpu_sut": mean([r.cpu["sut"] for r in slices]),
        "cpu_harness": mean([r.cpu["harness"] for r in slices]),
        "cpu_other": mean([r.cpu["other"] for r in slices]),
        "load": [r.cpu["load"] for r in slices],
        "errors": levels[-1][1],  # the process's ERROR lines so far, after its last slice
    }


# --- the part ---------------------------------------------------------------------------------------


async def durability_cost(
    sizes: Sizes, *, platforms: tuple[str, ...] = ("slack", "discord"), before: str = BEFORE, after: str | None = None
) -> dict[str, Any]:
    """(6) Both trees side by side in alternating slices, then a traced round each.

    The slices go before, after, after, before, ...
    """
    result: dict[str, Any] = {
        "concurrency": sizes.dur_concurrency, "latency": sizes.latency, "slice": sizes.dur_slice, "platforms": {},
    }
    with _tree(before) as before_tree, _tree(after) as after_tree:
        codes = (Code("before", describe(before), before_tree), Code("after", describe(after), after_tree))
        result |= {"before": codes[0].revision, "after": codes[1].revision}
        for platform in platforms:
            timed, waits = await _timed(platform, codes, sizes)
            store = {code.label: await _count_round(platform, code, sizes) for code in codes}
            result["platforms"][platform] = _judged(timed, waits) | {"store": store}
    return result


def _judged(timed: dict[str, list[tuple[Level, int]]], waits: list[float]) -> dict[str, Any]:
    """Pooled figures over the quiet pairs when there are enough of them, else over every pair (no verdict)."""
    pairs = list(zip(timed["before"], timed["after"], strict=False))
    quiet = [i for i, (b, a) in enumerate(pairs) if _quiet(b[0], a[0])]
    used = quiet if len(quiet) >= MIN_QUIET else list(range(len(pairs)))
    return {
        "pairs": len(pairs),
        "quiet_pairs": quiet,
        "verdict": len(quiet) >= MIN_QUIET,
        "waited": waits,
        "timed": {
            label: pooled([levels[i] for i in used]) | {"errors": levels[-1][1]} for label, levels in timed.items()
        },
        "every_pair": {label: pooled(levels) for label, levels in timed.items()},
    }
