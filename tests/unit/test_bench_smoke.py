"""The benchmark harness runs end to end at a tiny size (no timing is asserted: that is bench/'s job)."""

from __future__ import annotations

import subprocess
from dataclasses import replace

from bench import durability, run, webhooks
from bench.common import ROOT
from bench.relay import QUICK, baseline, relay_overhead

TINY = replace(
    QUICK, latency=0.05, levels=(2,), duration={2: 0.3}, warmup=2,
    dur_concurrency=2, dur_pairs=1, dur_max_pairs=1, dur_slice=0.3, dur_patience=0.0, dur_count_duration=0.3,
)


async def test_relay_and_webhook_benchmarks_run_and_render() -> None:
    rows = await relay_overhead("slack", TINY)
    [row] = rows
    assert row["answered"] > 0 and row["lost"] == 0 and row["errors"] == 0
    assert row["inbound_p50"] == row["inbound_p50"]  # every answer was matched to its upstream request (not NaN)

    intake = await webhooks.webhook_intake(count=20, concurrency=4)
    assert intake["bridge"]["accepted"] == 20 and intake["bare"]["accepted"] == 20

    table = run.relay_table(rows, TINY.latency) + run.webhook_table(intake)
    assert "| slack | 2 |" in table and "| bridge |" in table


async def test_socket_mode_pairs_and_the_baselines_run_count_answers_and_render() -> None:
    # Socket Mode: each question is a message + app_mention pair; the bridge must answer it once.
    socket = await relay_overhead("slack", TINY, slack_mode="socket")
    [row] = socket
    assert row["platform"] == "slack (Socket Mode)"
    assert row["answered"] > 0 and row["lost"] == 0 and row["errors"] == 0 and row["doubled"] == 0
    # CPU time is counted in clock ticks (10 ms): a tiny run's share may be 0, never NaN or negative.
    assert 0 <= row["cpu_per_answer"] < float("inf") and row["rss"] > 0 and row["load"] >= 0

    theirs = []
    for kind in ("bolt", "bolt64", "floor", "bolt64_socket"):
        [b] = await baseline(TINY, kind)
        assert b["answered"] > 0 and b["lost"] == 0 and b["errors"] == 0 and b["doubled"] == 0, (kind, b)
        assert 0 <= b["cpu_per_answer"] < float("inf"), (kind, b)
        theirs.append(b)

    table = run.baseline_table(socket, theirs)
    for name in ("bridge, slack (Socket Mode)", "Bolt bot, 64 listener threads", "minimal aiohttp relay"):
        assert f"| {name} | 2 |" in table
    assert "| Bolt bot, 64 listener threads, Socket Mode | 2 |" in table
    assert "FAIL" not in table and not run.doubled_rows({"relay_slack_socket": socket, "baseline": theirs})


def test_a_question_answered_twice_fails_the_bench() -> None:
    row = {"platform": "slack (Socket Mode)", "concurrent": 50, "doubled": 3}
    found = run.doubled_rows({"relay_slack_socket": [row]})
    assert found == ["relay_slack_socket: slack (Socket Mode) at 50: 3 doubled"]
    assert "FAIL: 3 questions answered more than once" in run._doubled(row)


def _bench_worktrees() -> set[str]:
    listing = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if "insitechat-bench-rev-" in line}


async def test_durability_benchmark_runs_both_trees_and_renders() -> None:
    # HEAD as "before": the temporary worktree and the child run from it, without depending on old history.
    trees_before = _bench_worktrees()
    result = await durability.durability_cost(TINY, platforms=("slack",), before="HEAD")
    part = result["platforms"]["slack"]
    for label in ("before", "after"):
        timed, store = part["timed"][label], part["store"][label]
        assert timed["answered"] > 0 and timed["lost"] == 0 and timed["errors"] == 0
        assert store["answers"] > 0 and store["writes"] > 0 and store["commits"] > 0 and store["unresolved"] == 0
    # Removed at the end. Only this run's count: other checkouts of the repository share the list of worktrees.
    assert _bench_worktrees() <= trees_before
    assert "| slack (Socket Mode) | **after - before** |" in run.durability_table(result)


def test_store_cost_counts_writes_and_the_transactions_that_wrote() -> None:
    events = [
        [1.0, 0, "INSERT OR IGNORE INTO jobs (id) VALUES ('a')", 1],
        [1.1, 0, "BEGIN IMMEDIATE", 0],
        [1.2, 0, "INSERT INTO outbox (key) VALUES ('k')", 1],
        [1.3, 0, "UPDATE jobs SET state = 'answered', reply = 'it''s 3' WHERE id = 'a'", 1],
        [1.4, 0, "COMMIT", 0],
        [1.5, 0, "BEGIN IMMEDIATE", 0],
        [1.6, 0, "SELECT 1 FROM outbox", 0],
        [1.7, 0, "COMMIT", 0],
        [1.8, 0, "UPDATE outbox SET started = 1 WHERE id = 99", 0],  # matched no row: no write
        [9.0, 0, "DELETE FROM seen", 4],  # outside the window
    ]
    cost = durability.store_cost(events, (0.0, 2.0), answers=1)
    assert (cost["writes"], cost["commits"], cost["empty_transactions"], cost["statements"]) == (3, 2, 1, 9)
    assert cost["kinds"] == {
        "INSERT OR IGNORE INTO jobs": 1, "INSERT INTO outbox": 1, "UPDATE jobs SET state, reply": 1,
    }
