"""The chat flow: decides whether to answer an inbound message, asks InsiteChat, and posts the reply."""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from bridge import metrics
from bridge.clock import Clock, SystemClock
from bridge.config import ReplyMode, RouteSettings, Settings
from bridge.alerts import UNANSWERED, Event
from bridge.desk import AlertDesk
from bridge.facts import FactLog
from bridge.gaps import FallbackMessages
from bridge.handover import HandOvers
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
from bridge.outbox import DeliveryResult, Outbox
from bridge.ports import Adapter
from bridge.store import ChatJob, FactKind, JobState, NewJob, ReplyKind, Store, StoreError

log = logging.getLogger(__name__)

JOB_LEASE = 60.0  # a job's worker renews its lease every third of this; a dead worker's job is taken over

HINTED = "hinted"  # store kind: conversation key -> told how to reach the bot when its text was withheld
HINT_TTL = 30 * 86_400.0  # as long as a thread is followed

RESET_WORDS = frozenset({"reset", "new conversation", "new chat", "start over"})
RESUME_WORDS = frozenset({"resume", "come back"})

# What the user reads. Kind and short; the cause goes to the operator's log.
NOTICES = {
    "hello": "Hi! Ask me a question and I'll answer here.",
    "reset": "Starting a new conversation: I've forgotten what we said before in this thread.",
    "resumed": "I'm back: ask me anything.",
    "restarted": "I restarted while I was answering this, so I lost the answer. Please ask again.",
    "queued": "Lots of questions right now: you're number {position} in the queue. "
    "I'll answer in about {seconds} seconds.",
    "quota": "The chatbot has used up its monthly message allowance, so I can't answer right now. "
    "I'll check again in about {when}: ask me then. An admin can raise the plan's limit in InsiteChat.",
    "busy": "The chatbot is very busy right now and couldn't answer in time. Please ask again in a minute.",
    "unavailable": "The chatbot service isn't reachable right now. Please try again in a few minutes.",
    "misconfigured": "I'm not set up correctly to answer here yet. An admin can see why in the bridge's logs.",
    "gap": "I couldn't find that in what I know. Someone from the team can help: use the button below.",
    "empty": "The chatbot had no answer to that. Could you rephrase the question?",
    "withheld": "I can only read messages here that mention me. To go on, mention me, reply to one of my "
    "messages, or use my slash command.",
    "error": "Something went wrong while getting your answer. Please try again.",
    # Said by an adapter (a slash command has no message to answer): the job was never stored.
    "not_stored": "I couldn't take your question just now (my state store is unavailable). "
    "Please ask again in a moment.",
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
    DEFERRED = "deferred"  # stored during shutdown: the next start answers it
    PENDING = "pending"  # the reply is stored; the outbox posts it once the platform takes it
    FAILED = "failed"  # the platform refused the reply for good (channel gone, bot removed)
    INTERRUPTED = "interrupted"  # the job could not be moved on (store, a bug): taken over when its lease ends


@dataclass(frozen=True)
class Decision:
    """Whether and why to answer one message."""

    answer: bool
    reason: str
    route: RouteSettings | None = None


@dataclass(frozen=True)
class _Exchange:
    """A question and its answer, kept for hand-overs (AlertDesk.remember_exchange) as the reply is stored."""

    conversation: Conversation
    session_id: str
    question: str
    answer: str


@dataclass(frozen=True)
class _Reply:
    text: str
    kind: ReplyKind
    outcome: Outcome  # what delivering it means for the message
    offer_human: bool = False
    exchange: _Exchange | None = None


def _done(outcome: Outcome) -> asyncio.Future[Outcome]:
    future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    future.set_result(outcome)
    return future


class Relay:
    """The one place that decides what to do with a message. Adapters only translate.

    Every message the bot answers becomes a chat job in the store before the platform is
    told "received" (`accept`); the job then moves through asked and answered, and its
    reply goes out through the outbox, which retries until the platform takes it. A
    process that starts takes over the jobs a dead one left (`recover`).
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        clients: Mapping[str, InsiteChatClient],
        outbox: Outbox,
        *,
        clock: Clock | None = None,
        desk: AlertDesk | None = None,
        handovers: HandOvers | None = None,
        queue_notice_after: float = 10.0,
        lease: float = JOB_LEASE,
        on_outcome: Callable[[Inbound, Outcome], None] | None = None,
        facts: FactLog | None = None,
    ) -> None:
        self._settings = settings
        self._desk = desk
        self._facts = facts
        self._handovers = handovers or HandOvers(settings, desk)
        self._store = store
        self._clients = clients
        self._outbox = outbox
        self._clock = clock or SystemClock()
        self._fallbacks = FallbackMessages(self._clock)
        # Only these chatbots' fallback messages are read: each read spends a request of the key's budget.
        self._gap_chatbots = frozenset(rule.chatbot for rule in settings.alerts if UNANSWERED in rule.events)
        self._queue_notice_after = queue_notice_after
        self._lease = lease
        self._adapters: dict[str, Adapter] = {}
        self._tasks: dict[str, asyncio.Task[Outcome]] = {}  # job id -> its worker
        self._accepting = True
        self._keeper: asyncio.Task[None] | None = None
        # Told how each message accept() took ended, when metrics.MESSAGES counts it: which
        # message was ignored, a duplicate, answered... (tests, embedders). Must not raise.
        self.on_outcome = on_outcome

    def register(self, adapter: Adapter) -> None:
        self._adapters[adapter.name] = adapter

    # --- intake ----------------------------------------------------------------------------

    async def accept(self, inbound: Inbound) -> asyncio.Future[Outcome]:
        """Decide, and store the job of a message the bot answers; the future tells how it ended.

        Adapters await this before they acknowledge the event to the platform, because
        neither Slack nor Discord delivers an acknowledged event again. Raises StoreError
        when the job could not be stored (the adapter then does not acknowledge).
        """
        decision = await self.decide(inbound)
        if not decision.answer:
            log.debug("ignored %s: %s", inbound.dedupe_key, decision.reason)
            return self._count(inbound, _done(Outcome.IGNORED))
        assert decision.route is not None
        job = ChatJob.new(inbound, chatbot=decision.route.chatbot, now=self._clock.time())
        # Stored while stopping: not leased to this process, so another replica takes it at once.
        # The conversation's lock is taken in the same step (its worker starts at once), not while stopping.
        lease = self._lease if self._accepting else 0.0
        # While a human has the conversation the bot stays quiet: that is read in the job's own
        # step, not a round trip before it. The words that end a hand-over must get through.
        quiet = None
        if self._desk is not None and _words(inbound.text) not in RESUME_WORDS:
            quiet = self._desk.pause_record(inbound.conversation)
        created = await self._store.create_job(job, lease=lease, lock=self._accepting, unless=quiet)
        if created is NewJob.HELD:
            log.debug("ignored %s: a human has taken over this thread", inbound.dedupe_key)
            return self._count(inbound, _done(Outcome.IGNORED))
        if created is NewJob.DUPLICATE:
            log.info("duplicate delivery of %s ignored", inbound.dedupe_key)
            metrics.DEDUPE_HITS.labels("chat").inc()
            return self._count(inbound, _done(Outcome.DUPLICATE))
        if not self._accepting:
            # Shutting down: the job is stored, and the next start (or another replica) answers it.
            log.info("accepted %s while stopping: left for the next start", inbound.dedupe_key)
            return self._count(inbound, _done(Outcome.DEFERRED))
        return self._count(inbound, self._start(job))

    def submit(self, inbound: Inbound) -> asyncio.Task[Outcome]:
        """handle() as a task of its own (the console, tests)."""
        return asyncio.get_running_loop().create_task(self.handle(inbound), name=f"relay:{inbound.dedupe_key}")

    async def handle(self, inbound: Inbound) -> Outcome:
        """accept() and wait for the outcome."""
        return await (await self.accept(inbound))

    def _count(self, inbound: Inbound, future: asyncio.Future[Outcome]) -> asyncio.Future[Outcome]:
        def count(done: asyncio.Future[Outcome]) -> None:
            if not done.cancelled():
                metrics.MESSAGES.labels(inbound.platform, done.result().value).inc()
                if self.on_outcome is not None:
                    self.on_outcome(inbound, done.result())

        future.add_done_callback(count)
        return future

    def _start(self, job: ChatJob, *, recovered: bool = False) -> asyncio.Task[Outcome]:
        task = asyncio.get_running_loop().create_task(self._work(job, recovered=recovered), name=f"job:{job.key}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.id, None))
        return task

    # --- recovery --------------------------------------------------------------------------

    async def recover(self) -> int:
        """Take over the open jobs whose worker died (an earlier run, or another replica); returns how many."""
        jobs = await self._store.take_over_jobs(lease=self._lease)
        for job in jobs:
            if job.id in self._tasks:
                continue
            platform = job.inbound.platform if job.inbound is not None else ""
            if platform not in self._adapters:
                # The config no longer has that platform: its lease runs out, and a later
                # start that has the platform again answers it.
                log.warning("job %s (%s) waits: %s is not configured", job.id, job.key, platform or "its platform")
                continue
            log.info(
                "recovered job %s (%s, %s): %s",
                job.id, job.key, job.state.value,
                "asking again" if job.state is JobState.ACCEPTED or self._ask_again else "telling the person",
            )
            metrics.MESSAGES.labels(platform, "recovered").inc()
            self._start(job, recovered=True)
        return len(jobs)

    @property
    def _ask_again(self) -> bool:
        return self._settings.chat.after_restart == "ask-again"

    def start(self) -> None:
        """Keep the leases of jobs in flight, and take over jobs whose lease ran out."""
        self._keeper = asyncio.get_running_loop().create_task(self._keep(), name="relay-leases")

    async def _keep(self) -> None:
        while True:
            await self._clock.sleep(self._lease / 3)
            try:
                if self._tasks:
                    await self._store.renew_jobs(list(self._tasks), lease=self._lease)
                if self._accepting:
                    await self.recover()
            except StoreError as exc:
                log.error("chat jobs: %s; trying again", exc)

    async def read_fallbacks(self) -> None:
        """Read now the fallback messages of the chatbots whose gaps are routed, rather than after a first answer.

        The sandbox does, so that its first question can already be a knowledge gap.
        """
        for chatbot in sorted(self._gap_chatbots):
            await self._fallbacks.read(self._clients[self._settings.chatbot_key(chatbot)], chatbot)

    def serves(self, platform: str, workspace: str, channel: str, is_dm: bool) -> bool:
        """Whether the bot answers anything in this place: a route exists and is not off.

        For a platform that must answer at once (a slash command's acknowledgement) and can
        still say why it will not answer; every other message goes through `accept`.
        """
        route = self._settings.route_for(platform, workspace, channel, is_dm)
        return route is not None and route.reply is not ReplyMode.OFF

    async def decide(self, inbound: Inbound) -> Decision:
        """Whether the bot should answer: the trigger rules, in one place (a human's hand-over: `accept`)."""
        if inbound.author_is_self:
            return Decision(False, "own message")
        if inbound.author_is_bot:
            return Decision(False, "from a bot")
        route = self._settings.route_for(inbound.platform, inbound.workspace, inbound.channel, inbound.is_dm)
        if route is None:
            return Decision(False, "no route for this place")
        if route.reply is ReplyMode.OFF:
            return Decision(False, "route is off")
        if inbound.text_withheld:
            return await self._withheld(inbound, route)
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

    async def _withheld(self, inbound: Inbound, route: RouteSettings) -> Decision:
        """A message whose text the platform withheld: in a thread the bot follows, say once how to reach it."""
        key = inbound.conversation.key
        if not inbound.in_thread or inbound.mentions_others or not await self._store.is_followed(key):
            return Decision(False, "text withheld by the platform (no Message Content intent)")
        # Claimed here, atomically: several such messages (or replicas) tell the person once.
        if not await self._store.put_if(HINTED, key, True, revision=None, ttl=HINT_TTL):
            return Decision(False, "text withheld; told how to go on already")
        return Decision(True, "a follow-up whose text was withheld: saying how to go on", route)

    # --- answering ---------------------------------------------------------------------------

    async def _work(self, job: ChatJob, *, recovered: bool = False) -> Outcome:
        """Move one job to its delivered reply. Cancelled (shutdown): it stays a job for the next start."""
        started = self._clock.monotonic()
        outcome = Outcome.INTERRUPTED
        assert job.inbound is not None
        inbound = job.inbound
        # For the log line and the report's fact: looked up once per job.
        route = self._settings.route_name(inbound.platform, inbound.workspace, inbound.channel, inbound.is_dm)
        try:
            # One answer at a time per conversation, across replicas: InsiteChat keeps one history.
            async with self._store.conversation_lock(job.conversation):
                outcome = await self._answer(job, inbound, route, recovered=recovered)
        except StoreError as exc:
            # Its lease runs out and the job is taken over: never silent, only late.
            log.error("job %s (%s): the state store failed: %s", job.id, job.key, exc)
        except Exception:
            # Not a platform or API failure (those end in a notice): a bug. The job stays
            # stored and is tried again once its lease runs out.
            log.exception("job %s (%s) failed unexpectedly; it is tried again later", job.id, job.key)
        finally:
            fields = {
                "platform": inbound.platform,
                "channel": inbound.channel,
                "route": route,
                "chatbot": job.chatbot,
                "job": job.id,
                "outcome": outcome.value,
                "latency_ms": round((self._clock.monotonic() - started) * 1000),
            }
            # The same fields as JSON keys (logging.format: json) and in the text line.
            log.info("message %s", " ".join(f"{k}={v}" for k, v in fields.items()), extra=fields)
        return outcome

    async def _answer(self, job: ChatJob, inbound: Inbound, route: str, *, recovered: bool) -> Outcome:
        adapter = self._adapters[inbound.platform]
        reply = await self._without_asking(job, inbound, recovered=recovered)
        if reply is not None and recovered:
            # The process that died may have left its working signal (a reaction) on the
            # question: shown and cleared again around the reply, as the outbox does.
            async with adapter.working(inbound):
                return await self._deliver(job, reply)
        if reply is not None:
            return await self._deliver(job, reply)
        async with adapter.working(inbound):
            reply = await self._ask(adapter, job, inbound, route)
            return await self._deliver(job, reply)

    async def _deliver(self, job: ChatJob, reply: _Reply) -> Outcome:
        """Store the reply with its delivery, then try that delivery at once; the outbox retries it."""
        answered = job.answered(reply.text, reply.kind, offer_human=reply.offer_human)
        storing = self._store.job_answered(answered, lease=self._outbox.attempt_lease)  # held for the attempt below
        if reply.exchange is None:
            item = await storing
        else:
            # Side by side: on a shared store both writes take one round trip, not two.
            item, _ = await asyncio.gather(storing, self._remember(reply.exchange))
        result = await self._outbox.deliver_now(item, answered)
        if result is DeliveryResult.DELIVERED:
            return reply.outcome
        return Outcome.FAILED if result is DeliveryResult.FAILED else Outcome.PENDING

    async def _remember(self, exchange: _Exchange) -> None:
        assert self._desk is not None  # an exchange is only kept with a desk (_ask)
        try:
            await self._desk.remember_exchange(
                exchange.conversation, exchange.session_id, exchange.question, exchange.answer
            )
        except StoreError as exc:  # the answer still goes out; a hand-over's card lacks this turn
            log.warning("the exchange in %s was not kept for hand-overs: %s", exchange.conversation.key, exc)

    async def _without_asking(self, job: ChatJob, inbound: Inbound, *, recovered: bool) -> _Reply | None:
        """The reply to a command word or an empty mention, or after a restart mid-call; None: ask InsiteChat."""
        conversation = inbound.conversation
        if inbound.text_withheld:
            return _notice("withheld")
        words = _words(inbound.text)
        if self._desk is not None and words in RESUME_WORDS and await self._desk.paused(conversation):
            await self._desk.resume(conversation)
            return _notice("resumed")
        if words in RESET_WORDS:
            await self._store.bump_generation(conversation.key)
            return _notice("reset", Outcome.RESET)
        if not inbound.is_dm:
            # Followed first: a bare mention's hello invites the question into this thread.
            await self._store.follow(conversation.key)
        if not inbound.text.strip():
            return _notice("hello")
        if recovered and job.state is JobState.ASKED and not self._ask_again:
            return _notice("restarted")
        return None

    async def _ask(self, adapter: Adapter, job: ChatJob, inbound: Inbound, route: str) -> _Reply:
        client = self._clients[self._settings.chatbot_key(job.chatbot)]
        lane = f"{inbound.platform}:{inbound.workspace}:{inbound.channel}"
        conversation = inbound.conversation
        session_id = conversation.session_id(await self._store.generation(conversation.key))
        text = inbound.text.strip()
        queue_noticed = await self._maybe_queue_notice(adapter, inbound, client, lane)

        asked: asyncio.Task[None] | None = None

        async def asking() -> None:
            # Stored as the request leaves, not before the limiter's queue: a question that
            # was still queued when the process died never reached InsiteChat, and is asked
            # after a restart even with after_restart: notice. The write goes out first (the
            # task's first step sends it on an open connection, before this returns; SQLite
            # commits it there), and its reply is awaited with the answer: a shared store's
            # round trip is not on the answer's path. A crash cannot undo a write that went
            # out; a store that fails it fails the job as before. (A connection being opened
            # just then sends it once open, maybe after the request: then a crash in that
            # moment has the question asked again instead of noticed.)
            nonlocal asked
            if asked is None:
                asked = asyncio.ensure_future(self._store.job_asked(job.id))
                await asyncio.sleep(0)
            elif asked.done():
                await asked  # a retry after a failed write does not go out

        async def rate_limited(seconds: float) -> None:
            # A 429 without Retry-After waits a minute: the user hears why, once, not only a reaction.
            nonlocal queue_noticed
            if queue_noticed or seconds < self._queue_notice_after:
                return
            queue_noticed = True
            position = client.limiter.position(lane) + 1 if client.limiter is not None else 1
            await self._post_queue_notice(adapter, inbound, position, seconds)

        try:
            try:
                answer = await client.chat(
                    job.chatbot, text, session_id, lane=lane, before_send=asking, on_wait=rate_limited
                )
            finally:
                if asked is not None:
                    await asked
        except InsiteChatError as exc:
            reply = _notice(self._failure_notice(job.chatbot, exc))
            if isinstance(exc, QuotaExhausted):
                # When the bot asks InsiteChat again: a raised plan works from then on.
                return _Reply(reply.text.format(when=_in_minutes(exc.retry_in)), reply.kind, reply.outcome)
            return reply
        if not adapter.render(answer):
            log.warning("chatbot %s returned an empty answer", job.chatbot)
            return _notice("empty")
        # Kept for hand-overs, which only a desk makes.
        exchange = _Exchange(conversation, session_id, text, answer) if self._desk is not None else None
        offer_human = self._handovers.offered(conversation, job.chatbot, is_dm=inbound.is_dm)
        if job.chatbot in self._gap_chatbots and self._fallbacks.is_fallback(client, job.chatbot, answer):
            metrics.ANSWERS.labels(job.chatbot, "unanswered").inc()
            self._note_answer(FactKind.UNANSWERED, job, route)
            await self._knowledge_gap(job, inbound, session_id, answer)
            if offer_human:
                # The chatbot knows nothing here: the way to a person comes first, not last.
                answer = f"{answer}\n\n{NOTICES['gap']}"
        else:
            metrics.ANSWERS.labels(job.chatbot, "answered").inc()
            self._note_answer(FactKind.ANSWERED, job, route)
        return _Reply(answer, ReplyKind.ANSWER, Outcome.ANSWERED, offer_human, exchange)

    def _note_answer(self, kind: FactKind, job: ChatJob, route: str) -> None:
        if self._facts is not None:
            self._facts.note(kind, job.id, chatbot=job.chatbot, route=route)

    async def _knowledge_gap(self, job: ChatJob, inbound: Inbound, session_id: str, answer: str) -> None:
        """An answer.unanswered event for the alert rules that route it (the team that owns the sources)."""
        if self._desk is None:
            return
        data = {
            "session_id": session_id,
            "conversation": inbound.conversation.key,
            "job": job.id,
            "message": inbound.text.strip(),
            "answer": answer,
        }
        now = datetime.fromtimestamp(self._clock.time(), UTC)
        try:
            await self._desk.raise_event(Event(UNANSWERED, job.chatbot, now, data))
        except StoreError as exc:  # the answer still goes out; only the gap's card is lost
            log.warning("chatbot %s: the knowledge-gap alert for job %s was not stored: %s", job.chatbot, job.id, exc)

    async def _maybe_queue_notice(
        self, adapter: Adapter, inbound: Inbound, client: InsiteChatClient, lane: str
    ) -> bool:
        """A courtesy while the answer waits in the queue: posted at once, not retried (the answer is)."""
        limiter = client.limiter
        if limiter is None:
            return False
        wait = limiter.estimated_wait(lane)
        if wait < self._queue_notice_after:
            return False
        await self._post_queue_notice(adapter, inbound, limiter.position(lane) + 1, wait)
        return True

    async def _post_queue_notice(self, adapter: Adapter, inbound: Inbound, position: int, wait: float) -> None:
        text = NOTICES["queued"].format(position=position, seconds=int(wait + 0.999))
        parts = adapter.render(text)
        outbound = Outbound(
            inbound.conversation,
            tuple(parts),
            OutboundKind.NOTICE,
            reply_to=inbound.message_id,
            question_thread=inbound.thread if inbound.in_thread else "",
        )
        try:
            await adapter.send(outbound)
        except Exception as exc:
            log.warning("posting the queued notice to %s failed: %s", inbound.conversation.key, exc)

    def _failure_notice(self, chatbot: str, exc: InsiteChatError) -> str:
        """The notice for an InsiteChat failure; the operator's log line says why."""
        if isinstance(exc, QuotaExhausted):
            log.error("chatbot %s: monthly quota exhausted: %s", chatbot, exc)
            return "quota"
        if isinstance(exc, RateLimited):
            log.warning("chatbot %s: rate limited past the answer deadline", chatbot)
            return "busy"
        if isinstance(exc, Unavailable):
            log.warning("chatbot %s: InsiteChat unavailable: %s", chatbot, exc)
            return "unavailable"
        if isinstance(exc, (Unauthorized, NotFound)):
            log.error("chatbot %s: %s (check the API key and the route's chatbot id)", chatbot, exc)
            return "misconfigured"
        if isinstance(exc, BadRequest):
            log.error("chatbot %s: InsiteChat refused the request: %s", chatbot, exc)
            return "error"
        log.warning("chatbot %s: InsiteChat failed: %s", chatbot, exc)
        return "unavailable"

    # --- shutdown ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self, grace: float) -> None:
        """Stop starting jobs; give those in flight `grace` seconds. What is left stays a job for the next start."""
        self._accepting = False
        await self._fallbacks.aclose()
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        pending = {t for t in self._tasks.values() if not t.done()}
        if pending:
            log.info("waiting up to %.0f s for %d answer(s) in flight", grace, len(pending))
            await asyncio.wait(pending, timeout=grace)
        unfinished = {job_id: task for job_id, task in self._tasks.items() if not task.done()}
        for task in unfinished.values():
            task.cancel()
        if unfinished:
            log.warning(
                "%d answer(s) not finished at shutdown: they stay stored, and the next start answers them",
                len(unfinished),
            )
            await asyncio.gather(*unfinished.values(), return_exceptions=True)
        if unfinished:
            try:
                # Leases ended now, not in a minute: another replica on the same Redis takes them at once.
                await self._store.renew_jobs(list(unfinished), lease=0)
            except StoreError as exc:
                log.warning(
                    "could not hand over %d unfinished job(s) at once (%s); their leases run out", len(unfinished), exc
                )


def _in_minutes(seconds: float) -> str:
    """ "a minute", "5 minutes": a wait as the user reads it, rounded up."""
    minutes = max(1, math.ceil(seconds / 60))
    return "a minute" if minutes == 1 else f"{minutes} minutes"


def _notice(name: str, outcome: Outcome = Outcome.NOTICE) -> _Reply:
    return _Reply(NOTICES[name], ReplyKind.NOTICE, outcome)
