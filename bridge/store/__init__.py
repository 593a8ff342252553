"""Durable state: small protocols by concern, the SQLite default, and the store the config asks for."""

from __future__ import annotations

from pathlib import Path

from bridge.clock import Clock
from bridge.store.protocols import (
    ChatJobs,
    ConversationState,
    DeliveryQueue,
    EventIntake,
    Records,
    Store,
    StoreError,
)
from bridge.store.records import (
    DAY,
    ChatJob,
    JobState,
    NewDelivery,
    NewRecord,
    OutboxItem,
    ReplyKind,
    Versioned,
)
from bridge.store.sqlite import SQLiteStore

__all__ = [
    "DAY",
    "ChatJob",
    "ChatJobs",
    "ConversationState",
    "DeliveryQueue",
    "EventIntake",
    "JobState",
    "NewDelivery",
    "NewRecord",
    "OutboxItem",
    "Records",
    "ReplyKind",
    "SQLiteStore",
    "Store",
    "StoreError",
    "Versioned",
    "open_store",
]


def open_store(sqlite_path: str | Path, *, clock: Clock | None = None, keep_text: float = DAY) -> Store:
    """The store the config asks for (SQLite today; Redis is the planned second backend)."""
    return SQLiteStore(sqlite_path, clock=clock, keep_text=keep_text)
