"""Durable state behind a narrow async interface, with SQLite (WAL) as the embedded default."""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bridge.clock import Clock, SystemClock

log = logging.getLogger(__name__)

DAY = 86_400.0

# A small JSON value kept by `put` or `accept`: (kind, key, value, ttl seconds or None).
Record = tuple[str, str, Any, float | None]


@dataclass(frozen=True)
class OutboxItem:
    """One delivery to make: a payload for one destination, retried until it is done."""

    id: int
    key: str  # unique per (event, destination): adding it twice is a no-op
    destination: str
    payload: dict[str, Any]
    attempts: int
    created_at: float
    next_attempt_at: float
    started: bool = False  # an earlier attempt began: it may have posted before a crash


class Store(Protocol):
    """What the bridge keeps across restarts. Small on purpose: a Redis version must fit it."""

    async def claim(self, key: str, ttl: float = DAY) -> bool:
        """Take a unit of work (one platform message) once. False when it is already taken.

        A claim left unfinished by an earlier process (it crashed mid-answer) can be
        taken again, so a platform retry after a restart still gets its answer.
        """

    async def finish(self, key: str) -> None:
        """Mark a claimed unit done: from now on every claim of it is refused until it expires."""

    async def release(self, key: str) -> None:
        """Give a claim back without finishing it (the work was never started)."""

    async def follow(self, conversation: str, ttl: float = 30 * DAY) -> None:
        """Remember that the bot takes part in this thread, so follow-ups need no mention."""

    async def is_followed(self, conversation: str) -> bool: ...

    async def generation(self, conversation: str) -> int:
        """The conversation's session generation; a reset increments it (fresh InsiteChat memory)."""

    async def bump_generation(self, conversation: str) -> int: ...

    async def put(self, kind: str, key: str, value: Any, ttl: float | None = None) -> None:
        """Keep a small JSON value (an alert, a thread reference...) under (kind, key)."""

    async def get(self, kind: str, key: str) -> Any | None: ...

    async def delete(self, kind: str, key: str) -> None: ...

    async def accept(
        self,
        keys: list[str],
        deliveries: list[tuple[str, str, dict[str, Any]]],
        ttl: float = DAY,
        record: Record | None = None,
    ) -> bool:
        """Atomically: unless one of `keys` was seen within its ttl, remember all of them, keep
        `record` and queue the deliveries (key, destination, payload). False for a duplicate."""

    async def outbox_add(self, key: str, destination: str, payload: dict[str, Any]) -> bool:
        """Queue a delivery; False if one with this key exists (delivered or not)."""

    async def outbox_due(self, limit: int = 50) -> list[OutboxItem]: ...

    async def outbox_begin(self, item_id: int) -> None:
        """Mark that an attempt starts: after a crash, look before posting again."""

    async def outbox_done(self, item_id: int, reference: str) -> None:
        """Record that the platform accepted the delivery, with its message reference."""

    async def outbox_retry(self, item_id: int, delay: float, error: str, *, count: bool = True) -> None:
        """Try again after `delay`; `count=False` when the item itself was not attempted."""

    async def outbox_depth(self) -> tuple[int, float | None]:
        """Undelivered items and the age in seconds of the oldest one."""

    async def ping(self) -> bool:
        """True when the store answers (for readiness)."""

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    expires_at REAL NOT NULL
);
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
    expires_at REAL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    destination TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    reference TEXT,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (delivered_at, next_attempt_at);
