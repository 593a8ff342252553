"""The store's contract on every backend (SQLite, Redis): jobs, leases, outbox, records, intake, retention, locks.

SQLite is exclusive (one process per file: opening it voids every earlier lease); Redis is
shared by live replicas, so there a lease is taken over only once it ran out. Tests that
take over a dead process's work say which of the two they face.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from bridge.clock import Clock, ManualClock
from bridge.messages import Inbound
from bridge.store import (
    DAY,
    FACTS_KEPT,
    ChatJob,
    Fact,
    FactKind,
    JobState,
    NewDelivery,
    NewJob,
    NewRecord,
    RecordRef,
    ReplyKind,
    SQLiteStore,
    Store,
    StoreError,
)
from bridge.store.records import inbound_from_json, inbound_to_json
from bridge.store.redis import LOCK_LEASE, RedisStore


class Open(Protocol):
    def __call__(self, *, clock: Clock | None = None, keep_text: float = DAY) -> Store: ...


@dataclass
class Backend:
    """Opens stores on one shared state: a new process after the last one died, or another replica."""

    name: str
    open: Open
    raw_texts: Callable[[str], Awaitable[list[Any]]]  # a job's question and reply as stored, not as read


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock) -> AsyncIterator[Backend]:
    opened: list[Store] = []
    if request.param == "sqlite":
        path = tmp_path / "s.db"

        def open_sqlite(*, clock: Clock | None = clock, keep_text: float = DAY) -> Store:
            opened.append(SQLiteStore(path, clock=clock, keep_text=keep_text))
            return opened[-1]

        async def sqlite_texts(job_id: str) -> list[Any]:
            row = sqlite3.connect(path).execute("SELECT inbound, reply FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return list(row)

        yield Backend("sqlite", open_sqlite, sqlite_texts)
    else:
        url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")

        def open_redis(*, clock: Clock | None = clock, keep_text: float = DAY) -> Store:
            opened.append(RedisStore(url, prefix=prefix, clock=clock, keep_text=keep_text))
            return opened[-1]

        async def redis_texts(job_id: str) -> list[Any]:
            import redis.asyncio

            raw = redis.asyncio.Redis.from_url(url, decode_responses=True)
            try:
                return list(await raw.hmget(f"{prefix}job:{job_id}", ["inbound", "reply"]))
            finally:
                await raw.aclose()

        yield Backend("redis", open_redis, redis_texts)
    for store in opened:
        await store.close()


@pytest.fixture
def reopen(backend: Backend) -> Open:
    return backend.open


def question(message_id: str = "100.1", text: str = "what is the refund policy?") -> Inbound:
    return Inbound("slack", "T1", "C1", message_id, "U1", text, mentions_bot=True)


def new_job(clock: ManualClock, message_id: str = "100.1") -> ChatJob:
    return ChatJob.new(question(message_id), chatbot="bot-1", now=clock.time())


async def test_the_same_ts_in_another_channel_is_another_message(reopen: Open, clock: ManualClock) -> None:
    # Slack ts values are unique only within a channel: the channel is part of the identity.
    store = reopen()
    here = ChatJob.new(question("100.1"), chatbot="bot-1", now=clock.time())
    elsewhere_inbound = Inbound("slack", "T1", "C2", "100.1", "U2", "and here?", mentions_bot=True)
    elsewhere = ChatJob.new(elsewhere_inbound, chatbot="bot-1", now=clock.time())
    assert await store.create_job(here, lease=60) is NewJob.CREATED
    assert await store.create_job(elsewhere, lease=60) is NewJob.CREATED
    found = [await store.job_by_key(job.key) for job in (here, elsewhere)]
    assert [(f[0].id, f[0].inbound) for f in found if f] == [(here.id, here.inbound), (elsewhere.id, elsewhere_inbound)]


async def test_a_job_is_created_once_per_platform_message(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    job = new_job(clock)
    assert await store.create_job(job, lease=60) is NewJob.CREATED
    assert await store.create_job(new_job(clock), lease=60) is NewJob.DUPLICATE  # message + app_mention, or a retry
    stored, state = await store.job_by_key(job.key)  # type: ignore[misc]
    assert state is JobState.ACCEPTED and stored.inbound == job.inbound
    assert await reopen().create_job(new_job(clock), lease=60) is NewJob.DUPLICATE  # after a restart too


async def test_a_live_record_holds_a_new_job_back_and_nothing_is_stored(reopen: Open, clock: ManualClock) -> None:
    # The relay's "a human has this conversation", read in the job's own step.
    store, other = reopen(), reopen()
    job = new_job(clock)
    quiet = RecordRef("paused", job.conversation)
    await store.put("paused", job.conversation, "alert-1", ttl=60)
    assert await other.create_job(job, lease=60, lock=True, unless=quiet) is NewJob.HELD
    assert await store.job_by_key(job.key) is None and await store.get_job(job.id) is None
    assert await store.create_job(new_job(clock, "100.2"), lease=60, unless=RecordRef("paused", "elsewhere")) is (
        NewJob.CREATED
    )
    clock.advance(61)  # the record ran out: it holds nothing back
    assert await other.create_job(job, lease=60, unless=quiet) is NewJob.CREATED
    # A duplicate is a duplicate, held or not.
    await store.put("paused", job.conversation, "alert-2", ttl=60)
    assert await other.create_job(new_job(clock), lease=60, unless=quiet) is NewJob.DUPLICATE


async def test_a_job_moves_through_its_states_and_its_reply_is_queued(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    job = new_job(clock)
    await store.create_job(job, lease=60)
    await store.job_asked(job.id)
    assert (await store.get_job(job.id)).state is JobState.ASKED  # type: ignore[union-attr]
    item = await store.job_answered(job.answered("It is 30 days.", ReplyKind.ANSWER, offer_human=True))
    answered = await store.get_job(job.id)
    assert answered is not None and answered.state is JobState.ANSWERED and answered.reply == "It is 30 days."
    assert answered.offer_human and answered.asks == 1
    assert [i.key for i in await store.outbox_due()] == [item.key] == [job.delivery_key]
    assert item.destination == job.conversation and item.payload == {"kind": "chat", "job": job.id}
    taken = await store.outbox_take(item.id, lease=60)
    assert taken is not None and not taken.started
    await store.outbox_done(item.id, "1700000000.000100")
    assert (await store.get_job(job.id)).state is JobState.DELIVERED  # type: ignore[union-attr]
    assert await store.take_over_jobs(lease=60) == []


async def test_a_refused_reply_fails_its_job(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    job = new_job(clock)
    await store.create_job(job, lease=60)
    item = await store.job_answered(job.answered("hi", ReplyKind.ANSWER))
    await store.outbox_fail(item.id, "channel_not_found")
    assert (await store.get_job(job.id)).state is JobState.FAILED  # type: ignore[union-attr]
    assert await store.outbox_due() == [] and (await store.outbox_depth())[0] == 0


async def test_open_jobs_of_a_dead_process_are_taken_over_once(reopen: Open, clock: ManualClock) -> None:
    first = reopen()
    accepted, asked, answered = new_job(clock, "1"), new_job(clock, "2"), new_job(clock, "3")
    for job in (accepted, asked, answered):
        await first.create_job(job, lease=60)
    await first.job_asked(asked.id)
    await first.job_answered(answered.answered("done", ReplyKind.ANSWER))
    assert await first.take_over_jobs(lease=60) == []  # its own leases are live
    second = reopen()  # the first died
    if not second.exclusive:
        # Shared by live replicas: the dead one's leases stand until they run out.
        assert await second.take_over_jobs(lease=60) == []
        clock.advance(61)
    # (Exclusive: one process per file, so opening it voided the dead one's leases.)
    taken = {job.id: job.state for job in await second.take_over_jobs(lease=60)}
    assert taken == {accepted.id: JobState.ACCEPTED, asked.id: JobState.ASKED}  # answered: the outbox has it
    assert await second.take_over_jobs(lease=60) == []
    assert [i.key for i in await second.outbox_due()] == [answered.delivery_key]


async def test_leases_run_out_unless_renewed(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    kept, dropped = new_job(clock, "1"), new_job(clock, "2")
    await store.create_job(kept, lease=30)
    await store.create_job(dropped, lease=30)
    clock.advance(20)
    await store.renew_jobs([kept.id], lease=30)
    clock.advance(20)
    assert [job.id for job in await store.take_over_jobs(lease=30)] == [dropped.id]


async def test_texts_are_dropped_after_the_keep_window_identity_stays(backend: Backend, clock: ManualClock) -> None:
    store = backend.open(keep_text=3600)
    job = new_job(clock)
    await store.create_job(job, lease=60)
    item = await store.job_answered(job.answered("secret answer", ReplyKind.ANSWER))
    await store.outbox_done(item.id, "ts")
    clock.advance(3599)
    await store.prune()
    assert (await store.get_job(job.id)).inbound is not None  # type: ignore[union-attr]
    clock.advance(2)
    await store.prune()
    kept, state = await store.job_by_key(job.key)  # type: ignore[misc]
    assert state is JobState.DELIVERED and kept.inbound is None and kept.reply == ""
    assert await backend.raw_texts(job.id) == [None, None]  # gone from the store, not only hidden
    assert await store.create_job(new_job(clock), lease=60) is NewJob.DUPLICATE  # still deduped
    clock.advance(7 * DAY)
    await store.prune()
    assert await store.job_by_key(job.key) is None


async def test_an_outbox_item_is_held_by_one_attempt(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    assert await store.outbox_add("a1|slack:C1", "slack:C1", {"kind": "post"})
    [item] = await store.outbox_due()
    first = await store.outbox_take(item.id, lease=60)
    assert first is not None and not first.started
    assert await store.outbox_take(item.id, lease=60) is None  # a second worker does not get it
    assert await store.outbox_due() == []
    await store.outbox_retry(item.id, delay=0, error="slack 500")
    again = await store.outbox_take(item.id, lease=60)
    assert again is not None and again.started and again.attempts == 1  # look before posting again
    crashed = reopen()  # died mid-attempt
    if not crashed.exclusive:
        assert await crashed.outbox_due() == []  # a live replica's attempt may still be under way
        assert await crashed.outbox_take(item.id, lease=60) is None
        clock.advance(61)  # the attempt's lease ran out
    # (Exclusive: the lease went with the process.)
    [left] = await crashed.outbox_due()
    assert left.started
    assert await crashed.outbox_take(item.id, lease=60) is not None


async def test_an_unattempted_item_is_not_moved_while_held(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    await store.outbox_add("k", "slack:C1", {})
    [item] = await store.outbox_due()
    await store.outbox_take(item.id, lease=60)
    await store.outbox_retry(item.id, 30, "waiting behind an earlier delivery", count=False)
    assert await store.outbox_take(item.id, lease=60) is None  # still held by its attempt


async def test_outbox_lifecycle(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    assert await store.outbox_add("evt1:slack:C1", "slack:C1", {"event": "lead.captured"})
    assert not await store.outbox_add("evt1:slack:C1", "slack:C1", {"event": "lead.captured"})
    clock.advance(5)
    assert await store.outbox_depth() == (1, 5.0)
    [item] = await store.outbox_due()
    assert (item.key, item.destination, item.payload, item.attempts) == (
        "evt1:slack:C1",
        "slack:C1",
        {"event": "lead.captured"},
        0,
    )
    await store.outbox_take(item.id, lease=60)
    await store.outbox_retry(item.id, delay=30, error="slack 500")
    assert await store.outbox_due() == []
    clock.advance(30)
    [again] = await store.outbox_due()
    assert again.attempts == 1
    await store.outbox_done(again.id, reference="1700000000.000100")
    assert await store.outbox_due() == []
    assert (await store.outbox_depth())[0] == 0
    assert not await store.outbox_add("evt1:slack:C1", "slack:C1", {})  # delivered stays deduped


async def test_followed_threads_and_generations_persist(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    assert not await store.is_followed("slack:T:C:1")
    await store.follow("slack:T:C:1", ttl=100)
    assert await store.generation("slack:T:C:1") == 0
    assert await store.bump_generation("slack:T:C:1") == 1
    assert await store.bump_generation("slack:T:C:1") == 2
    store = reopen()
    assert await store.is_followed("slack:T:C:1")
    assert await store.generation("slack:T:C:1") == 2
    clock.advance(101)
    assert not await store.is_followed("slack:T:C:1")


async def test_a_thread_stays_followed_for_its_ttl_after_the_latest_follow(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    await store.follow("slack:T:C:1", ttl=3000)
    clock.advance(50)
    await store.follow("slack:T:C:1", ttl=3000)  # the expiry may lag behind by a thirtieth of the TTL
    clock.advance(2900)
    assert await store.is_followed("slack:T:C:1")  # past the first follow's 3000 s
    await store.follow("slack:T:C:1", ttl=3000)
    clock.advance(2900)
    assert await store.is_followed("slack:T:C:1")
    clock.advance(200)
    assert not await store.is_followed("slack:T:C:1")


async def test_sqlite_rewrites_a_followed_threads_expiry_once_it_lags(tmp_path: Path, clock: ManualClock) -> None:
    # A commit per answer saved: the follow of every message only refreshes an expiry that fell behind.
    store = SQLiteStore(tmp_path / "s.db", clock=clock)
    start = clock.time()

    def stored() -> float:
        row = sqlite3.connect(tmp_path / "s.db").execute("SELECT expires_at FROM followed").fetchone()
        return float(row[0])

    await store.follow("slack:T:C:1", ttl=3000)
    assert stored() == start + 3000
    clock.advance(50)
    await store.follow("slack:T:C:1", ttl=3000)
    assert stored() == start + 3000  # within 100 s (a thirtieth): not written again
    clock.advance(60)
    await store.follow("slack:T:C:1", ttl=3000)
    assert stored() == start + 110 + 3000
    await store.close()


async def test_compare_and_set_refuses_a_stale_revision(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    assert await store.put_if("alert", "a1", {"state": "open"}, revision=None)
    assert not await store.put_if("alert", "a1", {"state": "other"}, revision=None)  # exists already
    first = await store.get_versioned("alert", "a1")
    assert first is not None and first.value == {"state": "open"}
    assert await store.put_if("alert", "a1", {"state": "claimed"}, revision=first.revision)
    assert not await store.put_if("alert", "a1", {"state": "resolved"}, revision=first.revision)  # lost the race
    assert await store.get("alert", "a1") == {"state": "claimed"}
    await store.put("alert", "a1", {"state": "x"}, ttl=10)
    clock.advance(11)
    assert await store.get_versioned("alert", "a1") is None
    assert await store.put_if("alert", "a1", {"state": "new"}, revision=None)  # expired counts as absent


async def test_accept_keeps_the_records_with_the_deliveries_or_nothing(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    record = NewRecord("alert", "a1", {"state": "open"}, 60.0)
    assert await store.accept(
        ["event:1", "body:x"], [NewDelivery("a1|slack:C1", "slack:C1", {"alert": "a1"})], records=[record]
    )
    assert await store.get("alert", "a1") == {"state": "open"}
    assert [i.key for i in await store.outbox_due()] == ["a1|slack:C1"]
    # A duplicate (one key seen) changes nothing, the record included.
    again = NewRecord("alert", "a1", {"state": "new"}, 60.0)
    assert not await store.accept(
        ["body:y", "event:1"], [NewDelivery("a1|discord:1", "discord:1", {})], records=[again]
    )
    assert await store.get("alert", "a1") == {"state": "open"}
    assert len(await store.outbox_due()) == 1


async def test_accept_never_drops_a_delivery_silently(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    await store.outbox_add("a1|slack:C1", "slack:C1", {})
    # The same delivery key again under fresh dedupe keys: refused as a whole, never half-stored.
    with pytest.raises(StoreError):
        await store.accept(["event:2"], [NewDelivery("a1|slack:C1", "slack:C1", {"alert": "a1"})])
    assert await store.accept(["event:2"], [])  # the keys were rolled back with it


async def test_dedupe_keys_expire(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    assert await store.accept(["event:1"], [], ttl=DAY)
    clock.advance(DAY - 1)
    assert not await store.accept(["event:1"], [])
    clock.advance(2)
    assert await store.accept(["event:1"], [])


async def test_ping_writes_and_a_closed_store_is_a_store_error(reopen: Open) -> None:
    store = reopen()
    assert await store.ping()
    await store.close()
    assert not await store.ping()
    with pytest.raises(StoreError):
        await store.is_followed("x")


async def test_the_state_file_is_in_wal_mode(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_answers_in_one_conversation_never_overlap(reopen: Open, clock: ManualClock) -> None:
    clock.autojump = True  # a holder waiting for a shared lock polls on the clock
    first = reopen()
    second = first if first.exclusive else reopen()  # exclusive: one process holds every lock of the file
    inside: list[int] = []
    entered: list[int] = []

    async def answer(store: Store, n: int) -> None:
        async with store.conversation_lock("slack:T:C:1"):
            assert inside == [], f"{n} entered while {inside} held the conversation"
            inside.append(n)
            entered.append(n)
            await asyncio.sleep(0.005)
            inside.remove(n)

    await asyncio.wait_for(asyncio.gather(*(answer((first, second)[n % 2], n) for n in range(8))), 20)
    assert sorted(entered) == list(range(8))
    # Within one process, waiters are served in the order they came (answers keep their order).
    assert [n for n in entered if n % 2 == 0] == [0, 2, 4, 6]


async def test_another_conversation_does_not_wait(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    async with store.conversation_lock("slack:T:C:1"):
        async with asyncio.timeout(5):
            async with store.conversation_lock("slack:T:C:2"):
                pass


async def _sleeping_on(clock: ManualClock) -> None:
    """Until a waiter sleeps on the clock: advancing it before then would wake nobody."""
    async with asyncio.timeout(5):
        while clock.sleepers == 0:
            await asyncio.sleep(0.005)


async def test_a_dead_holders_lock_is_taken_after_its_lease(reopen: Open, clock: ManualClock) -> None:
    # The holder stopped for good: its own clock never moves again, so it never renews nor releases.
    dead = reopen(clock=ManualClock(clock.monotonic()))
    abandoned = dead.conversation_lock("slack:T:C:1")
    await abandoned.__aenter__()
    live = reopen()

    async def answer() -> None:
        async with live.conversation_lock("slack:T:C:1"):
            pass

    taking = asyncio.create_task(answer())
    if not live.exclusive:
        # A live replica may hold it: waited for until its lease runs out, not a moment before.
        await _sleeping_on(clock)
        clock.advance(LOCK_LEASE - 1)
        await asyncio.sleep(0.05)
        await _sleeping_on(clock)
        assert not taking.done()
        clock.advance(2)
    # (Exclusive: the lock was the dead process's own, gone with it.)
    await asyncio.wait_for(taking, 5)
    await abandoned.__aexit__(None, None, None)  # cleans up the dead holder's task; frees nothing of the live one's


def test_a_state_file_that_cannot_be_opened_names_its_path(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where a directory should be")
    with pytest.raises(StoreError, match="not-a-dir"):
        SQLiteStore(blocked / "state.db")


async def test_another_process_holding_the_write_lock_never_stalls_the_loop(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db", lock_wait=30)
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. a `check` or a backup holding the file
    gaps: list[float] = []
    loop = asyncio.get_running_loop()

    async def heartbeat() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.01)
            gaps.append(loop.time() - last)
            last = loop.time()

    ticking = asyncio.create_task(heartbeat())
    write = asyncio.create_task(store.follow("slack:T:C:1"))
    await asyncio.sleep(1.5)
    assert not write.done()  # waiting for the lock...
    other.execute("COMMIT")
    await asyncio.wait_for(write, 5)  # ...and done once it is free
    ticking.cancel()
    assert await store.is_followed("slack:T:C:1")
    # The loop kept running the whole time; a blocking wait would show one 1.5 s gap.
    assert len(gaps) > 20 and max(gaps) < 1.0


async def test_a_lock_held_too_long_is_a_store_error_not_a_hang(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db", lock_wait=0.2)
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="locked"):
        await store.follow("slack:T:C:1")
    other.execute("ROLLBACK")


# --- fewer round trips: a reply stored held, a lock taken with the job, lists appended in place -----


async def test_a_reply_stored_with_a_lease_is_held_for_its_first_attempt(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    job = new_job(clock)
    await store.create_job(job, lease=60)
    item = await store.job_answered(job.answered("It is 30 days.", ReplyKind.ANSWER), lease=120)
    assert item.held and not item.started and item.attempts == 0  # as outbox_take would have returned it
    assert await store.outbox_take(item.id, lease=60) is None  # no other worker gets it meanwhile
    assert await store.outbox_due() == []
    clock.advance(121)  # the attempt died: it is due again, and the next one looks first
    [left] = await store.outbox_due()
    assert left.id == item.id and left.started and not left.held
    again = await store.outbox_take(item.id, lease=60)
    assert again is not None and again.started
    await store.outbox_done(item.id, "1700000000.000100")
    assert (await store.get_job(job.id)).state is JobState.DELIVERED  # type: ignore[union-attr]


async def test_a_reply_stored_without_a_lease_is_free_to_take(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    job = new_job(clock)
    await store.create_job(job, lease=60)
    item = await store.job_answered(job.answered("hi", ReplyKind.ANSWER))
    assert not item.held
    assert await store.outbox_take(item.id, lease=60) is not None


async def test_a_job_created_with_its_lock_is_answered_under_it(reopen: Open, clock: ManualClock) -> None:
    clock.autojump = True  # a waiter for a shared lock polls on the clock
    store = reopen()
    job = new_job(clock)
    assert await store.create_job(job, lease=60, lock=True) is NewJob.CREATED
    assert await store.create_job(new_job(clock), lease=60, lock=True) is NewJob.DUPLICATE  # a duplicate takes nothing
    async with asyncio.timeout(5):
        async with store.conversation_lock(job.conversation):
            assert await store.generation(job.conversation) == 0
            assert await store.bump_generation(job.conversation) == 1
            assert await store.generation(job.conversation) == 1  # the holder's own bump is seen
            item = await store.job_answered(job.answered("hi", ReplyKind.ANSWER), lease=120)
            await store.outbox_done(item.id, "ts")
        async with store.conversation_lock(job.conversation):  # free again, for the next answer
            assert await store.generation(job.conversation) == 1
    other = reopen()
    async with asyncio.timeout(5):
        async with other.conversation_lock(job.conversation):
            pass


async def test_append_keeps_the_last_elements_of_a_list(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    await store.append("history", "c1", [["User", "q1"], ["Bot", "a1"]], keep=3, ttl=100)
    assert await store.get("history", "c1") == [["User", "q1"], ["Bot", "a1"]]
    first = await store.get_versioned("history", "c1")
    await store.append("history", "c1", [["User", "q2"], ["Bot", "a2"]], keep=3, ttl=100)
    after = await store.get_versioned("history", "c1")
    assert after is not None and first is not None and after.revision > first.revision  # a new revision, as put
    assert after.value == [["Bot", "a1"], ["User", "q2"], ["Bot", "a2"]]
    assert await reopen().get("history", "c1") == after.value
    clock.advance(101)
    assert await store.get("history", "c1") is None  # expired with its ttl
    await store.append("history", "c1", ["fresh"], keep=3, ttl=100)  # expired counts as absent
    assert await store.get("history", "c1") == ["fresh"]


async def test_append_keeps_every_value_exactly_and_merges_a_list_written_by_put(
    reopen: Open, clock: ManualClock
) -> None:
    store = reopen()
    odd = [[], {}, {"n": 12345678901234567, "f": 0.1, "u": "caf\u00e9 \u2603 \"q\" /"}, None, True]
    await store.put("history", "c2", odd[:2])
    await store.append("history", "c2", odd[2:], keep=10)
    assert await store.get("history", "c2") == odd
    await store.append("history", "c2", [[]], keep=2)
    assert await store.get("history", "c2") == [True, []]
    await store.put("history", "c2", ["replaced"])  # put replaces the whole list, appended to afterwards
    await store.append("history", "c2", ["next"], keep=5)
    assert await store.get("history", "c2") == ["replaced", "next"]
    await store.put("history", "c3", {"not": "a list"})
    with pytest.raises(ValueError):
        await store.append("history", "c3", ["x"], keep=5)


async def test_appends_from_every_process_all_land(reopen: Open, clock: ManualClock) -> None:
    first = reopen()
    second = first if first.exclusive else reopen()
    await asyncio.gather(*(
        (first, second)[n % 2].append("history", "c4", [n], keep=100, ttl=100) for n in range(20)
    ))
    assert sorted(await first.get("history", "c4")) == list(range(20))


async def test_facts_are_kept_once_and_a_vote_is_the_voters_last(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    start = clock.time()
    answered = Fact(FactKind.ANSWERED, "job-1", start, chatbot="bot-1", route="support")
    await store.note_facts([answered, Fact(FactKind.VOTE, "job-1", start + 1, "bot-1", actor="U1", value="up")])
    # Noted again (a retried flush): still one; the same voter changes their mind: one vote, the last.
    await store.note_facts([
        Fact(FactKind.ANSWERED, "job-1", start + 2, chatbot="bot-1", route="other"),
        Fact(FactKind.VOTE, "job-1", start + 3, "bot-1", actor="U1", value="down"),
        Fact(FactKind.VOTE, "job-1", start + 4, "bot-1", actor="U2", value="up"),
    ])
    await store.note_facts([])
    facts = await (store if store.exclusive else reopen()).facts_since(start)
    assert facts == [
        answered,
        Fact(FactKind.VOTE, "job-1", start + 3, "bot-1", actor="U1", value="down"),
        Fact(FactKind.VOTE, "job-1", start + 4, "bot-1", actor="U2", value="up"),
    ]
    assert [f.at for f in await store.facts_since(start + 3.5)] == [start + 4]


async def test_facts_are_read_in_order_past_a_page_and_forgotten_after_their_window(
    reopen: Open, clock: ManualClock
) -> None:
    store = reopen()
    start = clock.time()
    many = [Fact(FactKind.ALERT_RAISED, f"alert-{n}", start + n / 1000, value="lead.captured") for n in range(2500)]
    await store.note_facts(many[1000:])
    await store.note_facts(many[:1000])
    assert await store.facts_since(start) == many
    clock.advance(FACTS_KEPT - 5)
    fresh = Fact(FactKind.ALERT_RESOLVED, "alert-1", clock.time(), actor="U9")
    await store.note_facts([fresh])
    clock.advance(10)
    await store.prune()
    assert await store.facts_since(0) == [fresh]


def test_stored_questions_read_across_versions_in_a_rolling_deploy() -> None:
    plain = Inbound("slack", "T1", "D1", "1.2", "U1", "hi", thread="1.1", is_dm=True)
    assistant = dataclasses.replace(plain, own_thread=True)
    # The version before knows no own_thread: a plain question is written as it wrote it.
    assert "own_thread" not in inbound_to_json(plain)
    assert inbound_from_json(inbound_to_json(plain)) == plain
    assert inbound_from_json(inbound_to_json(assistant)) == assistant
    # A newer replica's field this version does not know is left out, not a failed job.
    assert inbound_from_json({**inbound_to_json(plain), "added_later": True}) == plain
