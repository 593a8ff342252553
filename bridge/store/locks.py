"""In-process locks per key, each kept only while someone holds or awaits it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass
class _SharedLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class LocalLocks:
    """One asyncio lock per key: waiters are served in the order they came (answers keep their order)."""

    def __init__(self) -> None:
        self._locks: dict[str, _SharedLock] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.setdefault(key, _SharedLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._locks[key]

    def users(self, key: str) -> int:
        """How many hold or await `key` now."""
        entry = self._locks.get(key)
        return entry.users if entry is not None else 0

    def __contains__(self, key: object) -> bool:
        """Someone holds or awaits `key` now."""
        return key in self._locks

    def __len__(self) -> int:
        """Keys held or awaited now."""
        return len(self._locks)
