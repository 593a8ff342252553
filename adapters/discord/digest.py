"""The weekly report digest in Discord: one embed with a field per chatbot, the charts attached to the same message."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from typing import Any

import discord

from adapters.discord.alerts import card_embed, delivery_nonce, key_marker
from adapters.discord.formatting import neutralise_discord
from bridge.charts import Chart
from bridge.report import Report, figure_lines, window_text

log = logging.getLogger(__name__)

TITLE = "📊 Weekly InsiteChat report"
MISSING_PERMISSIONS = 50013
COLOUR = 0x4A90D9
# An embed holds 25 fields and 6000 characters in all: chatbots are shown while they fit.
EMBED_LIMIT = 6000
MAX_FIELDS = 25
RESERVED = 200  # for the "...and N more" line
FIELD_NAME_LIMIT = 256
NO_MENTIONS = discord.AllowedMentions.none()


def digest_embed(report: Report, charts: Sequence[Chart] = ()) -> dict[str, Any]:
    """The digest as embed data: the window, then one field per chatbot while they fit; the first chart as its image."""
    description = window_text(report)
    budget = EMBED_LIMIT - len(TITLE) - len(description) - RESERVED
    fields: list[dict[str, Any]] = []
    for bot in report.chatbots[:MAX_FIELDS]:
        name = neutralise_discord(bot.label)[:FIELD_NAME_LIMIT]
        value = "\n".join(f"**{label}:** {value}" for label, value in figure_lines(bot))
        budget -= len(name) + len(value)
        if budget < 0:
            break
        fields.append({"name": name, "value": value, "inline": False})
    if not report.chatbots:
        description += "\nNothing happened this week: no answers or alerts."
    hidden = len(report.chatbots) - len(fields)
    if hidden > 0:
        description += f"\n…and {hidden} more chatbot(s): run `insitechat-bridge report` for all of them."
    embed: dict[str, Any] = {"title": TITLE, "description": description, "color": COLOUR, "fields": fields}
    if charts:
        embed["image"] = {"url": f"attachment://{charts[0].filename}"}
    return embed


class DiscordDigests:
    """Posts the digest through a logged-in discord.py client (the adapter's poster)."""

    def __init__(self, client: Callable[[], discord.Client]) -> None:
        self._client = client

    async def post(self, channel: str, report: Report, charts: Sequence[Chart], *, key: str) -> str:
        """One message: the embed (marked with the delivery key, as alert cards are) and the charts attached.

        Its nonce, derived from the key, lets Discord drop a re-send within minutes; after that
        the outbox finds the marked embed first (AlertCards.find).
        """
        embed = card_embed({"embed": digest_embed(report, charts)}, key_marker(key))
        files = [discord.File(io.BytesIO(c.png), filename=c.filename, description=c.title) for c in charts]
        target = self._client().get_partial_messageable(int(channel))
        nonce = delivery_nonce(key, "digest")
        try:
            message = await target.send(embed=embed, files=files, nonce=nonce, allowed_mentions=NO_MENTIONS)
        except discord.Forbidden as exc:
            if not files or exc.code != MISSING_PERMISSIONS:
                raise
            # Attach Files is not in the invite's permissions: the text goes out on its own.
            log.warning("discord: the digest in %s goes out without its charts: the bot lacks Attach Files", channel)
            message = await target.send(
                embed=card_embed({"embed": digest_embed(report)}, key_marker(key)), nonce=nonce,
                allowed_mentions=NO_MENTIONS,
            )
        return str(message.id)
