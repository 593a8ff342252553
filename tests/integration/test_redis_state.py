"""The bridge with its state on Redis.

It answers, says when Redis keeps nothing on disk, and a Redis it cannot reach stops the start.
A conversation lock is reported lost only when another holder has it.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import redis.asyncio

from bridge import config
from bridge.app import BridgeApp
from bridge.clock import ManualClock
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from bridge.messages import Inbound
from bridge.relay import Outcome
from bridge.store import ChatJob, JobState, NewJob, ReplyKind, StoreError
from bridge.store.redis import RedisStore
from tests.conftest import free_port


def settings_for(emulator: Emulator, redis_url: str, prefix: str) -> config.Settings:
    return config.loads(
        f"""
insitechat: {{base_url: "{emulator.base_url}", api_key: "${{KEY}}", deadline: 2}}
state:
  redis_url: ${{REDIS_URL}}
  redis_prefix: "{prefix}"
server: {{listen: "127.0.0.1:0"}}
console: {{enabled: true}}
routes: [{{platform: console, chatbot: {SANDBOX_CHATBOT_ID}}}]
""",
        env={"KEY": SANDBOX_KEY, "REDIS_URL": redis_url},
    )


async def test_the_bridge_runs_on_redis(
    emulator: Emulator, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = BridgeApp(
        settings_for(emulator, redis_url, redis_prefix), console_in=io.StringIO(""), console_out=io.StringIO()
    )
    assert isinstance(app.store, RedisStore)
    with caplog.at_level(logging.WARNING, logger="bridge.app"):
        await app.start()
    try:
        warned = [r.getMessage() for r in caplog.records if "keeps nothing on disk" in r.getMessage()]
        assert len(warned) == 1  # the test server has no AOF and no RDB saves
        question = Inbound("console", "", "console", "1", "you", "hello there", is_dm=True)
        assert await app.relay.handle(question) is Outcome.ANSWERED
        assert await app.relay.handle(question) is Outcome.DUPLICATE
        async with httpx.AsyncClient(base_url=app.server_url) as http:
            assert (await http.get("/readyz")).json()["parts"]["state"] == "ok"
    finally:
        await app.stop()


async def test_a_question_is_marked_asked_in_redis_before_insitechat_has_it(
    emulator: Emulator, redis_url: str, redis_prefix: str
) -> None:
    # The relay no longer waits for the mark's reply before the request leaves (one round trip
    # off the answer's path): its write must still be out first, or a crash after the request
    # would have the question asked again instead of noticed (chat.after_restart).
    app = BridgeApp(
        settings_for(emulator, redis_url, redis_prefix), console_in=io.StringIO(""), console_out=io.StringIO()
    )
    reader = RedisStore(redis_url, prefix=redis_prefix)
    await app.start()
    try:
        emulator.inject("hang", seconds=30, path_contains="/chat", count=1)
        question = Inbound("console", "", "console", "1", "you", "are you there?", is_dm=True)
        asking = app.relay.submit(question)
        async with asyncio.timeout(10):
            while not any(r.path.endswith("/chat") for r in emulator.requests):
                await asyncio.sleep(0)
        found = await reader.job_by_key(question.dedupe_key)
        assert found is not None and found[1] is JobState.ASKED
        asking.cancel()
    finally:
        await app.stop()
        await reader.close()


async def test_a_redis_it_cannot_reach_stops_the_start_without_its_password(emulator: Emulator) -> None:
    url = f"redis://bridge:redis-pw-sentinel@127.0.0.1:{free_port()}/0"
    app = BridgeApp(settings_for(emulator, url, "icb:"), console_in=io.StringIO(""), console_out=io.StringIO())
    with pytest.raises(StoreError) as info:
        await app.start()
    assert "redis-pw-sentinel" not in str(info.value) and "127.0.0.1" in str(info.value)
    await app.stop()


# --- conversation locks across replicas ------------------------------------------------------------

LEASE = 3.0  # the conversation lock's lease; its holder renews it every second


@dataclass
class Replicas:
    """Two replicas' stores on one Redis, each on a clock of its own."""

    here: RedisStore
    clock: ManualClock  # here's
    there: RedisStore
    there_clock: ManualClock


@pytest.fixture
async def replicas(redis_url: str, redis_prefix: str) -> AsyncIterator[Replicas]:
    clock, there_clock = ManualClock(), ManualClock()
    two = Replicas(
        RedisStore(redis_url, prefix=redis_prefix, clock=clock, lock_lease=LEASE),
        clock,
        RedisStore(redis_url, prefix=redis_prefix, clock=there_clock, lock_lease=LEASE),
        there_clock,
    )
    yield two
    await two.here.close()
    await two.there.close()


