"""The Redis store beyond the shared contract: several replicas on one Redis, races, real TTLs, failures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio

from bridge.clock import Clock, ManualClock, SystemClock
from bridge.messages import Inbound
from bridge.store import DAY, ChatJob, JobState, NewDelivery, NewJob, ReplyKind, StoreError
from bridge.store.redis import LOCK_LEASE, TTL_MARGIN, RedisStore, redact_url
from tests.conftest import free_port

Replica = Callable[..., RedisStore]  # replica(clock=...)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def replica(redis_url: str, redis_prefix: str, clock: ManualClock) -> AsyncIterator[Replica]:
    """Opens one more replica on the test's Redis and prefix."""
    opened: list[RedisStore] = []

    def open_replica(*, clock: Clock = clock) -> RedisStore:
        opened.append(RedisStore(redis_url, prefix=redis_prefix, clock=clock))
        return opened[-1]

    yield open_replica
    for store in opened:
        await store.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def own_server() -> bool:
    """The session's own redis-server (its config may be changed), not one named by REDIS_URL."""
    return not os.environ.get("REDIS_URL")


@contextlib.asynccontextmanager
async def store_as_user(
    redis_url: str, raw: redis.asyncio.Redis, commands: list[str], prefix: str = "icb:"
) -> AsyncIterator[RedisStore]:
    """A RedisStore connected as a user of its own allowed only `commands` (as a managed or read-only Redis).

    It changes the server's users: only on the test session's own redis-server.
    """
    if not own_server():
        pytest.skip("changes the server's users; runs on the test session's own redis-server")
    user = f"icbtest-{uuid.uuid4().hex[:8]}"
    await raw.acl_setuser(
        user, enabled=True, passwords=["+pw-of-the-bridge"], keys="*", channels="*", commands=commands
    )
    store = RedisStore(redis_url.replace("redis://", f"redis://{user}:pw-of-the-bridge@"), prefix=prefix)
    try:
        yield store
    finally:
        await store.close()
        await raw.acl_deluser(user)


def new_job(clock: Clock, message_id: str = "100.1") -> ChatJob:
    inbound = Inbound("slack", "T1", "C1", message_id, "U1", "what is the refund policy?", mentions_bot=True)
    return ChatJob.new(inbound, chatbot="bot-1", now=clock.time())


# --- two replicas on one Redis ---------------------------------------------------------------------


async def test_a_job_one_replica_created_is_a_duplicate_for_the_other(replica: Replica, clock: ManualClock) -> None:
    first, second = replica(), replica()
    assert await first.create_job(new_job(clock), lease=60) is NewJob.CREATED
    # Slack sent the event to the other connection:
    assert await second.create_job(new_job(clock), lease=60) is NewJob.DUPLICATE
    assert await second.job_counts() == {JobState.ACCEPTED: 1}


async def test_a_live_replicas_lease_is_kept_and_taken_over_once_it_runs_out(
    replica: Replica, clock: ManualClock
) -> None:
    first, second = replica(), replica()
    job = new_job(clock)
    await first.create_job(job, lease=60)
    assert await second.take_over_jobs(lease=60) == []  # opening a replica voids nothing
    clock.advance(40)
    await first.renew_jobs([job.id], lease=60)  # still working on it
    clock.advance(40)
    assert await second.take_over_jobs(lease=60) == []  # renewed until 100
    clock.advance(21)  # the first stopped renewing: it died
    assert [j.id for j in await second.take_over_jobs(lease=60)] == [job.id]
    assert await first.take_over_jobs(lease=60) == []  # taken once
    # The first comes back from a stall: its renewal does not take the job back.
    await first.renew_jobs([job.id], lease=600)
    clock.advance(61)
    # The second's lease ran out, not a 600 s one:
    assert [j.id for j in await first.take_over_jobs(lease=60)] == [job.id]


async def test_an_outbox_item_one_replica_holds_is_not_given_to_the_other(replica: Replica, clock: ManualClock) -> None:
    first, second = replica(), replica()
    await first.outbox_add("a1|slack:C1", "slack:C1", {"kind": "post"})
    [item] = await second.outbox_due()
    assert await first.outbox_take(item.id, lease=120) is not None
    assert await second.outbox_due() == []
    assert await second.outbox_take(item.id, lease=120) is None
    await second.outbox_retry(item.id, 30, "waiting behind an earlier delivery", count=False)  # held: not moved
    clock.advance(121)  # the first died mid-attempt
    [left] = await second.outbox_due()
    taken = await second.outbox_take(left.id, lease=120)
    assert taken is not None and taken.started  # it may have posted: look first
    await second.outbox_done(item.id, "ts")
    await first.outbox_done(item.id, "late")  # the first's late word changes nothing
    assert await first.outbox_depth() == (0, None)


