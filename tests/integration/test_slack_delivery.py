"""Durable Slack posts: each part marked in its metadata, found again after a crash, never re-sent by the SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import aiohttp.web
import pytest
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler

from adapters.slack import SlackAdapter, SlackError
from adapters.slack.delivery import DELIVERY_EVENT_TYPE
from bridge import config
from bridge.app import BridgeApp
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from bridge.messages import Conversation, Delivery, Outbound
from bridge.ports import PermanentSendError
from bridge.relay import NOTICES
from tests.fakes.slack_api import BOT_TOKEN, SIGNING_SECRET, TEAM, FakeSlack, payload, sign

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
        adapter = SlackAdapter(settings_for(slack).slack, lambda inbound: None, web=aiohttp.web.Application())
        await adapter.start()
        started.append(adapter)
        return adapter

    yield start
    for adapter in started:
        await adapter.stop()


def answer(
    *parts: str, key: str = "job:1", look_first: bool = False, since: float = 0.0, channel: str = CHANNEL
) -> Outbound:
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


async def test_idempotent_calls_keep_the_connection_retry(slack: FakeSlack, start_adapter: StartAdapter) -> None:
    adapter = await start_adapter()
    slack.user_message(CHANNEL, QUESTION)
    slack.fail("conversations.replies", drop=True)
    # A read whose answer was lost is asked again by the SDK; the search goes through.
    assert await adapter.send(answer("hello", look_first=True)) == [posted(slack)[0]["ts"]]
    assert len(slack.calls_to("conversations.replies")) == 2


async def test_look_first_after_a_lost_response_posts_each_part_once(
    slack: FakeSlack, start_adapter: StartAdapter
) -> None:
    adapter = await start_adapter()
    slack.user_message(CHANNEL, QUESTION)
    slack.fail("chat.postMessage", drop=True)
    with pytest.raises(SlackError):
        await adapter.send(answer("part one", "part two"))  # part one landed; its answer was lost

    ts = await adapter.send(answer("part one", "part two", look_first=True))

    messages = posted(slack)
    assert [m["text"] for m in messages] == ["part one", "part two"]
    assert ts == [m["ts"] for m in messages]
    assert [m["metadata"] for m in messages] == [
        {"event_type": DELIVERY_EVENT_TYPE, "event_payload": {"key": "job:1", "part": n, "parts": 2}} for n in (1, 2)
    ]
    assert all(m["thread_ts"] == QUESTION for m in messages)
    [search] = slack.calls_to("conversations.replies")
    assert search.args["ts"] == QUESTION and search.args["include_all_metadata"] in (True, "1", "true")


async def test_look_first_after_a_crash_posts_only_the_missing_part(
    slack: FakeSlack, start_adapter: StartAdapter
) -> None:
    since = time.time() - 5
    parts = ("part one", "part two", "part three")
    slack.user_message(CHANNEL, QUESTION)
    slack.user_message(CHANNEL, "1700000200.000200", "someone else in the thread", thread_ts=QUESTION)
    before = await start_adapter()
    slack.fail("chat.postMessage", status=500, skip=2)  # parts one and two posted, then the crash
    with pytest.raises(SlackError):
        await before.send(answer(*parts, since=since))
    await before.send(answer("another answer", key="job:2", since=since))  # same thread, not this delivery
    await before.stop()

    after = await start_adapter()  # the restarted bridge remembers nothing
    ts = await after.send(answer(*parts, look_first=True, since=since))

    mine = [m for m in posted(slack) if m["metadata"]["event_payload"]["key"] == "job:1"]
    assert [m["text"] for m in mine] == list(parts)
    assert ts == [m["ts"] for m in mine]
    [resent] = [c for c in slack.calls_to("chat.postMessage") if c.ok][3:]
    assert resent.args["text"] == "part three"
    assert slack.calls_to("conversations.replies")[0].args["oldest"] == f"{since - 60:.6f}"


async def test_look_first_in_a_dm_searches_its_history(slack: FakeSlack, start_adapter: StartAdapter) -> None:
    adapter = await start_adapter()
    first = await adapter.send(answer("dm one", "dm two", channel=DM))
    assert await adapter.send(answer("dm one", "dm two", look_first=True, channel=DM)) == first
    assert len(posted(slack, DM)) == 2
    assert slack.calls_to("conversations.history") and not slack.calls_to("conversations.replies")


async def test_look_first_never_guesses_when_slack_cannot_be_asked(
    slack: FakeSlack, start_adapter: StartAdapter
) -> None:
    adapter = await start_adapter()
    slack.fail("conversations.history", status=500)
    with pytest.raises(SlackError) as failure:
        await adapter.send(answer("dm one", look_first=True, channel=DM))
    assert not isinstance(failure.value, PermanentSendError)
    assert slack.calls_to("chat.postMessage") == []  # nothing posted blind


# --- permanent and temporary refusals --------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    ["channel_not_found", "is_archived", "not_in_channel", "token_revoked", "restricted_action_read_only_channel"],
)
async def test_final_refusals_are_permanent(slack: FakeSlack, start_adapter: StartAdapter, code: str) -> None:
    adapter = await start_adapter()
    slack.fail("chat.postMessage", error=code)
    with pytest.raises(PermanentSendError) as failure:
        await adapter.send(answer("hello", channel=DM))
    assert code in str(failure.value) and BOT_TOKEN not in str(failure.value)
    assert isinstance(failure.value, SlackError)  # callers that catch SlackError still do


async def test_a_refused_search_is_permanent_too(slack: FakeSlack, start_adapter: StartAdapter) -> None:
    adapter = await start_adapter()
    slack.channels["C0GONE"] = {"name": "gone", "is_member": False}  # the bot was removed
    with pytest.raises(PermanentSendError, match="not_in_channel"):
        await adapter.send(answer("hello", look_first=True, channel="C0GONE"))


async def test_passing_trouble_is_not_permanent(slack: FakeSlack, start_adapter: StartAdapter) -> None:
    adapter = await start_adapter()
    for handler in adapter.client.retry_handlers:
        if isinstance(handler, AsyncRateLimitErrorRetryHandler):
            handler.max_retry_count = 1  # one wait (under a second), not three
    slack.fail("chat.postMessage", error="channel_not_found")
    with pytest.raises(PermanentSendError):  # the contrast: this one is final
        await adapter.send(answer("hello", channel=DM))
    for fault in (
        dict(status=500),  # fatal_error: Slack may even have posted; worth another look later
        dict(error="internal_error"),
        dict(status=429, retry_after=0, count=2),  # still rate limited after the SDK's retry
    ):
        slack.fail("chat.postMessage", **fault)  # type: ignore[arg-type]
        with pytest.raises(SlackError) as failure:
            await adapter.send(answer("hello", channel=DM))
        assert not isinstance(failure.value, PermanentSendError), fault
        slack.heal()


# --- the whole bridge ---------------------------------------------------------------------------


async def test_an_answer_whose_response_was_lost_is_posted_once(
    slack: FakeSlack, emulator: Emulator, tmp_path: Path
) -> None:
    settings = config.loads(
        f"""
