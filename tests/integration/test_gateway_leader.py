"""One Discord gateway among replicas: the Redis lease, and DiscordAdapters that follow it.

Real discord.py, FakeDiscord, real Redis.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import redis.asyncio as redis_asyncio

from adapters.discord import DiscordAdapter, DiscordRefused
from bridge import config
from bridge.app import BridgeApp
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from bridge.leader import RedisLease
from bridge.store.wire import Wire
from bridge.messages import Conversation, Delivery, Inbound, Outbound
from tests.conftest import _answers_ping, _no_redis, free_port
from tests.fakes import discord_api as fd
from tests.fakes.discord_api import FakeDiscord

LEASE = 0.6  # seconds: short, so an expiry is seen quickly
GATEWAY_LEASE = 1.0  # the adapters' lease: a takeover within it, one standby poll and an IDENTIFY
BOT = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"


# --- Redis: REDIS_URL when set, else a redis-server of our own ---------------------------------


class RedisServer:
    """redis-server on a free loopback port, nothing on disk; stopped by its PID."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            _no_redis("no redis-server on PATH for the gateway lease tests (they pause their own server)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not _answers_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                _no_redis("redis-server did not answer PING within 5 s")
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
        _no_redis(f"Redis at {redis_url} does not answer: {exc}")
    yield client
    await client.aclose()


@pytest.fixture
def key(redis: Any) -> Iterator[str]:
    """A lease key no other test (or run) shares."""
    yield f"test-bridge:{uuid.uuid4().hex}:discord-gateway"


Leases = Callable[..., Awaitable[RedisLease]]


@pytest.fixture
async def leases(redis_url: str, redis: Any, key: str) -> AsyncIterator[Leases]:
    """Starts leases on one key; stops (and releases) every one at the end, and removes the key."""
    made: list[RedisLease] = []
    wire = Wire(redis_url, timeout=5.0)  # the leases' connection; `redis` inspects

    async def start(name: str, **kw: Any) -> RedisLease:
        lease = RedisLease(wire, kw.pop("key", key), name=name, lease=kw.pop("lease", LEASE), **kw)
        made.append(lease)
        await lease.start()
        return lease

    yield start
    for lease in made:
        await lease.stop()
    await wire.aclose()
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


async def test_a_standby_stopped_as_its_poll_is_answered_still_stops(redis_url: str, key: str) -> None:
    # stop() cancels the polling task. A cancel that came as Redis's reply did was dropped by
    # Python 3.11's wait_for (it returns the finished result): the standby polled on, and
    # took the lease once it was free, while its stop() waited forever (a replica hanging at SIGTERM).
    wire = Wire(redis_url, timeout=5.0)
    holder = RedisLease(wire, key, name="host-a:1", lease=30.0)
    await holder.start()
    stops_that_hung = 0
    try:
        for attempt in range(200):
            standby = RedisLease(wire, key, name=f"host-b:{attempt}", lease=30.0, retry_every=0.0)  # back to back
            await standby.start()
            await asyncio.sleep(0.0005 * (attempt % 7))  # at different points of its round trips
            stopping = asyncio.ensure_future(standby.stop())
            done, _ = await asyncio.wait({stopping}, timeout=2)
            if not done:
                stops_that_hung += 1
                stopping.cancel()
    finally:
        for task in asyncio.all_tasks():  # the polls whose stop hung (the tasks are named by the key)
            if task.get_name() == f"lease-{key}":
                task.cancel()
        await holder.stop()
        await wire.aclose()
    assert stops_that_hung == 0


async def test_a_lease_from_a_url_closes_its_own_client(redis_url: str, redis: Any, key: str) -> None:
    lease = RedisLease.from_url(redis_url, key, name="host-a:1", lease=LEASE)
    await lease.start()
    assert lease.is_leader
    await lease.stop()
    await lease.stop()  # twice: safe
    assert await redis.exists(key) == 0


