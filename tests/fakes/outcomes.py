"""Records how the relay ended each message (Relay.on_outcome), for tests to wait on instead of log lines."""

from __future__ import annotations

import asyncio
import contextlib

from bridge.messages import Inbound
from bridge.relay import Outcome, Relay


class Outcomes:
    """The relay's Outcome per message, in the order they ended; one recorder can watch several relays (restarts)."""

    def __init__(self) -> None:
        self.seen: list[tuple[Inbound, Outcome]] = []
        self._changed = asyncio.Event()

    def watch(self, relay: Relay) -> None:
        relay.on_outcome = self

    def __call__(self, inbound: Inbound, outcome: Outcome) -> None:
        self.seen.append((inbound, outcome))
        self._changed.set()

    def of(self, message_id: str | int) -> list[Outcome]:
        """Every outcome of the message with this platform id (a duplicate delivery adds one)."""
        return [outcome for inbound, outcome in self.seen if inbound.message_id == str(message_id)]

    async def wait_for(self, message_id: str | int, outcome: Outcome, timeout: float = 10.0) -> None:
        """Until the message ended with `outcome` (again, for a repeat); fails with what was seen instead."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while outcome not in self.of(message_id):
            remaining = deadline - loop.time()
            if remaining <= 0:
                seen = [o.value for o in self.of(message_id)]
                raise AssertionError(f"message {message_id} never ended {outcome.value}; it ended {seen}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_all(self, message_ids: list[str | int], outcome: Outcome, timeout: float = 10.0) -> None:
        for message_id in message_ids:
            await self.wait_for(message_id, outcome, timeout)
