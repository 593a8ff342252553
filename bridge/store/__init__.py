"""Durable state: protocols by concern, the SQLite default, the Redis backend, and the store the config asks for."""

from __future__ import annotations

from pathlib import Path

from bridge.clock import Clock
from bridge.store.protocols import (
    ChatJobs,
    ConversationLocks,
    ConversationState,
    DeliveryQueue,
    EventIntake,
    Facts,
    Records,
    Store,
    StoreError,
)
from bridge.store.records import (
    DAY,
    FACTS_KEPT,
    LOCK_LEASE,
    ChatJob,
    Fact,
    FactKind,
    JobState,
    NewDelivery,
    NewJob,
    NewRecord,
    OutboxItem,
    RecordRef,
    ReplyKind,
    Versioned,
)
from bridge.store.sqlite import SQLiteStore

__all__ = [
    "DAY",
    "FACTS_KEPT",
    "LOCK_LEASE",
    "ChatJob",
    "ChatJobs",
    "ConversationLocks",
    "ConversationState",
    "DeliveryQueue",
    "EventIntake",
    "Fact",
    "FactKind",
    "Facts",
    "JobState",
    "NewDelivery",
    "NewJob",
    "NewRecord",
    "OutboxItem",
    "RecordRef",
    "Records",
    "ReplyKind",
    "SQLiteStore",
    "Store",
    "StoreError",
    "Versioned",
    "open_store",
]


def open_store(
    sqlite_path: str | Path,
    *,
    redis_url: str | None = None,
    redis_prefix: str = "icb:",
    clock: Clock | None = None,
    keep_text: float = DAY,
    lock_lease: float = LOCK_LEASE,
) -> Store:
    """The store the config asks for: Redis when it names one (it connects on first use), else the SQLite file."""
    if redis_url is not None:
        # Imported here: a bridge on SQLite never loads the Redis client.
        from bridge.store.redis import RedisStore

        return RedisStore(redis_url, prefix=redis_prefix, clock=clock, keep_text=keep_text, lock_lease=lock_lease)
    return SQLiteStore(sqlite_path, clock=clock, keep_text=keep_text)
