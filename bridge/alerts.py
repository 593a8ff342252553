"""InsiteChat events as alerts: loose parsing, dedupe keys, and routing to destinations by the config."""

from __future__ import annotations

import enum
import hashlib
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bridge.config import Settings
from bridge.messages import is_bridge_session

log = logging.getLogger(__name__)

ESCALATED = "conversation.escalated"
LEAD = "lead.captured"
STARTED = "conversation.started"
MESSAGE = "message.received"
HUMAN_REQUESTED = "bridge.human_requested"  # raised by the "Talk to a human" button, not by InsiteChat
UNANSWERED = "answer.unanswered"  # raised by the bridge: the chatbot answered with its fallback message
FLAGGED = "answer.flagged"  # raised by the bridge: someone voted 👎 on an answer
KNOWN_EVENTS = frozenset({ESCALATED, LEAD, STARTED, MESSAGE})

_TEXT_FIELDS = ("message", "content", "text", "visitor_message", "last_message")
_MAX_FIELD = 2000  # stored per visitor field; cards cut further


class AlertState(str, enum.Enum):
    OPEN = "open"
    CLAIMED = "claimed"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Event:
    """A webhook envelope, read loosely: every field may be missing except the event name."""

    name: str
    chatbot_id: str
    timestamp: datetime | None
    data: dict[str, Any]

    @property
    def is_test(self) -> bool:
        """The dashboard's "Send Test" (its event name is undocumented: recognise it loosely)."""
        return "test" in self.name.lower() or self.data.get("test") is True

    @property
    def session_id(self) -> str:
        return _text(self.data.get("session_id"))

    @property
    def conversation_id(self) -> str:
        return _text(self.data.get("conversation_id"))

    @property
    def visitor_text(self) -> str:
        for name in _TEXT_FIELDS:
            value = _text(self.data.get(name))
            if value:
                return value[:_MAX_FIELD]
        return ""

    @property
    def from_bridge(self) -> bool:
        """Events about the bridge's own InsiteChat sessions (a Slack or Discord thread)."""
        return is_bridge_session(self.session_id)

    @property
    def semantic_key(self) -> str:
        """What makes two deliveries the same alert, whatever their bytes.

        Escalations happen once per conversation; a lead has its id; other events are
        unique by session and time.
        """
        who = self.conversation_id or self.session_id
        if self.name in (ESCALATED, HUMAN_REQUESTED) and who:
            return f"{self.name}:{self.chatbot_id}:{who}"
        if self.name in (UNANSWERED, FLAGGED) and _text(self.data.get("job")):
            return f"{self.name}:{self.chatbot_id}:{_text(self.data.get('job'))}"  # one card per question / answer
        if self.name == LEAD and _text(self.data.get("lead_id")):
            return f"{LEAD}:{self.chatbot_id}:{_text(self.data.get('lead_id'))}"
        stamp = self.timestamp.isoformat() if self.timestamp else ""
        return f"{self.name}:{self.chatbot_id}:{who}:{stamp}"

    @property
    def group(self) -> str:
        """Alerts of one visitor session share a thread in the alert channel."""
        who = self.session_id or self.conversation_id or self.semantic_key
        return f"{self.chatbot_id}:{who}"


def parse_envelope(body: Any) -> Event | None:
    """The envelope, or None when the JSON is not one (no event name or chatbot id)."""
    if not isinstance(body, dict):
        return None
    name, chatbot_id = body.get("event"), body.get("chatbot_id")
    if not isinstance(name, str) or not name.strip() or not isinstance(chatbot_id, str):
        return None
    data = body.get("data")
    return Event(
        name.strip(), chatbot_id.strip(), parse_timestamp(body.get("timestamp")), data if isinstance(data, dict) else {}
    )


def parse_timestamp(value: Any) -> datetime | None:
    """ISO 8601 with `Z` or an offset, with or without microseconds; naive means UTC."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def body_key(raw: bytes) -> str:
    return "body:" + hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Destination:
    """One channel an alert goes to, with the mentions that channel's platform understands."""

    platform: str
    channel: str
    mentions: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"{self.platform}:{self.channel}"


_SLACK_MENTION = re.compile(r"^(<@[UW][A-Z0-9]+>|<!subteam\^[A-Z0-9]+>)$")
_DISCORD_MENTION = re.compile(r"^(<@!?\d+>|<@&\d+>)$")


def destinations_for(settings: Settings, event: Event) -> list[Destination]:
    """Every destination whose rule takes this event; message.received only when a rule names it."""
    found: dict[str, Destination] = {}
    for rule in settings.alerts:
        if rule.chatbot != event.chatbot_id:
            continue
        wanted = (
            event.is_test or event.name in rule.events or (event.name == HUMAN_REQUESTED and ESCALATED in rule.events)
        )
        if not wanted:
            continue
        for address in rule.to:
            platform, channel = address.split(":", 1)
            pattern = _SLACK_MENTION if platform == "slack" else _DISCORD_MENTION
            mentions = tuple(m for m in rule.mention if pattern.match(m))
            known = found.get(address)
            merged = tuple(dict.fromkeys((*(known.mentions if known else ()), *mentions)))
            found[address] = Destination(platform, channel, merged)
    return list(found.values())


@dataclass
class Alert:
    """What a card shows: the event, the chatbot's name, links, and the claim state."""

    id: str
    event: Event
    chatbot_name: str
    dashboard_url: str
    state: AlertState = AlertState.OPEN
    claimed_by: str = ""
    resolved_by: str = ""
    changed_at: float | None = None
    thread_link: str = ""  # the Slack/Discord thread when the session came from the bridge
    conversation: str = ""  # that thread's conversation key (for "Talk to a human")
    history: list[tuple[str, str]] = field(default_factory=list)  # the last exchanges, (who, text)
    version: int = 0  # bumped by every claim / resolve

    @property
    def can_be_claimed(self) -> bool:
        return self.event.name in (ESCALATED, HUMAN_REQUESTED, UNANSWERED, FLAGGED)


@dataclass
class AlertRecord:
    """An alert as stored: the event's envelope, its claim state, and where its cards were posted."""

    id: str
    envelope: dict[str, Any]
    state: AlertState = AlertState.OPEN
    claimed_by: str = ""
    resolved_by: str = ""
    changed_at: float | None = None
    conversation: str = ""  # the chat thread it is about, for "Talk to a human"
    history: list[tuple[str, str]] = field(default_factory=list)
    posts: dict[str, str] = field(default_factory=dict)  # destination address -> the card's reference
    version: int = 0  # bumped by every claim / resolve; cards show one version

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "envelope": self.envelope,
            "state": self.state.value,
            "claimed_by": self.claimed_by,
            "resolved_by": self.resolved_by,
            "changed_at": self.changed_at,
            "conversation": self.conversation,
            "history": [list(turn) for turn in self.history],
            "posts": self.posts,
            "version": self.version,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AlertRecord:
        return cls(
            id=str(data["id"]),
            envelope=dict(data["envelope"]),
            state=AlertState(data["state"]),
            claimed_by=str(data.get("claimed_by") or ""),
            resolved_by=str(data.get("resolved_by") or ""),
            changed_at=data.get("changed_at"),
            conversation=str(data.get("conversation") or ""),
            history=[(str(who), str(said)) for who, said in data.get("history") or []],
            posts={str(k): str(v) for k, v in (data.get("posts") or {}).items()},
            version=int(data.get("version") or 0),
        )


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (str, int, float)):
        return str(value).strip()
    return ""
