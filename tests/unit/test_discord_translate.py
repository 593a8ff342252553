"""Discord gateway payloads (recorded in tests/payloads/discord) translated into Inbound messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters.discord.translate import (
    BotIdentity,
    Place,
    PlaceKind,
    content_withheld,
    translate_command,
    translate_message,
)

PAYLOADS = Path(__file__).parent.parent / "payloads" / "discord"
BOT = "1098765432109876543"
BOT_ROLE = "1087654321098765432"
GUILD = "1012345678901234567"
CHANNEL = "1023456789012345678"
THREAD = "1364000000000000042"
FORUM = "1023456789012345999"
ME = BotIdentity(BOT, frozenset({BOT_ROLE}))
IN_CHANNEL = Place(CHANNEL, PlaceKind.TEXT)
IN_THREAD = Place(THREAD, PlaceKind.THREAD, parent_id=CHANNEL)


def payload(name: str) -> dict[str, Any]:
    frame = json.loads((PAYLOADS / f"{name}.json").read_text())
    assert frame["t"] == "MESSAGE_CREATE"
    return frame["d"]


def test_mention_in_a_channel() -> None:
    inbound = translate_message(payload("mention_in_channel"), ME, IN_CHANNEL)
    assert inbound is not None
    assert (inbound.platform, inbound.workspace, inbound.channel, inbound.thread) == ("discord", GUILD, CHANNEL, "")
    assert inbound.mentions_bot and not inbound.mentions_others and not inbound.is_dm
    assert inbound.text == "What is the refund policy?"
    assert inbound.author_id == "1034567890123456789" and inbound.author_name == "Ali"  # the server nickname
    # A channel message roots its own conversation: the thread created on it has its id.
    assert inbound.conversation.thread == "1364100000000000001"


def test_nick_form_mention_and_other_people_become_readable() -> None:
    inbound = translate_message(payload("mention_legacy_nick_form"), ME, IN_CHANNEL)
    assert inbound is not None and inbound.mentions_bot and inbound.mentions_others
    assert inbound.text == "hey  can you help @bob.b?"


def test_dm() -> None:
    inbound = translate_message(payload("dm"), ME, Place("1071234567890123456", PlaceKind.DM))
    assert inbound is not None and inbound.is_dm and inbound.workspace == ""
    assert inbound.conversation.thread == "" and inbound.channel == "1071234567890123456"


def test_thread_follow_up_belongs_to_the_parent_channel_and_the_thread() -> None:
    inbound = translate_message(payload("thread_follow_up"), ME, IN_THREAD)
    assert inbound is not None
    assert (inbound.channel, inbound.thread) == (CHANNEL, THREAD)
    assert inbound.in_thread and not inbound.mentions_bot and not inbound.mentions_others


def test_thread_message_for_someone_else() -> None:
    inbound = translate_message(payload("thread_mentions_someone_else"), ME, IN_THREAD)
    assert inbound is not None and inbound.mentions_others and not inbound.mentions_bot


def test_reply_to_the_bot_continues_the_conversation_its_answer_belonged_to() -> None:
    inbound = translate_message(payload("reply_to_bot_in_channel"), ME, IN_CHANNEL)
    assert inbound is not None and inbound.replies_to_bot
    # Not remembered by this process: the bot's answer itself says which question it answered.
    assert inbound.thread == "1364100000000000001" and inbound.in_thread
    remembered = translate_message(
        payload("reply_to_bot_in_channel"), ME, IN_CHANNEL, roots={"1364100000000000006": "1364099999999999999"}
    )
    assert remembered is not None and remembered.thread == "1364099999999999999"


def test_reply_to_a_slash_command_answer_continues_that_command_s_conversation() -> None:
    inbound = translate_message(payload("reply_to_slash_answer_without_ping"), ME, IN_CHANNEL)
    assert inbound is not None and inbound.replies_to_bot and not inbound.mentions_bot
    assert inbound.thread == "1364100000000000099"  # the interaction id, the command's message_id


def test_role_mention_of_the_bot_s_managed_role_is_a_mention() -> None:
    inbound = translate_message(payload("role_mention"), ME, IN_CHANNEL)
    assert inbound is not None and inbound.mentions_bot and not inbound.mentions_others
    assert inbound.text == "how do I reset my password?"
    without_role = translate_message(payload("role_mention"), BotIdentity(BOT), IN_CHANNEL)
    assert without_role is not None and not without_role.mentions_bot and without_role.mentions_others


def test_everyone_counts_as_mentioning_others() -> None:
    inbound = translate_message(payload("everyone"), ME, IN_THREAD)
    assert inbound is not None and inbound.mentions_others


@pytest.mark.parametrize(
    ("name", "is_bot", "is_self"),
    [
        ("from_other_bot", True, False),
        ("from_self", True, True),
        ("webhook", True, False),
        ("mention_in_channel", False, False),
    ],
)
def test_authors(name: str, is_bot: bool, is_self: bool) -> None:
    inbound = translate_message(payload(name), ME, IN_CHANNEL)
    assert inbound is not None and (inbound.author_is_bot, inbound.author_is_self) == (is_bot, is_self)


def test_forum_post_starter_is_its_own_thread() -> None:
    post = payload("forum_post_starter")
    inbound = translate_message(
        post, ME, Place(post["channel_id"], PlaceKind.THREAD, parent_id=FORUM, parent_is_forum=True)
    )
    assert inbound is not None
    assert (inbound.channel, inbound.thread, inbound.message_id) == (FORUM, post["id"], post["id"])
    assert not inbound.in_thread  # a new post: "reply: all" answers it like a top-level message
    assert inbound.conversation.thread == post["id"]  # ...in the post's own thread


@pytest.mark.parametrize("name", ["thread_created_notice"])
def test_system_messages_are_not_candidates(name: str) -> None:
    assert translate_message(payload(name), ME, IN_CHANNEL) is None


def test_a_forward_of_the_bot_s_message_is_not_a_reply_to_it() -> None:
    inbound = translate_message(
        payload("forward"), ME, IN_CHANNEL, roots={"1364100000000000006": "1364100000000000001"}
    )
    assert inbound is not None and not inbound.replies_to_bot and inbound.thread == ""


def test_content_withheld_without_the_intent() -> None:
    data = payload("content_withheld")
    inbound = translate_message(data, ME, IN_CHANNEL)
    assert inbound is not None
    assert content_withheld(data, inbound, has_intent=False)
    assert not content_withheld(data, inbound, has_intent=True)  # then it is truly empty
    mention = payload("mention_in_channel")
    mentioned = translate_message(mention, ME, IN_CHANNEL)
    assert mentioned is not None and not content_withheld(mention, mentioned, has_intent=False)


def test_slash_command_in_a_thread_continues_the_thread() -> None:
    inbound = translate_command(
        interaction_id="1364100000000000099", guild_id=GUILD, place=IN_THREAD, author_id="1", author_name="Alice",
        author_is_bot=False, text="which word?",
    )
    assert inbound.is_command and (inbound.channel, inbound.thread) == (CHANNEL, THREAD)
    assert inbound.conversation.thread == THREAD
    in_dm = translate_command(
        interaction_id="7", guild_id="", place=Place("5", PlaceKind.DM), author_id="1", author_name="A",
        author_is_bot=False, text="hi",
    )
    assert in_dm.is_dm and in_dm.conversation.thread == ""
