"""The pure pieces of 👍 / 👎: config, the click values and custom ids, the modals, and the flagged card."""

from __future__ import annotations

import pytest

from adapters.discord.feedback import parse_reason as discord_reason
from adapters.discord.feedback import parse_vote_id, vote_custom_id
from adapters.slack.feedback import ReasonTarget, feedback_block, parse_reason, parse_vote_value, reason_modal
from bridge import config
from bridge.alerts import FLAGGED, Alert, Event
from bridge.cards import TEXT_GONE, facts, plain_title
from bridge.config import ConfigError
from bridge.feedback import Vote, flagged_key
from tests.unit.test_config import BASE, BOT, ENV

JOB = "0123456789abcdef0123456789abcdef"


def test_feedback_is_on_by_default_and_answer_flagged_is_routable() -> None:
    rule = f"alerts:\n  - {{chatbot: {BOT}, events: [answer.flagged], to: [slack:C9]}}\n"
    rule += "webhooks: {verify_signatures: false}\n"
    settings = config.loads(BASE + rule, env=ENV)
    assert settings.routes[0].feedback is True and settings.alerts[0].events == ("answer.flagged",)
    assert settings.slack is not None and settings.slack.feedback_style == "feedback_buttons"


def test_a_wrong_feedback_setting_names_its_path() -> None:
    with pytest.raises(ConfigError) as info:
        config.loads(BASE + "    feedback: maybe\n", env=ENV)
    assert any(p.startswith("routes[0].feedback:") for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        config.loads(BASE.replace("  bot_token:", "  feedback_style: emoji\n  bot_token:"), env=ENV)
    assert any(p.startswith("slack.feedback_style:") for p in info.value.problems)


def test_slack_values_and_discord_ids_carry_the_vote_and_the_answer() -> None:
    block = feedback_block(JOB)
    buttons = block["elements"][0]
    assert block["type"] == "context_actions" and buttons["type"] == "feedback_buttons"
    assert parse_vote_value(buttons["negative_button"]["value"]) == (Vote.DOWN, JOB)
    assert parse_vote_value(feedback_block(JOB, "buttons")["elements"][0]["value"]) == (Vote.UP, JOB)
    for forged in ("", "up", "sideways:" + JOB, "up:../../etc", "down:" + "a" * 65):
        assert parse_vote_value(forged) is None
    assert parse_vote_id(vote_custom_id(Vote.UP, JOB)) == (Vote.UP, JOB)
    assert parse_vote_id(f"insitechat_human:{JOB}") is None and len(vote_custom_id(Vote.DOWN, JOB)) <= 100


def test_the_reason_modals_read_back_what_they_asked() -> None:
    view = reason_modal(ReasonTarget(JOB, "C1", "1700000000.000100"))
    block = view["blocks"][0]
    state = {"values": {block["block_id"]: {block["element"]["action_id"]: {"value": "outdated"}}}}
    assert parse_reason({**view, "state": state}) == (ReasonTarget(JOB, "C1", "1700000000.000100"), "outdated")
    assert parse_reason({**view, "private_metadata": '{"job": "../x"}'}) is None
    submitted = {"custom_id": f"insitechat_reason:{JOB}",
                 "components": [{"type": 18, "component": {"type": 4, "custom_id": "reason", "value": "wrong"}}]}
    assert discord_reason(submitted) == (JOB, "wrong")
    assert discord_reason({"custom_id": "other:x", "components": []}) is None


def test_a_flagged_card_says_when_the_texts_are_no_longer_kept() -> None:
    event = Event(FLAGGED, BOT, None, {"job": JOB, "message": "", "answer": "", "flagged_by": "alice",
                                       "reasons": [["bob", "wrong"]]})
    shown = dict(facts(Alert("a1", event, "Support Bot", "https://dash")))
    assert shown["Question"] == TEXT_GONE and shown["Its answer"] == TEXT_GONE
    assert shown["Flagged by"] == "alice" and shown["Reason"] == "bob: wrong"
    assert plain_title(Alert("a1", event, "", "")).startswith("👎")
    assert event.semantic_key == flagged_key(BOT, JOB)  # one card per answer, whoever flags it

