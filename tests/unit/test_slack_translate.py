"""Slack payload -> Inbound translation, table-driven over recorded payloads (tests/payloads/slack)."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.slack.translate import (
    BotIdentity,
    command_echo,
    command_inbound,
    event_to_inbound,
    parse_command,
    plain_text,
)
from tests.fakes.slack_api import command_form, payload

ME = BotIdentity(user_id="UBOT", bot_id="BBOT", team_id="T0TEST")

# payload name -> the Inbound fields it must give (a subset, checked exactly).
PASSED: dict[str, dict[str, Any]] = {
    "app_mention": dict(
        workspace="T0TEST", channel="C0GENERAL", message_id="1700000100.000100", thread="", is_dm=False,
        mentions_bot=True, mentions_others=False, author_is_bot=False, author_is_self=False,
        author_id="U0ALICE", text="What is the refund policy?",
    ),
    "message_channel_mention": dict(
        message_id="1700000100.000100", mentions_bot=True, mentions_others=False, text="What is the refund policy?",
    ),
    "message_thread_followup": dict(
        thread="1700000100.000100", mentions_bot=False, mentions_others=False, text="And for digital goods?",
    ),
    "message_thread_other_mention": dict(mentions_bot=False, mentions_others=True, thread="1700000100.000100"),
    "message_thread_group_mention": dict(mentions_bot=False, mentions_others=True, text="@support any idea?"),
    "message_im": dict(channel="D0ALICE", is_dm=True, thread="", text="How do I reset my password?"),
    "message_im_in_thread": dict(channel="D0ALICE", is_dm=True, thread="1700000400.000400"),
    "message_top_level": dict(mentions_bot=False, mentions_others=False, is_dm=False, thread=""),
    "message_links": dict(
        mentions_bot=True,
        text="compare our pricing (https://example.com/pricing) with example.org in #sales & tell <me>",
    ),
    "bot_message": dict(author_is_bot=True, author_is_self=False, author_id="B0DEPLOY"),
    "message_from_other_bot": dict(author_is_bot=True, author_is_self=False, mentions_bot=True),
    "message_from_self": dict(author_is_bot=True, author_is_self=True),
    "thread_broadcast": dict(thread="1700000100.000100", author_is_bot=False),
    "file_share": dict(mentions_bot=True, text="what does this screenshot show?"),
}
DROPPED = ["message_changed", "message_deleted", "channel_join", "channel_topic", "url_verification"]


@pytest.mark.parametrize("name", sorted(PASSED))
def test_recorded_payloads_translate(name: str) -> None:
    inbound = event_to_inbound(payload(name), ME)
    assert inbound is not None and inbound.platform == "slack"
    got = {key: getattr(inbound, key) for key in PASSED[name]}
    assert got == PASSED[name]


@pytest.mark.parametrize("name", DROPPED)
def test_changes_to_a_channel_are_not_messages(name: str) -> None:
    assert event_to_inbound(payload(name), ME) is None


def test_message_and_app_mention_of_one_post_share_the_dedupe_key() -> None:
    mention = event_to_inbound(payload("app_mention"), ME)
    message = event_to_inbound(payload("message_channel_mention"), ME)
    assert mention is not None and message is not None
    assert mention.dedupe_key == message.dedupe_key
    assert mention.conversation == message.conversation


def test_installation_team_wins_over_the_authors_team() -> None:
    # Slack Connect: the author's workspace differs from the one the app is installed in.
    body = payload("app_mention", team="T0GUEST")
    inbound = event_to_inbound(body, ME)
    assert inbound is not None and inbound.workspace == "T0TEST"


@pytest.mark.parametrize(
    ("raw", "plain"),
    [
        ("<@UBOT> hello", "hello"),
        ("<@UBOT|insitechat>   hello   there", "hello there"),
        ("hi <@U0BOB|bob>", "hi @bob"),
        ("hi <@U0BOB>", "hi @U0BOB"),
        ("see <#C0SALES|sales>", "see #sales"),
        ("<!here> and <!channel> and <!everyone>", "@here and @channel and @everyone"),
        ("<!subteam^S0X|@support> help", "@support help"),
        ("<!date^1700000000^{date}|Nov 14> meeting", "Nov 14 meeting"),
        ("<https://a.example/x|the docs>", "the docs (https://a.example/x)"),
        ("<https://a.example/x>", "https://a.example/x"),
        ("<http://example.org|example.org>", "example.org"),
        ("<mailto:a@example.com|a@example.com>", "a@example.com"),
        ("a &amp; b &lt;tag&gt;", "a & b <tag>"),
        ("&amp;lt;!channel&amp;gt;", "&lt;!channel&gt;"),  # typed literally: stays text
        ("line one\n  line two", "line one\nline two"),
        ("```\ncode  block\n```", "```\ncode block\n```"),
    ],
)
def test_plain_text_for_the_chatbot(raw: str, plain: str) -> None:
    assert plain_text(raw, "UBOT") == plain


@pytest.mark.parametrize(
    ("text", "channel", "action", "is_dm"),
    [
        ("What is the refund policy?", "C0GENERAL", "ask", False),
        ("", "C0GENERAL", "usage", False),
        ("   ", "C0GENERAL", "usage", False),
        ("reset", "C0GENERAL", "reset", False),
        ("Reset.", "D0ALICE", "reset", True),
        ("reset my password please", "D0ALICE", "ask", True),
    ],
)
def test_slash_command_parsing(text: str, channel: str, action: str, is_dm: bool) -> None:
    body = {**command_form(), "text": text, "channel_id": channel}
    if channel.startswith("D"):
        body["channel_name"] = "directmessage"
    command = parse_command(body, ME)
    assert (command.action, command.is_dm, command.workspace, command.user_id) == (action, is_dm, "T0TEST", "U0ALICE")


def test_command_inbound_threads_under_the_root_post() -> None:
    command = parse_command(command_form(), ME)
    inbound = command_inbound(command, "1800000001.000100")
    assert inbound.is_command and inbound.message_id == "1800000001.000100"
    assert inbound.conversation.thread == "1800000001.000100"
    assert inbound.text == "What is the refund policy?"


@pytest.mark.parametrize("hostile", ["<!channel> now", "@here look", "<!subteam^S1> x", "@everyone", "<@U0BOSS>"])
def test_command_echo_cannot_ping_anyone_but_the_asker(hostile: str) -> None:
    body = {**command_form(), "text": f"&lt;!channel&gt; {hostile}"}
    echo = command_echo(parse_command(body, ME))
    assert echo.startswith("<@U0ALICE> asked: ")
    rest = echo.removeprefix("<@U0ALICE> asked: ")
    assert "<" not in rest and ">" not in rest
    for crowd in ("@here", "@channel", "@everyone"):
        assert crowd not in rest
