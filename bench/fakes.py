"""Thin timing wrappers over the test fakes: they tell a waiting benchmark when its answer lands."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from aiohttp import web

from bridge.emulator import Emulator
from tests.fakes.discord_api import FakeDiscord
from tests.fakes.slack_api import FakeSlack

# Set while a chat request that GatedEmulator already counted runs its handler: not counted twice.
_COUNTED: ContextVar[bool] = ContextVar("counted", default=False)


TOKEN = re.compile(r"q\d+k\d+z")  # the harness's question tokens (bench/harness.py _token), echoed in answers


class _Waiters:
    """Futures keyed by where an answer will be posted; resolved with the arrival time of the answer.

    `counts` holds how many posts answered each question (by its token), waited for or not:
    more than one is a doubled answer.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[str, asyncio.Future[float]]] = {}
        self.counts: Counter[str] = Counter()

    def expect(self, place: str, token: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[place] = (token, future)
        return future

    def arrived(self, place: str, text: str, at: float) -> None:
        # The first token is the question answered; the emulator quotes the conversation's earlier ones after it.
        first = TOKEN.search(text)
        if first is not None:
            self.counts[first.group()] += 1
        waiting = self._waiting.get(place)
        # The token tells the answer from a notice ("you're number 12 in the queue") in the same thread.
        if waiting is not None and waiting[0] in text and not waiting[1].done():
            waiting[1].set_result(at)
            del self._waiting[place]

    def forget(self, place: str) -> None:
        self._waiting.pop(place, None)


class TimedSlack(FakeSlack):
    """FakeSlack that reports each chat.postMessage in a thread the moment it arrives."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.answers = _Waiters()

    def _m_chat_postMessage(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        data, headers = super()._m_chat_postMessage(args)
        if data.get("ok"):
            self.answers.arrived(str(args.get("thread_ts") or ""), str(args.get("text") or ""), time.monotonic())
        return data, headers

    def posts_to(self, channel: str) -> int:
        return sum(
            1 for c in self.calls if c.method == "chat.postMessage" and c.ok and c.args.get("channel") == channel
        )


class TimedDiscord(FakeDiscord):
    """FakeDiscord that reports each message the bot creates, by channel (a thread is a channel)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.answers = _Waiters()

    async def _post_message(self, request: web.Request, body: Any, channel_id: str) -> web.Response:
        at = time.monotonic()
        response = await super()._post_message(request, body, channel_id)
        if response.status == 200 and isinstance(body, dict):
            self.answers.arrived(channel_id, str(body.get("content") or ""), at)
        return response


class GatedEmulator(Emulator):
    """The emulator, with a gate that holds chat requests (to keep a known number in flight)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.gate: asyncio.Event | None = None  # None: no gate; an unset Event holds /chat requests
        self.held = 0

    async def _serve(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse | None:
        gate = self.gate
        if gate is not None and request.path.endswith("/chat"):
            self.held += 1
            try:
                await gate.wait()
            finally:
                self.held -= 1
        if self.count_at is not None and request.path.endswith("/chat") and self.latency > 0 and not self.faults:
            return await self._serve_counting_at(request, handler, self.count_at)
        return await super()._serve(request, handler)

    # Where in its latency a chat request counts against the rate limit: 0 on arrival, 1 at
    # the answer, "random" anywhere in between (drawn per request); None: as the emulator
    # does (after its latency, just before the answer). The limiter must hold wherever.
    count_at: float | str | None = None

    async def _serve_counting_at(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]], at: float | str
    ) -> web.StreamResponse:
        share = random.random() if at == "random" else float(at)
        await self.clock.sleep(self.latency * share)
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and key.strip() in self._keys:
            self._count_request(key.strip())  # a 429 (EmulatorError) answers at once, as the emulator's does
        await self.clock.sleep(self.latency * (1.0 - share))
        token = _COUNTED.set(True)
        try:
            return await handler(request)
        finally:
            _COUNTED.reset(token)

    def _count_request(self, key: str) -> None:
        if not _COUNTED.get():
            super()._count_request(key)

    def chat_statuses(self, since: float = 0.0) -> list[tuple[float, int | None]]:
        """(arrival time, status) of every chat request that arrived after `since`."""
        return [(r.time, r.status) for r in self.requests if r.path.endswith("/chat") and r.time >= since]
