"""The embedded store: one SQLite file (WAL), one connection, and waits for its lock that never block the loop."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from bridge.clock import Clock, SystemClock
from bridge.store.checkpointer import WalCheckpointer
from bridge.store.locks import LocalLocks
from bridge.store.protocols import StoreError
from bridge.store.recent import remember
from bridge.store.records import (
    DAY,
    FACTS_KEPT,
    FOLLOW_LAG,
    ChatJob,
    Fact,
    JobState,
    NewDelivery,
    NewJob,
    NewRecord,
    OutboxItem,
    RecordRef,
    ReplyKind,
    Versioned,
    inbound_from_json,
    inbound_to_json,
)

log = logging.getLogger(__name__)

# A record that is there and not expired: its (kind, key, now) as parameters.
_LIVE_RECORD = "kind = ? AND key = ? AND (expires_at IS NULL OR expires_at >= ?)"

T = TypeVar("T")

DELIVERED_KEPT = 7 * DAY  # delivered outbox rows and finished jobs' identities (dedupe after the text is gone)
# SQLite waits this long for another connection's lock inside the (blocking) call; longer
# waits happen in asyncio.sleep between tries, so the loop keeps serving Slack acks,
# Discord heartbeats and health checks while another process holds the file.
BUSY_SLICE_MS = 5
LOCK_WAIT = 5.0
# Conversations whose follow expiry and generation the store remembers (the file has one
# process, so what it wrote is what is there); past this many the oldest is forgotten.
REMEMBERED = 50_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS followed (
    conversation TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS generations (
    conversation TEXT PRIMARY KEY,
    generation INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    key TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 1,
    expires_at REAL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    conversation TEXT NOT NULL,
    chatbot TEXT NOT NULL,
    state TEXT NOT NULL,
    inbound TEXT,
    reply TEXT,
    reply_kind TEXT NOT NULL DEFAULT 'answer',
    offer_human INTEGER NOT NULL DEFAULT 0,
    asks INTEGER NOT NULL DEFAULT 0,
    outbox_id INTEGER,
    owner TEXT NOT NULL,
    lease_until REAL NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs (state, lease_until);
CREATE INDEX IF NOT EXISTS jobs_outbox ON jobs (outbox_id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    destination TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    delivered_at REAL,
    failed_at REAL,
    reference TEXT,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (delivered_at, next_attempt_at);
CREATE TABLE IF NOT EXISTS facts (
    identity TEXT PRIMARY KEY,
    at REAL NOT NULL,
    fact TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS facts_at ON facts (at);
"""

_OPEN_STATES = (JobState.ACCEPTED.value, JobState.ASKED.value)
_JOB_COLUMNS = "id, key, conversation, chatbot, state, inbound, reply, reply_kind, offer_human, asks, created_at"
_OUTBOX_COLUMNS = "id, key, destination, payload, attempts, created_at, next_attempt_at, started"


