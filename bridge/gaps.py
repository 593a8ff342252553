"""Knowledge gaps: recognising the chatbot's fallback message, the answer it gives when it knows nothing."""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from dataclasses import dataclass

from bridge.clock import Clock
from bridge.insitechat import InsiteChatClient, InsiteChatError

log = logging.getLogger(__name__)

REFRESH = 600.0  # seconds a chatbot's fallback message is trusted before it is fetched again
BUSY = 0.05  # seconds of estimated limiter wait above which the budget counts as spoken for
RETRY = 60.0  # after a failed fetch: the answer counts as answered, and the fetch is tried again after this

_MARKUP = re.compile(r"[*_`~>#\[\]()|]")
_SPACE = re.compile(r"\s+")


def normalised(text: str) -> str:
    """Text compared for meaning only: case, Markdown marks, spacing and end punctuation do not count."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _MARKUP.sub("", text)
    return _SPACE.sub(" ", text).strip(" .!?…")


@dataclass
class _Known:
    fallback: str  # normalised; "" when the chatbot has none (or it could not be fetched)
    until: float  # monotonic time after which it is fetched again


class FallbackMessages:
    """Each chatbot's fallback message, fetched with GET /v1/chatbots/{id}, cached and refreshed.

    Fetched in the background, never in an answer's path: a request spends the key's budget
    and may wait in the limiter, which an answer must not. Until the first fetch is back, an
    answer counts as answered.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._known: dict[str, _Known] = {}
        self._fetching: dict[str, asyncio.Task[None]] = {}

    def refresh(self, client: InsiteChatClient, chatbot: str) -> None:
        """Fetch the chatbot's fallback message in the background unless a fresh one is known (or on its way)."""
        known = self._known.get(chatbot)
        if (known is None or self._clock.monotonic() >= known.until) and chatbot not in self._fetching:
            task = asyncio.get_running_loop().create_task(self._fetch(client, chatbot), name=f"fallback:{chatbot}")
            self._fetching[chatbot] = task
            task.add_done_callback(lambda _: self._fetching.pop(chatbot, None))

    async def read(self, client: InsiteChatClient, chatbot: str) -> None:
        """refresh(), and wait until the fetch is back (the sandbox, before its first question)."""
        self.refresh(client, chatbot)
        fetching = self._fetching.get(chatbot)
        if fetching is not None:
            await asyncio.wait({fetching})  # its failure is logged by _fetch; our own cancellation propagates

    def is_fallback(self, client: InsiteChatClient, chatbot: str, answer: str) -> bool:
        """Whether `answer` is the chatbot's fallback message (the whole answer, not a near miss)."""
        self.refresh(client, chatbot)
        known = self._known.get(chatbot)
        return known is not None and bool(known.fallback) and normalised(answer) == known.fallback

    async def aclose(self) -> None:
        for task in list(self._fetching.values()):
            task.cancel()
        await asyncio.gather(*self._fetching.values(), return_exceptions=True)

    async def _fetch(self, client: InsiteChatClient, chatbot: str) -> None:
        known = self._known.get(chatbot)
        limiter = client.limiter
        if client.circuit_state() != "closed" or (
            limiter is not None and (limiter.waiting or limiter.estimated_wait() > BUSY)
        ):
            # InsiteChat is failing, or the budget is spoken for: an answer must never wait behind
            # this, nor this be the trial call after an outage. Asked again at the next answer.
            return
        try:
            detail = await client.get_chatbot(chatbot)
        except InsiteChatError as exc:
            # Not fatal: answers are posted either way; only a gap goes unnoticed until the next try.
            log.info("chatbot %s: its fallback message could not be read (%s); trying again later", chatbot, exc)
            self._known[chatbot] = _Known(known.fallback if known else "", self._clock.monotonic() + RETRY)
            return
        self._known[chatbot] = _Known(normalised(detail.fallback_message), self._clock.monotonic() + REFRESH)
