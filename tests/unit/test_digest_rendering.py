"""The digest as each platform shows it: within the platforms' limits for many chatbots, and never a ping."""

from __future__ import annotations

import discord

from adapters.discord.alerts import MARKER_PREFIX, card_embed, key_marker
from adapters.discord.digest import digest_embed
from adapters.slack.digest import digest_message
from bridge.report import ChatbotFigures, Durations, Report

HOSTILE = "<!channel> @everyone <@U123> <@123> & <@&42> @here"  # Slack and Discord pings


def big_report(chatbots: int) -> Report:
    """Many chatbots with long names and large figures: the worst case for the platforms' limits."""
    slow = Durations(99_999, 9 * 86_400.0 + 23 * 3600, 29 * 86_400.0)
    bots = tuple(
        ChatbotFigures(
            chatbot=f"{i:08d}-0000-4000-8000-000000000000", name=("N" * 60 if i else HOSTILE), questions=9_999_999,
            unanswered=9_999_998, votes_up=999_999, votes_down=999_999, flagged=999_999, escalations=999_999,
            human_requests=999_999, alerts=999_999, to_claim=slow, to_resolve=slow, open_alerts=999_999,
            per_day=(1,) * 8, claim_buckets=(1,) * 6,
        )
        for i in range(chatbots)
    )
    return Report(1_795_424_400.0, 1_796_029_200.0, "America/Argentina/ComodRivadavia", ("2026-11-23",) * 8, bots)


def test_slack_blocks_stay_within_block_kit_limits_and_never_ping() -> None:
    for count in (0, 1, 15, 16, 40):
        text, blocks = digest_message(big_report(count))
        assert len(blocks) <= 50
        for block in blocks:
            assert len(block.get("fields", [])) <= 10
            assert all(len(f["text"]) <= 2000 for f in block.get("fields", []))
            if block["type"] == "section" and "text" in block:
                assert len(block["text"]["text"]) <= 3000
            if block["type"] == "header":
                assert len(block["text"]["text"]) <= 150
        rendered = str(blocks)
        for ping in ("<!channel>", "<@U123>", "<@&42>", "@everyone", "@here"):
            assert ping not in rendered
        assert ("…and 25 more chatbot(s)" in rendered) == (count == 40)
        assert text.startswith("Weekly InsiteChat report:")


def test_the_discord_embed_stays_within_discords_limits_and_never_pings() -> None:
    for count in (0, 1, 12, 30):
        embed = card_embed({"embed": digest_embed(big_report(count))}, key_marker("digest:2026-11-30|discord:1"))
        assert isinstance(embed, discord.Embed)
        assert len(embed) <= 6000 and len(embed.fields) <= 25
        assert all(len(f.value or "") <= 1024 and len(f.name or "") <= 256 for f in embed.fields)
        assert MARKER_PREFIX in (embed.url or "")
        rendered = str(embed.to_dict())
        for ping in ("@everyone", "@here", "<@123>", "<@&42>"):
            assert ping not in rendered
        hidden = count - len(embed.fields)
        assert hidden == 0 if count <= 1 else hidden >= 0
        assert (f"…and {hidden} more chatbot(s)" in (embed.description or "")) == (hidden > 0)
