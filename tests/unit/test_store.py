"""The store's contract, on the SQLite backend: jobs, leases, the outbox, records, atomic intake, retention."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.clock import ManualClock
from bridge.messages import Inbound
from bridge.store import DAY, ChatJob, JobState, NewDelivery, NewRecord, ReplyKind, SQLiteStore, Store, StoreError

Open = Callable[[], Store]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def reopen(tmp_path: Path, clock: ManualClock) -> Open:
    """Opens the store on the same state again: a new process after the last one died."""
    return lambda: SQLiteStore(tmp_path / "s.db", clock=clock)


def question(message_id: str = "100.1", text: str = "what is the refund policy?") -> Inbound:
    return Inbound("slack", "T1", "C1", message_id, "U1", text, mentions_bot=True)


def new_job(clock: ManualClock, message_id: str = "100.1") -> ChatJob:
    return ChatJob.new(question(message_id), chatbot="bot-1", now=clock.time())


async def test_a_job_is_created_once_per_platform_message(reopen: Open, clock: ManualClock) -> None:
    store = reopen()
    job = new_job(clock)
    assert await store.create_job(job, lease=60)
    assert not await store.create_job(new_job(clock), lease=60)  # message + app_mention, or a retry
    stored, state = await store.job_by_key(job.key)  # type: ignore[misc]
    assert state is JobState.ACCEPTED and stored.inbound == job.inbound
    assert not await reopen().create_job(new_job(clock), lease=60)  # after a restart too


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
    second = reopen()  # the first died: one process per file, so its leases are void
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


async def test_texts_are_dropped_after_the_keep_window_identity_stays(tmp_path: Path, clock: ManualClock) -> None:
    store = SQLiteStore(tmp_path / "s.db", clock=clock, keep_text=3600)
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
    raw = sqlite3.connect(tmp_path / "s.db").execute("SELECT inbound, reply FROM jobs").fetchall()
    assert raw == [(None, None)]  # gone from the file, not only hidden
    assert not await store.create_job(new_job(clock), lease=60)  # still deduped
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
    crashed = reopen()  # died mid-attempt: the lease goes with the process
    [left] = await crashed.outbox_due()
    assert left.started


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
    assert (item.key, item.destination, item.payload, item.attempts) == ("evt1:slack:C1", "slack:C1", {"event": "lead.captured"}, 0)
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
    assert await store.accept(["event:1", "body:x"], [NewDelivery("a1|slack:C1", "slack:C1", {"alert": "a1"})], records=[record])
    assert await store.get("alert", "a1") == {"state": "open"}
    assert [i.key for i in await store.outbox_due()] == ["a1|slack:C1"]
    # A duplicate (one key seen) changes nothing, the record included.
    again = NewRecord("alert", "a1", {"state": "new"}, 60.0)
    assert not await store.accept(["body:y", "event:1"], [NewDelivery("a1|discord:1", "discord:1", {})], records=[again])
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


async def test_ping_writes_and_a_broken_file_is_a_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert await store.ping()
    await store.close()
    assert not await store.ping()
    with pytest.raises(StoreError):
        await store.is_followed("x")


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
