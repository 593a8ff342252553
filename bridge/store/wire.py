"""One Redis connection that every caller in a process shares: commands pipelined, replies matched in order.

redis-py's client gives each command a pooled connection of its own for its round trip; its client
CPU (pool get/release, retry wrappers, observability hooks, a task per timed write) was 0.10-0.18
ms per command here, most of what the Redis store cost over SQLite. This costs 0.02-0.04 ms with
hiredis, 0.04-0.06 ms without (`python -m bench.wire`, bench/REPLICAS.md). It keeps redis-py's
connection layer and drops only that per-command machinery: one
`redis.asyncio.connection.Connection` (or `SSLConnection`, `UnixDomainSocketConnection`, as the
URL says, read by its `parse_url`; the pools' own options such as max_connections are dropped) per
`Wire`, so redis-py connects, does the handshake (AUTH, SELECT, CLIENT SETINFO), TLS, packs the
commands and parses the replies (hiredis when it is installed, the `fast` extra; else its own
Python parser). What is ours is the pipelining: every caller writes its command at once, and one
reader task per connection hands the replies to the callers' futures in order (Redis answers a
connection's commands in the order sent).

What this relies on in redis-py (8.1, redis/asyncio/connection.py), and forces for it:
- `send_packed_command(check_health=False)` on a connected `Connection` with `socket_timeout=None`
  writes the whole command (`StreamWriter.writelines`) before its first await (`drain`), so two
  callers' bytes never interleave and the order of writes is the order of the futures queued
  just before. With a socket timeout it would write from a task of its own (`wait_for`), and
  when not connected it would connect by itself: so `socket_timeout` is None (this timeout plays
  its part, below) and a command is only written on a connection known to be open. Many callers
  may wait in `drain` at once when the send buffer is full (Python 3.11's StreamWriter allows it).
- `read_response()` is called by the one reader task only, never by callers. An error reply
  comes back as a raised ResponseError with the connection left open; anything else it raises
  (ConnectionError, a closed socket) it raises after closing the connection itself.
- `health_check_interval` is 0 (its PING would be a reply nobody asked for), `retry` is none
  (one connect per attempt; the next command tries again), `protocol` is 2 (RESP2: HGETALL and
  CONFIG GET are flat lists, as the store reads them), whatever the URL says.

A caller that is cancelled leaves its command on the wire; its reply is read and dropped, so the
replies of the others stay in step (which redis-py can get wrong: redis/redis-py#2028). (One
exception: cancelled while redis-py waits for the socket to drain, which only a send buffer
already full makes it do, redis-py closes the connection; everything on it fails as below.) A
command unanswered after its timeout fails with TimeoutError, and with it every command still on
the wire, and the connection is dropped; the next command connects again. Errors are redis-py's
own exception types (ResponseError, ConnectionError, TimeoutError), so callers catch RedisError.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

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


class _Session:
    """One open connection of redis-py's, the commands on it, and the one task reading their replies."""

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn
        self.sent: deque[_Sent] = deque()
        self.lost: BaseException | None = None
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def usable(self) -> bool:
        return self.lost is None and bool(self.conn.is_connected)

    async def _read(self) -> None:
        conn, sent = self.conn, self.sent
        try:
            while True:
                try:
                    reply: Any = await conn.read_response()
                except ResponseError as exc:  # an error reply: that command failed, the connection is fine
                    reply = exc
                if not sent:  # nothing asked for it: the stream is out of step, never trust it again
                    self.fail(RedisConnectionError("Redis sent a reply nobody asked for"))
                    return
                waiting = sent.popleft().reply
                if waiting.done():
                    continue  # its caller was cancelled: read and dropped, the others stay in step
                if isinstance(reply, ResponseError):
                    waiting.set_exception(reply)
                else:
                    waiting.set_result(reply)
        except Exception as exc:  # redis-py closed the connection already (Redis closed it, a bad reply)
            self.fail(exc if isinstance(exc, RedisError) else RedisConnectionError(f"Redis connection lost ({exc})"))
        finally:  # cancelled by fail() (a timeout, aclose), or redis-py left it open: closed here
            if conn.is_connected:
                await conn.disconnect(nowait=True)

    def fail(self, exc: BaseException) -> None:
        """Every command still on the wire fails; the connection is closed and not used again."""
        if self.lost is None:
            self.lost = exc
        while self.sent:
            waiting = self.sent.popleft().reply
            if not waiting.done():
                waiting.set_exception(exc)
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()  # its read_response closes the socket as it is cancelled

    async def close(self) -> None:
        self.fail(RedisConnectionError("the Redis connection is closed"))
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.conn.disconnect(nowait=True)


