"""Slack's alert card: a Block Kit message per alert, bounded, escaped and mention-safe."""

from __future__ import annotations

from typing import Any

from adapters.slack.formatting import neutralise_slack
from bridge.alerts import Alert, AlertState
from bridge.cards import CLAIM, QUOTE_LIMIT, RESOLVE, action_id, cut, dashboard_link, facts, state_line, title


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
        quoted = "\n".join(f"> {line}" for line in _slack_text(cut(words, QUOTE_LIMIT)).splitlines())
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": quoted}})
    fields = [{"type": "mrkdwn", "text": f"*{_slack_text(k)}*\n{_slack_text(v)}"} for k, v in facts(alert)[:10]]
    blocks.append({"type": "section", "fields": fields})
    if alert.history:
        exchanges = "\n".join(
            f"*{_slack_text(who)}:* {_slack_text(cut(said, 300))}" for who, said in alert.history[-4:]
        )
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": cut(exchanges, 2900)}})
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
    return {"text": cut(text, 300), "blocks": blocks}


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
