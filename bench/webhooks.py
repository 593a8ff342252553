"""Webhook intake: signed escalations posted as fast as the client can, next to a bare aiohttp handler."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from bench.common import ENV, Child, CpuMeter, free_port, percentile
from bench.harness import BOT, harness
from bridge.emulator import sign_webhook
from bridge.webhooks import SIGNATURE_HEADER


def escalations(count: int, first: int = 0) -> list[tuple[bytes, dict[str, str]]]:
    """Distinct signed `conversation.escalated` envelopes (one visitor each, so none is a duplicate)."""
    stamp = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()
    secret = ENV["BENCH_WEBHOOK_SECRET"]
    bodies = []
    for i in range(first, first + count):
        raw = json.dumps({
            "event": "conversation.escalated", "chatbot_id": BOT, "timestamp": stamp,
            "data": {"session_id": f"visitor-{i}", "conversation_id": f"conv-{i}", "message": "Can I talk to a human?"},
        }).encode()
        bodies.append((raw, {"Content-Type": "application/json", SIGNATURE_HEADER: sign_webhook(raw, secret)}))
    return bodies


async def blast(url: str, bodies: list[tuple[bytes, dict[str, str]]], concurrency: int, pid: int) -> dict[str, Any]:
    """POST every body with `concurrency` keep-alive connections, each sending its next as soon as answered."""
    durations: list[float] = []
    statuses: Counter[int | None] = Counter()
    todo = iter(bodies)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def sender() -> None:
            for raw, headers in todo:
                started = time.monotonic()
                status: int | None = None
                try:
                    async with http.post(url, data=raw, headers=headers) as response:
                        await response.read()
                        status = response.status
                except (TimeoutError, aiohttp.ClientError):
                    pass
                durations.append(time.monotonic() - started)
                statuses[status] += 1

        meter = CpuMeter(pid)
        started = time.monotonic()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        wall = time.monotonic() - started
        cpu = meter.read()
    return {
        "posted": len(bodies),
        "accepted": statuses.get(200, 0),
        "other": {str(k): v for k, v in statuses.items() if k != 200},
        "per_second": statuses.get(200, 0) / wall,
        "ack_p50": percentile(durations, 50),
        "ack_p99": percentile(durations, 99),
        "cpu_sut": cpu["sut"],
        "cpu_harness": cpu["harness"],
        "cpu_other": cpu["other"],
    }


async def webhook_intake(count: int, concurrency: int) -> dict[str, Any]:
    """(4) The bridge (durable SQLite store, alert rule to Slack) vs the bare handler, same client and bodies."""
    async with harness(latency=0.0) as h:
        bridge = h.bridge("webhooks", platforms=("slack",), rate_limit=55, rate_window=60, alerts=True)
        await bridge.start()
        url = f"{bridge.url}/webhooks/insitechat/{BOT}"
        await blast(url, escalations(100, first=10**6), concurrency, bridge.pid)  # warm-up, not measured
        ours = await blast(url, escalations(count), concurrency, bridge.pid)
        await asyncio.sleep(1.0)  # let the outbox worker take what it can before counting
        ours["alerts_posted"] = h.slack.posts_to("CALERTS")
        ours["errors"] = bridge.log_count(" ERROR ")
        await bridge.stop()
        port = free_port()
        bare = Child("bare", ["-m", "bench.bare_handler", str(port)], port, h.tmp / "bare.log")
        h.children.append(bare)
        await bare.start(ready_path=None)
        bare_url = f"{bare.url}/webhooks/insitechat/{BOT}"
        await blast(bare_url, escalations(100, first=10**6), concurrency, bare.pid)
        ceiling = await blast(bare_url, escalations(count), concurrency, bare.pid)
    return {"bridge": ours, "bare": ceiling, "concurrency": concurrency}
