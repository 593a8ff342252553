"""How a stand-in platform renders: as the real adapter of the platform it is named after."""

from __future__ import annotations

from typing import Any

from adapters.console import console_card
from adapters.discord.cards import discord_card
from adapters.discord.formatting import to_discord
from adapters.slack.cards import slack_card
from adapters.slack.formatting import to_slack
from bridge.alerts import Alert
from bridge.formatting import to_plain


def render_as(platform: str, markdown: str) -> list[str]:
    """The parts the real `platform` adapter would post for `markdown`."""
    if platform == "slack":
        return to_slack(markdown)
    if platform == "discord":
        return to_discord(markdown)
    return to_plain(markdown)


def card_as(platform: str, alert: Alert, mentions: tuple[str, ...]) -> dict[str, Any]:
    """The card the real `platform` adapter would post for `alert`."""
    if platform == "slack":
        return slack_card(alert, mentions)
    if platform == "discord":
        return discord_card(alert, mentions)
    return console_card(alert, mentions)
