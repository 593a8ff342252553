"""The outbox worker: delivers stored alerts and chat replies until the platform takes each, exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections import defaultdict
from collections.abc import Callable

from bridge import metrics
from bridge.alerts import ESCALATED, HUMAN_REQUESTED, LEAD, Alert
from bridge.backoff import Backoff
from bridge.clock import Clock
from bridge.desk import AlertDesk
from bridge.messages import Conversation, Delivery, Inbound, Outbound, OutboundKind
from bridge.ports import Adapter, AlertPoster, PermanentSendError, PostsDigest, TellsRefusal
from bridge.store import ChatJob, OutboxItem, ReplyKind, Store, StoreError

log = logging.getLogger(__name__)

THREAD = "alert-thread"  # store kind: (destination, visitor session) -> the thread's root reference
_MENTIONED_EVENTS = (ESCALATED, HUMAN_REQUESTED, LEAD)
ATTEMPT_LEASE = 120.0  # one attempt may take this long (a platform's own 429 waits included)


class DeliveryResult(enum.Enum):
    DELIVERED = "delivered"
    RETRYING = "retrying"  # the platform is down or refused for now: tried again later
    FAILED = "failed"  # refused for a reason that cannot heal
    SKIPPED = "skipped"  # someone else holds it, or it is done already


# A person waits for a chat reply: retry it sooner than an alert card.
CHAT_BACKOFF = Backoff(1.0, 60.0)
ALERT_BACKOFF = Backoff(5.0, 300.0)


class Outbox:
    """Polls the store for due deliveries; backs off per item for as long as a platform is down.

    Each attempt holds the item under a lease (`outbox_take`), so an attempt made at once
    by the relay and a pass of this worker never post the same item twice.
    """

    def __init__(
        self,
        store: Store,
        desk: AlertDesk,
        clock: Clock,
        *,
        poll_interval: float = 2.0,
        chat_backoff: Backoff = CHAT_BACKOFF,
        alert_backoff: Backoff = ALERT_BACKOFF,
        jitter: Callable[[], float] = random.random,
        attempt_lease: float = ATTEMPT_LEASE,
        offers_feedback: Callable[[Inbound], bool] | None = None,
    ) -> None:
        """`offers_feedback(question)`: whether its answer carries 👍 / 👎 (bridge/feedback.py decides)."""
        self._store = store
        self._desk = desk
        self._clock = clock
        self._adapters: dict[str, Adapter] = {}
        self._poll = poll_interval
        self._chat_backoff = chat_backoff
        self._alert_backoff = alert_backoff
        self._jitter = jitter
        self._attempt_lease = attempt_lease
        self._offers_feedback = offers_feedback or (lambda inbound: False)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One pass at a time: a pass pushes later items of a failing destination back.
        self._pass = asyncio.Lock()

    def register(self, adapter: Adapter) -> None:
        self._adapters[adapter.name] = adapter

    @property
    def attempt_lease(self) -> float:
        """How long one attempt holds an item (for a reply stored already held: job_answered's lease)."""
        return self._attempt_lease

    def wake(self) -> None:
        """New work was stored: deliver now instead of at the next poll."""
        self._wake.set()

    async def platform_up(self, platform: str) -> None:
        """A platform (re)connected: what waits for it is due now, not at the end of its backoff."""
        count = await self._store.outbox_hasten(platform)
        if count:
            log.info("%s is up: delivering the %d item(s) that waited for it", platform, count)
        self.wake()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox")

    async def stop(self, final_pass: float = 0.0) -> None:
        """Stop; anything undelivered stays in the store for the next start.

        `final_pass` seconds are spent delivering what is due right now (at shutdown),
        after which a delivery still under way is cut off: the next start looks before
        posting it again.
        """
        if final_pass > 0:
            try:
                async with asyncio.timeout(final_pass):
                    await self.deliver_due()
            except TimeoutError:
                log.info("shutdown: deliveries still under way are left for the next start")
            except Exception:
                log.exception("shutdown: the last outbox pass failed; undelivered items stay queued")
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            # Cleared before the pass, not after: work stored during a pass must start another.
            self._wake.clear()
            try:
                await self.deliver_due()
            except StoreError as exc:
                log.error("outbox pass failed: %s; trying again", exc)
            except Exception:
                log.exception("outbox pass failed; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll):
                    await self._wake.wait()

    async def deliver_due(self) -> int:
        """One pass over what is due; returns how many deliveries succeeded.

        Destinations are served side by side, so an outage of one platform does not hold
        up the other; within one destination (an alert channel, a chat conversation),
        deliveries keep their order.
        """
        async with self._pass:
            by_destination: dict[str, list[OutboxItem]] = defaultdict(list)
            for item in await self._store.outbox_due(limit=200):
                by_destination[item.destination].append(item)
            results = await asyncio.gather(*(self._deliver_in_order(items) for items in by_destination.values()))
            return sum(results)

    async def deliver_now(self, item: OutboxItem, job: ChatJob) -> DeliveryResult:
        """One attempt at a chat reply just stored, with its job in hand; on failure the worker retries it."""
        result = await self._deliver(item, job=job)
        if result is DeliveryResult.RETRYING:
            self.wake()  # later items of the same conversation wait behind it
        return result

    async def _deliver_in_order(self, items: list[OutboxItem]) -> int:
        delivered = 0
        for index, item in enumerate(items):
            result = await self._deliver(item)
            if result is DeliveryResult.RETRYING:
                # Later items to this destination wait as well, so they stay in order (threads).
                delay = self._backoff_for(item).delay(item.attempts, self._jitter())
                for later in items[index + 1 :]:
                    await self._store.outbox_retry(later.id, delay, "waiting behind an earlier delivery", count=False)
                return delivered
            delivered += result is DeliveryResult.DELIVERED
        return delivered

    async def _tell_refused(
        self, adapter: Adapter, item: OutboxItem, job: ChatJob | None, refusal: PermanentSendError
    ) -> None:
        """Never silent: a chat reply refused for good is explained to the asker, where the platform allows it."""
        if item.payload.get("kind") != "chat" or not isinstance(adapter, TellsRefusal):
            return
        if job is None:
            job = await self._store.get_job(item.payload["job"])
        if job is not None and job.inbound is not None:
            await adapter.tell_refused(job.inbound, refusal)

    def _backoff_for(self, item: OutboxItem) -> Backoff:
        return self._chat_backoff if item.payload.get("kind") == "chat" else self._alert_backoff

    async def _deliver(self, item: OutboxItem, *, job: ChatJob | None = None) -> DeliveryResult:
        """One attempt at one item, under its lease."""
        platform = item.destination.split(":", 1)[0]
        adapter = self._adapters.get(platform)
        if adapter is None:
            log.error("delivery to %s is waiting: %s is not configured", item.destination, platform)
            await self._store.outbox_retry(item.id, self._alert_backoff.cap, f"no {platform} connection", count=False)
            return DeliveryResult.RETRYING
        taken = item if item.held else await self._store.outbox_take(item.id, lease=self._attempt_lease)
        if taken is None:
            return DeliveryResult.SKIPPED
        try:
            reference = await self._perform(adapter, platform, taken, job=job)
        except PermanentSendError as exc:
            metrics.DELIVERIES.labels(platform, "refused").inc()
            await self._store.outbox_fail(taken.id, str(exc))
            log.error("delivery to %s refused for good, not retried: %s", taken.destination, exc)
            await self._tell_refused(adapter, taken, job, exc)
            return DeliveryResult.FAILED
        except StoreError:
            raise
        except Exception as exc:
            metrics.DELIVERIES.labels(platform, "failed").inc()
            delay = self._backoff_for(taken).delay(taken.attempts, self._jitter())
            await self._store.outbox_retry(taken.id, delay, f"{type(exc).__name__}: {exc}")
            log.warning(
                "delivery to %s failed (attempt %d): %s; next try in %.0f s",
                taken.destination, taken.attempts + 1, exc, delay,
            )
            return DeliveryResult.RETRYING
        metrics.DELIVERIES.labels(platform, "delivered").inc()
        await self._store.outbox_done(taken.id, reference)
        return DeliveryResult.DELIVERED

    async def _perform(self, adapter: Adapter, platform: str, item: OutboxItem, *, job: ChatJob | None) -> str:
        kind = item.payload.get("kind")
        if kind == "chat":
            return await self._reply(adapter, platform, item, job=job)
        if kind == "notice":
            conversation = Conversation.from_key(item.payload["conversation"])
            parts = tuple(adapter.render(item.payload["text"]))
            delivery = Delivery(item.key, look_first=item.started, since=item.created_at)
            sent = await adapter.send(Outbound(conversation, parts, OutboundKind.NOTICE, delivery=delivery))
            return sent[0] if sent else ""
        if kind == "digest":
            return await self._digest(adapter, platform, item)
        if not isinstance(adapter, AlertPoster):
            raise PermanentSendError(f"{platform} cannot carry alert cards")
        alert = await self._desk.load(item.payload["alert"])
        if alert is None:
            log.warning("alert %s expired before delivery; dropped", item.payload["alert"])
            return "expired"
        await self._add_thread_link(alert)
        if kind == "update":
            return await self._update(adapter, platform, item, alert)
        return await self._post(adapter, platform, item, alert)

    async def _reply(self, adapter: Adapter, platform: str, item: OutboxItem, *, job: ChatJob | None) -> str:
        """A chat job's reply, in the thread of the question; after a crash, only the parts not yet there.

        `job` is given by the relay's first attempt (it just stored it); retries read it back.
        """
        inline = job is not None
        if job is None:
            job = await self._store.get_job(item.payload["job"])
        if job is None or job.inbound is None:
            log.warning("chat reply %s expired before delivery; dropped", item.key)
            return "expired"
        inbound = job.inbound
        parts = tuple(adapter.render(job.reply))
        outbound = Outbound(
            inbound.conversation,
            parts,
            OutboundKind.ANSWER if job.reply_kind is ReplyKind.ANSWER else OutboundKind.NOTICE,
            reply_to=inbound.message_id,
            question_thread=inbound.thread if inbound.in_thread else "",
            human_chatbot=job.chatbot if job.offer_human else "",
            feedback_job=job.id if job.reply_kind is ReplyKind.ANSWER and self._offers_feedback(inbound) else "",
            delivery=Delivery(job.delivery_key, look_first=item.started or item.attempts > 0, since=job.created_at),
        )
        if inline:
            return ",".join(await adapter.send(outbound))
        # A retry or a recovery: the working signal shows while it posts, and is cleared after
        # (one left behind by a process that died is cleared too).
        async with adapter.working(inbound):
            return ",".join(await adapter.send(outbound))

    async def _post(self, poster: AlertPoster, platform: str, item: OutboxItem, alert: Alert) -> str:
        destination = item.payload["destination"]
        channel, address = destination["channel"], item.destination
        mentions = (
            tuple(destination["mentions"]) if alert.event.name in _MENTIONED_EVENTS or alert.event.is_test else ()
        )
        thread_key = f"{address}|{item.payload['group']}"
        thread = await self._store.get(THREAD, thread_key) or ""
        reference = None
        if item.started or item.attempts:
            # An earlier attempt may have posted before it could record so: look first.
            reference = await poster.find_alert(channel, item.key, since=item.created_at, thread=thread)
            if reference:
                log.info("alert %s was already posted to %s; not posting again", alert.id, address)
        if not reference:
            card = poster.render_card(alert, mentions)
            reference = await poster.post_alert(
                channel, card, thread=thread, broadcast=bool(item.payload.get("broadcast")), key=item.key
            )
        if not thread:
            await self._store.put(THREAD, thread_key, reference, ttl=7 * 86_400)
        await self._desk.record_post(alert.id, address, reference, shown_version=alert.version)
        return reference

    async def _update(self, poster: AlertPoster, platform: str, item: OutboxItem, alert: Alert) -> str:
        if item.payload.get("version", alert.version) < alert.version:
            return "superseded"  # a newer update of this card is queued behind this one
        reference = await self._desk.post_reference(alert.id, item.destination)
        if not reference:
            return "not-posted"
        channel = item.destination.split(":", 1)[1]
        await poster.update_alert(channel, reference, poster.render_card(alert, ()))
        return reference

    async def _digest(self, adapter: Adapter, platform: str, item: OutboxItem) -> str:
        """The weekly digest (queued by bridge/digest.py), with its charts when they are wanted and can be drawn."""
        if not isinstance(adapter, PostsDigest):
            raise PermanentSendError(f"{platform} cannot carry the report digest")
        channel = item.destination.split(":", 1)[1]
        if item.started or item.attempts:
            # An earlier attempt may have posted before it could record so: look first.
            found = await adapter.find_digest(channel, item.key, since=item.created_at)
            if found:
                log.info("the digest %s was already posted to %s; not posting again", item.key, item.destination)
                return found
        from bridge.charts import render_charts  # only a digest needs it, once a week
        from bridge.report import Report

        report = Report.from_json(item.payload["report"])
        charts = await render_charts(report) if item.payload.get("charts") else []
        return await adapter.post_digest(channel, report, charts, key=item.key)

    async def _add_thread_link(self, alert: Alert) -> None:
        if not alert.conversation or alert.thread_link:
            return
        conversation = Conversation.from_key(alert.conversation)
        poster = self._adapters.get(conversation.platform)
        if isinstance(poster, AlertPoster):
            try:
                alert.thread_link = await poster.permalink(conversation) or ""
            except Exception as exc:  # a link is nice to have; the alert goes out without it
                log.info("no link to %s: %s", alert.conversation, exc)


