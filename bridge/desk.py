"""The alert desk: turns events into stored alerts and outbox deliveries; claim, resolve, talk to a human."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from bridge.alerts import (
    ESCALATED,
    HUMAN_REQUESTED,
    MESSAGE,
    STARTED,
    Alert,
    AlertState,
    Destination,
    Event,
    body_key,
    destinations_for,
    parse_envelope,
)
from bridge.clock import Clock
from bridge.config import Settings
from bridge.messages import Conversation
from bridge.store import DAY, Store

log = logging.getLogger(__name__)

ALERT = "alert"  # store record kinds
PAUSED = "paused"  # conversation key -> alert id: the bot is quiet there until resolved
SESSION = "session"  # InsiteChat session id -> conversation key (for thread links)
HISTORY = "history"  # conversation key -> the last exchanges, for "Talk to a human" cards
HUMAN_ROUNDS = "human-rounds"  # conversation key -> how many times a human was asked for there
ALERT_TTL = 30 * DAY
HISTORY_TURNS = 4

RESUMED_NOTICE = "A teammate marked this resolved, so I'm back: ask me anything."


def alert_id_for(event: Event) -> str:
    return hashlib.sha256(event.semantic_key.encode()).hexdigest()[:20]


class AlertDesk:
    """Owns alert state. The webhook receiver, the buttons and the relay all go through it."""

    def __init__(self, settings: Settings, store: Store, clock: Clock) -> None:
        self._settings = settings
        self._store = store
        self._clock = clock
        # Called whenever deliveries were queued (the outbox worker's wake-up), so a click
        # on Claim updates the cards at once instead of at the next poll.
        self.on_queued: Callable[[], None] = lambda: None

    # --- events in -----------------------------------------------------------------------------

    async def raise_event(self, event: Event, raw: bytes = b"") -> bool:
        """Store the alert and queue one delivery per destination; False for a duplicate.

        Runs inside the webhook request: storage only, no network.
        """
        if event.from_bridge and event.name in (STARTED, MESSAGE):
            # The bridge's own chats would echo back as "visitor" activity.
            log.debug("suppressed %s about the bridge's own session", event.name)
            return True
        destinations = destinations_for(self._settings, event)
        alert_id = alert_id_for(event)
        keys = [f"event:{event.semantic_key}"] + ([body_key(raw)] if raw else [])
        if not destinations:
            await self._store.accept(keys, [])
            log.info("%s for chatbot %s: no alert rule takes it", event.name, event.chatbot_id)
            return True
        conversation = ""
        if event.from_bridge:
            conversation = await self._store.get(SESSION, event.session_id) or ""
        elif event.name == HUMAN_REQUESTED:
            conversation = str(event.data.get("conversation", ""))
        record = {
            "id": alert_id,
            "envelope": _envelope(event),
            "state": AlertState.OPEN.value,
            "claimed_by": "",
            "resolved_by": "",
            "changed_at": None,
            "conversation": conversation,
            "history": event.data.get("history", []) if event.name == HUMAN_REQUESTED else [],
            "posts": {},
            "version": 0,
        }
        deliveries = [(f"{alert_id}|{d.address}", d.address, _post_payload(alert_id, d, event)) for d in destinations]
        accepted = await self._store.accept(keys, deliveries, record=(ALERT, alert_id, record, ALERT_TTL))
        if accepted:
            log.info("alert %s (%s) queued for %d destination(s)", alert_id, event.name, len(destinations))
            self.on_queued()
        return accepted

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
        round_ = int(await self._store.get(HUMAN_ROUNDS, conversation.key) or 0) + 1
        await self._store.put(HUMAN_ROUNDS, conversation.key, round_, ttl=ALERT_TTL)
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
        await self.raise_event(event)
        alert_id = alert_id_for(event)
        await self._store.put(PAUSED, conversation.key, alert_id, ttl=ALERT_TTL)
        return await self.load(alert_id)

    # --- the chat side ----------------------------------------------------------------------

    async def paused(self, conversation: Conversation) -> bool:
        return await self._store.get(PAUSED, conversation.key) is not None

    async def resume(self, conversation: Conversation) -> None:
        await self._store.delete(PAUSED, conversation.key)

    async def remember_exchange(self, conversation: Conversation, session_id: str, question: str, answer: str) -> None:
        """Keep what "Talk to a human" and thread links need: the session's thread, the last turns."""
        await self._store.put(SESSION, session_id, conversation.key, ttl=ALERT_TTL)
        history = await self._store.get(HISTORY, conversation.key) or []
        history = [*history, ["User", question[:500]], ["Bot", answer[:500]]][-2 * HISTORY_TURNS :]
        await self._store.put(HISTORY, conversation.key, history, ttl=7 * DAY)

    # --- buttons ------------------------------------------------------------------------------

    async def act(self, alert_id: str, action: str, who: str) -> Alert | None:
        """Claim or resolve; every posted copy of the card is updated through the outbox."""
        record = await self._store.get(ALERT, alert_id)
        if record is None:
            return None
        state = AlertState(record["state"])
        if not self._alert(record).can_be_claimed:
            return self._alert(record)  # leads and notices carry no buttons
        if action == "claim" and state is AlertState.OPEN:
            record.update(state=AlertState.CLAIMED.value, claimed_by=who)
        elif action == "resolve" and state is not AlertState.RESOLVED:
            record.update(state=AlertState.RESOLVED.value, resolved_by=who)
        else:
            return self._alert(record)  # a second click changes nothing
        record["changed_at"] = self._clock.time()
        record["version"] += 1
        version = record["version"]
        updates = [
            (f"{alert_id}|{address}|v{version}", address, {"kind": "update", "alert": alert_id, "version": version})
            for address in record["posts"]
        ]
        if record["state"] == AlertState.RESOLVED.value and record["conversation"]:
            conversation = record["conversation"]
            if await self._store.get(PAUSED, conversation) == alert_id:
                await self._store.delete(PAUSED, conversation)
                platform = conversation.split(":", 1)[0]
                updates.append(
                    (f"{alert_id}|resumed", f"{platform}:notice", {"kind": "notice", "conversation": conversation, "text": RESUMED_NOTICE})
                )
        await self._store.put(ALERT, alert_id, record, ttl=ALERT_TTL)
        for key, destination, payload in updates:
            await self._store.outbox_add(key, destination, payload)
        self.on_queued()
        log.info("alert %s %s by %s", alert_id, record["state"], who)
        return self._alert(record)

    # --- reading back -------------------------------------------------------------------------

    async def load(self, alert_id: str) -> Alert | None:
        record = await self._store.get(ALERT, alert_id)
        return self._alert(record) if record else None

    async def record_post(self, alert_id: str, address: str, reference: str) -> None:
        record = await self._store.get(ALERT, alert_id)
        if record is not None:
            record["posts"][address] = reference
            await self._store.put(ALERT, alert_id, record, ttl=ALERT_TTL)

    async def post_reference(self, alert_id: str, address: str) -> str | None:
        record = await self._store.get(ALERT, alert_id)
        return record["posts"].get(address) if record else None

    def _alert(self, record: dict[str, Any]) -> Alert:
        event = parse_envelope(record["envelope"])
        assert event is not None
        bot = self._settings.chatbot_settings(event.chatbot_id)
        return Alert(
            id=record["id"],
            event=event,
            chatbot_name=bot.name if bot and bot.name else "",
            dashboard_url=self._settings.insitechat.dashboard_url,
            state=AlertState(record["state"]),
            claimed_by=record["claimed_by"],
            resolved_by=record["resolved_by"],
            changed_at=record["changed_at"],
            conversation=record["conversation"],
            history=[(str(w), str(t)) for w, t in record.get("history", [])],
            version=record["version"],
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
