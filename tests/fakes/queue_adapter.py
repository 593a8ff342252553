"""A test adapter whose I/O is a list and a queue: tests talk to the relay as a platform would."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bridge.messages import Inbound, Outbound
from bridge.ports import PermanentSendError
from tests.fakes.rendering import render_as


class QueueAdapter:
    """Records everything the relay posts; can be told to fail sends, for now or for good."""

    def __init__(self, name: str = "console") -> None:
        self.name = name
        self.sent: list[Outbound] = []
        self.posted: asyncio.Queue[Outbound] = asyncio.Queue()
        self.working_events: list[tuple[str, str]] = []  # ("enter"|"exit", message id)
        self.fail_next_sends = 0
        self.refuse_sends = False  # refused for good: the channel is gone
        self._ids = itertools.count(1)

    def render(self, markdown: str) -> list[str]:
        return render_as(self.name, markdown)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, outbound: Outbound) -> list[str]:
        if self.refuse_sends:
            raise PermanentSendError("channel_not_found")
        if self.fail_next_sends:
            self.fail_next_sends -= 1
            raise ConnectionError("platform said no")
        self.sent.append(outbound)
        await self.posted.put(outbound)
        return [str(next(self._ids)) for _ in outbound.parts]

    @asynccontextmanager
    async def working(self, inbound: Inbound) -> AsyncIterator[None]:
        self.working_events.append(("enter", inbound.message_id))
        try:
            yield
        finally:
            self.working_events.append(("exit", inbound.message_id))

    async def next_post(self, timeout: float = 10.0) -> Outbound:
        return await asyncio.wait_for(self.posted.get(), timeout)