def _is_busy(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


class SQLiteStore:
    """The embedded store. One process per file: opening it takes over every lease of an earlier run.

    Each operation is one short synchronous statement or transaction (well under a
    millisecond) run in the loop: the project runs no threads. Only waiting for another
    connection's lock is long, and that wait is spent in asyncio.sleep (see BUSY_SLICE_MS).
    """

    exclusive = True  # one process per file: whatever an earlier process held died with it

    def __init__(
        self,
        path: str | Path = ":memory:",
        *,
        clock: Clock | None = None,
        keep_text: float = DAY,
        lock_wait: float = LOCK_WAIT,
    ) -> None:
        self._clock = clock or SystemClock()
        self._keep_text = keep_text
        self._lock_wait = lock_wait
        self._path = str(path)
        # Each process run owns its leases; leases of dead runs are taken over.
        self.owner = uuid.uuid4().hex
        # One process per file, so a conversation's lock is in this process.
        self._locks = LocalLocks()
        self._checkpointer: WalCheckpointer | None = None
        # What this process wrote, so that it need not be read or written again (REMEMBERED).
        self._follow_expiry: dict[str, float] = {}
        self._generations: dict[str, int] = {}
        try:
            if self._path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self._path, isolation_level=None)
            self._db.execute(f"PRAGMA busy_timeout={BUSY_SLICE_MS * 200}")  # start-up may wait (no loop yet)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a crash of this process; only a power loss can
            # undo the last commits.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA busy_timeout={BUSY_SLICE_MS}")
            self._prune_now()
            # A file has one bridge process: whatever an earlier run held, it held when it died.
            self._db.execute("UPDATE jobs SET lease_until = 0 WHERE owner != ?", (self.owner,))
            self._db.execute("UPDATE outbox SET lease_until = 0")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the state file {self._path}: {exc}") from None

    # --- running statements ---------------------------------------------------------------------

    async def _run(self, operation: Callable[[], T]) -> T:
        """Run one statement or transaction; wait for another connection's lock without blocking the loop."""
        deadline = self._clock.monotonic() + self._lock_wait
        pause = 0.002
        while True:
            try:
                return operation()
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise StoreError(f"state file {self._path}: {exc}") from None
                if self._clock.monotonic() >= deadline:
                    raise StoreError(f"state file {self._path} stayed locked by another process") from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock at once: the busy wait happens here, before any change.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def _now(self) -> float:
        return self._clock.time()

    # --- maintenance ----------------------------------------------------------------------------

    async def prune(self) -> None:
        await self._run(self._prune_now)

    def _prune_now(self) -> None:
        now = self._now()
        with self._transaction():
            self._db.execute("DELETE FROM followed WHERE expires_at < ?", (now,))
            self._db.execute("DELETE FROM seen WHERE expires_at < ?", (now,))
            self._db.execute("DELETE FROM records WHERE expires_at IS NOT NULL AND expires_at < ?", (now,))
            self._db.execute(
                "DELETE FROM outbox WHERE COALESCE(delivered_at, failed_at) < ?", (now - DELIVERED_KEPT,)
            )
            # The question and the reply are kept only as long as they may still be needed.
            self._db.execute(
                "UPDATE jobs SET inbound = NULL, reply = NULL WHERE finished_at < ? AND inbound IS NOT NULL",
                (now - self._keep_text,),
            )
            self._db.execute("DELETE FROM jobs WHERE finished_at < ?", (now - DELIVERED_KEPT,))
            self._db.execute("DELETE FROM facts WHERE at < ?", (now - FACTS_KEPT,))

    async def ping(self) -> bool:
        """A write, not a read: a full disk or a read-only file makes the store unready."""
        try:
            await self._run(lambda: self._db.execute(
                "INSERT OR REPLACE INTO seen (key, expires_at) VALUES ('ping', ?)", (self._now() + 60,)
            ))
        except StoreError as exc:
            log.error("state store cannot write: %s", exc)
            return False
        return True

    def checkpoint_elsewhere(self) -> None:
        """Leave the WAL's checkpoints, and their fsyncs, to a child process (bridge/store/checkpointer.py).

        `run` does this once its loop runs. The store's own checkpoint stays as a backstop, and
        takes over again if the child cannot start or exits.
        """
        if self._path == ":memory:" or self._checkpointer is not None:
            return
        checkpointer = WalCheckpointer(self._path, self._db)
        try:
            checkpointer.start()
        except OSError as exc:
            log.warning("the WAL checkpointer could not start (%s): the state store checkpoints in the loop", exc)
            return
        self._checkpointer = checkpointer

    @property
    def checkpointer(self) -> WalCheckpointer | None:
        return self._checkpointer

    async def close(self) -> None:
        if self._checkpointer is not None:
            await self._checkpointer.stop()
        self._db.close()

    # --- conversation state ---------------------------------------------------------------------

    async def follow(self, conversation: str, ttl: float = 30 * DAY) -> None:
        expires = self._now() + ttl
        if self._follow_expiry.get(conversation, 0.0) >= expires - ttl * FOLLOW_LAG:
            return  # written lately: kept long enough (FOLLOW_LAG)
        await self._run(lambda: self._db.execute(
            "INSERT OR REPLACE INTO followed (conversation, expires_at) VALUES (?, ?)", (conversation, expires)
        ))
        remember(self._follow_expiry, conversation, expires, REMEMBERED)

    async def is_followed(self, conversation: str) -> bool:
        now = self._now()
        if self._follow_expiry.get(conversation, 0.0) >= now:
            return True
        row = await self._run(lambda: self._db.execute(
            "SELECT expires_at FROM followed WHERE conversation = ? AND expires_at >= ?", (conversation, now)
        ).fetchone())
        if row is None:
            return False
        remember(self._follow_expiry, conversation, float(row[0]), REMEMBERED)
        return True

    async def generation(self, conversation: str) -> int:
        known = self._generations.get(conversation)
        if known is not None:
            return known
        row = await self._run(lambda: self._db.execute(
            "SELECT generation FROM generations WHERE conversation = ?", (conversation,)
        ).fetchone())
        generation = int(row[0]) if row else 0
        remember(self._generations, conversation, generation, REMEMBERED)
        return generation

    async def bump_generation(self, conversation: str) -> int:
        row = await self._run(lambda: self._db.execute(
            "INSERT INTO generations (conversation, generation) VALUES (?, 1) "
            "ON CONFLICT(conversation) DO UPDATE SET generation = generation + 1 RETURNING generation",
            (conversation,),
        ).fetchone())
        remember(self._generations, conversation, int(row[0]), REMEMBERED)
        return int(row[0])

    def conversation_lock(self, conversation: str) -> AbstractAsyncContextManager[None]:
        """An asyncio lock: the file has one process, so no other process answers here."""
        return self._locks.hold(conversation)

    # --- records ----------------------------------------------------------------------------------

    async def get(self, kind: str, key: str) -> Any | None:
        found = await self.get_versioned(kind, key)
        return found.value if found is not None else None

    async def get_versioned(self, kind: str, key: str) -> Versioned | None:
        row = await self._run(lambda: self._db.execute(
            f"SELECT value, revision FROM records WHERE {_LIVE_RECORD}",
            (kind, key, self._now()),
        ).fetchone())
        return Versioned(json.loads(row[0]), int(row[1])) if row else None

    async def put(self, kind: str, key: str, value: Any, ttl: float | None = None) -> None:
        await self._run(lambda: self._put(NewRecord(kind, key, value, ttl)))

    def _put(self, record: NewRecord) -> None:
        expires = self._now() + record.ttl if record.ttl is not None else None
        self._db.execute(
            "INSERT INTO records (kind, key, value, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(kind, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at, "
            "revision = revision + 1",
            (record.kind, record.key, json.dumps(record.value), expires),
        )

    async def put_if(self, kind: str, key: str, value: Any, *, revision: int | None, ttl: float | None = None) -> bool:
        def compare_and_set() -> bool:
            now = self._now()
            with self._transaction():
                row = self._db.execute(
                    f"SELECT revision FROM records WHERE {_LIVE_RECORD}",
                    (kind, key, now),
                ).fetchone()
                current = int(row[0]) if row else None
                if current != revision:
                    return False
                self._put(NewRecord(kind, key, value, ttl))
            return True

        return await self._run(compare_and_set)

    async def append(self, kind: str, key: str, values: Sequence[Any], *, keep: int, ttl: float | None = None) -> None:
        if keep < 1:
            raise ValueError("keep at least one element")

        def append_all() -> None:
            with self._transaction():
                row = self._db.execute(
                    f"SELECT value FROM records WHERE {_LIVE_RECORD}",
                    (kind, key, self._now()),
                ).fetchone()
                current = json.loads(row[0]) if row else []
                if not isinstance(current, list):
                    raise ValueError(f"{kind} {key} holds no list")
                self._put(NewRecord(kind, key, [*current, *values][-keep:], ttl))

        await self._run(append_all)

    async def delete(self, kind: str, key: str) -> None:
        await self._run(lambda: self._db.execute("DELETE FROM records WHERE kind = ? AND key = ?", (kind, key)))

    # --- webhook intake -------------------------------------------------------------------------

    async def accept(
        self,
        keys: Sequence[str],
        deliveries: Sequence[NewDelivery],
        *,
        ttl: float = DAY,
        records: Sequence[NewRecord] = (),
    ) -> bool:
        def accept_all() -> bool:
            now = self._now()
            # One transaction: a crash leaves either nothing, or the keys, the records (which
            # the deliveries need) and every delivery.
            with self._transaction():
                marks = ",".join("?" * len(keys))
                seen = self._db.execute(f"SELECT 1 FROM seen WHERE key IN ({marks}) AND expires_at >= ?", (*keys, now))
                if seen.fetchone() is not None:
                    return False
                self._db.executemany(
                    "INSERT OR REPLACE INTO seen (key, expires_at) VALUES (?, ?)", [(k, now + ttl) for k in keys]
                )
                for delivery in deliveries:
                    # Never ignored: a delivery that could not be queued must not leave a 2xx behind it.
                    self._insert_delivery(delivery, now)
                for record in records:
                    self._put(record)
            return True

        return await self._run(accept_all)

    def _insert_delivery(self, delivery: NewDelivery, now: float) -> int:
        try:
            cursor = self._db.execute(
                "INSERT INTO outbox (key, destination, payload, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?)",
                (delivery.key, delivery.destination, json.dumps(delivery.payload), now, now),
            )
        except sqlite3.IntegrityError:
            raise StoreError(f"delivery {delivery.key} is already queued") from None
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    # --- chat jobs ------------------------------------------------------------------------------

    async def create_job(
        self, job: ChatJob, *, lease: float, lock: bool = False, unless: RecordRef | None = None
    ) -> NewJob:
        # `lock` changes nothing here: a conversation's lock is in this process (an asyncio lock), free to take.
        if job.inbound is None:
            raise ValueError("a new job carries its question")
        inbound = json.dumps(inbound_to_json(job.inbound))
        row = (
            job.id, job.key, job.conversation, job.chatbot, job.state.value,
            inbound, self.owner, self._clock.time() + lease, job.created_at,
        )
        columns = (
            "INSERT OR IGNORE INTO jobs"
            " (id, key, conversation, chatbot, state, inbound, owner, lease_until, created_at)"
        )

        def create() -> NewJob:
            if unless is None:
                cursor = self._db.execute(f"{columns} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            else:
                # One statement: the record is read as the row is written.
                cursor = self._db.execute(
                    f"{columns} SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS"
                    f" (SELECT 1 FROM records WHERE {_LIVE_RECORD})",
                    (*row, unless.kind, unless.key, self._now()),
                )
            if cursor.rowcount == 1:
                return NewJob.CREATED
            if unless is None or self._db.execute("SELECT 1 FROM jobs WHERE key = ?", (job.key,)).fetchone():
                return NewJob.DUPLICATE
            return NewJob.HELD

        return await self._run(create)

    async def job_asked(self, job_id: str) -> None:
        await self._run(lambda: self._db.execute(
            "UPDATE jobs SET state = ?, asks = asks + 1 WHERE id = ?", (JobState.ASKED.value, job_id)
        ))

    async def job_answered(self, job: ChatJob, *, lease: float | None = None) -> OutboxItem:
        def answer() -> OutboxItem:
            now = self._now()
            delivery = NewDelivery(job.delivery_key, job.conversation, {"kind": "chat", "job": job.id})
            with self._transaction():
                item_id = self._insert_delivery(delivery, now)
                if lease is not None:  # held for the caller's first attempt, as outbox_take would
                    self._db.execute(
                        "UPDATE outbox SET started = 1, lease_until = ? WHERE id = ?", (now + lease, item_id)
                    )
                self._db.execute(
                    "UPDATE jobs SET state = ?, reply = ?, reply_kind = ?, offer_human = ?, outbox_id = ? WHERE id = ?",
                    (JobState.ANSWERED.value, job.reply, job.reply_kind.value, int(job.offer_human), item_id, job.id),
                )
            return OutboxItem(
                item_id, delivery.key, delivery.destination, delivery.payload, 0, now, now, held=lease is not None
            )

        return await self._run(answer)

    async def get_job(self, job_id: str) -> ChatJob | None:
        row = await self._run(lambda: self._db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
        ).fetchone())
        return _job(row) if row else None

    async def job_by_key(self, key: str) -> tuple[ChatJob, JobState] | None:
        row = await self._run(lambda: self._db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE key = ?", (key,)
        ).fetchone())
        if row is None:
            return None
        job = _job(row)
        return job, job.state

    async def take_over_jobs(self, *, lease: float, limit: int = 100) -> list[ChatJob]:
        def take() -> list[ChatJob]:
            now = self._now()
            with self._transaction():
                rows = self._db.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN (?, ?) AND lease_until < ? "
                    "ORDER BY created_at LIMIT ?",
                    (*_OPEN_STATES, now, limit),
                ).fetchall()
                self._db.executemany(
                    "UPDATE jobs SET owner = ?, lease_until = ? WHERE id = ?",
                    [(self.owner, now + lease, row[0]) for row in rows],
                )
            return [_job(row) for row in rows]

        return await self._run(take)

    async def renew_jobs(self, job_ids: Sequence[str], *, lease: float) -> None:
        until = self._now() + lease
        await self._run(lambda: self._db.executemany(
            "UPDATE jobs SET lease_until = ? WHERE id = ? AND owner = ?", [(until, i, self.owner) for i in job_ids]
        ))

    async def job_counts(self) -> dict[JobState, int]:
        rows = await self._run(lambda: self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {JobState(state): int(count) for state, count in rows}

    # --- outbox ---------------------------------------------------------------------------------

    async def outbox_add(self, key: str, destination: str, payload: dict[str, Any]) -> bool:
        def add() -> bool:
            now = self._now()
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO outbox (key, destination, payload, created_at, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (key, destination, json.dumps(payload), now, now),
            )
            return cursor.rowcount == 1

        return await self._run(add)

    async def outbox_due(self, limit: int = 50) -> list[OutboxItem]:
        def due() -> list[OutboxItem]:
            now = self._now()
            rows = self._db.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL "
                "AND next_attempt_at <= ? AND lease_until < ? ORDER BY id LIMIT ?",
                (now, now, limit),
            ).fetchall()
            return [_item(row) for row in rows]

        return await self._run(due)

    async def outbox_take(self, item_id: int, *, lease: float) -> OutboxItem | None:
        def take() -> OutboxItem | None:
            now = self._now()
            with self._transaction():
                row = self._db.execute(
                    f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id = ? AND delivered_at IS NULL "
                    "AND failed_at IS NULL AND lease_until < ?",
                    (item_id, now),
                ).fetchone()
                if row is None:
                    return None
                self._db.execute(
                    "UPDATE outbox SET started = 1, lease_until = ? WHERE id = ?", (now + lease, item_id)
                )
            return _item(row)

        return await self._run(take)

    async def outbox_done(self, item_id: int, reference: str) -> None:
        def done() -> None:
            now = self._now()
            with self._transaction():
                self._db.execute(
                    "UPDATE outbox SET delivered_at = ?, reference = ?, attempts = attempts + 1, lease_until = 0 "
                    "WHERE id = ?",
                    (now, reference, item_id),
                )
                self._db.execute(
                    "UPDATE jobs SET state = ?, finished_at = ? WHERE outbox_id = ?",
                    (JobState.DELIVERED.value, now, item_id),
                )

        await self._run(done)

    async def outbox_retry(self, item_id: int, delay: float, error: str, *, count: bool = True) -> None:
        # An item that was not attempted (count=False) is moved only while nobody holds it.
        await self._run(lambda: self._db.execute(
            "UPDATE outbox SET attempts = attempts + ?, next_attempt_at = ?, last_error = ?, lease_until = 0 "
            "WHERE id = ? AND (? OR lease_until < ?)",
            (int(count), self._now() + delay, error[:500], item_id, int(count), self._now()),
        ))

    async def outbox_fail(self, item_id: int, error: str) -> None:
        def fail() -> None:
            now = self._now()
            with self._transaction():
                self._db.execute(
                    "UPDATE outbox SET failed_at = ?, last_error = ?, attempts = attempts + 1, lease_until = 0 "
                    "WHERE id = ?",
                    (now, error[:500], item_id),
                )
                self._db.execute(
                    "UPDATE jobs SET state = ?, finished_at = ? WHERE outbox_id = ?",
                    (JobState.FAILED.value, now, item_id),
                )

        await self._run(fail)

    async def outbox_hasten(self, platform: str) -> int:
        def hasten() -> int:
            now = self._now()
            cursor = self._db.execute(
                "UPDATE outbox SET next_attempt_at = ? WHERE delivered_at IS NULL AND failed_at IS NULL "
                "AND next_attempt_at > ? AND substr(destination, 1, ?) = ?",
                (now, now, len(platform) + 1, platform + ":"),
            )
            return cursor.rowcount

        return await self._run(hasten)

    async def outbox_depth(self) -> tuple[int, float | None]:
        count, oldest = await self._run(lambda: self._db.execute(
            "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL"
        ).fetchone())
        return int(count), (self._now() - oldest) if oldest is not None else None

    # --- facts for the report -------------------------------------------------------------------

    async def note_facts(self, facts: Sequence[Fact]) -> None:
        def note_all() -> None:
            with self._transaction():
                for fact in facts:
                    verb = "INSERT OR REPLACE" if fact.replaces else "INSERT OR IGNORE"
                    self._db.execute(
                        f"{verb} INTO facts (identity, at, fact) VALUES (?, ?, ?)",
                        (fact.identity, fact.at, fact.to_json()),
                    )

        if facts:
            await self._run(note_all)

    async def facts_since(self, since: float) -> list[Fact]:
        rows = await self._run(lambda: self._db.execute(
            "SELECT fact FROM facts WHERE at >= ? ORDER BY at, identity", (since,)
        ).fetchall())
        return [Fact.from_json(row[0]) for row in rows]

