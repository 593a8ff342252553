"""Discord alert helpers: nonces, markers, mention allow-lists, button views, references, click conversations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import discord

from adapters.discord.alerts import (
    allowed_mentions_for,
    broadcast_line,
    card_embed,
    delivery_nonce,
    human_view,
    jump_url,
    key_marker,
    make_reference,
    marked_with,
    parse_human_id,
    split_reference,
    thread_title,
    view_of,
)
from adapters.discord.translate import Place, PlaceKind, click_conversation
from bridge.messages import Conversation

PAYLOADS = Path(__file__).parent.parent / "payloads" / "discord"
GUILD, CHANNEL, THREAD = "1012345678901234567", "1023456789012345678", "1364000000000000042"
CARD: dict[str, Any] = {
    "content": "<@&111> <@222>",
    "embed": {
        "title": "🙋 A visitor asked for a human",
        "description": "> help\n\n[Open in InsiteChat](https://app.insitechat.ai/chatbots/abc)",
        "fields": [
            {"name": "Chatbot", "value": "Support", "inline": True},
            {"name": "Session", "value": "web\\_1", "inline": True},
        ],
    },
    "components": [{"type": 1, "components": [
        {"type": 2, "style": 1, "label": "Claim", "custom_id": "insitechat_alert:claim:a1"},
        {"type": 2, "style": 3, "label": "Resolve", "custom_id": "insitechat_alert:resolve:a1"},
    ]}],
}


def test_delivery_nonce_is_short_stable_and_distinct() -> None:
    key = "0123456789abcdef0123|discord:1200000000000000014"
    assert delivery_nonce(key) == delivery_nonce(key) and len(delivery_nonce(key)) <= 25
    assert len({delivery_nonce(key), delivery_nonce(key, "line"), delivery_nonce(key + "x")}) == 3


def test_only_the_written_ids_may_ping() -> None:
    allowed = allowed_mentions_for("<@&111> <@222> <@!333> @everyone @here <@&111>").to_dict()
    assert allowed == {"parse": [], "users": [222, 333], "roles": [111]}
    assert allowed_mentions_for("").to_dict() == {"parse": []}


def test_marker_rides_in_the_title_link_and_is_recognised() -> None:
    marker = key_marker("k|discord:1")
    embed = card_embed(CARD, marker).to_dict()
    assert (
        embed["url"] == f"https://app.insitechat.ai/chatbots/abc#icb-{marker}"
        and embed["title"] == CARD["embed"]["title"]
    )
    assert marked_with({"embeds": [embed]}, marker) and not marked_with({"embeds": [embed]}, key_marker("other"))
    assert card_embed(CARD).to_dict()["url"] == "https://app.insitechat.ai/chatbots/abc"  # edits: link kept, no marker
    assert "url" not in CARD["embed"]  # the card itself is not changed


async def test_views_keep_rows_styles_and_custom_ids_and_are_not_kept_by_discord_py() -> None:
    view = view_of(CARD["components"])
    assert view is not None and view.is_finished()  # stopped: clicks come as interactions, not to this object
    assert view.to_components() == [{"type": 1, "components": [
        {"type": 2, "style": 1, "label": "Claim", "custom_id": "insitechat_alert:claim:a1", "disabled": False},
        {"type": 2, "style": 3, "label": "Resolve", "custom_id": "insitechat_alert:resolve:a1", "disabled": False},
    ]}]
    assert view_of([]) is None
    human = human_view("0a1b2c3d-4e5f-6789-abcd-ef0123456789")
    assert human is not None
    [row] = human.to_components()
    custom_id = row["components"][0]["custom_id"]
    assert parse_human_id(custom_id) == "0a1b2c3d-4e5f-6789-abcd-ef0123456789" and len(custom_id) <= 100
    assert parse_human_id("insitechat_alert:claim:a1") is None and parse_human_id("insitechat_human:") is None


def test_references_and_links() -> None:
    assert split_reference(CHANNEL, make_reference("", "5")) == (CHANNEL, "5")
    assert split_reference(CHANNEL, make_reference(THREAD, "5")) == (THREAD, "5")
    assert jump_url(GUILD, THREAD) == f"https://discord.com/channels/{GUILD}/{THREAD}"
    assert jump_url(None, CHANNEL, "9") == f"https://discord.com/channels/@me/{CHANNEL}/9"


def test_announcement_and_thread_title() -> None:
    line = broadcast_line(CARD, "https://discord.com/channels/1/2")
    assert line == "<@&111> <@222> 🙋 A visitor asked for a human https://discord.com/channels/1/2"
    assert thread_title(CARD) == "Visitor session web_1"
    assert thread_title({"embed": {"title": "🧪 Test alert"}}) == "🧪 Test alert"


def test_a_click_belongs_to_the_conversation_its_answer_was_in() -> None:
    in_thread = Place(THREAD, PlaceKind.THREAD, parent_id=CHANNEL)
    assert click_conversation(guild_id=GUILD, place=in_thread, message_id="7") == Conversation(
        "discord", GUILD, CHANNEL, THREAD
    )
    dm = Place("55", PlaceKind.DM)
    assert click_conversation(guild_id="", place=dm, message_id="7") == Conversation("discord", "", "55", "")
    text = Place(CHANNEL, PlaceKind.TEXT)
    # Threads off: the answer replied to the question, which roots the conversation.
    assert click_conversation(guild_id=GUILD, place=text, message_id="7", replied_id="6").thread == "6"
    # A slash command's followup: the command's interaction id roots it.
    assert click_conversation(guild_id=GUILD, place=text, message_id="7", interaction_id="4").thread == "4"
    assert (
        click_conversation(guild_id=GUILD, place=text, message_id="7", replied_id="6", roots={"7": "3"}).thread == "3"
    )


def test_recorded_button_click_payload_maps_to_its_thread() -> None:
    frame = json.loads((PAYLOADS / "button_click_in_thread.json").read_text())
    assert frame["t"] == "INTERACTION_CREATE" and frame["d"]["type"] == 3
    data = frame["d"]
    channel = data["channel"]
    place = Place(str(channel["id"]), PlaceKind.THREAD, parent_id=str(channel["parent_id"]))
    conversation = click_conversation(guild_id=data["guild_id"], place=place, message_id=data["message"]["id"])
    assert conversation == Conversation("discord", data["guild_id"], channel["parent_id"], channel["id"])
    assert parse_human_id(data["data"]["custom_id"]) == "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
    assert discord.InteractionType(data["type"]) is discord.InteractionType.component
