"""The outbox worker: delivers stored alerts to Slack and Discord until each is done, exactly once."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Mapping

from adapters.base import AlertPoster
from bridge import metrics
from bridge.alerts import ESCALATED, HUMAN_REQUESTED, LEAD, Alert
from bridge.cards import console_card, discord_card, slack_card
from bridge.clock import Clock
from bridge.desk import AlertDesk
from bridge.messages import Conversation, Outbound, OutboundKind
from bridge.relay import RENDERERS
from bridge.store import OutboxItem, Store

log = logging.getLogger(__name__)

THREAD = "alert-thread"  # store kind: (destination, visitor session) -> the thread's root reference
_MENTIONED_EVENTS = (ESCALATED, HUMAN_REQUESTED, LEAD)
_CARDS = {"slack": slack_card, "discord": discord_card, "console": console_card}


class Outbox:
    """Polls the store for due deliveries; backs off per item for as long as a platform is down."""

    def __init__(
        self,
        store: Store,
        desk: AlertDesk,
        posters: Mapping[str, AlertPoster],
        clock: Clock,
        *,
        poll_interval: float = 2.0,
        base_backoff: float = 5.0,
        max_backoff: float = 300.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._desk = desk
        self._posters = posters
        self._clock = clock
        self._poll = poll_interval
        self._base = base_backoff
        self._max = max_backoff
        self._jitter = jitter
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One pass at a time: two passes would both see the same due item and post it twice.
        self._pass = asyncio.Lock()

    def wake(self) -> None:
        """New work was stored: deliver now instead of at the next poll."""
        self._wake.set()

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
                await asyncio.wait_for(self.deliver_due(), final_pass)
            except asyncio.TimeoutError:
                log.info("shutdown: deliveries still under way are left for the next start")
            except Exception:
                log.exception("shutdown: the last outbox pass failed; undelivered alerts stay queued")
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
            except Exception:
                log.exception("outbox pass failed; trying again")
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll)
            except asyncio.TimeoutError:
                pass

    async def deliver_due(self) -> int:
        """One pass over what is due; returns how many deliveries succeeded.

        Destinations are served side by side, so an outage of one platform does not hold
        up the other; within one destination, deliveries keep their order (threads).
        """
        async with self._pass:
            by_destination: dict[str, list[OutboxItem]] = defaultdict(list)
            for item in await self._store.outbox_due(limit=200):
                by_destination[item.destination].append(item)
            results = await asyncio.gather(*(self._deliver_in_order(items) for items in by_destination.values()))
            return sum(results)

    async def _deliver_in_order(self, items: list[OutboxItem]) -> int:
        for index, item in enumerate(items):
            delay = await self._deliver(item)
            if delay is not None:
                # Later items to this destination wait as long, so they stay in order (threads).
                for later in items[index + 1 :]:
                    await self._store.outbox_retry(later.id, delay, "waiting behind an earlier delivery", count=False)
                return index
        return len(items)

    async def _deliver(self, item: OutboxItem) -> float | None:
        """Deliver one item; None when done, else the delay before it is tried again."""
        platform = item.destination.split(":", 1)[0]
        poster = self._posters.get(platform)
        if poster is None:
            log.error("alert for %s is waiting: %s is not connected", item.destination, platform)
            await self._store.outbox_retry(item.id, self._max, f"no {platform} connection configured", count=False)
            return self._max
        await self._store.outbox_begin(item.id)
        try:
            reference = await self._perform(poster, platform, item)
        except Exception as exc:
            metrics.DELIVERIES.labels(platform, "failed").inc()
            delay = self._backoff(item.attempts)
            await self._store.outbox_retry(item.id, delay, f"{type(exc).__name__}: {exc}")
            log.warning(
                "delivery to %s failed (attempt %d): %s; next try in %.0f s",
                item.destination, item.attempts + 1, exc, delay,
            )
            return delay
        metrics.DELIVERIES.labels(platform, "delivered").inc()
        await self._store.outbox_done(item.id, reference)
        return None

    async def _perform(self, poster: AlertPoster, platform: str, item: OutboxItem) -> str:
        kind = item.payload.get("kind")
        if kind == "notice":
            conversation = Conversation.from_key(item.payload["conversation"])
            parts = tuple(RENDERERS[platform](item.payload["text"]))
            sent = await poster.send(Outbound(conversation, parts, OutboundKind.NOTICE))
            return sent[0] if sent else ""
        alert = await self._desk.load(item.payload["alert"])
        if alert is None:
            log.warning("alert %s expired before delivery; dropped", item.payload["alert"])
            return "expired"
        await self._add_thread_link(alert)
        if kind == "update":
            return await self._update(poster, platform, item, alert)
        return await self._post(poster, platform, item, alert)

    async def _post(self, poster: AlertPoster, platform: str, item: OutboxItem, alert: Alert) -> str:
        destination = item.payload["destination"]
        channel, address = destination["channel"], item.destination
        mentions = tuple(destination["mentions"]) if alert.event.name in _MENTIONED_EVENTS or alert.event.is_test else ()
        thread_key = f"{address}|{item.payload['group']}"
        thread = await self._store.get(THREAD, thread_key) or ""
        reference = None
        if item.started or item.attempts:
            # An earlier attempt may have posted before it could record so: look first.
            reference = await poster.find_alert(channel, item.key, since=item.created_at, thread=thread)
            if reference:
                log.info("alert %s was already posted to %s; not posting again", alert.id, address)
        if not reference:
            card = _CARDS[platform](alert, mentions)
            reference = await poster.post_alert(
                channel, card, thread=thread, broadcast=bool(item.payload.get("broadcast")), key=item.key
            )
        if not thread:
            await self._store.put(THREAD, thread_key, reference, ttl=7 * 86_400)
        await self._desk.record_post(alert.id, address, reference)
        return reference

    async def _update(self, poster: AlertPoster, platform: str, item: OutboxItem, alert: Alert) -> str:
        if item.payload.get("version", alert.version) < alert.version:
            return "superseded"  # a newer update of this card is queued behind this one
        reference = await self._desk.post_reference(alert.id, item.destination)
        if not reference:
            return "not-posted"
        channel = item.destination.split(":", 1)[1]
        await poster.update_alert(channel, reference, _CARDS[platform](alert, ()))
        return reference

    async def _add_thread_link(self, alert: Alert) -> None:
        if not alert.conversation or alert.thread_link:
            return
        conversation = Conversation.from_key(alert.conversation)
        poster = self._posters.get(conversation.platform)
        if poster is not None:
            try:
                alert.thread_link = await poster.permalink(conversation) or ""
            except Exception as exc:  # a link is nice to have; the alert goes out without it
                log.info("no link to %s: %s", alert.conversation, exc)

    def _backoff(self, attempts: int) -> float:
        cap = min(self._max, self._base * 2 ** min(attempts, 16))
        return cap * (0.5 + 0.5 * self._jitter())

