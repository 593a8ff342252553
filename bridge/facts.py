"""The report's facts (answers, votes, alerts), noted in batches off the answer path."""

from __future__ import annotations

import asyncio
import logging

from bridge.clock import Clock
from bridge.store import Fact, FactKind, Store, StoreError

log = logging.getLogger(__name__)

FLUSH_DELAY = 1.0  # seconds facts wait to be written together: one store trip per second, not one per answer
RETRY_DELAY = 5.0  # after a failed write
MAX_PENDING = 10_000  # facts kept while the store is failing; the oldest are dropped beyond this


class FactLog:
    """Collects facts and writes them in one store call a second.

    They are statistics, not promises: a crash loses at most the last second's facts, which
    is worth one round trip less per answer on a shared store. A failing store keeps them for
    the next flush.
    """

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._pending: list[Fact] = []
        self._flushing: asyncio.Task[None] | None = None
        self._failing = False

    def note(
        self, kind: FactKind, subject: str, *, chatbot: str = "", route: str = "", actor: str = "", value: str = ""
    ) -> None:
        """Note a fact now; it is written within FLUSH_DELAY."""
        self._pending.append(Fact(kind, subject, self._clock.time(), chatbot, route, actor, value))
        if len(self._pending) > MAX_PENDING:
            del self._pending[: len(self._pending) - MAX_PENDING]
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_later(), name="facts-flush")

    async def flush(self) -> bool:
        """Write what is pending now (before a report reads, and at shutdown); False when the store failed."""
        facts, self._pending = self._pending, []
        if not facts:
            return True
        try:
            await self._store.note_facts(facts)
        except StoreError as exc:
            self._pending[:0] = facts  # kept, in order, for the next try
            if not self._failing:
                log.warning("report facts not written yet (%d waiting): %s", len(self._pending), exc)
            self._failing = True
            return False
        self._failing = False
        return True

    async def aclose(self) -> None:
        if self._flushing is not None and not self._flushing.done():
            self._flushing.cancel()
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self.flush()

    async def _flush_later(self) -> None:
        delay = FLUSH_DELAY
        while self._pending:
            await self._clock.sleep(delay)
            delay = FLUSH_DELAY if await self.flush() else RETRY_DELAY
