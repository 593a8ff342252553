"""An httpx transport over aiohttp's connection pool: httpx's client and models, aiohttp's cheaper HTTP/1.1 path."""

from __future__ import annotations

import ssl
import urllib.request

import aiohttp
import httpx

# What each aiohttp failure means to httpx, and so to the InsiteChat client's retry rule:
# httpx.ConnectError / ConnectTimeout say no byte of the request left (a POST may be sent
# again); every other failure may come after the request was sent, so it must not be.
# (httpx-aiohttp, the library that does this, maps every ClientConnectionError, a server
# that disconnects mid-answer included, to ConnectTimeout: a chat question would be asked twice.)


def environment_proxy(url: str) -> bool:
    """Whether the environment names a proxy for this URL's scheme (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY).

    httpx applies such a proxy (and NO_PROXY) only on its own transports: a client given a
    transport of its own ignores the environment's proxies without a word.
    """
    proxies = urllib.request.getproxies()
    return bool(proxies.get(httpx.URL(url).scheme) or proxies.get("all"))


class AiohttpTransport(httpx.AsyncBaseTransport):
    """At most `connections` keep-alive HTTP/1.1 connections in one aiohttp pool.

    Why not httpcore: with anyio and h11 it spent about twice the CPU of this transport on
    each InsiteChat request at 50 conversations (bench/README.md, *Profile*), and aiohttp is
    already here for Slack and Discord. The body is read whole before the response is
    returned: InsiteChat's answers are small JSON documents, and the client reads them whole.
    The session is opened on the first request, in the running loop.
    """

    def __init__(self, connections: int, *, keepalive_expiry: float = 5.0) -> None:
        self._connections = connections
        self._keepalive_expiry = keepalive_expiry
        # httpx's own TLS context: its CA bundle (certifi) and SSL_CERT_FILE / SSL_CERT_DIR.
        self._ssl: ssl.SSLContext = httpx.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._connections, limit_per_host=0, keepalive_timeout=self._keepalive_expiry, ssl=self._ssl
        )
        # httpx decodes bodies and keeps (here: no) cookies itself; proxies from the
        # environment are httpx's own mounts, which never reach this transport.
        return aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
        )

    def _timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        wanted = request.extensions.get("timeout", {})
        key = (wanted.get("connect"), wanted.get("read"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            # connect covers the wait for a connection, the DNS lookup and the connect itself.
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(total=None, connect=key[0], sock_read=key[1])
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session
        if session is None or session.closed:
            session = self._session = self._open()
        try:
            async with session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=request.content or None,
                allow_redirects=False,
                timeout=self._timeout(request),
            ) as response:
                body = await response.read()
                status, headers, reason = response.status, response.raw_headers, response.reason
        except aiohttp.ConnectionTimeoutError as exc:  # before aiohttp's ServerTimeoutError: a subclass
            raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        extensions = {"http_version": b"HTTP/1.1", "reason_phrase": (reason or "").encode("ascii", "replace")}
        return httpx.Response(status, headers=headers, content=body, request=request, extensions=extensions)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