"""


class SQLiteStore:
    """The embedded store: one file, WAL journal, one connection.

    Calls are synchronous inside async methods on purpose: each is a single indexed
    statement that takes well under a millisecond, and the project runs no threads.
    """

    def __init__(self, path: str | Path = ":memory:", *, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        # Each process run owns its claims; claims of dead runs can be retaken.
        self.run_id = uuid.uuid4().hex
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a crash of this process; only a power loss can
        # undo the last commits. busy_timeout covers a second process (e.g. `check`).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._prune()

    def _prune(self) -> None:
        now = self._clock.time()
        self._db.execute("DELETE FROM claims WHERE expires_at < ?", (now,))
        self._db.execute("DELETE FROM followed WHERE expires_at < ?", (now,))
        self._db.execute("DELETE FROM seen WHERE expires_at < ?", (now,))
        self._db.execute("DELETE FROM records WHERE expires_at IS NOT NULL AND expires_at < ?", (now,))
        self._db.execute("DELETE FROM outbox WHERE delivered_at IS NOT NULL AND delivered_at < ?", (now - 7 * DAY,))

    async def claim(self, key: str, ttl: float = DAY) -> bool:
        now = self._clock.time()
        row = self._db.execute("SELECT owner, done, expires_at FROM claims WHERE key = ?", (key,)).fetchone()
        if row is not None and row[2] >= now and (row[1] or row[0] == self.run_id):
            return False
        self._db.execute(
            "INSERT OR REPLACE INTO claims (key, owner, done, expires_at) VALUES (?, ?, 0, ?)",
            (key, self.run_id, now + ttl),
        )
        return True

    async def finish(self, key: str) -> None:
        self._db.execute("UPDATE claims SET done = 1 WHERE key = ?", (key,))

    async def release(self, key: str) -> None:
        self._db.execute("DELETE FROM claims WHERE key = ? AND owner = ? AND done = 0", (key, self.run_id))

    async def follow(self, conversation: str, ttl: float = 30 * DAY) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO followed (conversation, expires_at) VALUES (?, ?)",
            (conversation, self._clock.time() + ttl),
        )

    async def is_followed(self, conversation: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM followed WHERE conversation = ? AND expires_at >= ?", (conversation, self._clock.time())
        ).fetchone()
        return row is not None

    async def generation(self, conversation: str) -> int:
        row = self._db.execute("SELECT generation FROM generations WHERE conversation = ?", (conversation,)).fetchone()
        return int(row[0]) if row else 0

    async def bump_generation(self, conversation: str) -> int:
        self._db.execute(
            "INSERT INTO generations (conversation, generation) VALUES (?, 1) "
            "ON CONFLICT(conversation) DO UPDATE SET generation = generation + 1",
            (conversation,),
        )
        return await self.generation(conversation)

    async def put(self, kind: str, key: str, value: Any, ttl: float | None = None) -> None:
        self._put(kind, key, value, ttl)

    def _put(self, kind: str, key: str, value: Any, ttl: float | None = None) -> None:
        expires = self._clock.time() + ttl if ttl is not None else None
        self._db.execute(
            "INSERT OR REPLACE INTO records (kind, key, value, expires_at) VALUES (?, ?, ?, ?)",
            (kind, key, json.dumps(value), expires),
        )

    async def get(self, kind: str, key: str) -> Any | None:
        row = self._db.execute(
            "SELECT value FROM records WHERE kind = ? AND key = ? AND (expires_at IS NULL OR expires_at >= ?)",
            (kind, key, self._clock.time()),
        ).fetchone()
        return json.loads(row[0]) if row else None

    async def delete(self, kind: str, key: str) -> None:
        self._db.execute("DELETE FROM records WHERE kind = ? AND key = ?", (kind, key))

    async def accept(
        self,
        keys: list[str],
        deliveries: list[tuple[str, str, dict[str, Any]]],
        ttl: float = DAY,
        record: Record | None = None,
    ) -> bool:
        now = self._clock.time()
        # One transaction: a crash leaves either nothing, or the keys, the record (which the
        # deliveries need) and every delivery.
        with self._transaction():
            marks = ",".join("?" * len(keys))
            seen = self._db.execute(f"SELECT 1 FROM seen WHERE key IN ({marks}) AND expires_at >= ?", (*keys, now))
            if seen.fetchone() is not None:
                return False
            self._db.executemany(
                "INSERT OR REPLACE INTO seen (key, expires_at) VALUES (?, ?)", [(k, now + ttl) for k in keys]
            )
            self._db.executemany(
                "INSERT OR IGNORE INTO outbox (key, destination, payload, created_at, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(key, dest, json.dumps(payload), now, now) for key, dest, payload in deliveries],
            )
            if record is not None:
                self._put(*record)
        return True

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    async def outbox_add(self, key: str, destination: str, payload: dict[str, Any]) -> bool:
        now = self._clock.time()
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO outbox (key, destination, payload, created_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (key, destination, json.dumps(payload), now, now),
        )
        return cursor.rowcount == 1

    async def outbox_due(self, limit: int = 50) -> list[OutboxItem]:
        rows = self._db.execute(
            "SELECT id, key, destination, payload, attempts, created_at, next_attempt_at, started FROM outbox "
            "WHERE delivered_at IS NULL AND next_attempt_at <= ? ORDER BY id LIMIT ?",
            (self._clock.time(), limit),
        ).fetchall()
        return [OutboxItem(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], bool(r[7])) for r in rows]

    async def outbox_begin(self, item_id: int) -> None:
        self._db.execute("UPDATE outbox SET started = 1 WHERE id = ?", (item_id,))

    async def outbox_done(self, item_id: int, reference: str) -> None:
        self._db.execute(
            "UPDATE outbox SET delivered_at = ?, reference = ?, attempts = attempts + 1 WHERE id = ?",
            (self._clock.time(), reference, item_id),
        )

    async def outbox_retry(self, item_id: int, delay: float, error: str, *, count: bool = True) -> None:
        self._db.execute(
            "UPDATE outbox SET attempts = attempts + ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
            (int(count), self._clock.time() + delay, error[:500], item_id),
        )

    async def outbox_depth(self) -> tuple[int, float | None]:
        count, oldest = self._db.execute(
            "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE delivered_at IS NULL"
        ).fetchone()
        return int(count), (self._clock.time() - oldest) if oldest is not None else None

    async def ping(self) -> bool:
        try:
            self._db.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            log.exception("state store does not answer")
            return False
        return True

    async def close(self) -> None:
        self._db.close()


def open_store(sqlite_path: str, *, clock: Clock | None = None) -> Store:
    """The store the config asks for (SQLite today; Redis is the planned second backend)."""
    return SQLiteStore(sqlite_path, clock=clock)
