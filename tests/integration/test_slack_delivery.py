"""Durable Slack posts: each part marked in its metadata, found again after a crash, never re-sent by the SDK."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp.web
import pytest
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler

from adapters.slack import SlackAdapter, SlackError
from bridge import config
from bridge.emulator import SANDBOX_CHATBOT_ID
from bridge.messages import Conversation, Delivery, Outbound
from bridge.ports import PermanentSendError
from tests.fakes.slack_api import BOT_TOKEN, SIGNING_SECRET, TEAM, FakeSlack

CHANNEL = "C0GENERAL"
DM = "D0ALICE"
QUESTION = "1700000100.000100"  # the question's ts: the answer's thread


def settings_for(slack: FakeSlack) -> config.Settings:
    return config.loads(
        f"""
insitechat: {{api_key: "${{KEY}}"}}
slack: {{bot_token: "${{BOT}}", signing_secret: "${{SECRET}}", mode: http, api_url: "{slack.api_url}"}}
routes:
  - {{platform: slack, chatbot: {SANDBOX_CHATBOT_ID}, human_button: false}}
""",
        env={"KEY": "ic_test", "BOT": BOT_TOKEN, "SECRET": SIGNING_SECRET},
    )


StartAdapter = Callable[[], Awaitable[SlackAdapter]]


@pytest.fixture
async def start_adapter(slack: FakeSlack) -> AsyncIterator[StartAdapter]:
    """Starts a fresh SlackAdapter per call: a second one is the bridge after a restart (no memory)."""
    started: list[SlackAdapter] = []

    async def start() -> SlackAdapter:
        adapter = SlackAdapter(settings_for(slack), lambda inbound: None, web=aiohttp.web.Application())
        await adapter.start()
        started.append(adapter)
        return adapter

    yield start
    for adapter in started:
        await adapter.stop()


def answer(*parts: str, key: str = "job:1", look_first: bool = False, since: float = 0.0, channel: str = CHANNEL) -> Outbound:
    thread = QUESTION if channel == CHANNEL else ""
    return Outbound(
        Conversation("slack", TEAM, channel, thread),
        parts,
        reply_to=QUESTION,
        delivery=Delivery(key, look_first=look_first, since=since or time.time() - 5),
    )


def posted(slack: FakeSlack, channel: str = CHANNEL) -> list[dict]:
    """The bot's messages as Slack holds them, in posting order."""
    return [m for m in slack.messages.get(channel, []) if m.get("bot_id")]


async def test_a_lost_response_is_not_re_sent_by_the_sdk(slack: FakeSlack, start_adapter: StartAdapter) -> None:
    adapter = await start_adapter()
    slack.user_message(CHANNEL, QUESTION)
    slack.fail("chat.postMessage", drop=True)  # Slack posts it, the answer never comes back
    with pytest.raises(SlackError) as failure:
        await adapter.send(answer("the only part"))
    assert not isinstance(failure.value, PermanentSendError)  # the outbox tries again later
    assert len(posted(slack)) == 1
    assert len(slack.calls_to("chat.postMessage")) == 1  # no connection-error re-send by slack_sdk
