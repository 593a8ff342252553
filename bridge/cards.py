"""What every platform's alert card shows: the title, the facts, the state line, and the button ids."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from bridge.alerts import FLAGGED, ESCALATED, HUMAN_REQUESTED, LEAD, MESSAGE, STARTED, UNANSWERED, Alert, AlertState

CLAIM, RESOLVE = "claim", "resolve"
ACTION_PREFIX = "insitechat_alert"  # Slack action_id / Discord custom_id: "<prefix>:<action>:<alert id>"

_TITLES = {
    ESCALATED: ":raising_hand: A visitor asked for a human",
    HUMAN_REQUESTED: ":raising_hand: Someone asked for a human in chat",
    LEAD: ":card_index: New lead captured",
    STARTED: ":speech_balloon: New conversation on the website",
    MESSAGE: ":envelope: Visitor message",
    UNANSWERED: ":grey_question: The chatbot had no answer: a gap in what it knows",
    FLAGGED: ":thumbsdown: An answer was flagged as not helpful",
}
_DISCORD_EMOJI = {
    ":raising_hand:": "🙋",
    ":card_index:": "📇",
    ":speech_balloon:": "💬",
    ":envelope:": "✉️",
    ":test_tube:": "🧪",
    ":grey_question:": "❔",
    ":thumbsdown:": "👎",
}
QUOTE_LIMIT = 1000  # the visitor's words shown on a card
FIELD_LIMIT = 200  # one lead field
FLAGGED_ANSWER_LIMIT = 500  # a flagged answer, shortened
REASONS_SHOWN = 5  # the latest reasons given with 👎 on one card
# A flagged answer's texts live as long as the question's (state.keep_text_hours); the card says so after.
TEXT_GONE = "(no longer kept: the bridge keeps message texts for state.keep_text_hours)"


def title(alert: Alert) -> str:
    if alert.event.is_test:
        return ":test_tube: Test alert from InsiteChat: routing works"
    name = alert.event.name
    if name == ESCALATED and alert.event.from_bridge:
        # InsiteChat escalated one of the bridge's own sessions: someone in a chat thread (or the
        # sandbox console) asked the bot for a human, not a website visitor.
        name = HUMAN_REQUESTED
    return _TITLES.get(name, f":bell: InsiteChat event {name}")


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
                lines.append((label, value[:FIELD_LIMIT]))
        custom = event.data.get("custom_data")
        if isinstance(custom, dict):
            for key, value in list(custom.items())[:10]:
                lines.append((str(key)[:50], str(value)[:FIELD_LIMIT]))
    if event.name == UNANSWERED:
        lines.append(("Its answer", str(event.data.get("answer") or "")[:FIELD_LIMIT]))
    if event.name == FLAGGED:
        lines += _flagged_facts(alert)
    if event.session_id:
        lines.append(("Session", event.session_id[:100]))
    count = event.data.get("message_count")
    if isinstance(count, int):
        lines.append(("Messages so far", str(count)))
    if event.timestamp is not None:
        lines.append(("Time", event.timestamp.strftime("%Y-%m-%d %H:%M:%S UTC")))
    return lines


def _flagged_facts(alert: Alert) -> list[tuple[str, str]]:
    """What a flagged answer's card adds: the answer, who flagged it, the reasons given (newest last)."""
    data = alert.event.data
    lines: list[tuple[str, str]] = []
    if not alert.event.visitor_text:
        lines.append(("Question", TEXT_GONE))
    answer = str(data.get("answer") or "").strip()
    lines.append(("Its answer", cut(answer, FLAGGED_ANSWER_LIMIT) if answer else TEXT_GONE))
    lines.append(("Flagged by", str(data.get("flagged_by") or "someone")[:FIELD_LIMIT]))
    reasons = [r for r in data.get("reasons") or [] if isinstance(r, list) and len(r) == 2]
    for who, reason in reasons[-REASONS_SHOWN:]:
        lines.append(("Reason", cut(f"{who}: {reason}", FIELD_LIMIT * 2)))
    if not reasons:
        lines.append(("Reason", "none given (yet)"))
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


def cut(text: str, limit: int) -> str:
    """`text`, ending in "…" where it had to be shortened to `limit` characters."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plain_title(alert: Alert) -> str:
    """The title with emoji instead of Slack's :codes: (Discord, the console)."""
    heading = title(alert)
    for code, emoji in _DISCORD_EMOJI.items():
        heading = heading.replace(code, emoji)
    return heading
