"""One Discord gateway among replicas: the Redis lease, and DiscordAdapters that follow it (real discord.py, FakeDiscord, real Redis)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

redis_asyncio = pytest.importorskip("redis.asyncio", reason="redis-py is not installed (pip install redis)")

from bridge.leader import RedisLease  # noqa: E402

LEASE = 0.6  # seconds: short, so an expiry is seen quickly


# --- Redis: REDIS_URL when set, else a redis-server of our own ---------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """redis-server on a free loopback port, nothing on disk; stopped by its PID."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("no REDIS_URL and no redis-server on PATH")
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.skip("redis-server did not answer PING within 5 s")
            time.sleep(0.02)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)  # connections stay open, nothing is answered

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisServer()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        await asyncio.wait_for(client.ping(), 2)
    except Exception as exc:
        await client.aclose()
        pytest.skip(f"Redis at {redis_url} does not answer: {exc}")
    yield client
    await client.aclose()


@pytest.fixture
def key(redis: Any) -> Iterator[str]:
    """A lease key no other test (or run) shares."""
    yield f"test-bridge:{uuid.uuid4().hex}:discord-gateway"


Leases = Callable[..., Awaitable[RedisLease]]


@pytest.fixture
async def leases(redis: Any, key: str) -> AsyncIterator[Leases]:
    """Starts leases on one key; stops (and releases) every one at the end, and removes the key."""
    made: list[RedisLease] = []

    async def start(name: str, **kw: Any) -> RedisLease:
        lease = RedisLease(redis, kw.pop("key", key), name=name, lease=kw.pop("lease", LEASE), **kw)
        made.append(lease)
        await lease.start()
        return lease

    yield start
    for lease in made:
        await lease.stop()
    await redis.delete(key)


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --- the lease -------------------------------------------------------------------------------


async def test_the_first_replica_takes_the_lease_with_a_readable_token(leases: Leases, redis: Any, key: str) -> None:
    a = await leases("host-a:1")
    assert a.is_leader and a.holder() == "host-a:1" and a.error == ""
    token = (await redis.get(key)).decode()
    assert token.startswith("host-a:1#")  # who holds it, readable in redis-cli too
    assert 0 < await redis.pttl(key) <= LEASE * 1000


async def test_the_holder_renews_past_its_lease(leases: Leases, redis: Any, key: str) -> None:
    a = await leases("host-a:1")
    await asyncio.sleep(LEASE * 3)
    assert a.is_leader
    assert await redis.pttl(key) > LEASE * 1000 / 3  # renewed every lease/3: never close to running out


async def test_another_replica_is_refused_and_knows_the_holder(leases: Leases) -> None:
    a = await leases("host-a:1")
    b = await leases("host-b:2")
    await asyncio.sleep(LEASE * 2)  # b keeps trying; a keeps renewing
    assert a.is_leader and not b.is_leader
    assert b.holder() == "host-a:1" and b.error == ""


async def test_a_lease_left_to_run_out_goes_to_the_standby(leases: Leases) -> None:
    a = await leases("host-a:1")
    b = await leases("host-b:2")
    changed = asyncio.ensure_future(b.wait_changed())
    started = time.monotonic()
    await a.stop(release=False)  # what a crash leaves: no more renewals, the key stays until PX
    await asyncio.wait_for(changed, LEASE + b.retry_every + 1)
    assert b.is_leader and b.holder() == "host-b:2"
    assert time.monotonic() - started <= LEASE + b.retry_every + 0.5


async def test_a_release_hands_over_at_the_next_poll(leases: Leases, redis: Any, key: str) -> None:
    a = await leases("host-a:1", lease=30.0)
    b = await leases("host-b:2", lease=30.0, retry_every=0.1)
    await a.stop()
    assert not a.is_leader
    await eventually(lambda: b.is_leader, timeout=2, what="the standby to take a released lease")
    assert (await redis.get(key)).decode().startswith("host-b:2#")


async def test_a_release_never_removes_another_holders_lease(leases: Leases, redis: Any, key: str) -> None:
    a = await leases("host-a:1", lease=30.0, renew_every=0.1)
    # The lease went elsewhere without a noticing yet (say a paused past its lease).
    await redis.set(key, "host-c:3#ffff", px=30_000)
    await a.stop()  # compare-and-delete: c's token is not a's
    assert (await redis.get(key)) == b"host-c:3#ffff"


async def test_the_holder_steps_down_when_redis_names_another(leases: Leases, redis: Any, key: str) -> None:
    a = await leases("host-a:1", renew_every=0.1)
    changed = asyncio.ensure_future(a.wait_changed())
    await redis.set(key, "host-c:3#ffff", px=5_000)
    await asyncio.wait_for(changed, 1)
    assert not a.is_leader and a.holder() == "host-c:3"
    assert (await redis.get(key)) == b"host-c:3#ffff"  # the renewal did not extend or take c's lease


async def test_the_holder_steps_down_when_redis_stops_answering() -> None:
    server = RedisServer()  # our own: this test freezes it
    client = redis_asyncio.Redis.from_url(server.url)
    lease = RedisLease(client, "test-bridge:frozen", name="host-a:1", lease=1.0)
    try:
        await lease.start()
        assert lease.is_leader
        changed = asyncio.ensure_future(lease.wait_changed())
        frozen = time.monotonic()
        server.pause()
        await asyncio.wait_for(changed, 2)
        # Given up within the lease counted from the last good renewal, before Redis lets another take it.
        assert not lease.is_leader and time.monotonic() - frozen <= 1.0 + 0.1
        assert lease.error == "Redis did not answer in time"
        server.resume()
        await eventually(lambda: lease.is_leader, timeout=3, what="the lease taken again once Redis answers")
        assert lease.error == ""
    finally:
        server.resume()
        await lease.stop()
        await client.aclose()
        server.stop()


async def test_a_replica_starts_as_a_standby_while_redis_is_unreachable() -> None:
    client = redis_asyncio.Redis.from_url(f"redis://127.0.0.1:{_free_port()}/0")  # nobody listens there
    lease = RedisLease(client, "test-bridge:nowhere", name="host-a:1", lease=1.0)
    try:
        await lease.start()
        assert not lease.is_leader and lease.holder() is None
        assert "ConnectionError" in lease.error
    finally:
        await lease.stop()
        await client.aclose()
