"""An httpx transport made of several small connection pools, so that each request's pool bookkeeping stays small."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable

import httpx

# Connections per pool. httpcore's pool walks its connections on every request and every
# release, and for each idle one counts the idle ones again (connections squared): 4,800
# connection checks per answer with 50 requests in flight in one pool, 16 at most in one of 4.
POOL_SIZE = 4


class ShardedTransport(httpx.AsyncBaseTransport):
    """`connections` HTTP/1.1 connections in pools of POOL_SIZE; a request goes to the least busy pool.

    The caller keeps at most `connections` requests in flight (InsiteChatClient's semaphore):
    then a pool always has a free connection for the request sent to it, and httpcore never
    queues one. A request counts as busy until its response is closed (its body read).
    """

    def __init__(self, connections: int, *, keepalive_expiry: float = 5.0) -> None:
        count = max(1, -(-connections // POOL_SIZE))
        limits = httpx.Limits(
            max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE, keepalive_expiry=keepalive_expiry
        )
        # One TLS context for every pool: building one loads the CA bundle (milliseconds each).
        context: ssl.SSLContext = httpx.create_ssl_context()
        self._pools = [httpx.AsyncHTTPTransport(verify=context, limits=limits) for _ in range(count)]
        self._busy = [0] * count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        busy = self._busy
        index = busy.index(min(busy))
        busy[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            busy[index] -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_ReleasingStream(response.stream, lambda: self._release(index)),
            extensions=response.extensions,
        )

    def _release(self, index: int) -> None:
        self._busy[index] -= 1

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that tells its pool when it is closed (once)."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()