async def test_a_chat_reply_delivered_by_another_replica_finishes_the_job(replica: Replica, clock: ManualClock) -> None:
    first, second = replica(), replica()
    job = new_job(clock)
    await first.create_job(job, lease=60)
    item = await first.job_answered(job.answered("30 days", ReplyKind.ANSWER))
    assert await second.outbox_take(item.id, lease=120) is not None
    await second.outbox_done(item.id, "ts")
    found = await first.job_by_key(job.key)
    assert found is not None and found[1] is JobState.DELIVERED and found[0].reply == "30 days"
    assert await first.job_counts() == {JobState.DELIVERED: 1}


async def test_compare_and_set_races_have_exactly_one_winner_each_round(replica: Replica, clock: ManualClock) -> None:
    replicas = [replica(), replica()]
    revision: int | None = None
    for round_ in range(15):
        results = await asyncio.gather(*(
            replicas[n % 2].put_if("alert", "a1", {"round": round_, "writer": n}, revision=revision, ttl=60)
            for n in range(16)
        ))
        assert results.count(True) == 1, f"round {round_}: {results.count(True)} winners"
        stored = await replicas[1].get_versioned("alert", "a1")
        assert stored is not None and stored.value == {"round": round_, "writer": results.index(True)}
        revision = stored.revision


async def test_racing_replicas_store_one_job_accept_one_event_and_take_over_each_job_once(
    replica: Replica, clock: ManualClock
) -> None:
    replicas = [replica() for _ in range(4)]
    created = await asyncio.gather(*(r.create_job(new_job(clock), lease=60) for r in replicas * 3))
    assert created.count(NewJob.CREATED) == 1
    accepted = await asyncio.gather(*(
        r.accept([f"event:{n}", "body:same"], [NewDelivery(f"evt|slack:C{n}", f"slack:C{n}", {})])
        for n, r in enumerate(replicas)
    ))
    assert accepted.count(True) == 1 and (await replicas[0].outbox_depth())[0] == 1
    for n in range(20):
        await replicas[0].create_job(new_job(clock, f"200.{n}"), lease=60)
    clock.advance(61)
    taken = await asyncio.gather(*(r.take_over_jobs(lease=60, limit=7) for r in replicas))
    ids = [job.id for jobs in taken for job in jobs]
    assert len(ids) == len(set(ids)) == 21


