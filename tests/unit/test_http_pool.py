"""The aiohttp transport under httpx on loopback sockets: in flight, reuse, bodies, what each failure means."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from bridge.http_pool import AiohttpTransport


class HoldingServer:
    """A loopback server that holds every request until told, remembering the client ports it saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0
        self.peers: set[int] = set()
        self.url = ""
        self.seen: list[tuple[str, dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peers.add(peer[1])
        self.seen.append((request.method, dict(request.headers), await request.read()))
        self.waiting += 1
        await self.release.wait()
        self.waiting -= 1
        return web.json_response({"ok": True})


@pytest.fixture
async def server() -> AsyncIterator[HoldingServer]:
    holding = HoldingServer()
    app = web.Application()
    app.router.add_post("/chat", holding.handle)
    app.router.add_get("/gzip", gzipped)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    holding.url = f"http://127.0.0.1:{port}/chat"
    yield holding
    await runner.cleanup()


async def gzipped(request: web.Request) -> web.Response:
    body = gzip.compress(json.dumps({"text": "é" * 100}).encode())
    return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})


async def until(condition: object, what: str) -> None:
    for _ in range(500):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


async def test_requests_up_to_the_cap_are_all_in_flight_at_once_and_connections_are_reused(
    server: HoldingServer,
) -> None:
    cap = 12
    async with httpx.AsyncClient(transport=AiohttpTransport(cap)) as client:
        for round_ in range(2):
            server.release.clear()
            calls = [asyncio.create_task(client.post(server.url, json={"n": i})) for i in range(cap)]
            await until(lambda: server.waiting == cap, f"round {round_}: only {server.waiting} of {cap} arrived")
            server.release.set()
            responses = await asyncio.gather(*calls)
            assert [r.json() for r in responses] == [{"ok": True}] * cap
            # The second round reuses the first round's connections.
            assert len(server.peers) == cap


async def test_the_request_goes_out_as_httpx_built_it_and_a_gzipped_body_is_decoded(server: HoldingServer) -> None:
    server.release.set()
    async with httpx.AsyncClient(transport=AiohttpTransport(2), headers={"Authorization": "Bearer k"}) as client:
        response = await client.post(server.url, json={"message": "hi"})
        assert response.status_code == 200 and response.reason_phrase == "OK"
        method, headers, body = server.seen[0]
        assert method == "POST" and json.loads(body) == {"message": "hi"}
        assert headers["Authorization"] == "Bearer k" and headers["Content-Type"] == "application/json"
        zipped = await client.get(server.url.replace("/chat", "/gzip"))
        assert zipped.json() == {"text": "é" * 100}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_refused_connection_is_a_connect_error_which_says_nothing_was_sent() -> None:
    async with httpx.AsyncClient(transport=AiohttpTransport(2)) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"http://127.0.0.1:{closed_port()}/chat", json={})


@pytest.fixture
async def hanging_up() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A raw server that reads a whole request, then closes the connection without an answer."""
    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        requests.append(head + await reader.readexactly(length))
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/chat", requests
    listener.close()
    await listener.wait_closed()


async def test_a_server_that_hangs_up_after_the_request_is_not_a_connect_error(
    hanging_up: tuple[str, list[bytes]],
) -> None:
    # The request arrived: a failure that says "never sent" would have a chat question asked twice.
    url, requests = hanging_up
    async with httpx.AsyncClient(transport=AiohttpTransport(2)) as client:
        with pytest.raises(httpx.TransportError) as caught:
            await client.post(url, json={"message": "hi"})
    assert not isinstance(caught.value, (httpx.ConnectError, httpx.ConnectTimeout))
    assert len(requests) == 1 and requests[0].endswith(b'{"message":"hi"}')


async def test_an_answer_that_does_not_come_is_a_read_timeout() -> None:
    held = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        await held.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/chat", hold)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/chat"
        async with httpx.AsyncClient(transport=AiohttpTransport(2), timeout=0.05) as client:  # a real 50 ms wait
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url, json={})
    finally:
        held.set()
        await runner.cleanup()