class Wire:
    """The shared connection. Connects lazily, on the first command, and again after a failure."""

    def __init__(self, url: str, *, timeout: float, decode: bool = True) -> None:
        # redis-py reads the URL (redis://, rediss:// and its ssl_* options, unix://, user and password,
        # db), so the URLs mean what they mean for redis-py; a URL it would not take is a ValueError.
        options: dict[str, Any] = dict(parse_url(url))
        self._kind: type[AbstractConnection] = options.pop("connection_class", Connection)
        for pooled in ("max_connections", "timeout"):  # the pool's options (redis-py's pools), none of ours
            options.pop(pooled, None)
        self._options: dict[str, Any] = {
            **options,
            "socket_timeout": None,  # see the module docstring: the deadline below, not a task per write
            "socket_connect_timeout": timeout,
            "health_check_interval": 0,
            "retry": Retry(NoBackoff(), 0),
            "retry_on_timeout": False,
            "protocol": 2,
            "decode_responses": decode,
        }
        try:
            self._kind(**self._options)  # an option no connection takes fails here, not at the first command
        except TypeError as exc:
            raise ValueError(f"the Redis URL has an option redis-py's connection does not take: {exc}") from None
        self._timeout = timeout
        options = self._options
        self._where = str(options.get("path") or f"{options.get('host', 'localhost')}:{options.get('port', 6379)}")
        self._session: _Session | None = None
        self._connecting: asyncio.Task[_Session] | None = None
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
        except NoScriptError:  # redis-py's class for a NOSCRIPT reply
            pass
        return await self.call("EVAL", script.text, len(keys), *keys, *args)

    async def _send(self, commands: list[tuple[Arg, ...]]) -> Any:
        if self._closed:
            raise RedisConnectionError("the Redis connection is closed")
        session = self._session
        if session is None or not session.usable:
            session = await self._connected()
            if not session.usable:  # lost again while this caller waited for the connect
                raise session.lost or RedisConnectionError("the connection to Redis was lost")
        conn = session.conn
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        packed = conn.pack_command(*commands[0]) if len(commands) == 1 else conn.pack_commands(commands)
        replies = [loop.create_future() for _ in commands]
        for reply in replies:
            session.sent.append(_Sent(reply, deadline))
        self._watch(loop, deadline)
        try:
            # Written before this awaits anything (the module docstring): in the order of the futures.
            await conn.send_packed_command(packed, check_health=False)
        except BaseException as exc:
            # redis-py closed the connection (the bytes may be half written): everything on it fails.
            session.fail(exc if isinstance(exc, RedisError) else RedisConnectionError("the Redis connection closed"))
            for reply in replies:
                if reply.done() and not reply.cancelled():
                    reply.exception()  # retrieved: this caller raises its own error below
            raise
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

    async def _connected(self) -> _Session:
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

    async def _connect(self) -> _Session:
        if self._session is not None:
            self._session.fail(RedisConnectionError("the connection to Redis was lost"))
            self._session = None
        conn = self._kind(**self._options)
        try:
            # redis-py's connect: the socket (TLS), then AUTH, CLIENT SETINFO and SELECT; the whole of
            # it within the timeout, as its handshake replies are read without one (socket_timeout).
            async with asyncio.timeout(self._timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise RedisTimeoutError(
                f"cannot connect to Redis at {self._where}: no answer within {self._timeout:g} s (timeout)"
            ) from None
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        session = self._session = _Session(conn)
        session.start()
        return session

    def _watch(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check)

    def _check(self) -> None:
        """A command past its deadline: Redis (or the way to it) hangs; fail what is on the wire."""
        self._timer = None
        session = self._session
        if session is None or not session.sent:
            return
        loop = asyncio.get_running_loop()
        first = min(sent.deadline for sent in session.sent)
        if first <= loop.time():
            session.fail(RedisTimeoutError(f"Redis did not answer within {self._timeout:g} s (timeout)"))
            self._session = None
        else:
            self._timer = loop.call_at(first, self._check)

    @property
    def connected(self) -> bool:
        """A connection is open (the next command needs no connect)."""
        return self._session is not None and self._session.usable

    @property
    def busy(self) -> int:
        """Commands on the wire whose replies are still to come."""
        return len(self._session.sent) if self._session is not None else 0

    async def aclose(self) -> None:
        """Waits (up to the timeout) for the replies still on their way, then closes the socket."""
        if self._closed:
            return
        session = self._session
        if session is not None and session.sent and session.usable:
            # Replies come in order: once a PING sent now is answered, so is everything sent before it.
            with contextlib.suppress(RedisError):
                await self.call("PING")
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        session, self._session = self._session, None
        if session is not None:
            await session.close()
