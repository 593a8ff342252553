"""The sharded httpx transport: every request below its cap goes out at once, and pools are reused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from bridge.http_pool import POOL_SIZE, ShardedTransport


class HoldingServer:
    """A loopback server that holds every request until told, remembering the client ports it saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0
        self.peers: set[int] = set()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peers.add(peer[1])
        self.waiting += 1
        await self.release.wait()
        self.waiting -= 1
        return web.json_response({"ok": True})


@pytest.fixture
async def server() -> AsyncIterator[HoldingServer]:
    holding = HoldingServer()
    app = web.Application()
    app.router.add_post("/chat", holding.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    holding.url = f"http://127.0.0.1:{port}/chat"
    yield holding
    await runner.cleanup()


async def until(condition: object, what: str) -> None:
    for _ in range(500):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


async def test_requests_up_to_the_cap_are_all_in_flight_at_once_and_connections_are_reused(
    server: HoldingServer,
) -> None:
    cap = 3 * POOL_SIZE
    async with httpx.AsyncClient(transport=ShardedTransport(cap)) as client:
        for round_ in range(2):
            server.release.clear()
            calls = [asyncio.create_task(client.post(server.url, json={"n": i})) for i in range(cap)]
            # None waits in a pool's queue: each pool got no more than its connections.
            await until(lambda: server.waiting == cap, f"round {round_}: only {server.waiting} of {cap} arrived")
            server.release.set()
            responses = await asyncio.gather(*calls)
            assert [r.json() for r in responses] == [{"ok": True}] * cap
            # The second round reuses the first round's connections: every pool's count went back to 0.
            assert len(server.peers) == cap
