"""Alert cards: a Slack Block Kit message and a Discord embed per alert, bounded, escaped, mention-safe."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from bridge.alerts import ESCALATED, HUMAN_REQUESTED, LEAD, MESSAGE, STARTED, Alert, AlertState
from bridge.formatting import neutralise_discord, neutralise_slack

CLAIM, RESOLVE = "claim", "resolve"
ACTION_PREFIX = "insitechat_alert"  # Slack action_id / Discord custom_id: "<prefix>:<action>:<alert id>"

_TITLES = {
    ESCALATED: ":raising_hand: A visitor asked for a human",
    HUMAN_REQUESTED: ":raising_hand: Someone asked for a human in chat",
    LEAD: ":card_index: New lead captured",
    STARTED: ":speech_balloon: New conversation on the website",
    MESSAGE: ":envelope: Visitor message",
}
_DISCORD_EMOJI = {":raising_hand:": "🙋", ":card_index:": "📇", ":speech_balloon:": "💬", ":envelope:": "✉️", ":test_tube:": "🧪"}
_COLOURS = {AlertState.OPEN: 0xE01E5A, AlertState.CLAIMED: 0xECB22E, AlertState.RESOLVED: 0x2EB67D}
_QUOTE_LIMIT = 1000  # the visitor's words shown on a card
_FIELD_LIMIT = 200  # one lead field


def title(alert: Alert) -> str:
    if alert.event.is_test:
        return ":test_tube: Test alert from InsiteChat: routing works"
    return _TITLES.get(alert.event.name, f":bell: InsiteChat event {alert.event.name}")


def action_id(action: str, alert_id: str) -> str:
    return f"{ACTION_PREFIX}:{action}:{alert_id}"


def parse_action_id(value: str) -> tuple[str, str] | None:
    """(action, alert id) from a button's id, or None for a button that is not ours."""
    prefix, _, rest = value.partition(":")
    action, _, alert_id = rest.partition(":")
    if prefix != ACTION_PREFIX or action not in (CLAIM, RESOLVE) or not alert_id:
        return None
    return action, alert_id


def facts(alert: Alert) -> list[tuple[str, str]]:
    """The card's labelled lines, as plain text (each platform escapes them itself)."""
    event = alert.event
    lines: list[tuple[str, str]] = [("Chatbot", alert.chatbot_name or event.chatbot_id)]
    if event.name == LEAD:
        for label, key in (("Name", "name"), ("Email", "email"), ("Phone", "phone")):
            value = str(event.data.get(key) or "").strip()
            if value:
                lines.append((label, value[:_FIELD_LIMIT]))
        custom = event.data.get("custom_data")
        if isinstance(custom, dict):
            for key, value in list(custom.items())[:10]:
                lines.append((str(key)[:50], str(value)[:_FIELD_LIMIT]))
    if event.session_id:
        lines.append(("Session", event.session_id[:100]))
    count = event.data.get("message_count")
    if isinstance(count, int):
        lines.append(("Messages so far", str(count)))
    if event.timestamp is not None:
        lines.append(("Time", event.timestamp.strftime("%Y-%m-%d %H:%M:%S UTC")))
    return lines


_USER_MENTION = re.compile(r"^<@[UW]?[A-Z0-9]+>$|^<@!?\d+>$")


def state_line(alert: Alert, escape: Callable[[str], str]) -> str:
    """Who claimed or resolved it, when. `who` is the clicking user's own mention (an edit never pings)."""
    when = time.strftime("%H:%M UTC", time.gmtime(alert.changed_at)) if alert.changed_at else ""
    if alert.state is AlertState.OPEN:
        return "Waiting for someone to pick it up" if alert.can_be_claimed else ""
    who = alert.claimed_by if alert.state is AlertState.CLAIMED else alert.resolved_by
    shown = who if _USER_MENTION.match(who) else escape(who)
    return f"{alert.state.value.capitalize()} by {shown} at {when}"


def dashboard_link(alert: Alert) -> str:
    return f"{alert.dashboard_url}/chatbots/{alert.event.chatbot_id}"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- Slack -----------------------------------------------------------------------------------


def _slack_text(text: str) -> str:
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return neutralise_slack(escaped)