async def test_conversation_lock_release_is_compare_and_delete(
    replica: Replica, clock: ManualClock, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    stalled = replica(clock=ManualClock(clock.monotonic()))  # stops renewing: its clock never moves
    live, third = replica(), replica()
    held = stalled.conversation_lock("slack:T:C:1")
    await held.__aenter__()
    clock.advance(LOCK_LEASE + 1)
    async with live.conversation_lock("slack:T:C:1"):
        await held.__aexit__(None, None, None)  # the stalled one wakes up and lets go: of nothing it still has
        assert str(await raw.hget(f"{redis_prefix}lock:slack:T:C:1", "token")).startswith(live.owner)
        contender = asyncio.create_task(third.conversation_lock("slack:T:C:1").__aenter__())
        await asyncio.sleep(0.05)
        assert not contender.done()
    clock.advance(1)  # the contender's next poll
    await asyncio.wait_for(contender, 5)


async def test_a_held_lock_is_renewed_past_its_lease(replica: Replica, clock: ManualClock) -> None:
    holder, other = replica(), replica()

    async def take() -> None:
        async with other.conversation_lock("slack:T:C:1"):
            pass

    async with holder.conversation_lock("slack:T:C:1"):
        contender = asyncio.create_task(take())
        for _ in range(9):  # three leases, in steps just over the renewal interval
            clock.advance(LOCK_LEASE / 3 + 0.1)
            await asyncio.sleep(0.03)  # the renewal and the contender's try both run
            assert not contender.done()
    clock.advance(1)
    await asyncio.wait_for(contender, 5)


async def _enters(store: RedisStore, conversation: str) -> None:
    async with store.conversation_lock(conversation):
        pass


async def test_a_lock_taken_with_its_job_keeps_other_replicas_out_until_the_reply_is_delivered(
    replica: Replica, clock: ManualClock, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    holder, other = replica(), replica()
    job = new_job(clock)
    assert await holder.create_job(job, lease=60, lock=True) is NewJob.CREATED
    inside, leave = asyncio.Event(), asyncio.Event()

    async def hold_it() -> None:
        async with other.conversation_lock(job.conversation):
            inside.set()
            await leave.wait()

    contender = asyncio.create_task(hold_it())
    await asyncio.sleep(0.05)
    assert not inside.is_set()  # taken with the job, before its worker even started
    async with holder.conversation_lock(job.conversation):
        item = await holder.job_answered(job.answered("hi", ReplyKind.ANSWER), lease=120)
        clock.advance(1)  # the contender's next poll: still held
        await asyncio.sleep(0.05)
        assert not inside.is_set()
        await holder.outbox_done(item.id, "ts")  # the answer is out: the next may start elsewhere
        clock.advance(1)
        await asyncio.wait_for(inside.wait(), 5)
    # The holder's block ended after another replica took the lock: it freed nothing of theirs.
    assert str(await raw.hget(f"{redis_prefix}lock:{job.conversation}", "token")).startswith(other.owner)
    leave.set()
    await asyncio.wait_for(contender, 5)


async def test_a_lock_taken_by_its_worker_is_freed_by_the_delivery_of_the_reply_stored_under_it(
    replica: Replica, clock: ManualClock, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    holder, other = replica(), replica()
    job = new_job(clock)
    await holder.create_job(job, lease=60)
    async with holder.conversation_lock(job.conversation):
        item = await holder.job_answered(job.answered("hi", ReplyKind.ANSWER))
        assert await raw.exists(f"{redis_prefix}lock:{job.conversation}")
        await holder.outbox_done(item.id, "ts")
        assert not await raw.exists(f"{redis_prefix}lock:{job.conversation}")
        await asyncio.wait_for(_enters(other, job.conversation), 5)


async def test_a_lock_taken_with_a_job_nobody_answers_frees_itself(
    replica: Replica, clock: ManualClock, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    holder, other = replica(), replica()
    job = new_job(clock)
    await holder.create_job(job, lease=60, lock=True)
    lock = f"{redis_prefix}lock:{job.conversation}"
    assert await raw.exists(lock)
    for _ in range(2):  # the renewer's second look finds it still not entered
        clock.advance(LOCK_LEASE / 3 + 0.1)
        await asyncio.sleep(0.05)
    assert not await raw.exists(lock)
    await asyncio.wait_for(_enters(other, job.conversation), 5)
    # And one left at shutdown is freed by close().
    second = new_job(clock, "100.2")
    await other.create_job(second, lease=60, lock=True)
    assert await raw.exists(f"{redis_prefix}lock:{second.conversation}")
    await other.close()
    assert not await raw.exists(f"{redis_prefix}lock:{second.conversation}")


async def test_follow_ups_and_generations_under_a_lock_need_no_round_trip(replica: Replica, clock: ManualClock) -> None:
    store, other = replica(), replica()
    job = new_job(clock)
    await store.create_job(job, lease=60, lock=True)
    await store.follow(job.conversation)
    async with store.conversation_lock(job.conversation):
        wire, store.wire = store.wire, None  # type: ignore[assignment]  # nothing below may need Redis
        assert await store.generation(job.conversation) == 0
        await store.follow(job.conversation)
        assert await store.is_followed(job.conversation)
        store.wire = wire  # for the release
    assert await other.is_followed(job.conversation)


async def test_a_replica_killed_mid_work_hands_its_job_item_and_lock_over_after_their_leases(
    redis_url: str, redis_prefix: str
) -> None:
    """A real crash: a replica in a subprocess is SIGKILLed while it holds a job, an outbox attempt and a lock."""
    lease = 1.5
    script = textwrap.dedent(f"""
        import asyncio
        from bridge.clock import SystemClock
        from bridge.messages import Inbound
        from bridge.store import ChatJob
        from bridge.store.redis import RedisStore

        async def main():
            store = RedisStore({redis_url!r}, prefix={redis_prefix!r}, lock_lease={lease})
            clock = SystemClock()
            inbound = Inbound("slack", "T1", "C1", "1.1", "U1", "hello", mentions_bot=True)
            await store.create_job(ChatJob.new(inbound, chatbot="bot", now=clock.time()), lease={lease})
            await store.outbox_add("a1|slack:C1", "slack:C1", {{}})
            [item] = await store.outbox_due()
            await store.outbox_take(item.id, lease={lease})
            async with store.conversation_lock("slack:T1:C1:1.1"):
                print("holding", flush=True)
                await asyncio.sleep(3600)

        asyncio.run(main())
    """)
    doomed = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE)
    live = RedisStore(redis_url, prefix=redis_prefix, clock=SystemClock())
    try:
        assert doomed.stdout is not None
        line = await asyncio.wait_for(doomed.stdout.readline(), 20)
        assert line.strip() == b"holding"
        killed = time.monotonic()
        doomed.send_signal(signal.SIGKILL)
        await asyncio.wait_for(doomed.wait(), 5)
        assert await live.take_over_jobs(lease=60) == [] and await live.outbox_due() == []  # leases still live

        async def job() -> float:
            while not await live.take_over_jobs(lease=60):
                await asyncio.sleep(0.05)
            return time.monotonic() - killed

        async def item() -> float:
            while not (due := await live.outbox_due()) or not due[0].started:
                await asyncio.sleep(0.05)
            return time.monotonic() - killed

        async def lock() -> float:
            async with live.conversation_lock("slack:T1:C1:1.1"):
                return time.monotonic() - killed

        waits = await asyncio.wait_for(asyncio.gather(job(), item(), lock()), 10)
        assert all(lease - 1.0 < wait < lease + 1.5 for wait in waits), waits  # not before their leases ran out
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await doomed.wait()
        await live.close()


# --- keys and expiry -----------------------------------------------------------------------------


async def test_keys_carry_their_prefix_and_a_real_ttl(
    replica: Replica, clock: ManualClock, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    store = replica()
    await store.follow("slack:T:C:1", ttl=100)
    await store.accept(["event:1"], [], ttl=DAY)
    await store.put("alert", "a1", {"state": "open"}, ttl=60)
    await store.put("alert", "forever", {})
    job = new_job(clock)
    await store.create_job(job, lease=60)
    pttl = {
        key.removeprefix(redis_prefix): await raw.pttl(key) async for key in raw.scan_iter(match=f"{redis_prefix}*")
    }
    assert all(key in pttl for key in ("followed:slack:T:C:1", "seen:event:1", "record:alert:a1", f"job:{job.id}"))
    assert (100 + TTL_MARGIN - 5) * 1000 < pttl["followed:slack:T:C:1"] <= (100 + TTL_MARGIN) * 1000
    assert (DAY + TTL_MARGIN - 5) * 1000 < pttl["seen:event:1"] <= (DAY + TTL_MARGIN) * 1000
    assert pttl["record:alert:forever"] == -1  # kept for good, as asked
    assert pttl[f"job:{job.id}"] == -1  # an open job is never dropped by Redis
    item = await store.job_answered(job.answered("hi", ReplyKind.ANSWER))
    await store.outbox_done(item.id, "ts")
    for key in (f"job:{job.id}", f"job-key:{job.key}", f"item:{item.id}", f"item-key:{item.key}"):
        assert (7 * DAY + TTL_MARGIN - 5) * 1000 < await raw.pttl(redis_prefix + key) <= (7 * DAY + TTL_MARGIN) * 1000


async def test_prefixes_keep_bridges_apart(redis_url: str, redis_prefix: str, clock: ManualClock) -> None:
    one = RedisStore(redis_url, prefix=redis_prefix + "one:", clock=clock)
    two = RedisStore(redis_url, prefix=redis_prefix + "two:", clock=clock)
    try:
        assert await one.create_job(new_job(clock), lease=60) is NewJob.CREATED
        assert await two.create_job(new_job(clock), lease=60) is NewJob.CREATED
        await one.outbox_add("k", "slack:C1", {})
        assert await two.outbox_due() == []
    finally:
        await one.close()
        await two.close()


# --- failures --------------------------------------------------------------------------------------


async def test_a_redis_that_is_down_is_a_store_error_without_the_password(clock: ManualClock) -> None:
    store = RedisStore(f"redis://bridge:s3cret-pw@127.0.0.1:{free_port()}/0", clock=clock, timeout=1)
    started = time.monotonic()
    for operation in (
        store.is_followed("x"),
        store.create_job(new_job(clock), lease=60),
        store.outbox_due(),
        store.job_counts(),
        store.persistence_warning(),
    ):
        with pytest.raises(StoreError) as info:
            await operation
        assert "s3cret-pw" not in str(info.value) and "127.0.0.1" in str(info.value)
    with pytest.raises(StoreError):
        async with store.conversation_lock("c"):
            pass
    assert not await store.ping()
    assert time.monotonic() - started < 5  # refused at once, not after long retries
    await store.close()
    assert redact_url("rediss://u:pw@h:6380/0?password=pw2") == "rediss://u:***@h:6380/0?password=***"


def test_a_url_option_redis_py_does_not_take_is_refused_at_once() -> None:
    """The URL means what it means to redis-py: its connection options pass, a made-up one is named."""
    with pytest.raises(StoreError, match="no_such_option"):
        RedisStore("redis://127.0.0.1:6379/0?no_such_option=1")
    RedisStore("redis://127.0.0.1:6379/0?socket_keepalive=yes&max_connections=5&health_check_interval=3")


async def test_a_redis_that_does_not_answer_is_a_store_error_not_a_hang(clock: ManualClock) -> None:
    async def accept_and_stay_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)

    server = await asyncio.start_server(accept_and_stay_silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", clock=clock, timeout=0.3)
    try:
        with pytest.raises(StoreError, match=r"(?i)timeout"):
            await asyncio.wait_for(store.outbox_add("k", "slack:C1", {}), 5)
    finally:
        await store.close()
        server.close()


async def test_commands_redis_does_not_answer_in_time_all_fail_and_the_next_connects_again(
    redis_url: str, redis_prefix: str, clock: ManualClock, raw: redis.asyncio.Redis
) -> None:
    """A connected Redis that stops answering (paused here): every command on the wire fails, none hangs."""
    if not own_server():
        pytest.skip("pauses the server; runs on the test session's own redis-server")
    store = RedisStore(redis_url, prefix=redis_prefix, clock=clock, timeout=0.3)
    try:
        assert await store.create_job(new_job(clock, "1"), lease=60) is NewJob.CREATED  # connected, before the pause
        own_id = await store.wire.call("CLIENT", "ID")
        await raw.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        waiting = await asyncio.wait_for(
            asyncio.gather(store.get_job("x"), store.outbox_due(), store.job_counts(), return_exceptions=True), 5
        )
        assert all(isinstance(result, StoreError) and "timeout" in str(result).lower() for result in waiting)
        assert not store.wire.connected and store.wire.busy == 0
        await raw.execute_command("CLIENT", "UNPAUSE")
        assert await store.create_job(new_job(clock, "2"), lease=60) is NewJob.CREATED  # a new connection
        assert await store.wire.call("CLIENT", "ID") != own_id
    finally:
        await store.close()


async def test_a_script_error_is_a_store_error(replica: Replica, raw: redis.asyncio.Redis, redis_prefix: str) -> None:
    store = replica()
    await raw.set(f"{redis_prefix}outbox:due", "not a sorted set")  # e.g. another program writing under our prefix
    with pytest.raises(StoreError, match="WRONGTYPE"):
        await store.outbox_add("k", "slack:C1", {})


async def test_a_cancelled_caller_returns_at_once_and_leaves_the_connection_usable(replica: Replica) -> None:
    store = replica()
    for _ in range(30):  # cancelled at every point of a command's round trip, sooner or later
        call = asyncio.create_task(store.outbox_due())
        await asyncio.sleep(0.0005)
        call.cancel()
        await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), 1)
        assert await store.outbox_add(uuid.uuid4().hex, "slack:C1", {})
    await store.close()  # waits for the commands still under way


# --- persistence --------------------------------------------------------------------------------------


async def test_a_redis_that_keeps_nothing_on_disk_is_warned_about(replica: Replica, raw: redis.asyncio.Redis) -> None:
    store = replica()
    appendonly, save = (
        str((await raw.config_get("appendonly"))["appendonly"]),
        str((await raw.config_get("save"))["save"]),
    )
    warning = await store.persistence_warning()
    if appendonly == "no" and not save.strip():
        assert warning is not None and "restart loses the queued alerts and answers" in warning
    else:
        assert warning is None
    if not own_server():
        return
    await raw.config_set("save", "3600 1")  # RDB snapshots on: the state survives a restart
    try:
        assert await store.persistence_warning() is None
    finally:
        await raw.config_set("save", save)


async def test_no_persistence_warning_when_config_is_not_allowed(redis_url: str, raw: redis.asyncio.Redis) -> None:
    async with store_as_user(redis_url, raw, ["+@all", "-config"]) as store:  # as a managed Redis
        assert await store.ping()
        assert await store.persistence_warning() is None


async def test_a_burst_of_hundreds_of_commands_at_once_all_succeed(replica: Replica, clock: ManualClock) -> None:
    store = replica()
    jobs = [new_job(clock, str(n)) for n in range(500)]  # 500 questions at once: 500 commands on one connection
    created = await asyncio.gather(*(store.create_job(job, lease=60) for job in jobs))
    assert set(created) == {NewJob.CREATED}
    assert (await store.job_counts())[JobState.ACCEPTED] == len(jobs)


async def test_callers_cancelled_mid_command_leave_the_others_replies_in_step(
    redis_url: str, redis_prefix: str, clock: ManualClock
) -> None:
    """One connection carries every command: a cancelled caller's reply is read and dropped, never handed on."""
    separator = "&" if "?" in redis_url else "?"
    store = RedisStore(f"{redis_url}{separator}max_connections=2", prefix=redis_prefix, clock=clock)  # still taken
    try:
        jobs = [new_job(clock, str(n)) for n in range(40)]
        assert set(await asyncio.gather(*(store.create_job(job, lease=60) for job in jobs))) == {NewJob.CREATED}
        reads = [asyncio.create_task(store.get_job(job.id)) for job in jobs]
        await asyncio.sleep(0)  # every read is on the wire now
        for read in reads[::3]:
            read.cancel()
        done = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 10)
        for job, read, result in zip(jobs, reads, done, strict=True):
            if not read.cancelled():
                assert isinstance(result, ChatJob) and result.id == job.id  # its own reply, not a neighbour's
        assert (await store.get_job(jobs[0].id)).id == jobs[0].id  # type: ignore[union-attr]
        assert store.wire.busy == 0
    finally:
        await store.close()


async def test_a_connection_redis_closed_is_made_again_by_the_next_command(
    replica: Replica, clock: ManualClock, raw: redis.asyncio.Redis
) -> None:
    store = replica()
    job = new_job(clock)
    assert await store.create_job(job, lease=60) is NewJob.CREATED
    own_id = await store.wire.call("CLIENT", "ID")
    await raw.execute_command("CLIENT", "KILL", "ID", own_id)  # as a Redis restart or an idle timeout would
    for _ in range(200):  # the replica hears the close on its own loop
        if not store.wire.connected:
            break
        await asyncio.sleep(0.01)
    assert not store.wire.connected
    found = await store.get_job(job.id)
    assert found is not None and found.id == job.id
    assert await store.wire.call("CLIENT", "ID") != own_id  # a new connection


async def test_scripts_redis_forgot_are_sent_again(
    replica: Replica, clock: ManualClock, raw: redis.asyncio.Redis
) -> None:
    """A Redis restarted without its script cache (or SCRIPT FLUSH): EVALSHA says NOSCRIPT, the script is sent."""
    if not own_server():
        pytest.skip("flushes the server's script cache; runs on the test session's own redis-server")
    store = replica()
    assert await store.create_job(new_job(clock, "1"), lease=60) is NewJob.CREATED
    await raw.script_flush()
    assert await store.create_job(new_job(clock, "2"), lease=60) is NewJob.CREATED
    assert await store.create_job(new_job(clock, "2"), lease=60) is NewJob.DUPLICATE  # by its SHA again: a duplicate
    assert (await store.job_counts())[JobState.ACCEPTED] == 2


async def test_a_redis_that_refuses_writes_is_not_ready(
    redis_url: str, redis_prefix: str, raw: redis.asyncio.Redis
) -> None:
    """Readiness is a write: a read-only user (as a read-only replica or a full Redis) must not look ready."""
    async with store_as_user(redis_url, raw, ["+@read", "+ping"], prefix=redis_prefix) as store:
        assert await store.ping() is False
    writable = RedisStore(redis_url, prefix=redis_prefix)
    try:
        assert await writable.ping() is True
    finally:
        await writable.close()
