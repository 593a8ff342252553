"""The chat flow: decides whether to answer an inbound message, asks InsiteChat, and posts the reply."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from adapters.base import Adapter
from bridge import formatting, metrics
from bridge.clock import Clock, SystemClock
from bridge.config import ReplyMode, RouteSettings, Settings
from bridge.desk import AlertDesk
from bridge.insitechat import (
    BadRequest,
    InsiteChatClient,
    InsiteChatError,
    NotFound,
    QuotaExhausted,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from bridge.messages import Conversation, Inbound, Outbound, OutboundKind
from bridge.store import Store

log = logging.getLogger(__name__)

RESET_WORDS = frozenset({"reset", "new conversation", "new chat", "start over"})
RESUME_WORDS = frozenset({"resume", "come back"})

# What the user reads. Kind and short; the cause goes to the operator's log.
NOTICES = {
    "hello": "Hi! Ask me a question and I'll answer here.",
    "reset": "Starting a new conversation: I've forgotten what we said before in this thread.",
    "resumed": "I'm back: ask me anything.",
    "restarting": "I'm restarting right now and can't answer this one. Please ask again in a minute.",
    "queued": "Lots of questions right now: you're number {position} in the queue. "
    "I'll answer in about {seconds} seconds.",
    "quota": "The chatbot has used up its monthly message allowance, so I can't answer right now. "
    "An admin can raise the plan's limit in InsiteChat.",
    "busy": "The chatbot is very busy right now and couldn't answer in time. Please ask again in a minute.",
    "unavailable": "The chatbot service isn't reachable right now. Please try again in a few minutes.",
    "misconfigured": "I'm not set up correctly to answer here yet. An admin can see why in the bridge's logs.",
    "empty": "The chatbot had no answer to that. Could you rephrase the question?",
    "error": "Something went wrong while getting your answer. Please try again.",
}

Renderer = Callable[[str], list[str]]
RENDERERS: dict[str, Renderer] = {
    "slack": formatting.to_slack,
    "discord": formatting.to_discord,
    "console": formatting.to_plain,
}


def _words(text: str) -> str:
    """A message reduced for command matching: "Reset!" and "reset" are the same."""
    return " ".join(text.lower().strip(" .!?").split())


class Outcome(str, enum.Enum):
    """How one inbound message ended; logged and counted."""

    ANSWERED = "answered"
    NOTICE = "notice"  # the user got a notice instead of an answer
    RESET = "reset"
    IGNORED = "ignored"  # not addressed to the bot, a bot, or no route
    DUPLICATE = "duplicate"
    SHUTTING_DOWN = "shutting-down"  # arrived during shutdown: told to ask again
    SEND_FAILED = "send-failed"


@dataclass
class _SharedLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(frozen=True)
class Decision:
    """Whether and why to answer one message."""

    answer: bool
    reason: str
    route: RouteSettings | None = None


class Relay:
    """The one place that decides what to do with a message. Adapters only translate."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        clients: Mapping[str, InsiteChatClient],
        *,
        clock: Clock | None = None,
        desk: AlertDesk | None = None,
        queue_notice_after: float = 10.0,
    ) -> None:
        self._settings = settings
        self._desk = desk
        self._store = store
        self._clients = clients
        self._clock = clock or SystemClock()
        self._queue_notice_after = queue_notice_after
        self._adapters: dict[str, Adapter] = {}
        # One answer at a time per conversation, so InsiteChat's history stays in order.
        self._locks: dict[str, _SharedLock] = {}
        self._tasks: set[asyncio.Task[Outcome]] = set()
        self._accepting = True

    def register(self, adapter: Adapter) -> None:
        self._adapters[adapter.name] = adapter

    # --- intake ----------------------------------------------------------------------------

    def submit(self, inbound: Inbound) -> asyncio.Task[Outcome]:
        """Handle a message in the background (adapters must ack their platform quickly)."""
        task = asyncio.get_running_loop().create_task(self.handle(inbound), name=f"relay:{inbound.dedupe_key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def handle(self, inbound: Inbound) -> Outcome:
        """Decide, answer and post; returns how it ended. Never raises for a platform or API failure."""
        outcome = await self._handle(inbound)
        metrics.MESSAGES.labels(inbound.platform, outcome.value).inc()
        if outcome is Outcome.DUPLICATE:
            metrics.DEDUPE_HITS.labels("chat").inc()
        return outcome

    async def _handle(self, inbound: Inbound) -> Outcome:
        started = self._clock.monotonic()
        decision = await self.decide(inbound)
        if not decision.answer:
            log.debug("ignored %s: %s", inbound.dedupe_key, decision.reason)
            return Outcome.IGNORED
        if not await self._store.claim(inbound.dedupe_key):
            log.info("duplicate delivery of %s ignored", inbound.dedupe_key)
            return Outcome.DUPLICATE
        if not self._accepting:
            # Adapters stop their intake before the drain, so this is a message already on
            # its way: the platform will not deliver it again, so say so instead of going silent.
            log.info("not answering %s: shutting down", inbound.dedupe_key)
            await self._notify(self._adapters[inbound.platform], inbound, "restarting")
            await self._store.finish(inbound.dedupe_key)
            return Outcome.SHUTTING_DOWN
        assert decision.route is not None
        outcome = Outcome.SEND_FAILED
        try:
            outcome = await self._answer(inbound, decision.route)
        except asyncio.CancelledError:
            # Interrupted before finishing: hand the claim back so a retry can answer it.
            await self._store.release(inbound.dedupe_key)
            raise
        else:
            await self._store.finish(inbound.dedupe_key)
        finally:
            route = decision.route
            log.info(
                "message platform=%s channel=%s route=%s:%s:%s chatbot=%s outcome=%s latency_ms=%d",
                inbound.platform,
                inbound.channel,
                route.platform,
                route.workspace,
                route.channel,
                route.chatbot,
                outcome.value,
                (self._clock.monotonic() - started) * 1000,
            )
        return outcome

    async def decide(self, inbound: Inbound) -> Decision:
        """Whether the bot should answer: the trigger rules, then a human's hand-over."""
        decision = await self._triggered(inbound)
        if decision.answer and self._desk is not None and await self._desk.paused(inbound.conversation):
            if _words(inbound.text) not in RESUME_WORDS:
                return Decision(False, "a human has taken over this thread", decision.route)
        return decision

    async def _triggered(self, inbound: Inbound) -> Decision:
        """The trigger rules, in one place."""
        if inbound.author_is_self:
            return Decision(False, "own message")
        if inbound.author_is_bot:
            return Decision(False, "from a bot")
        route = self._settings.route_for(inbound.platform, inbound.workspace, inbound.channel, inbound.is_dm)
        if route is None:
            return Decision(False, "no route for this place")
        if route.reply is ReplyMode.OFF:
            return Decision(False, "route is off")
        if inbound.is_command or inbound.is_dm:
            return Decision(True, "command" if inbound.is_command else "direct message", route)
        if inbound.mentions_bot or inbound.replies_to_bot:
            return Decision(True, "addressed", route)
        if inbound.text.lstrip().startswith("!"):
            return Decision(False, "marked as not for the bot (!)")
        if inbound.in_thread:
            if inbound.mentions_others:
                return Decision(False, "addressed to someone else")
            if await self._store.is_followed(inbound.conversation.key):
                return Decision(True, "follow-up in a followed thread", route)
            return Decision(False, "thread the bot is not in")
        if route.reply is ReplyMode.ALL:
            return Decision(True, "channel answers everything", route)
        return Decision(False, "not addressed")

    # --- answering ---------------------------------------------------------------------------

    async def _answer(self, inbound: Inbound, route: RouteSettings) -> Outcome:
        adapter = self._adapters[inbound.platform]
        conversation = inbound.conversation
        text = inbound.text.strip()
        if self._desk is not None and _words(text) in RESUME_WORDS and await self._desk.paused(conversation):
            await self._desk.resume(conversation)
            return await self._notify(adapter, inbound, "resumed")
        if _words(text) in RESET_WORDS:
            await self._store.bump_generation(conversation.key)
            outcome = await self._notify(adapter, inbound, "reset")
            return Outcome.RESET if outcome is Outcome.NOTICE else outcome
        if not text:
            return await self._notify(adapter, inbound, "hello")
        if not inbound.is_dm:
            await self._store.follow(conversation.key)
        async with self._one_at_a_time(conversation.key):
            return await self._ask_and_post(adapter, inbound, route, conversation, text)

    @asynccontextmanager
    async def _one_at_a_time(self, key: str) -> AsyncIterator[None]:
        """Serialise answers per conversation; the lock lives only while someone holds or awaits it."""
        entry = self._locks.setdefault(key, _SharedLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._locks[key]

    async def _ask_and_post(
        self, adapter: Adapter, inbound: Inbound, route: RouteSettings, conversation: Conversation, text: str
    ) -> Outcome:
        client = self._clients[self._settings.chatbot_key(route.chatbot)]
        lane = f"{inbound.platform}:{inbound.workspace}:{inbound.channel}"
        session_id = conversation.session_id(await self._store.generation(conversation.key))
        async with adapter.working(inbound):
            await self._maybe_queue_notice(adapter, inbound, client, lane)
            try:
                answer = await client.chat(route.chatbot, text, session_id, lane=lane)
            except InsiteChatError as exc:
                return await self._notify_failure(adapter, inbound, route, exc)
            parts = RENDERERS[inbound.platform](answer)
            if not parts:
                log.warning("chatbot %s returned an empty answer", route.chatbot)
                return await self._notify(adapter, inbound, "empty")
            offer_human = False
            if self._desk is not None:
                await self._desk.remember_exchange(conversation, session_id, text, answer)
                offer_human = route.human_button and self._desk.has_human_route(route.chatbot)
            outbound = Outbound(
                conversation, tuple(parts), OutboundKind.ANSWER, reply_to=inbound.message_id, offer_human=offer_human
            )
            try:
                await adapter.send(outbound)
            except Exception:
                log.exception("posting the answer to %s failed", conversation.key)
                await self._notify(adapter, inbound, "error")
                return Outcome.SEND_FAILED
        return Outcome.ANSWERED

    async def _maybe_queue_notice(self, adapter: Adapter, inbound: Inbound, client: InsiteChatClient, lane: str) -> None:
        limiter = client.limiter
        if limiter is None:
            return
        wait = limiter.estimated_wait(lane)
        if wait >= self._queue_notice_after:
            await self._notify(
                adapter, inbound, "queued", position=limiter.position(lane) + 1, seconds=int(wait + 0.999)
            )

    async def _notify_failure(
        self, adapter: Adapter, inbound: Inbound, route: RouteSettings, exc: InsiteChatError
    ) -> Outcome:
        if isinstance(exc, QuotaExhausted):
            name = "quota"
            log.error("chatbot %s: monthly quota exhausted: %s", route.chatbot, exc)
        elif isinstance(exc, RateLimited):
            name = "busy"
            log.warning("chatbot %s: rate limited past the answer deadline", route.chatbot)
        elif isinstance(exc, Unavailable):
            name = "unavailable"
            log.warning("chatbot %s: InsiteChat unavailable: %s", route.chatbot, exc)
        elif isinstance(exc, (Unauthorized, NotFound)):
            name = "misconfigured"
            log.error("chatbot %s: %s (check the API key and the route's chatbot id)", route.chatbot, exc)
        elif isinstance(exc, BadRequest):
            name = "error"
            log.error("chatbot %s: InsiteChat refused the request: %s", route.chatbot, exc)
        else:
            name = "unavailable"
            log.warning("chatbot %s: InsiteChat failed: %s", route.chatbot, exc)
        return await self._notify(adapter, inbound, name)

    async def _notify(self, adapter: Adapter, inbound: Inbound, name: str, **values: object) -> Outcome:
        text = NOTICES[name].format(**values)
        parts = RENDERERS[inbound.platform](text)
        outbound = Outbound(inbound.conversation, tuple(parts), OutboundKind.NOTICE, reply_to=inbound.message_id)
        try:
            await adapter.send(outbound)
        except Exception:
            log.exception("posting the %s notice to %s failed too", name, inbound.conversation.key)
            return Outcome.SEND_FAILED
        return Outcome.NOTICE

    # --- shutdown ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self, grace: float) -> None:
        """Stop taking new messages; give those in flight `grace` seconds, then cancel them."""
        self._accepting = False
        pending = {t for t in self._tasks if not t.done()}
        if not pending:
            return
        log.info("waiting up to %.0f s for %d answer(s) in flight", grace, len(pending))
        _, still = await asyncio.wait(pending, timeout=grace)
        for task in still:
            task.cancel()
        if still:
            log.warning("%d answer(s) cut short by shutdown; their platform retries will be answered", len(still))
            await asyncio.gather(*still, return_exceptions=True)