def slack_card(alert: Alert, mentions: tuple[str, ...] = ()) -> dict[str, Any]:
    """chat.postMessage arguments: `text` (notification + fallback) and `blocks`.

    `mentions` are the configured on-call ids, the only mentions the bridge sends.
    """
    heading = title(alert)
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{_slack_text(heading)}*"}},
    ]
    words = alert.event.visitor_text
    if words:
        quoted = "\n".join(f"> {line}" for line in _slack_text(_cut(words, _QUOTE_LIMIT)).splitlines())
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": quoted}})
    fields = [{"type": "mrkdwn", "text": f"*{_slack_text(k)}*\n{_slack_text(v)}"} for k, v in facts(alert)[:10]]
    blocks.append({"type": "section", "fields": fields})
    if alert.history:
        exchanges = "\n".join(f"*{_slack_text(who)}:* {_slack_text(_cut(said, 300))}" for who, said in alert.history[-4:])
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _cut(exchanges, 2900)}})
    links = [f"<{dashboard_link(alert)}|Open in InsiteChat>"]
    if alert.thread_link:
        links.append(f"<{alert.thread_link}|Open the chat thread>")
    status = state_line(alert, _slack_text)
    context = " · ".join([*links, status] if status else links)
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]})
    if alert.can_be_claimed and alert.state is not AlertState.RESOLVED:
        buttons = []
        if alert.state is AlertState.OPEN:
            buttons.append(_slack_button("Claim", CLAIM, alert.id, style="primary"))
        buttons.append(_slack_button("Resolve", RESOLVE, alert.id))
        blocks.append({"type": "actions", "block_id": f"alert-{alert.id}", "elements": buttons})
    text = heading.split(" ", 1)[-1] + f" ({alert.chatbot_name or alert.event.chatbot_id})"
    if mentions:
        text = " ".join(mentions) + " " + text
        blocks.insert(0, {"type": "section", "text": {"type": "mrkdwn", "text": " ".join(mentions)}})
    return {"text": _cut(text, 300), "blocks": blocks}


def _slack_button(label: str, action: str, alert_id: str, style: str = "") -> dict[str, Any]:
    button: dict[str, Any] = {
        "type": "button",
        "text": {"type": "plain_text", "text": label},
        "action_id": action_id(action, alert_id),
        "value": alert_id,
    }
    if style:
        button["style"] = style
    return button


# --- Discord ---------------------------------------------------------------------------------


def _discord_text(text: str) -> str:
    # Embeds render Markdown: keep the visitor's asterisks and underscores literal.
    escaped = "".join("\\" + c if c in "\\*_`~|" else c for c in text)
    return neutralise_discord(escaped)


def discord_card(alert: Alert, mentions: tuple[str, ...] = ()) -> dict[str, Any]:
    """Message JSON: `content` (only the on-call mentions), one `embed` dict, `components` (buttons)."""
    heading = _plain_title(alert)
    description = ""
    if alert.event.visitor_text:
        description = "\n".join(f"> {line}" for line in _discord_text(_cut(alert.event.visitor_text, _QUOTE_LIMIT)).splitlines())
    if alert.history:
        exchanges = "\n".join(f"**{_discord_text(who)}:** {_discord_text(_cut(said, 300))}" for who, said in alert.history[-4:])
        description = f"{description}\n\n{exchanges}".strip()
    links = [f"[Open in InsiteChat]({dashboard_link(alert)})"]
    if alert.thread_link:
        links.append(f"[Open the chat thread]({alert.thread_link})")
    description = f"{description}\n\n{' · '.join(links)}".strip()
    embed: dict[str, Any] = {
        "title": _cut(heading, 256),
        "description": _cut(description, 4000),
        "color": _COLOURS[alert.state],
        "fields": [{"name": _cut(k, 256), "value": _cut(_discord_text(v), 1024) or "-", "inline": True} for k, v in facts(alert)[:20]],
    }
    status = state_line(alert, _discord_text)
    if status:
        embed["footer"] = {"text": _cut(status, 2048)}
    components: list[dict[str, Any]] = []
    if alert.can_be_claimed and alert.state is not AlertState.RESOLVED:
        buttons = []
        if alert.state is AlertState.OPEN:
            buttons.append({"type": 2, "style": 1, "label": "Claim", "custom_id": action_id(CLAIM, alert.id)})
        buttons.append({"type": 2, "style": 3, "label": "Resolve", "custom_id": action_id(RESOLVE, alert.id)})
        components.append({"type": 1, "components": buttons})
    return {"content": " ".join(mentions), "embed": embed, "components": components}


# --- Console (the sandbox) ------------------------------------------------------------------


def console_card(alert: Alert, mentions: tuple[str, ...] = ()) -> dict[str, Any]:
    """Plain lines for a terminal; `/claim` and `/resolve` stand in for the buttons."""
    lines = [f"{_plain_title(alert)}  [alert {alert.id[:8]}]"]
    if alert.event.visitor_text:
        lines.append(f'  "{_cut(alert.event.visitor_text, _QUOTE_LIMIT)}"')
    lines += [f"  {key}: {value}" for key, value in facts(alert)]
    lines += [f"  {who}: {_cut(said, 300)}" for who, said in alert.history[-4:]]
    status = state_line(alert, lambda text: text)
    if status:
        lines.append(f"  {status}")
    actionable = alert.can_be_claimed and alert.state is not AlertState.RESOLVED
    if actionable:
        lines.append("  (type /claim or /resolve)")
    return {"id": alert.id, "actionable": actionable, "lines": [neutralise_discord(line) for line in lines]}


def _plain_title(alert: Alert) -> str:
    heading = title(alert)
    for code, emoji in _DISCORD_EMOJI.items():
        heading = heading.replace(code, emoji)
    return heading
