"""The SQLite store: claims across restarts, followed threads, generations, the outbox."""

from __future__ import annotations

from pathlib import Path

from bridge.clock import ManualClock
from bridge.store import DAY, SQLiteStore


async def test_claim_is_once_per_key(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    assert await store.claim("msg:1")
    assert not await store.claim("msg:1")  # concurrent duplicate in the same run
    await store.finish("msg:1")
    assert not await store.claim("msg:1")
    assert await store.claim("msg:2")


async def test_finished_claim_survives_restart_unfinished_one_can_be_retaken(tmp_path: Path) -> None:
    first = SQLiteStore(tmp_path / "s.db")
    await first.claim("done")
    await first.finish("done")
    await first.claim("crashed-mid-answer")
    await first.close()
    second = SQLiteStore(tmp_path / "s.db")
    assert not await second.claim("done")
    assert await second.claim("crashed-mid-answer")  # the earlier run died: answer the retry
    assert not await second.claim("crashed-mid-answer")


async def test_claims_expire(tmp_path: Path) -> None:
    clock = ManualClock()
    store = SQLiteStore(tmp_path / "s.db", clock=clock)
    await store.claim("k", ttl=DAY)
    await store.finish("k")
    clock.advance(DAY - 1)
    assert not await store.claim("k")
    clock.advance(2)
    assert await store.claim("k")


async def test_release_gives_the_claim_back(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.claim("k")
    await store.release("k")
    assert await store.claim("k")


async def test_followed_threads_and_generations_persist(tmp_path: Path) -> None:
    clock = ManualClock()
    store = SQLiteStore(tmp_path / "s.db", clock=clock)
    assert not await store.is_followed("slack:T:C:1")
    await store.follow("slack:T:C:1", ttl=100)
    assert await store.generation("slack:T:C:1") == 0
    assert await store.bump_generation("slack:T:C:1") == 1
    assert await store.bump_generation("slack:T:C:1") == 2
    await store.close()
    store = SQLiteStore(tmp_path / "s.db", clock=clock)
    assert await store.is_followed("slack:T:C:1")
    assert await store.generation("slack:T:C:1") == 2
    clock.advance(101)
    assert not await store.is_followed("slack:T:C:1")


async def test_outbox_lifecycle(tmp_path: Path) -> None:
    clock = ManualClock()
    store = SQLiteStore(tmp_path / "s.db", clock=clock)
    assert await store.outbox_add("evt1:slack:C1", "slack:C1", {"event": "lead.captured"})
    assert not await store.outbox_add("evt1:slack:C1", "slack:C1", {"event": "lead.captured"})
    clock.advance(5)
    assert await store.outbox_depth() == (1, 5.0)
    [item] = await store.outbox_due()
    assert (item.key, item.destination, item.payload, item.attempts) == ("evt1:slack:C1", "slack:C1", {"event": "lead.captured"}, 0)
    await store.outbox_retry(item.id, delay=30, error="slack 500")
    assert await store.outbox_due() == []
    clock.advance(30)
    [again] = await store.outbox_due()
    assert again.attempts == 1
    await store.outbox_done(again.id, reference="1700000000.000100")
    assert await store.outbox_due() == []
    assert (await store.outbox_depth())[0] == 0
    assert not await store.outbox_add("evt1:slack:C1", "slack:C1", {})  # delivered stays deduped


async def test_wal_mode_and_ping(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert await store.ping()
    await store.close()
    assert not await store.ping()


async def test_accept_keeps_the_record_with_the_deliveries_or_nothing(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    record = ("alert", "a1", {"state": "open"}, 60.0)
    assert await store.accept(["event:1", "body:x"], [("a1|slack:C1", "slack:C1", {"alert": "a1"})], record=record)
    assert await store.get("alert", "a1") == {"state": "open"}
    assert [i.key for i in await store.outbox_due()] == ["a1|slack:C1"]
    # A duplicate (one key seen) changes nothing, the record included.
    assert not await store.accept(["body:y", "event:1"], [("a1|discord:1", "discord:1", {})], record=("alert", "a1", {"state": "new"}, 60.0))
    assert await store.get("alert", "a1") == {"state": "open"}
    assert len(await store.outbox_due()) == 1
