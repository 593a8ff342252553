"""One Redis connection that every caller in a process shares: commands pipelined, replies matched in order.

redis-py gives each command a pooled connection of its own for its round trip; its client CPU
(pool, retries, observability hooks, a task per timed write) was 0.13-0.18 ms per command here,
most of what the Redis store cost over SQLite (bench/REPLICAS.md). This sends each command at
once on one socket and resolves the callers' futures from the replies as they come, in order
(Redis answers every connection's commands in the order sent), parsed by hiredis: 0.01-0.04 ms
per command. redis-py still reads the URL (`redis://`, `rediss://` and its TLS options,
`unix://`, user and password, db), so the URLs mean what they meant before.

A caller that is cancelled leaves its command on the wire; its reply is read and dropped, so the
replies of the others stay in step (which redis-py can get wrong: redis/redis-py#2028). A command
unanswered after its timeout fails with TimeoutError, and with it every command still on the
wire, and the connection is dropped; the next command connects again. Errors are redis-py's own
exception types (ResponseError, ConnectionError, TimeoutError), so callers catch RedisError.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | int | float | bytes


@dataclass(frozen=True)
class Script:
    """A Lua script run by its SHA1 (EVALSHA); sent whole once when Redis does not know it yet."""

    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())


@dataclass
class _Sent:
    reply: asyncio.Future[Any]
    deadline: float  # loop time by which its reply must have come


class _Protocol(asyncio.Protocol):
    """The socket's side: replies parsed as they arrive, each handed to the oldest command waiting."""

    def __init__(self, encoding: str | None) -> None:
        self.transport: asyncio.Transport | None = None
        self.sent: deque[_Sent] = deque()
        self.lost: BaseException | None = None
        self._reader = hiredis.Reader(replyError=ResponseError, encoding=encoding) if encoding else hiredis.Reader(
            replyError=ResponseError
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self.sent:  # nothing asked for it: the stream is out of step, never trust it again
                self.fail(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            waiting = self.sent.popleft().reply
            if waiting.done():
                continue  # its caller was cancelled: read and dropped, the others stay in step
            if isinstance(reply, ResponseError):
                waiting.set_exception(reply)
            else:
                waiting.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"the connection to Redis was lost ({exc or 'closed by Redis'})"))

    def fail(self, exc: BaseException) -> None:
        """Every command still on the wire fails; the connection is not used again."""
        if self.lost is None:
            self.lost = exc
        while self.sent:
            waiting = self.sent.popleft().reply
            if not waiting.done():
                waiting.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class Wire:
    """The shared connection. Connects lazily, on the first command, and again after a failure."""

    def __init__(self, url: str, *, timeout: float, decode: bool = True) -> None:
        options = parse_url(url)  # ValueError for a URL redis-py would not take either
        self._timeout = timeout
        self._encoding = "utf-8" if decode else None
        self._path: str | None = None
        self._host, self._port = str(options.get("host", "localhost")), int(options.get("port", 6379))
        self._ssl: ssl.SSLContext | None = None
        kind = options.pop("connection_class", None)
        if kind is UnixDomainSocketConnection:
            self._path = str(options["path"])
        elif kind is SSLConnection:
            ssl_options: dict[str, Any] = {name: value for name, value in options.items() if name.startswith("ssl_")}
            # redis-py turns its ssl_* URL options into a context: the same options mean the same here.
            self._ssl = SSLConnection(host=self._host, **ssl_options).ssl_context.get()
        self._hello: list[tuple[Arg, ...]] = []
        if options.get("password") is not None:
            user = options.get("username")
            self._hello.append(("AUTH", user, options["password"]) if user else ("AUTH", options["password"]))
        if int(options.get("db", 0) or 0):
            self._hello.append(("SELECT", int(options["db"])))
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # --- commands ---------------------------------------------------------------------------

    async def call(self, *args: Arg) -> Any:
        """One command; its reply (str when decoding, None for nil, lists for arrays)."""
        return await self._send([args])

    async def transaction(self, commands: Sequence[tuple[Arg, ...]]) -> list[Any]:
        """MULTI, the commands, EXEC, in one write: the commands' replies, one atomic step."""
        replies = await self._send([("MULTI",), *commands, ("EXEC",)])
        if replies is None:
            raise ResponseError("the transaction was aborted")
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return list(replies)

    async def run(self, script: Script, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        """EVALSHA; EVAL (which caches it) when Redis does not know the script (a restart, SCRIPT FLUSH)."""
        try:
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.call("EVAL", script.text, len(keys), *keys, *args)

    async def _send(self, commands: list[tuple[Arg, ...]]) -> Any:
        if self._closed:
            raise RedisConnectionError("the Redis connection is closed")
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connected()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        packed = b"".join(hiredis.pack_command(command) for command in commands)  # type: ignore[arg-type]
        replies = [loop.create_future() for _ in commands]
        for reply in replies:
            protocol.sent.append(_Sent(reply, deadline))
        assert protocol.transport is not None
        protocol.transport.write(packed)
        self._watch(loop, deadline)
        if len(replies) == 1:
            return await replies[0]
        try:
            # A transaction's queued answers (+OK, +QUEUED) come first; EXEC's reply holds the results.
            await asyncio.gather(*replies[:-1])
        except ResponseError:
            await asyncio.gather(replies[-1], return_exceptions=True)
            raise
        return await replies[-1]

    # --- the connection ---------------------------------------------------------------------

    async def _connected(self) -> _Protocol:
        """One connect at a time: callers that arrive meanwhile wait for the same one."""
        connecting = self._connecting
        if connecting is None or connecting.done():
            connecting = self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(connecting)
        finally:
            failed = connecting.done() and (connecting.cancelled() or connecting.exception() is not None)
            if failed and self._connecting is connecting:
                self._connecting = None  # the next command tries again

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        where = self._path or f"{self._host}:{self._port}"
        try:
            async with asyncio.timeout(self._timeout):
                if self._path is not None:
                    _, protocol = await loop.create_unix_connection(lambda: _Protocol(self._encoding), self._path)
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(self._encoding), self._host, self._port, ssl=self._ssl
                    )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis at {where}: {exc or type(exc).__name__}") from None
        self._protocol = protocol
        for command in self._hello:
            try:
                await self.call(*command)
            except ResponseError:
                protocol.fail(RedisConnectionError("Redis refused the connection's AUTH or SELECT"))
                self._protocol = None
                raise
        return protocol

    def _watch(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check)

    def _check(self) -> None:
        """A command past its deadline: Redis (or the way to it) hangs; fail what is on the wire."""
        self._timer = None
        protocol = self._protocol
        if protocol is None or not protocol.sent:
            return
        loop = asyncio.get_running_loop()
        first = min(sent.deadline for sent in protocol.sent)
        if first <= loop.time():
            protocol.fail(RedisTimeoutError(f"Redis did not answer within {self._timeout:g} s (timeout)"))
            self._protocol = None
        else:
            self._timer = loop.call_at(first, self._check)

    @property
    def connected(self) -> bool:
        """A connection is open (the next command needs no connect)."""
        return self._protocol is not None and self._protocol.lost is None

    @property
    def busy(self) -> int:
        """Commands on the wire whose replies are still to come."""
        return len(self._protocol.sent) if self._protocol is not None else 0

    async def aclose(self) -> None:
        """Waits (up to the timeout) for the replies still on their way, then closes the socket."""
        if self._closed:
            return
        protocol = self._protocol
        if protocol is not None and protocol.sent and protocol.lost is None:
            # Replies come in order: once a PING sent now is answered, so is everything sent before it.
            with contextlib.suppress(RedisError):
                await self.call("PING")
        self._closed = True
        protocol = self._protocol
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        self._protocol = None
