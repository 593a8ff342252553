"""The benchmark harness runs end to end at a tiny size (no timing is asserted: that is bench/'s job)."""

from __future__ import annotations

from dataclasses import replace

from bench import run, webhooks
from bench.relay import QUICK, relay_overhead

TINY = replace(QUICK, latency=0.05, levels=(2,), duration={2: 0.3}, warmup=2)


async def test_relay_and_webhook_benchmarks_run_and_render() -> None:
    rows = await relay_overhead("slack", TINY)
    [row] = rows
    assert row["answered"] > 0 and row["lost"] == 0 and row["errors"] == 0
    assert row["inbound_p50"] == row["inbound_p50"]  # every answer was matched to its upstream request (not NaN)

    intake = await webhooks.webhook_intake(count=20, concurrency=4)
    assert intake["bridge"]["accepted"] == 20 and intake["bare"]["accepted"] == 20

    table = run.relay_table(rows, TINY.latency) + run.webhook_table(intake)
    assert "| slack | 2 |" in table and "| bridge |" in table