insitechat: {{base_url: "{emulator.base_url}", api_key: "${{KEY}}"}}
state: {{sqlite: "{tmp_path / 'state.db'}"}}
server: {{listen: "127.0.0.1:0"}}
slack: {{bot_token: "${{BOT}}", signing_secret: "${{SECRET}}", mode: http, api_url: "{slack.api_url}"}}
routes:
  - {{platform: slack, chatbot: {SANDBOX_CHATBOT_ID}}}
""",
        env={"KEY": SANDBOX_KEY, "BOT": BOT_TOKEN, "SECRET": SIGNING_SECRET},
    )
    app = BridgeApp(settings, grace=2)
    await app.start()
    await asyncio.wait_for(app.connected(), 15)  # the platforms connect in the background
    slack.fail("chat.postMessage", drop=True)  # the answer lands in Slack; the bridge never hears back
    try:
        raw = json.dumps(payload("message_im")).encode()
        async with aiohttp.ClientSession() as http:
            headers = {"Content-Type": "application/json", **sign(raw)}
            async with http.post(app.server_url + "/slack/events", data=raw, headers=headers) as response:
                assert response.status == 200
        # The outbox tries again after its backoff, looks first, and finds the answer there.
        await slack.wait_for(lambda: slack.calls_to("conversations.history"), timeout=10)
        await slack.wait_for(lambda: not app.relay.in_flight, timeout=5)
    finally:
        await app.stop()
    [message] = posted(slack, "D0ALICE")
    assert "reset my password" in message["text"] and message["text"] not in NOTICES.values()
    assert len(slack.calls_to("chat.postMessage")) == 1
