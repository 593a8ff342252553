"""The alert desk: turns events into stored alerts and outbox deliveries; claim, resolve, talk to a human."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from bridge.alerts import (
    ESCALATED,
    FLAGGED,
    HUMAN_REQUESTED,
    MESSAGE,
    STARTED,
    UNANSWERED,
    Alert,
    AlertRecord,
    AlertState,
    Destination,
    Event,
    body_key,
    destinations_for,
    parse_envelope,
)
from bridge.cards import CLAIM
from bridge.clock import Clock
from bridge.config import Settings
from bridge.facts import FactLog
from bridge.messages import Conversation
from bridge.store import DAY, FactKind, NewDelivery, NewRecord, RecordRef, Store, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

ALERT = "alert"  # store record kinds
ROUND = "alert-round"  # semantic key -> its current round's alert (a new round after a Resolve or a day)
PAUSED = "paused"  # conversation key -> alert id: the bot is quiet there until resolved
SESSION = "session"  # InsiteChat session id -> conversation key (for thread links)
HISTORY = "history"  # conversation key -> the last exchanges, for "Talk to a human" cards
HUMAN_ROUNDS = "human-rounds"  # conversation key -> how many times a human was asked for there
ALERT_TTL = 30 * DAY
# A session's thread is written again only this long after this desk last wrote it: the record
# then lives at most this much less than ALERT_TTL, and a follow-up costs no round trip.
SESSION_REFRESH = DAY
SESSIONS_KNOWN = 10_000  # session -> thread writes remembered (the oldest forgotten first)
HISTORY_TURNS = 4
REASONS_KEPT = 20  # reasons a flagged answer's alert keeps (the card shows the latest few)
_CAS_TRIES = 20  # compare-and-set retries: only concurrent clicks on one card ever collide

RESUMED_NOTICE = "A teammate marked this resolved, so I'm back: ask me anything."


@dataclass(frozen=True)
class AlertRound:
    """Which round of one semantic event is current: the escalations of one session after each Resolve."""

    number: int
    alert_id: str


class AlertDesk:
    """Owns alert state. The webhook receiver, the buttons and the relay all go through it."""

    def __init__(self, settings: Settings, store: Store, clock: Clock, *, facts: FactLog | None = None) -> None:
        self._settings = settings
        self._store = store
        self._clock = clock
        self._facts = facts
        self._keep_text = settings.state.keep_text_hours * 3600
        # Called whenever deliveries were queued (the outbox worker's wake-up), so a click
        # on Claim updates the cards at once instead of at the next poll.
        self.on_queued: Callable[[], None] = lambda: None
        # Session ids this desk wrote, and when (monotonic): a session id names one thread for good.
        self._sessions_written: dict[str, float] = {}

    # --- events in -----------------------------------------------------------------------------

    async def raise_event(self, event: Event, raw: bytes = b"") -> bool:
        """Store the alert and queue one delivery per destination; False for a duplicate.

        Runs inside the webhook request: storage only, no network.
        """
        return await self._raise(event, raw) is not None

    async def _raise(self, event: Event, raw: bytes) -> str | None:
        """The new alert's id ("" when no card is due), or None for a duplicate."""
        if event.from_bridge and event.name in (STARTED, MESSAGE):
            # The bridge's own chats would echo back as "visitor" activity.
            log.debug("suppressed %s about the bridge's own session", event.name)
            return ""
        # A flagged answer has one card for good (as long as alerts are kept), however many 👎 it gets
        # and whether or not its card was resolved: the answer itself does not change.
        once = event.name == FLAGGED
        number = 1 if once else await self._round_of(event.semantic_key)
        # The same event within a day of its round is a duplicate; the body key catches
        # InsiteChat's own retries of one delivery.
        keys = [f"event:{event.semantic_key}#{number}"] + ([body_key(raw)] if raw else [])
        dedupe_ttl = ALERT_TTL if once else DAY
        destinations = destinations_for(self._settings, event)
        if not destinations:
            fresh = await self._store.accept(keys, [], ttl=dedupe_ttl)
            log.info("%s for chatbot %s: no alert rule takes it", event.name, event.chatbot_id)
            return "" if fresh else None
        alert_id = uuid.uuid4().hex[:20]
        conversation = ""
        if event.from_bridge:
            conversation = await self._store.get(SESSION, event.session_id) or ""
        elif event.name in (HUMAN_REQUESTED, UNANSWERED, FLAGGED):
            conversation = str(event.data.get("conversation", ""))
        history = event.data.get("history", []) if event.name == HUMAN_REQUESTED else []
        record = AlertRecord(
            alert_id, _envelope(event), conversation=conversation, history=[(str(w), str(t)) for w, t in history]
        )
        deliveries = [
            NewDelivery(f"{alert_id}|{d.address}", d.address, _post_payload(alert_id, d, event)) for d in destinations
        ]
        records = [
            NewRecord(ALERT, alert_id, record.to_json(), ALERT_TTL),
            NewRecord(ROUND, event.semantic_key, asdict(AlertRound(number, alert_id)), ALERT_TTL),
        ]
        if not await self._store.accept(keys, deliveries, records=records, ttl=dedupe_ttl):
            return None
        if self._facts is not None:
            self._facts.note(FactKind.ALERT_RAISED, alert_id, chatbot=event.chatbot_id, value=event.name)
        log.info(
            "alert %s (%s, round %d) queued for %d destination(s)", alert_id, event.name, number, len(destinations)
        )
        self.on_queued()
        return alert_id

    async def raise_flagged(self, event: Event) -> str | None:
        """An answer.flagged event (bridge/feedback.py): the new alert's id; "" when no rule takes it, None when
        the answer was flagged before (its card stands)."""
        return await self._raise(event, b"")

    async def current_alert(self, semantic_key: str) -> str | None:
        """The id of the alert an event with this key raised last (its current round), if any."""
        stored = await self._store.get(ROUND, semantic_key)
        return AlertRound(**stored).alert_id if stored is not None else None

    async def add_reason(self, alert_id: str, who: str, reason: str) -> bool:
        """Add a 👎's reason to a flagged answer's card; every posted copy is updated through the outbox.

        A card still on its way shows it too: record_post sees the newer version and queues the update.
        False when there is no such alert (expired).
        """

        def append(record: AlertRecord) -> bool:
            data = record.envelope.setdefault("data", {})
            reasons = [r for r in data.get("reasons") or [] if r != [who, reason]]
            data["reasons"] = [*reasons, [who, reason]][-REASONS_KEPT:]
            record.version += 1
            return True

        changed = await self._change_alert(alert_id, append)
        if changed is None:
            return False
        record = changed[0]
        for address in record.posts:
            await self._queue_update(record, address)
        self.on_queued()
        return True

    async def _round_of(self, semantic_key: str) -> int:
        """The round an event with this key belongs to: the current one, or the next once that was resolved."""
        stored = await self._store.get(ROUND, semantic_key)
        if stored is None:
            return 1
        current = AlertRound(**stored)
        record = await self._record(current.alert_id)
        if record is None or record.state is AlertState.RESOLVED:
            return current.number + 1
        return current.number

    def has_human_route(self, chatbot_id: str) -> bool:
        """Whether "Talk to a human" has somewhere to go for this chatbot."""
        probe = Event(HUMAN_REQUESTED, chatbot_id, None, {})
        return bool(destinations_for(self._settings, probe))

    async def request_human(self, chatbot_id: str, conversation: Conversation, requester: str) -> Alert | None:
        """The "Talk to a human" button: an escalation for this thread; the bot goes quiet there.

        While a request is open, asking again returns it; after it is resolved, asking
        again raises a new alert (each request is its own round).
        """
        open_request = await self._store.get(PAUSED, conversation.key)
        if open_request is not None:
            log.info("talk-to-a-human already requested for %s", conversation.key)
            return await self.load(open_request)
        round_ = await self._update(HUMAN_ROUNDS, conversation.key, lambda n: int(n or 0) + 1, ALERT_TTL)
        history = await self._store.get(HISTORY, conversation.key) or []
        event = Event(
            HUMAN_REQUESTED,
            chatbot_id,
            None,
            {
                "session_id": conversation.session_id(),
                "conversation_id": f"{conversation.key}#{round_}",
                "conversation": conversation.key,
                "requested_by": requester,
                "history": history,
                # The card quotes what the person last asked, not the bot's answer.
                "message": next((said for who, said in reversed(history) if who == "User"), ""),
            },
        )
        alert_id = await self._raise(event, b"")
        if not alert_id:
            return None
        await self._store.put(PAUSED, conversation.key, alert_id, ttl=ALERT_TTL)
        return await self.load(alert_id)

    # --- the chat side ----------------------------------------------------------------------

    async def paused(self, conversation: Conversation) -> bool:
        return await self._store.get(PAUSED, conversation.key) is not None

    def pause_record(self, conversation: Conversation) -> RecordRef:
        """The record that keeps the bot quiet in a conversation while a human has it (read by create_job)."""
        return RecordRef(PAUSED, conversation.key)

    async def resume(self, conversation: Conversation) -> None:
        await self._store.delete(PAUSED, conversation.key)

    async def remember_exchange(self, conversation: Conversation, session_id: str, question: str, answer: str) -> None:
        """Keep what "Talk to a human" and thread links need: the session's thread, the last turns."""
        now = self._clock.monotonic()
        written = self._sessions_written.get(session_id)
        if written is None or now - written >= SESSION_REFRESH:
            await self._store.put(SESSION, session_id, conversation.key, ttl=ALERT_TTL)
            self._sessions_written.pop(session_id, None)
            self._sessions_written[session_id] = now
            if len(self._sessions_written) > SESSIONS_KNOWN:
                del self._sessions_written[next(iter(self._sessions_written))]
        # The words are kept only as long as the questions and answers themselves.
        turn = [["User", question[:500]], ["Bot", answer[:500]]]
        await self._store.append(HISTORY, conversation.key, turn, keep=2 * HISTORY_TURNS, ttl=self._keep_text)

    async def _update(self, kind: str, key: str, change: Callable[[Any], T], ttl: float) -> T:
        """Read, change and write one record atomically (compare-and-set, retried on a collision)."""
        for _ in range(_CAS_TRIES):
            found = await self._store.get_versioned(kind, key)
            value = change(found.value if found is not None else None)
            if await self._store.put_if(kind, key, value, revision=found.revision if found else None, ttl=ttl):
                return value
        raise StoreError(f"{kind} {key} kept changing under concurrent updates")

    # --- buttons ------------------------------------------------------------------------------

    @staticmethod
    def taken_by_someone_else(alert: Alert, action: str, who: str) -> str:
        """What the clicker reads when their click changed nothing, as someone else got there first; "" otherwise."""
        if alert.state is AlertState.RESOLVED and alert.resolved_by != who:
            return f"Already resolved by {alert.resolved_by}."
        if action == CLAIM and alert.state is AlertState.CLAIMED and alert.claimed_by != who:
            return f"Already claimed by {alert.claimed_by}."
        return ""

    async def act(self, alert_id: str, action: str, who: str) -> Alert | None:
        """Claim or resolve; every posted copy of the card is updated through the outbox."""

        def claim_or_resolve(record: AlertRecord) -> bool:
            if not self._alert(record).can_be_claimed:
                return False  # leads and notices carry no buttons
            if action == "claim" and record.state is AlertState.OPEN:
                record.state, record.claimed_by = AlertState.CLAIMED, who
            elif action == "resolve" and record.state is not AlertState.RESOLVED:
                record.state, record.resolved_by = AlertState.RESOLVED, who
            else:
                return False  # a second click changes nothing
            record.changed_at = self._clock.time()
            record.version += 1
            return True

        changed = await self._change_alert(alert_id, claim_or_resolve)
        if changed is None:
            return None
        record, written = changed
        alert = self._alert(record)
        if not written:
            return alert
        if self._facts is not None:
            kind = FactKind.ALERT_RESOLVED if record.state is AlertState.RESOLVED else FactKind.ALERT_CLAIMED
            self._facts.note(kind, alert_id, chatbot=alert.event.chatbot_id, actor=who)
        for address in record.posts:
            await self._queue_update(record, address)
        if record.state is AlertState.RESOLVED and record.conversation:
            conversation = record.conversation
            if await self._store.get(PAUSED, conversation) == alert_id:
                await self._store.delete(PAUSED, conversation)
                platform = conversation.split(":", 1)[0]
                await self._store.outbox_add(
                    f"{alert_id}|resumed",
                    f"{platform}:notice",
                    {"kind": "notice", "conversation": conversation, "text": RESUMED_NOTICE},
                )
        self.on_queued()
        log.info("alert %s %s by %s", alert_id, record.state.value, who)
        return alert

    async def _change_alert(
        self, alert_id: str, change: Callable[[AlertRecord], bool]
    ) -> tuple[AlertRecord, bool] | None:
        """Apply `change` to the stored alert atomically (compare-and-set, retried on a collision).

        `change` edits the record and says whether there is anything to write. Returns the
        record and whether it was written; None when there is no such alert.
        """
        for _ in range(_CAS_TRIES):
            found = await self._store.get_versioned(ALERT, alert_id)
            if found is None:
                return None
            record = AlertRecord.from_json(found.value)
            if not change(record):
                return record, False
            if await self._store.put_if(ALERT, alert_id, record.to_json(), revision=found.revision, ttl=ALERT_TTL):
                return record, True
        raise StoreError(f"alert {alert_id} kept changing under concurrent updates")

    async def _queue_update(self, record: AlertRecord, address: str) -> None:
        # Keyed by version: the click and a post that saw the change queue the same update once.
        await self._store.outbox_add(
            f"{record.id}|{address}|v{record.version}",
            address,
            {"kind": "update", "alert": record.id, "version": record.version},
        )

    # --- reading back -------------------------------------------------------------------------

    async def load(self, alert_id: str) -> Alert | None:
        record = await self._record(alert_id)
        return self._alert(record) if record else None

    async def _record(self, alert_id: str) -> AlertRecord | None:
        value = await self._store.get(ALERT, alert_id)
        return AlertRecord.from_json(value) if value else None

    async def record_post(self, alert_id: str, address: str, reference: str, *, shown_version: int) -> None:
        """Remember where a card went; if the alert changed while it was posted, queue its update."""

        def add_post(record: AlertRecord) -> bool:
            record.posts[address] = reference
            return True

        changed = await self._change_alert(alert_id, add_post)
        if changed is None:
            return
        record = changed[0]
        if record.version != shown_version:
            # A claim or resolve came while this card was on its way: it shows an old state.
            await self._queue_update(record, address)
            self.on_queued()

    async def post_reference(self, alert_id: str, address: str) -> str | None:
        record = await self._record(alert_id)
        return record.posts.get(address) if record else None

    def _alert(self, record: AlertRecord) -> Alert:
        event = parse_envelope(record.envelope)
        assert event is not None
        bot = self._settings.chatbot_settings(event.chatbot_id)
        return Alert(
            id=record.id,
            event=event,
            chatbot_name=bot.name if bot and bot.name else "",
            dashboard_url=self._settings.insitechat.dashboard_url,
            state=record.state,
            claimed_by=record.claimed_by,
            resolved_by=record.resolved_by,
            changed_at=record.changed_at,
            conversation=record.conversation,
            history=list(record.history),
            version=record.version,
        )


def _envelope(event: Event) -> dict[str, Any]:
    return {
        "event": event.name,
        "chatbot_id": event.chatbot_id,
        "timestamp": event.timestamp.isoformat() if event.timestamp else None,
        "data": event.data,
    }


def _post_payload(alert_id: str, destination: Destination, event: Event) -> dict[str, Any]:
    return {
        "kind": "post",
        "alert": alert_id,
        "destination": asdict(destination),
        "group": event.group,
        # The escalation is broadcast to the channel (with the on-call mention) even when
        # it lands in the visitor's existing thread.
        "broadcast": event.name in (ESCALATED, HUMAN_REQUESTED),
    }