async def renewal_pass(clock: ManualClock) -> None:
    """Move `here`'s clock to its next renewal and wait until that pass is over (its keeper sleeps again)."""
    clock.advance(LEASE / 3)
    async with asyncio.timeout(5):
        while clock.sleepers == 0:
            await asyncio.sleep(0.005)


def lost_locks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bridge.store.redis" and r.levelno >= logging.ERROR]


def new_job(clock: ManualClock) -> ChatJob:
    question = Inbound("slack", "T1", "C1", "100.1", "U1", "what is the refund policy?", mentions_bot=True)
    return ChatJob.new(question, chatbot="bot-1", now=clock.time())


async def test_a_lock_freed_by_its_jobs_delivery_on_another_replica_is_not_reported_lost(
    replicas: Replicas, caplog: pytest.LogCaptureFixture
) -> None:
    clock, here, there = replicas.clock, replicas.here, replicas.there
    job = new_job(clock)
    assert await here.create_job(job, lease=60, lock=True) is NewJob.CREATED
    async with here.conversation_lock(job.conversation):
        item = await here.job_answered(job.answered("the answer", ReplyKind.ANSWER), lease=6.0)
        # This replica's attempt outlives its lease; another replica's outbox delivers the reply,
        # and with it frees the conversation: the lock was taken for that job.
        assert await there.outbox_take(item.id, lease=6.0) is None  # held by this replica's attempt
        replicas.there_clock.advance(7)
        assert await there.outbox_take(item.id, lease=6.0) is not None
        await there.outbox_done(item.id, "1700000000.000100")
        with caplog.at_level(logging.ERROR, logger="bridge.store.redis"):
            await renewal_pass(clock)
    assert lost_locks(caplog) == []
    # The conversation is free for the next answer at once, on either replica.
    async with asyncio.timeout(1), there.conversation_lock(job.conversation):
        pass


async def test_the_next_question_takes_the_lock_with_its_job_while_the_last_answer_is_finishing(
    replicas: Replicas, redis_url: str, redis_prefix: str
) -> None:
    # A round trip less per answer: the last answer's delivery, which frees the lock, is on the
    # wire ahead of the next question's job, so the job's own step can take the lock for it.
    clock, here, there = replicas.clock, replicas.here, replicas.there
    first = new_job(clock)
    follow_up = Inbound("slack", "T1", "C1", "100.2", "U1", "and for sale items?", thread="100.1")
    second = ChatJob.new(follow_up, chatbot="bot-1", now=clock.time())
    assert second.conversation == first.conversation
    warm = ChatJob.new(Inbound("slack", "T1", "C9", "1.1", "U1", "hi", mentions_bot=True), chatbot="bot-1", now=0)
    await here.create_job(warm, lease=60, lock=True)
    async with here.conversation_lock(warm.conversation):  # Redis knows every script now: one trip each
        await here.outbox_done((await here.job_answered(warm.answered("hi", ReplyKind.ANSWER), lease=6.0)).id, "1")
    assert await here.create_job(first, lease=60, lock=True) is NewJob.CREATED
    async with here.conversation_lock(first.conversation):
        item = await here.job_answered(first.answered("30 days.", ReplyKind.ANSWER), lease=6.0)
        delivered = asyncio.ensure_future(here.outbox_done(item.id, "1700000000.000100"))
        await asyncio.sleep(0)  # its command is on the wire, its reply not back: the block is finishing
        assert await here.create_job(second, lease=60, lock=True) is NewJob.CREATED
        await delivered
    raw = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert await raw.hget(f"{redis_prefix}lock:{first.conversation}", "job") == second.id
    finally:
        await raw.aclose()
    with pytest.raises(TimeoutError):  # it is this replica's: the other one waits
        async with asyncio.timeout(0.2), there.conversation_lock(first.conversation):
            pass
    async with asyncio.timeout(1), here.conversation_lock(first.conversation):
        pass  # the next worker here enters at once


async def test_a_lock_taken_over_after_its_lease_is_reported_lost(
    replicas: Replicas, caplog: pytest.LogCaptureFixture
) -> None:
    clock, here, there = replicas.clock, replicas.here, replicas.there
    job = new_job(clock)
    assert await here.create_job(job, lease=60, lock=True) is NewJob.CREATED
    async with here.conversation_lock(job.conversation):
        # This replica stalled past the lease (its clock stood still); the other one took the conversation.
        replicas.there_clock.advance(LEASE + 1)
        async with there.conversation_lock(job.conversation):
            with caplog.at_level(logging.ERROR, logger="bridge.store.redis"):
                await renewal_pass(clock)
    assert lost_locks(caplog) == [f"conversation {job.conversation}: its lock was lost to another holder"]
