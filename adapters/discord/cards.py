"""Discord's alert card: an embed with Claim / Resolve buttons per alert, bounded, escaped and mention-safe."""

from __future__ import annotations

from typing import Any

from adapters.discord.formatting import neutralise_discord
from bridge.alerts import Alert, AlertState
from bridge.cards import CLAIM, QUOTE_LIMIT, RESOLVE, action_id, cut, dashboard_link, facts, plain_title, state_line

COLOURS = {AlertState.OPEN: 0xE01E5A, AlertState.CLAIMED: 0xECB22E, AlertState.RESOLVED: 0x2EB67D}


def _discord_text(text: str) -> str:
    # Embeds render Markdown: keep the visitor's asterisks and underscores literal.
    escaped = "".join("\\" + c if c in "\\*_`~|" else c for c in text)
    return neutralise_discord(escaped)


def discord_card(alert: Alert, mentions: tuple[str, ...] = ()) -> dict[str, Any]:
    """Message JSON: `content` (only the on-call mentions), one `embed` dict, `components` (buttons)."""
    heading = plain_title(alert)
    description = ""
    if alert.event.visitor_text:
        description = "\n".join(
            f"> {line}" for line in _discord_text(cut(alert.event.visitor_text, QUOTE_LIMIT)).splitlines()
        )
    if alert.history:
        exchanges = "\n".join(
            f"**{_discord_text(who)}:** {_discord_text(cut(said, 300))}" for who, said in alert.history[-4:]
        )
        description = f"{description}\n\n{exchanges}".strip()
    links = [f"[Open in InsiteChat]({dashboard_link(alert)})"]
    if alert.thread_link:
        links.append(f"[Open the chat thread]({alert.thread_link})")
    description = f"{description}\n\n{' · '.join(links)}".strip()
    embed: dict[str, Any] = {
        "title": cut(heading, 256),
        "description": cut(description, 4000),
        "color": COLOURS[alert.state],
        "fields": [
            {"name": cut(k, 256), "value": cut(_discord_text(v), 1024) or "-", "inline": True}
            for k, v in facts(alert)[:20]
        ],
    }
    status = state_line(alert, _discord_text)
    if status:
        embed["footer"] = {"text": cut(status, 2048)}
    components: list[dict[str, Any]] = []
    if alert.can_be_claimed and alert.state is not AlertState.RESOLVED:
        buttons = []
        if alert.state is AlertState.OPEN:
            buttons.append({"type": 2, "style": 1, "label": "Claim", "custom_id": action_id(CLAIM, alert.id)})
        buttons.append({"type": 2, "style": 3, "label": "Resolve", "custom_id": action_id(RESOLVE, alert.id)})
        components.append({"type": 1, "components": buttons})
    return {"content": " ".join(mentions), "embed": embed, "components": components}