def _job(row: tuple[Any, ...]) -> ChatJob:
    (job_id, key, conversation, chatbot, state, inbound, reply, reply_kind, offer_human, asks, created) = row
    return ChatJob(
        id=job_id,
        inbound=inbound_from_json(json.loads(inbound)) if inbound else None,
        key=key,
        conversation=conversation,
        chatbot=chatbot,
        created_at=created,
        state=JobState(state),
        reply=reply or "",
        reply_kind=ReplyKind(reply_kind),
        offer_human=bool(offer_human),
        asks=int(asks),
    )


def _item(row: tuple[Any, ...]) -> OutboxItem:
    return OutboxItem(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], bool(row[7]))


class FactsReader:
    """A state file's report facts, read through a read-only connection, beside a bridge that may be running.

    Not a SQLiteStore: opening one voids every lease in the file (one process per file), which
    would let a running bridge's own work be taken over. A read-only connection changes nothing,
    and in WAL mode it neither waits for the bridge's writes nor holds them up.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        if not Path(path).is_file():
            raise StoreError(f"no state file at {self._path} (has the bridge run with this config yet?)")
        try:
            self._db = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
            self._db.execute(f"PRAGMA busy_timeout={BUSY_SLICE_MS * 200}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the state file {self._path}: {exc}") from None

    async def facts_since(self, since: float) -> list[Fact]:
        try:
            rows = self._db.execute("SELECT fact FROM facts WHERE at >= ? ORDER BY at, identity", (since,)).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # written by a bridge from before the report: nothing noted yet
            raise StoreError(f"state file {self._path}: {exc}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"state file {self._path}: {exc}") from None
        return [Fact.from_json(row[0]) for row in rows]

    async def close(self) -> None:
        self._db.close()
