"""One InsiteChat budget per key shared by replicas through a real Redis.

The window holds, queues stay fair, dead replicas expire.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


from redis.asyncio import Redis

from bridge.app import build_clients
from bridge.budget import RedisWindow, key_base
from bridge.clock import ManualClock
from bridge.emulator import SANDBOX_KEY, Emulator
from bridge.insitechat import InsiteChatClient, Unavailable
from bridge.limiter import SlidingWindowLimiter
from bridge.relay import NOTICES, Outcome
from bridge.store import SQLiteStore, StoreError
from bridge.store.wire import Wire
from tests.conftest import free_port
from tests.integration.test_relay import Harness, chat_calls, msg, settings_for
from tests.unit.test_limiter import window_violations

START = 1_000_000.0  # with ManualClock's epoch offset, wall times stay exact in binary fractions
ROOT = Path(__file__).resolve().parents[2]
KEY = "ic_fake_budget_key"  # an obvious fake; only its hash names the Redis keys

# --- Redis: the session's server from tests/conftest.py (`redis_url`) ----------------------


def new_prefix() -> str:
    return f"test-budget:{uuid.uuid4().hex}:"


async def forget(url: str, prefix: str) -> None:
    redis = Redis.from_url(url)
    try:
        async for key in redis.scan_iter(match=f"{prefix}*"):
            await redis.delete(key)
    finally:
        await redis.aclose()


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    value = new_prefix()
    yield value
    await forget(redis_url, value)


# --- replicas on one manual clock -------------------------------------------------------------


class SteppingClock(ManualClock):
    """A ManualClock that says when its earliest sleeper is due (several sleep at once here)."""

    def next_wakeup(self) -> float | None:
        due = [at for at, _, future in self._sleepers if not future.done()]
        return min(due) if due else None


class Replica:
    """One bridge process's limiter for one key: its own queue and Redis connection, the shared window."""

    def __init__(
        self, url: str, prefix: str, clock: ManualClock, max_calls: int, window: float, hold: float = 300.0
    ) -> None:
        # No jitter: every moment stays exact, so the test can step the clock from one to the next.
        self.shared = RedisWindow.from_url(
            url, KEY, max_calls, window, clock=clock, hold=hold, prefix=prefix, random=lambda: 0.0
        )
        self.limiter = SlidingWindowLimiter(max_calls, window, clock=clock, shared=self.shared)


async def loop_turns(rounds: int = 50) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def quiesce(replicas: Iterable[Replica]) -> None:
    """Until nothing runs and no Redis reply is on its way (these take real time, unlike the clock)."""
    calm = 0
    while calm < 2:
        await loop_turns()
        if any(r.shared.in_flight for r in replicas):
            calm = 0
            await asyncio.sleep(0.0005)
        else:
            calm += 1


