"""Pure Slack alert pieces (card metadata, the "Talk to a human" button, clicks) and the readiness rules."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web

from adapters.slack import SlackAdapter
from adapters.slack.alerts import (
    HUMAN_ACTION,
    HUMAN_BLOCK_ID,
    alert_key,
    alert_metadata,
    click_of,
    human_blocks,
    parse_human_value,
    without_human_button,
)
from bridge import config
from bridge.messages import Conversation
from tests.conftest import CHATBOT_ID
from tests.fakes.slack_api import APP_TOKEN, BOT_TOKEN, SIGNING_SECRET, block_actions


def test_the_delivery_key_round_trips_through_message_metadata() -> None:
    message = {"ts": "1.2", "metadata": alert_metadata("abc|slack:C1")}
    assert alert_key(message) == "abc|slack:C1"
    for other in (
        {"ts": "1.2"},
        {"metadata": {"event_type": "task_created", "event_payload": {"key": "abc|slack:C1"}}},
        {"metadata": {"event_type": "insitechat_alert", "event_payload": "abc"}},
        {"metadata": {"event_type": "insitechat_alert", "event_payload": {"key": 7}}},
        {"metadata": "insitechat_alert"},
    ):
        assert alert_key(other) is None


def test_the_human_button_names_its_conversation_and_parses_back() -> None:
    conversation = Conversation("slack", "T1", "C1", "1700000100.000100")
    section, actions = human_blocks("The *answer*", conversation, CHATBOT_ID)
    assert section == {"type": "section", "text": {"type": "mrkdwn", "text": "The *answer*"}}
    [button] = actions["elements"]
    assert actions["block_id"] == HUMAN_BLOCK_ID and button["action_id"] == HUMAN_ACTION
    assert len(button["value"]) <= 2000  # Slack's limit for a button value
    assert parse_human_value(button["value"]) == (CHATBOT_ID, conversation)
    dm = Conversation("slack", "T1", "D1", "")
    assert parse_human_value(human_blocks("x", dm, CHATBOT_ID)[1]["elements"][0]["value"]) == (CHATBOT_ID, dm)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not json",
        "[1, 2]",
        json.dumps({"chatbot": CHATBOT_ID}),
        json.dumps({"chatbot": "", "conversation": "slack:T1:C1:1.2"}),
        json.dumps({"chatbot": CHATBOT_ID, "conversation": "discord:G1:42:900"}),
        json.dumps({"chatbot": CHATBOT_ID, "conversation": "slack:T1::1.2"}),
        json.dumps({"chatbot": CHATBOT_ID, "conversation": "slack:T1:C1"}),
        json.dumps({"chatbot": CHATBOT_ID, "conversation": 5}),
    ],
)
def test_foreign_or_broken_button_values_are_refused(value: str) -> None:
    assert parse_human_value(value) is None


def test_after_a_click_the_button_gives_way_to_who_asked() -> None:
    blocks = human_blocks("answer", Conversation("slack", "T1", "C1", "1.2"), CHATBOT_ID)
    after = without_human_button(blocks, "<@U0ALICE>")
    assert after[0] == blocks[0] and all(b.get("block_id") != HUMAN_BLOCK_ID for b in after)
    assert after[-1]["type"] == "context" and "<@U0ALICE> asked for a human" in after[-1]["elements"][0]["text"]
    assert without_human_button(None, "<@U0ALICE>")[0]["type"] == "context"


def test_a_click_is_read_from_the_recorded_payload() -> None:
    message = {
        "type": "message",
        "ts": "1800000005.000100",
        "thread_ts": "1700000100.000100",
        "text": "hi",
        "blocks": [],
    }
    click = click_of(block_actions(HUMAN_ACTION, user="U0ALICE", channel="C0GENERAL", message=message))
    assert (click.user, click.channel, click.message_ts, click.thread_ts, click.message_text) == (
        "U0ALICE", "C0GENERAL", "1800000005.000100", "1700000100.000100", "hi"
    )
    empty = click_of({})
    assert (empty.user, empty.channel, empty.message_ts, empty.message_blocks) == ("", "", "", [])


# --- readiness: the rules over the socket client's state -------------------------------------------


def adapter(transport: str) -> SlackAdapter:
    secret = 'app_token: "${APP}"' if transport == "socket" else 'signing_secret: "${SECRET}"'
    settings = config.loads(
        f"""
insitechat: {{api_key: "${{KEY}}"}}
slack: {{bot_token: "${{BOT}}", {secret}}}
routes: [{{platform: slack, chatbot: {CHATBOT_ID}}}]
""",
        env={"KEY": "ic_test", "BOT": BOT_TOKEN, "APP": APP_TOKEN, "SECRET": SIGNING_SECRET},
    )
    return SlackAdapter(settings.slack, lambda inbound: None, web=web.Application())


class FakeHandler:
    """The parts of Bolt's socket handler readiness looks at (the SDK client's connection state)."""

    def __init__(self, **client: Any) -> None:
        session = SimpleNamespace(closed=client.pop("session_closed", False))
        pong = time.time() - client.pop("pong_ago", 0.0)  # the SDK's stamp is wall-clock
        defaults = {"closed": False, "stale": False, "current_session": session, "last_ping_pong_time": pong}
        self.client = SimpleNamespace(**{**defaults, **client})
        self.closed = False

    async def close_async(self) -> None:
        self.closed = True


def socket_adapter(**client: Any) -> SlackAdapter:
    slack = adapter("socket")
    slack._running = True
    slack._socket = FakeHandler(**client)  # type: ignore[assignment]
    slack._last_frame = time.time() - 3600
    return slack


def test_a_live_socket_is_ready() -> None:
    assert socket_adapter().readiness() is None
    # No pong yet, but a frame (hello, an event) just came: live too.
    fresh = socket_adapter(last_ping_pong_time=None)
    fresh._last_frame = time.time()
    assert fresh.readiness() is None


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ({"current_session": None}, "down"),
        ({"session_closed": True}, "down"),
        ({"stale": True}, "down"),
        ({"closed": True}, "down"),
        ({"pong_ago": 25}, "silent for 25 s"),  # looks connected, but nothing for 2.5 pings
        ({"last_ping_pong_time": None}, "silent"),
    ],
)
def test_a_socket_that_is_down_or_silent_is_not_ready(client: dict[str, Any], reason: str) -> None:
    readiness = socket_adapter(**client).readiness()
    assert readiness is not None and reason in readiness


def test_the_silence_allowed_follows_the_ping_interval() -> None:
    slack = socket_adapter(pong_ago=1.0)
    assert slack.readiness() is None
    slack.ping_interval = 0.2
    assert "silent" in str(slack.readiness())


async def test_stop_intake_closes_the_socket_and_says_so() -> None:
    slack = socket_adapter()
    handler = slack._socket
    await slack.stop_intake()
    assert handler.closed and slack._socket is None  # type: ignore[union-attr]
    assert "shutting down" in str(slack.readiness())
    await slack.stop()  # still safe afterwards


def test_http_mode_is_ready_once_started() -> None:
    slack = adapter("http")
    assert slack.readiness() == "not connected"
    slack._running = True
    assert slack.readiness() is None