async def test_the_holder_steps_down_when_redis_stops_answering() -> None:
    server = RedisServer()  # our own: this test freezes it
    client = Wire(server.url, timeout=5.0)
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
    client = Wire(f"redis://127.0.0.1:{free_port()}/0", timeout=5.0)  # nobody listens there
    lease = RedisLease(client, "test-bridge:nowhere", name="host-a:1", lease=1.0)
    try:
        await lease.start()
        assert not lease.is_leader and lease.holder() is None
        assert "ConnectionError" in lease.error
    finally:
        await lease.stop()
        await client.aclose()


# --- DiscordAdapters following the lease: two "replicas" in one process, one FakeDiscord ---------


@pytest.fixture(autouse=True)
def fast_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DiscordAdapter, "guild_ready_timeout", 0.1)
    monkeypatch.setattr(DiscordAdapter, "start_timeout", 10.0)


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with fd.running_fake() as discord_fake:
        yield discord_fake


def settings() -> config.Settings:
    return config.loads(
        f"""
insitechat: {{base_url: "http://127.0.0.1:9", api_key: "${{KEY}}"}}
discord: {{token: "${{DISCORD_TOKEN}}"}}
routes:
  - {{platform: discord, chatbot: {BOT}, reply: mention}}
""",
        env={"KEY": "unused", "DISCORD_TOKEN": fd.TOKEN},
    )


class Replica:
    """One replica's Discord half: its own lease object and its own discord.py clients."""

    def __init__(self, lease: RedisLease) -> None:
        self.lease = lease
        self.heard: list[Inbound] = []
        self.adapter = DiscordAdapter(settings().discord, self._on_message, leadership=lease)

    async def _on_message(self, inbound: Inbound) -> None:
        self.heard.append(inbound)


Replicas = Callable[..., Awaitable[Replica]]


@pytest.fixture
async def replicas(leases: Leases, fake: FakeDiscord) -> AsyncIterator[Replicas]:
    made: list[Replica] = []

    async def start(name: str, **kw: Any) -> Replica:
        replica = Replica(await leases(name, lease=kw.pop("lease", GATEWAY_LEASE), **kw))
        made.append(replica)
        await replica.adapter.start()
        return replica

    yield start
    for replica in made:
        await replica.adapter.stop()


def bridge_settings(emulator_url: str, state: Path) -> config.Settings:
    return config.loads(
        f"""
insitechat: {{base_url: "{emulator_url}", api_key: "${{KEY}}"}}
state: {{sqlite: "{state}"}}
server: {{listen: "127.0.0.1:0"}}
discord: {{token: "${{DISCORD_TOKEN}}"}}
routes:
  - {{platform: discord, chatbot: {SANDBOX_CHATBOT_ID}, reply: mention}}
""",
        env={"KEY": SANDBOX_KEY, "DISCORD_TOKEN": fd.TOKEN},
    )


def general() -> Conversation:
    return Conversation("discord", str(fd.GUILD_ID), str(fd.GENERAL))


CARD = {"content": "", "embed": {"title": "A visitor asked for a human", "description": "[Open](https://insitechat.ai/x)"}}