async def run_until_done(clock: SteppingClock, replicas: list[Replica], tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Move the clock from one due sleeper to the next until every task is done."""
    for _ in range(5_000):
        await quiesce(replicas)
        if all(task.done() for task in tasks):
            for task in tasks:
                task.result()  # a failure inside a task fails the test
            return
        due = clock.next_wakeup()
        assert due is not None, "requests still wait, yet nobody sleeps on the clock"
        clock.advance(max(0.0, due - clock.monotonic()))
    raise AssertionError("the replicas never finished")


async def close(replicas: Iterable[Replica]) -> None:
    for replica in replicas:
        await replica.limiter.aclose()


# --- the window holds across replicas ---------------------------------------------------------

ticks = st.integers(min_value=0, max_value=5 * 64).map(lambda n: n / 64)  # 1/64 s steps: exact in floats


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_calls=st.integers(min_value=1, max_value=3),
    window=st.sampled_from([1.0, 4.0]),
    count=st.integers(min_value=2, max_value=3),
    requests=st.lists(
        st.tuples(
            ticks,  # arrival
            st.integers(min_value=0, max_value=2),  # replica (modulo count)
            st.sampled_from("ab"),  # lane
            st.none() | ticks,  # not held, or held this long until its answer
        ),
        min_size=1,
        max_size=16,
    ),
)
def test_replicas_together_never_exceed_the_window_held_and_settled_mixed(
    redis_url: str, max_calls: int, window: float, count: int, requests: list[tuple[float, int, str, float | None]]
) -> None:
    granted: dict[int, float] = {}
    answered: dict[int, float] = {}
    prefix = new_prefix()

    async def scenario() -> None:
        clock = SteppingClock(START)
        replicas = [Replica(redis_url, prefix, clock, max_calls, window) for _ in range(count)]

        async def request(index: int, at: float, replica: Replica, lane: str, held_for: float | None) -> None:
            await clock.sleep(at)
            grant = await replica.limiter.acquire(lane, hold=held_for is not None)
            granted[index] = clock.monotonic()
            if held_for is None:
                return
            try:
                await clock.sleep(held_for)
            finally:
                answered[index] = clock.monotonic()
                replica.limiter.settle(grant)

        tasks = [
            asyncio.create_task(request(i, at, replicas[r % count], lane, held))
            for i, (at, r, lane, held) in enumerate(requests)
        ]
        try:
            await run_until_done(clock, replicas, tasks)
            assert all(r.limiter.waiting == 0 for r in replicas)
        finally:
            await close(replicas)
            await forget(redis_url, prefix)

    asyncio.run(scenario())
    assert len(granted) == len(requests)  # everyone was served
    # The service counts a request anywhere between send and answer: neither "all at the send"
    # nor "all at the answer" may exceed the limit, whichever replica sent them.
    unheld = [at for i, at in granted.items() if requests[i][3] is None]
    assert window_violations(list(granted.values()), max_calls, window) == []
    assert window_violations(unheld + list(answered.values()), max_calls, window) == []


async def test_each_replica_keeps_its_lanes_taking_turns(redis_url: str, prefix: str) -> None:
    clock = SteppingClock(START)
    one, two = replicas = [Replica(redis_url, prefix, clock, 1, 1.0) for _ in range(2)]
    order: dict[str, list[str]] = {"one": [], "two": []}
    times: list[float] = []

    async def request(replica: Replica, who: str, name: str, lane: str) -> None:
        await replica.limiter.acquire(lane)
        order[who].append(name)
        times.append(clock.monotonic())

    tasks = [asyncio.create_task(request(one, "one", f"a{i}", "A")) for i in range(3)]
    tasks += [asyncio.create_task(request(one, "one", f"b{i}", "B")) for i in range(2)]
    tasks += [asyncio.create_task(request(one, "one", "c0", "C"))]
    tasks += [asyncio.create_task(request(two, "two", f"x{i}", "X")) for i in range(3)]
    try:
        await run_until_done(clock, replicas, tasks)
    finally:
        await close(replicas)
    assert order["one"] == ["a0", "b0", "c0", "a1", "b1", "a2"]  # round robin inside the replica
    assert order["two"] == ["x0", "x1", "x2"]
    # One slot a second for both together.
    assert sorted(times) == [START + s for s in range(9)]


async def test_a_slot_settled_on_one_replica_frees_on_the_other_one_window_after_the_answer(
    redis_url: str, prefix: str
) -> None:
    clock = SteppingClock(START)
    one, two = replicas = [Replica(redis_url, prefix, clock, 2, 4.0) for _ in range(2)]
    grants = [await one.limiter.acquire(hold=True) for _ in range(2)]
    waiting = asyncio.create_task(two.limiter.acquire())
    await quiesce(replicas)
    clock.advance(10.0)  # long past the window, but both requests are still on their way
    await quiesce(replicas)
    assert not waiting.done()
    one.limiter.settle(grants[0])  # answered at START + 10; the other stays held
    try:
        await run_until_done(clock, replicas, [waiting])
    finally:
        await close(replicas)
    assert clock.monotonic() == START + 14.0  # not the hold deadline: the answer plus one window


async def test_a_replica_killed_holding_slots_blocks_the_others_until_its_hold_deadline_plus_a_window(
    redis_url: str, prefix: str
) -> None:
    max_calls, window, hold = 2, 4.0, 5.0
    code = (
        "import asyncio, sys\n"
        "from bridge.budget import RedisWindow\n"
        "from bridge.clock import ManualClock\n"
        "from bridge.limiter import SlidingWindowLimiter\n"
        "async def main():\n"
        "    url, key, prefix, n, window, hold, start = sys.argv[1:]\n"
        "    clock = ManualClock(float(start))\n"
        "    shared = RedisWindow.from_url(url, key, int(n), float(window), clock=clock,"
        " hold=float(hold), prefix=prefix)\n"
        "    limiter = SlidingWindowLimiter(int(n), float(window), clock=clock, shared=shared)\n"
        "    for _ in range(int(n)):\n"
        "        await limiter.acquire('x', hold=True)  # on its way, never settled\n"
        "    print('holding', flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    args = [redis_url, KEY, prefix, str(max_calls), str(window), str(hold), str(START)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), timeout=5) == b"holding\n"
    finally:
        proc.send_signal(signal.SIGKILL)  # no finally, no settle: a crash
        await proc.wait()

    clock = SteppingClock(START)
    survivor = Replica(redis_url, prefix, clock, max_calls, window)
    task = asyncio.create_task(survivor.limiter.acquire())
    try:
        await run_until_done(clock, [survivor], [task])
    finally:
        await close([survivor])
    # Counted as answered at the hold deadline, then gone one window later; not a moment sooner.
    assert clock.monotonic() == START + hold + window


async def test_a_head_cancelled_while_asking_gives_its_slot_back(redis_url: str, prefix: str) -> None:
    clock = SteppingClock(START)
    replica = Replica(redis_url, prefix, clock, 1, 60.0)
    task = asyncio.create_task(replica.limiter.acquire(hold=True))
    while not replica.shared.in_flight:
        await asyncio.sleep(0)
    task.cancel()  # the script is on its way and grants the slot: nobody will use it
    await quiesce([replica])
    assert task.cancelled() and replica.limiter.waiting == 0
    redis = Redis.from_url(redis_url)
    try:
        assert await redis.zcard(replica.shared.keys[0]) == 0
    finally:
        await redis.aclose()
    other = Replica(redis_url, prefix, clock, 1, 60.0)
    await asyncio.wait_for(other.limiter.acquire(), timeout=2)  # at once, not a hold deadline later
    assert clock.monotonic() == START
    await close([replica, other])


async def test_a_429_on_one_replica_pauses_every_replica(redis_url: str, prefix: str) -> None:
    clock = SteppingClock(START)
    one, two = replicas = [Replica(redis_url, prefix, clock, 10, 60.0) for _ in range(2)]
    one.limiter.penalize(START + 30.0)
    one.limiter.penalize(START + 5.0)  # a shorter pause never shortens the first
    await quiesce(replicas)
    times: dict[str, float] = {}

    async def request(replica: Replica, name: str) -> None:
        await replica.limiter.acquire()
        times[name] = clock.monotonic()

    tasks = [asyncio.create_task(request(one, "one")), asyncio.create_task(request(two, "two"))]
    try:
        await run_until_done(clock, replicas, tasks)
    finally:
        await close(replicas)
    assert times == {"one": START + 30.0, "two": START + 30.0}


async def test_the_redis_keys_hold_a_hash_of_the_api_key_never_the_key(redis_url: str, prefix: str) -> None:
    clock = SteppingClock(START)
    replica = Replica(redis_url, prefix, clock, 5, 60.0)
    await replica.limiter.acquire()
    replica.limiter.penalize(START + 1.0)
    await quiesce([replica])
    redis = Redis.from_url(redis_url)
    try:
        keys = sorted([k.decode() async for k in redis.scan_iter(match=f"{prefix}*")])
    finally:
        await redis.aclose()
        await close([replica])
    base = key_base(KEY, prefix)
    assert keys == [f"{base}:penalty", f"{base}:window"]
    assert all(KEY not in k and KEY[3:20] not in k for k in keys)


# --- Redis down -------------------------------------------------------------------------------


async def test_redis_down_is_unavailable_to_the_user_and_nothing_is_sent(prefix: str) -> None:
    clock = ManualClock(START, autojump=True)
    shared = RedisWindow.from_url(f"redis://127.0.0.1:{free_port()}/0", KEY, 5, 60.0, clock=clock, prefix=prefix)
    limiter = SlidingWindowLimiter(5, 60.0, clock=clock, shared=shared)
    # Everyone queued behind a failing head fails too, at once, not one socket timeout each.
    queued = [asyncio.create_task(limiter.acquire(f"lane{i}")) for i in range(5)]
    results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), timeout=5)
    assert all(isinstance(r, StoreError) and "Redis" in str(r) for r in results), results
    assert limiter.waiting == 0

    with respx.mock(base_url="https://ic.test/api", assert_all_called=False, using="httpx") as api:
        route = api.post(url__regex=r"/chat$").mock(return_value=httpx.Response(200, json={"response": "hi"}))
        client = InsiteChatClient("https://ic.test/api", KEY, limiter=limiter, clock=clock, random=lambda: 0.5)
        try:
            with pytest.raises(Unavailable) as caught:
                await client.chat("0a1b2c3d-4e5f-6789-abcd-ef0123456789", "hello", "s")
        finally:
            await client.aclose()
    assert route.call_count == 0
    assert "shared rate budget in Redis failed" in caught.value.reason
    assert client.circuit_state() == "closed"  # InsiteChat itself did nothing wrong
    await limiter.aclose()


async def test_a_redis_that_hangs_costs_the_queue_one_timeout_not_one_each(prefix: str) -> None:
    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # takes every command, answers none
        writer.close()

    server = await asyncio.start_server(deaf, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    redis = Wire(f"redis://127.0.0.1:{port}/0", timeout=0.2)
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(
        5, 60.0, clock=clock, shared=RedisWindow(redis, KEY, 5, 60.0, clock=clock, prefix=prefix)
    )
    began = time.monotonic()
    queued = [asyncio.create_task(limiter.acquire(f"lane{i}")) for i in range(5)]
    try:
        results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), timeout=5)
    finally:
        await redis.aclose()
        server.close()
    assert all(isinstance(r, StoreError) for r in results), results
    assert time.monotonic() - began < 0.6  # one 0.2 s timeout (the head's), then the rest at once


async def test_through_the_relay_redis_down_is_the_unavailable_notice(emulator: Emulator, tmp_path: Path) -> None:
    settings = settings_for(emulator.base_url)
    clock = ManualClock(START, autojump=True)
    clients = build_clients(settings, clock, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    h = Harness(settings, SQLiteStore(tmp_path / "s.db"), clock=clock, clients=clients)
    try:
        assert await h.relay.handle(msg("anyone there?", channel="D1", is_dm=True)) is Outcome.NOTICE
    finally:
        await h.close()
        for client in clients.values():
            assert client.limiter is not None
            await client.limiter.aclose()
    assert "".join(h.adapter.sent[-1].parts) == NOTICES["unavailable"]
    assert chat_calls(emulator) == []


async def test_two_bridges_wired_to_one_redis_share_the_key_budget(
    emulator: Emulator, tmp_path: Path, redis_url: str
) -> None:
    # build_clients' own key names: clean before and after, as other runs may share this Redis.
    base = key_base(SANDBOX_KEY)
    redis = Redis.from_url(redis_url)
    await redis.delete(f"{base}:window", f"{base}:penalty")
    clock = ManualClock(START)
    settings = settings_for(emulator.base_url, rate_limit=2)
    bridges = [
        Harness(
            settings,
            SQLiteStore(tmp_path / f"{n}.db"),
            clock=clock,
            clients=build_clients(settings, clock, redis_url=redis_url),
        )
        for n in ("one", "two")
    ]
    try:
        one, two = bridges
        for n in ("1", "2"):
            assert await one.relay.handle(msg(f"q{n}", id=n, channel="D1", is_dm=True)) is Outcome.ANSWERED
        third = asyncio.create_task(two.relay.handle(msg("q3", id="3", channel="D2", is_dm=True)))
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert not third.done()  # the other bridge spent the key's two slots
        while not third.done():
            clock.advance(5)
            await asyncio.sleep(0.01)
        assert third.result() is Outcome.ANSWERED
        assert clock.monotonic() >= START + 60.0
        assert len(chat_calls(emulator)) == 3
    finally:
        for h in bridges:
            await h.close()
            for client in h.clients.values():
                assert client.limiter is not None
                await client.limiter.aclose()
        await redis.delete(f"{base}:window", f"{base}:penalty")
        await redis.aclose()
