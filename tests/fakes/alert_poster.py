"""A platform stand-in for alert delivery: keeps posted cards in a list, fails on request."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from bridge.alerts import Alert
from bridge.messages import Conversation, Inbound, Outbound
from tests.fakes.rendering import card_as, render_as


@dataclass
class Posted:
    channel: str
    card: dict[str, Any]
    thread: str
    broadcast: bool
    key: str
    reference: str
    updates: list[dict[str, Any]] = field(default_factory=list)


class FakePoster:
    """Implements the AlertPoster protocol over memory, like a platform that can be down."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.posted: list[Posted] = []
        self.sent: list[Outbound] = []
        self.down = False  # every call fails while True
        self.crash_after_post = 0  # post, then fail as if the answer was lost (N times)
        self.calls: list[str] = []
        # While set: a post is stored at once but its answer waits for the gate (a slow platform).
        self.gate: asyncio.Event | None = None
        self.posting = asyncio.Event()  # set when a post reached the platform
        self._ids = itertools.count(1)

    def render(self, markdown: str) -> list[str]:
        return render_as(self.name, markdown)

    def render_card(self, alert: Alert, mentions: tuple[str, ...]) -> dict[str, Any]:
        return card_as(self.name, alert, mentions)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def _check(self, call: str) -> None:
        self.calls.append(call)
        if self.down:
            raise ConnectionError(f"{self.name} is down")

    async def send(self, outbound: Outbound) -> list[str]:
        self._check("send")
        self.sent.append(outbound)
        return [str(next(self._ids))]

    @asynccontextmanager
    async def working(self, inbound: Inbound) -> AsyncIterator[None]:
        yield

    async def post_alert(self, channel: str, card: dict[str, Any], *, thread: str, broadcast: bool, key: str) -> str:
        self._check("post_alert")
        reference = f"{self.name}-msg-{next(self._ids)}"
        self.posted.append(Posted(channel, card, thread, broadcast, key, reference))
        self.posting.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.crash_after_post:
            self.crash_after_post -= 1
            raise TimeoutError("posted, but the answer never came back")
        return reference

    async def find_alert(self, channel: str, key: str, *, since: float, thread: str) -> str | None:
        self._check("find_alert")
        return next((p.reference for p in self.posted if p.channel == channel and p.key == key), None)

    async def update_alert(self, channel: str, reference: str, card: dict[str, Any]) -> None:
        self._check("update_alert")
        post = next(p for p in self.posted if p.reference == reference)
        post.updates.append(card)

    async def permalink(self, conversation: Conversation) -> str | None:
        return f"https://{self.name}.example/{conversation.channel}/{conversation.thread}"

    def posts_to(self, channel: str) -> list[Posted]:
        return [p for p in self.posted if p.channel == channel]