async def test_only_the_lease_holder_opens_a_gateway_and_every_replica_posts(
    replicas: Replicas, fake: FakeDiscord
) -> None:
    a = await replicas("host-a:1")
    b = await replicas("host-b:2")
    assert a.lease.is_leader and not b.lease.is_leader
    assert len(fake.identifies) == 1 and fake.open_sessions() == 1
    assert a.adapter.client is not None and b.adapter.client is None
    assert len(fake.rest("GET", r"/users/@me")) == 3  # a over REST and on the gateway, b over REST only

    question = await fake.user_message(fd.GENERAL, "hello?", mention_bot=True)
    await eventually(lambda: a.heard, what="the holder to hear the mention")
    assert [i.message_id for i in a.heard] == [question["id"]] and b.heard == []

    # Both post: answers and alert cards go over REST from either replica.
    [from_a] = await a.adapter.send(Outbound(general(), ("from a",), delivery=Delivery("answer-a")))
    [from_b] = await b.adapter.send(Outbound(general(), ("from b",), delivery=Delivery("answer-b")))
    card = await b.adapter.post_alert(str(fd.ALERTS), CARD, thread="", broadcast=False, key="alert-1")
    assert await a.adapter.find_alert(str(fd.ALERTS), "alert-1", since=time.time() - 60, thread="") == card
    await a.adapter.update_alert(str(fd.ALERTS), card, CARD | {"embed": CARD["embed"] | {"title": "Claimed"}})
    assert [m["content"] for m in fake.bot_posts(fd.GENERAL)] == ["from a", "from b"]
    assert fake.messages[int(card)]["embeds"][0]["title"] == "Claimed"
    assert {from_a, from_b} <= {m["id"] for m in fake.bot_posts()}
    assert len(fake.identifies) == 1  # posting never needed a second gateway

    assert a.adapter.readiness() == "ok (gateway held here: host-a:1)"
    assert b.adapter.readiness() == "ok (standby; gateway held by host-a:1)"


async def test_the_standby_opens_the_gateway_when_the_holder_dies(replicas: Replicas, fake: FakeDiscord) -> None:
    a = await replicas("host-a:1")
    b = await replicas("host-b:2")
    took_over = asyncio.ensure_future(b.lease.wait_changed())
    died = time.monotonic()
    # A death in one process: renewals stop without a release, and the clients go.
    await a.lease.stop(release=False)
    await a.adapter.stop()
    await asyncio.wait_for(took_over, GATEWAY_LEASE + b.lease.retry_every + 1)
    await eventually(lambda: b.adapter.readiness() == "ok (gateway held here: host-b:2)", what="b's gateway")
    assert time.monotonic() - died <= GATEWAY_LEASE + b.lease.retry_every + 1.0
    assert len(fake.identifies) == 2 and fake.open_sessions() == 1

    await fake.user_message(fd.GENERAL, "anyone there?", mention_bot=True)
    await eventually(lambda: b.heard, what="the new holder to hear the mention")
    await fake.slash("ask", {"question": "and commands?"})
    await eventually(lambda: any(i.is_command for i in b.heard), what="the slash command on the new holder")
    assert a.heard == []


async def test_losing_the_lease_closes_the_gateway_at_once(
    replicas: Replicas, fake: FakeDiscord, redis: Any, key: str
) -> None:
    a = await replicas("host-a:1", renew_every=0.1)
    assert fake.open_sessions() == 1
    # Another replica holds the key now (a paused past its lease, say): a's next renewal is refused.
    await redis.set(key, "host-c:3#ffff", px=30_000)
    await eventually(lambda: fake.open_sessions() == 0, timeout=1.0, what="a to close its gateway")
    assert a.adapter.client is None and a.adapter.readiness() == "ok (standby; gateway held by host-c:3)"
    # Still posts over REST as a standby.
    await a.adapter.send(Outbound(general(), ("still here",), delivery=Delivery("still-here")))
    assert fake.bot_posts(fd.GENERAL)[-1]["content"] == "still here"
    # The key is free again: a takes the lease back and reconnects.
    await redis.delete(key)
    await eventually(
        lambda: a.adapter.readiness() == "ok (gateway held here: host-a:1)", timeout=3, what="a back on the gateway"
    )
    assert len(fake.identifies) == 2 and fake.open_sessions() == 1


async def test_a_slash_command_taken_before_the_lease_moved_on_is_answered_by_its_replica(
    replicas: Replicas, fake: FakeDiscord, redis: Any, key: str
) -> None:
    a = await replicas("host-a:1", renew_every=0.1)
    interaction = await fake.slash("ask", {"question": "will you still answer?"})
    [command] = await eventually(lambda: [i for i in a.heard if i.is_command], what="the command on the holder")
    await redis.set(key, "host-c:3#ffff", px=30_000)
    await eventually(lambda: a.adapter.client is None, timeout=1.0, what="a to close its gateway")
    # The followup rides the REST client's session: the gateway client's closed with it.
    await a.adapter.send(Outbound(command.conversation, ("yes",), reply_to=command.message_id))
    [followup] = fake.rest("POST", rf"/webhooks/{fd.APP_ID}/{interaction['token']}")
    assert followup.json["content"] == "yes"


