"""Pure Slack pieces of the alert loop: card metadata, the "Talk to a human" button, click payloads."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapters.slack.delivery import marked_payload
from adapters.slack.translate import PLATFORM
from bridge.messages import Conversation

ALERT_EVENT_TYPE = "insitechat_alert"  # message metadata event_type of every alert card
HUMAN_ACTION = "insitechat_human"  # action_id of the "Talk to a human" button
HUMAN_BLOCK_ID = "insitechat_human"
SECTION_LIMIT = 3000  # Block Kit: a section's text holds at most 3000 characters

ALERT_GONE = "This alert is no longer tracked (it expired or was never stored), so it can't be changed."
ALERTS_OFF = "Alerts aren't handled by this bridge, so this button does nothing."
ACTION_FAILED = "Something went wrong while recording that. Please try again."


def alert_metadata(key: str) -> dict[str, Any]:
    """chat.postMessage `metadata`: the outbox delivery key, so the card can be found after a crash."""
    return {"event_type": ALERT_EVENT_TYPE, "event_payload": {"key": key}}


def alert_key(message: Mapping[str, Any]) -> str | None:
    """The delivery key stored in a message's metadata, or None when it is not one of our cards."""
    payload = marked_payload(message, ALERT_EVENT_TYPE)
    key = payload.get("key") if payload is not None else None
    return key if isinstance(key, str) else None


def is_dm_channel(channel: str) -> bool:
    """Slack direct message channel ids start with D."""
    return channel.startswith("D")


# --- "Talk to a human" --------------------------------------------------------------------------


def human_blocks(text: str, conversation: Conversation, chatbot: str) -> list[dict[str, Any]]:
    """The answer's last part as a section, with the button under it.

    The button's value names the chatbot and the conversation, so a click (which may come
    after a restart) needs no memory of the answer. `text` must fit a section.
    """
    value = json.dumps({"chatbot": chatbot, "conversation": conversation.key}, separators=(",", ":"))
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {
            "type": "actions",
            "block_id": HUMAN_BLOCK_ID,
            "elements": [
                {
                    "type": "button",
                    "text": {"type": "plain_text", "text": "Talk to a human"},
                    "action_id": HUMAN_ACTION,
                    "value": value,
                }
            ],
        },
    ]


def parse_human_value(value: str) -> tuple[str, Conversation] | None:
    """(chatbot id, conversation) from the button's value; None when it is not one of ours."""
    try:
        data = json.loads(value)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    chatbot, key = data.get("chatbot"), data.get("conversation")
    if not isinstance(chatbot, str) or not chatbot or not isinstance(key, str):
        return None
    try:
        conversation = Conversation.from_key(key)
    except ValueError:
        return None
    return (chatbot, conversation) if conversation.platform == PLATFORM else None


def without_human_button(blocks: Any, who: str) -> list[dict[str, Any]]:
    """The answer's blocks after a click: the button gives way to who asked (an edit never pings)."""
    kept = (
        [b for b in blocks if isinstance(b, dict) and b.get("block_id") != HUMAN_BLOCK_ID]
        if isinstance(blocks, list)
        else []
    )
    note = {"type": "context", "elements": [{"type": "mrkdwn", "text": f":raising_hand: {who} asked for a human"}]}
    return [*kept, note]


# --- button clicks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Click:
    """Where and by whom a button was clicked, read from a block_actions payload."""

    user: str
    channel: str
    message_ts: str  # the message carrying the button
    thread_ts: str  # its thread, if it is in one
    message_text: str
    message_blocks: list[dict[str, Any]]


def _part(body: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = body.get(key)
    return value if isinstance(value, Mapping) else {}


def click_of(body: Mapping[str, Any]) -> Click:
    user = _part(body, "user")
    container = _part(body, "container")
    channel = _part(body, "channel")
    message = _part(body, "message")
    blocks = message.get("blocks")
    return Click(
        user=str(user.get("id") or ""),
        channel=str(container.get("channel_id") or channel.get("id") or ""),
        message_ts=str(container.get("message_ts") or message.get("ts") or ""),
        thread_ts=str(container.get("thread_ts") or message.get("thread_ts") or ""),
        message_text=str(message.get("text") or ""),
        message_blocks=list(blocks) if isinstance(blocks, list) else [],
    )