async def test_a_standby_without_redis_still_posts_and_says_why_it_is_not_on_the_gateway(fake: FakeDiscord) -> None:
    client = Wire(f"redis://127.0.0.1:{free_port()}/0", timeout=5.0)  # nobody listens there
    lease = RedisLease(client, "test-bridge:nowhere", name="host-a:1", lease=GATEWAY_LEASE)
    adapter = DiscordAdapter(settings().discord, lambda inbound: asyncio.sleep(0), leadership=lease)
    try:
        await lease.start()
        await adapter.start()
        assert fake.identifies == []
        assert str(adapter.readiness()).startswith("ok (standby; cannot ask Redis which replica holds the gateway: ")
        await adapter.send(Outbound(general(), ("posted anyway",), delivery=Delivery("posted-anyway")))
        assert fake.bot_posts(fd.GENERAL)[-1]["content"] == "posted anyway"
    finally:
        await adapter.stop()
        await lease.stop()
        await client.aclose()


async def test_a_gateway_the_new_holder_cannot_open_ends_the_connection_for_its_supervisor(
    replicas: Replicas, fake: FakeDiscord
) -> None:
    a = await replicas("host-a:1")
    b = await replicas("host-b:2")
    fake.identify_close_code = 4004  # the token was reset while a held the gateway
    await a.lease.stop(release=False)
    await a.adapter.stop()
    ended = await asyncio.wait_for(b.adapter.wait_ended(), GATEWAY_LEASE + b.lease.retry_every + 3)
    assert isinstance(ended, DiscordRefused) and "bot token" in str(ended)


# --- two bridges -----------------------------------------------------------------------------


async def test_two_bridges_one_gateway_both_ready_and_a_clean_stop_hands_it_over(
    emulator: Emulator, fake: FakeDiscord, redis_url: str, redis: Any, key: str, tmp_path: Path
) -> None:
    wire = Wire(redis_url, timeout=5.0)

    def bridge(name: str) -> BridgeApp:
        lease = RedisLease(wire, key, name=name, lease=GATEWAY_LEASE, retry_every=0.1)
        return BridgeApp(bridge_settings(emulator.base_url, tmp_path / f"{name}.db"), grace=1, gateway_lease=lease)

    async def readyz(app: BridgeApp) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.get(app.server_url + "/readyz") as response:
            return response.status, (await response.json())["parts"]["discord"]

    a, b = bridge("host-a"), bridge("host-b")
    try:
        for app in (a, b):
            await app.start()
            await asyncio.wait_for(app.connected(), 10)
        assert fake.open_sessions() == 1
        assert await readyz(a) == (200, "ok (gateway held here: host-a)")
        assert await readyz(b) == (200, "ok (standby; gateway held by host-a)")
        await a.stop()  # released on the way out: b need not wait for the lease to run out
        await eventually(
            lambda: b.gateway_lease is not None and b.gateway_lease.is_leader, timeout=1, what="b to take the lease"
        )
        await eventually(lambda: fake.open_sessions() == 1 and len(fake.identifies) == 2, timeout=3, what="b's gateway")
        b_discord = next(adapter for adapter in b.adapters if isinstance(adapter, DiscordAdapter))
        await eventually(
            lambda: b_discord.readiness() == "ok (gateway held here: host-b)", what="b ready on the gateway"
        )
        assert await readyz(b) == (200, "ok (gateway held here: host-b)")
    finally:
        for app in (a, b):
            if not app.stopped.is_set():
                await app.stop()
        await wire.aclose()
