"""The whole bridge with the Slack adapter: real Bolt and slack_sdk against a fake Slack, the InsiteChat emulator."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from adapters.slack import interactions
from bridge import config
from bridge.app import BridgeApp
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from adapters.slack.formatting import SLACK_LIMIT
from bridge.messages import Inbound
from bridge.relay import NOTICES, Outcome
from bridge.store import JobState
from tests.fakes.slack_api import (
    ALL_SCOPES,
    APP_TOKEN,
    BOT_TOKEN,
    SIGNING_SECRET,
    TEAM,
    FakeSlack,
    command_form,
    payload,
    sign,
)
from tests.fakes.outcomes import Outcomes

MENTION_TS = "1700000100.000100"


def bridge_settings(
    emulator: Emulator,
    slack: FakeSlack,
    state: Path,
    *,
    mode: str = "http",
    deadline: float = 30,
    working_signal: str = "reaction",  # this file's tests watch the reaction; the status has tests of its own
) -> config.Settings:
    transport = "signing_secret: ${SLACK_SIGNING_SECRET}" if mode == "http" else "app_token: ${SLACK_APP_TOKEN}"
    return config.loads(
        f"""
insitechat:
  base_url: {emulator.base_url}
  api_key: ${{IC_KEY}}
  deadline: {deadline}
state: {{sqlite: "{state}"}}
server: {{listen: "127.0.0.1:0"}}
slack:
  bot_token: ${{SLACK_BOT_TOKEN}}
  {transport}
  mode: {mode}
  api_url: {slack.api_url}
  working_signal: {working_signal}
routes:
  - {{platform: slack, chatbot: {SANDBOX_CHATBOT_ID}, reply: mention}}
  - {{platform: slack, channel: C0QUIET, chatbot: {SANDBOX_CHATBOT_ID}, reply: "off"}}
  - {{platform: slack, channel: C0ALL, chatbot: {SANDBOX_CHATBOT_ID}, reply: all}}
""",
        env={
            "IC_KEY": SANDBOX_KEY,
            "SLACK_BOT_TOKEN": BOT_TOKEN,
            "SLACK_APP_TOKEN": APP_TOKEN,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        },
    )


class Bridge:
    """A running BridgeApp and a client that talks to it as Slack would over HTTP."""

    def __init__(self, app: BridgeApp) -> None:
        self.app = app
        self.http = aiohttp.ClientSession()

    @property
    def events_url(self) -> str:
        return self.app.server_url + "/slack/events"

    async def post_event(
        self,
        body: dict[str, Any],
        *,
        retry: int = 0,
        secret: str = SIGNING_SECRET,
        timestamp: int | None = None,
    ) -> tuple[int, str]:
        raw = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **sign(raw, secret, timestamp)}
        if retry:
            headers.update({"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"})
        async with self.http.post(self.events_url, data=raw, headers=headers) as response:
            return response.status, await response.text()

    async def command(self, **fields: str) -> tuple[int, str]:
        raw = urlencode(command_form(**fields)).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded", **sign(raw)}
        async with self.http.post(self.events_url, data=raw, headers=headers) as response:
            return response.status, await response.text()

    async def close(self) -> None:
        await self.http.close()
        await self.app.stop()



@pytest.fixture
def outcomes() -> Outcomes:
    """How the relay ended each message, across every bridge a test starts."""
    return Outcomes()


@pytest.fixture
async def start_bridge(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path, outcomes: Outcomes
) -> AsyncIterator[Callable[..., Awaitable[Bridge]]]:
    running: list[Bridge] = []

    async def start(**kw: Any) -> Bridge:
        app = BridgeApp(bridge_settings(emulator, slack, tmp_path / "state.db", **kw), grace=2)
        outcomes.watch(app.relay)
        await app.start()
        await asyncio.wait_for(app.connected(), 15)  # the platforms connect in the background
        bridge = Bridge(app)
        running.append(bridge)
        return bridge

    yield start
    for bridge in running:
        await bridge.close()


def chat_calls(emulator: Emulator) -> list[Any]:
    return [r for r in emulator.requests if r.path.endswith("/chat")]


def texts(slack: FakeSlack) -> list[str]:
    return [str(p["text"]) for p in slack.posts]


async def settle(bridge: Bridge) -> None:
    """Wait until the relay has nothing in flight (answers and notices all posted)."""
    deadline = time.monotonic() + 10
    while bridge.app.relay.in_flight:
        assert time.monotonic() < deadline, "the relay never settled"
        await asyncio.sleep(0.01)


# --- HTTP transport: signatures ------------------------------------------------------------------


async def test_url_verification_and_signatures(start_bridge, slack: FakeSlack, emulator: Emulator) -> None:
    bridge = await start_bridge()
    challenge = payload("url_verification")
    status, body = await bridge.post_event(challenge)
    assert status == 200 and challenge["challenge"] in body

    assert (await bridge.post_event(payload("app_mention"), secret="not-the-secret"))[0] == 401
    stale = int(time.time()) - 6 * 60
    assert (await bridge.post_event(payload("app_mention"), timestamp=stale))[0] == 401
    assert (await bridge.post_event(challenge, secret="not-the-secret"))[0] == 401
    # The right signature cut short (or with a byte more) is as wrong as any other: Bolt, not
    # the bridge, compares them, and the bridge must keep it doing so for every event.
    raw = json.dumps(payload("app_mention")).encode()
    headers = {"Content-Type": "application/json", **sign(raw)}
    right = headers["X-Slack-Signature"]
    for near_miss in (right[:-1], right[:35], "v0=", right + "0"):
        headers["X-Slack-Signature"] = near_miss
        async with bridge.http.post(bridge.events_url, data=raw, headers=headers) as response:
            assert response.status == 401, near_miss
    # Only a correctly signed, fresh event is answered.
    assert (await bridge.post_event(payload("app_mention")))[0] == 200
    await slack.wait_for(lambda: slack.posts)
    await settle(bridge)
    assert len(chat_calls(emulator)) == 1 and len(slack.posts) == 1


JUNK_BODIES = [
    (b"not json at all", "application/json"),
    (b"[]", "application/json"),
    (b"null", "application/json"),
    (b"payload=garbage", "application/x-www-form-urlencoded"),
    (b"payload=%7B%22type%22%3A", "application/x-www-form-urlencoded"),
    (b"\xff\xfe\x00", "application/json"),
]


@pytest.mark.parametrize(("raw", "content_type"), JUNK_BODIES)
async def test_junk_is_refused_before_it_is_parsed(
    start_bridge, slack: FakeSlack, emulator: Emulator, raw: bytes, content_type: str
) -> None:
    """Unsigned junk is 401 and signed junk 400: never a 500, whatever Bolt's body parser makes of it."""
    bridge = await start_bridge()
    async with bridge.http.post(bridge.events_url, data=raw, headers={"Content-Type": content_type}) as response:
        assert response.status == 401
    headers = {"Content-Type": content_type, **sign(raw, SIGNING_SECRET)}
    async with bridge.http.post(bridge.events_url, data=raw, headers=headers) as response:
        assert response.status == 400
    # And the bridge still answers a real event afterwards.
    assert (await bridge.post_event(payload("app_mention")))[0] == 200
    await slack.wait_for(lambda: slack.posts)


# --- triggers -------------------------------------------------------------------------------------


async def test_by_default_a_mention_shows_slacks_loading_status_in_its_thread_instead_of_a_reaction(
    start_bridge, slack: FakeSlack, emulator: Emulator
) -> None:
    # Slack takes assistant.threads.setStatus with chat:write (2026-03): one call, cleared by
    # Slack when the answer is posted in that thread, where the reaction is two.
    bridge = await start_bridge(working_signal="status")
    now = f"{time.time():.6f}"  # posted while the bridge runs: no reaction of a dead run to clear
    await bridge.post_event(payload("app_mention", ts=now))
    await slack.wait_for(lambda: slack.posts)
    await settle(bridge)
    [shown] = slack.calls_to("assistant.threads.setStatus")
    assert (shown.args["channel_id"], shown.args["thread_ts"]) == ("C0GENERAL", now) and shown.args["status"]
    [post] = slack.posts
    assert post["thread_ts"] == now and shown.time < chat_calls(emulator)[0].time
    assert [c.method for c in slack.calls if c.method != "auth.test"] == [
        "assistant.threads.setStatus", "chat.postMessage"
    ]
    assert slack.statuses == {}  # cleared by the answer, as Slack does


async def test_a_top_level_dm_keeps_the_reaction_by_default(start_bridge, slack: FakeSlack) -> None:
    bridge = await start_bridge(working_signal="status")
    await bridge.post_event(payload("message_im"))
    await slack.wait_for(lambda: slack.posts and slack.calls_to("reactions.remove"))
    await settle(bridge)
    assert slack.calls_to("assistant.threads.setStatus") == []  # its answer is not in a thread


async def test_mention_is_answered_once_in_its_thread_with_a_reaction(
    start_bridge, slack: FakeSlack, emulator: Emulator
) -> None:
    bridge = await start_bridge()
    # Slack delivers one post that mentions the bot twice: as app_mention and as message.
    await asyncio.gather(
        bridge.post_event(payload("app_mention")), bridge.post_event(payload("message_channel_mention"))
    )
    await slack.wait_for(lambda: slack.calls_to("reactions.remove"))
    await settle(bridge)
    [post] = slack.posts
    assert post["channel"] == "C0GENERAL" and post["thread_ts"] == MENTION_TS
    assert post["unfurl_links"] is False and post["unfurl_media"] is False
    assert "refund policy" in post["text"]
    assert len(chat_calls(emulator)) == 1
    assert len(slack.calls_to("auth.test")) == 1  # Bolt reuses the adapter's, even on the first event
    methods = [c.method for c in slack.calls if c.method != "auth.test"]
    assert methods.index("reactions.add") < methods.index("chat.postMessage") < methods.index("reactions.remove")
    for method in ("reactions.add", "reactions.remove"):
        [call] = slack.calls_to(method)
        assert (call.args["channel"], call.args["timestamp"], call.args["name"]) == ("C0GENERAL", MENTION_TS, "eyes")


async def test_the_same_ts_in_two_channels_gets_two_answers(start_bridge, slack: FakeSlack, emulator: Emulator) -> None:
    # Two people post at the same instant in two channels: Slack's ts is unique per channel only.
    bridge = await start_bridge()
    general = payload("app_mention")
    elsewhere = payload("app_mention", channel="C0OTHER", text="<@UBOT> where is the office?")
    elsewhere["event_id"] = general["event_id"] + "2"
    assert general["event"]["ts"] == elsewhere["event"]["ts"]
    for body in (general, elsewhere):
        assert (await bridge.post_event(body))[0] == 200
    await slack.wait_for(lambda: len(slack.posts) == 2)
    await settle(bridge)
    answered = sorted((p["channel"], p["thread_ts"]) for p in slack.posts)
    assert answered == [("C0GENERAL", MENTION_TS), ("C0OTHER", MENTION_TS)]
    assert len(chat_calls(emulator)) == 2


async def test_follow_ups_in_the_thread(start_bridge, slack: FakeSlack, emulator: Emulator) -> None:
    bridge = await start_bridge()
    await bridge.post_event(payload("app_mention"))
    await slack.wait_for(lambda: len(slack.posts) == 1)
    await settle(bridge)
    # Someone else is addressed, or a group, or marked "!": not for the bot.
    await bridge.post_event(payload("message_thread_other_mention"))
    await bridge.post_event(payload("message_thread_group_mention"))
    await bridge.post_event(payload("message_thread_followup", ts="1700000250.000250", text="!note to self"))
    # No mention, but the bot is in this thread: answered, with the thread's context.
    await bridge.post_event(payload("message_thread_followup"))
    await slack.wait_for(lambda: len(slack.posts) == 2)
    await settle(bridge)
    assert len(chat_calls(emulator)) == 2
    follow_up = slack.posts[1]
    assert follow_up["thread_ts"] == MENTION_TS
    assert "digital goods" in follow_up["text"] and "refund policy" in follow_up["text"]  # the emulator echoes history


async def test_channel_reply_modes(start_bridge, slack: FakeSlack, emulator: Emulator) -> None:
    bridge = await start_bridge()
    await bridge.post_event(payload("message_top_level"))  # mention mode: chatter is not for the bot
    await bridge.post_event(payload("message_thread_followup"))  # a thread the bot is not in
    await bridge.post_event(payload("app_mention", channel="C0QUIET"))  # reply: off
    await bridge.post_event(payload("message_top_level", channel="C0ALL"))  # reply: all answers it
    await slack.wait_for(lambda: slack.posts)
    await settle(bridge)
    [post] = slack.posts
    assert post["channel"] == "C0ALL" and post["thread_ts"] == "1700000500.000500"
    assert len(chat_calls(emulator)) == 1


async def test_direct_messages(start_bridge, slack: FakeSlack, emulator: Emulator) -> None:
    bridge = await start_bridge()
    await bridge.post_event(payload("message_im"))
    await slack.wait_for(lambda: len(slack.posts) == 1)
    await settle(bridge)
    first = slack.posts[0]
    assert first["channel"] == "D0ALICE" and "thread_ts" not in first and "reset my password" in first["text"]
    # A reply written inside a DM thread is answered in that thread, in the same conversation.
    await bridge.post_event(payload("message_im_in_thread"))
    await slack.wait_for(lambda: len(slack.posts) == 2)
    second = slack.posts[1]
    assert second["thread_ts"] == "1700000400.000400" and "on mobile" in second["text"]
    sessions = {c.json["session_id"] for c in chat_calls(emulator)}
    assert len(sessions) == 1


async def test_an_answer_for_a_dm_thread_still_lands_in_that_thread_after_a_restart(
    start_bridge, slack: FakeSlack
) -> None:
    slack.fail("chat.postMessage", status=500, count=None)  # the answer exists but cannot be posted
    first = await start_bridge()
    await first.post_event(payload("message_im_in_thread"))
    await settle(first)
    await first.close()  # stopped with the answer still in the outbox
    slack.heal()
    await start_bridge()  # the next run: it knows the question's thread from the stored job alone
    [answer] = await slack.wait_for(lambda: slack.posts)
    assert answer["channel"] == "D0ALICE" and answer["thread_ts"] == "1700000400.000400"


async def test_bots_self_and_subtypes_are_ignored(start_bridge, slack: FakeSlack, emulator: Emulator) -> None:
    bridge = await start_bridge()
    await bridge.post_event(payload("app_mention"))  # the bot now follows this thread
    await slack.wait_for(lambda: slack.posts)
    await settle(bridge)
    ignored = [
        "bot_message", "message_from_other_bot", "message_from_self",
        "message_changed", "message_deleted", "channel_join", "channel_topic",
    ]
    for name in ignored:
        assert (await bridge.post_event(payload(name)))[0] == 200
    await settle(bridge)
    await bridge.post_event(payload("message_im"))  # the sentinel
    await slack.wait_for(lambda: len(slack.posts) == 2)
    await settle(bridge)
    assert len(chat_calls(emulator)) == 2 and [p["channel"] for p in slack.posts] == ["C0GENERAL", "D0ALICE"]
    assert [c.args["timestamp"] for c in slack.calls_to("reactions.add")] == [MENTION_TS, "1700000400.000400"]


# --- exactly one answer -----------------------------------------------------------------------------


async def test_pair_and_retries_give_one_answer_also_across_a_restart(
    start_bridge, slack: FakeSlack, emulator: Emulator
) -> None:
    emulator.latency = 0.3  # the retries arrive while the first delivery is still being answered
    bridge = await start_bridge()
    statuses = await asyncio.gather(
        bridge.post_event(payload("message_channel_mention")),
        bridge.post_event(payload("app_mention")),
        bridge.post_event(payload("app_mention"), retry=1),
        bridge.post_event(payload("message_channel_mention"), retry=1),
    )
    assert [s for s, _ in statuses] == [200] * 4
    await slack.wait_for(lambda: slack.posts)
    await settle(bridge)
    await bridge.close()

    again = await start_bridge()  # a new process over the same SQLite file
    await again.post_event(payload("app_mention"), retry=2)
    # A post whose first delivery was lost is still answered from its retry.
    await again.post_event(payload("message_im"), retry=1)
    await slack.wait_for(lambda: len(slack.posts) >= 2)
    await settle(again)
    assert [p["channel"] for p in slack.posts] == ["C0GENERAL", "D0ALICE"]
    assert len(chat_calls(emulator)) == 2


# --- formatting ---------------------------------------------------------------------------------------


async def test_a_5000_line_answer_is_split_in_order_with_fences_intact(
    start_bridge, slack: FakeSlack, emulator: Emulator
) -> None:
    lines = []
    for block in range(50):
        lines += [f"Step {block}: run this", "```python", *(f"print({block}, {i})  # line" for i in range(97)), "```"]
    assert len(lines) == 5000
    emulator.script_reply(None, "refund policy", "\n".join(lines))
    bridge = await start_bridge()
    await bridge.post_event(payload("app_mention"))
    await slack.wait_for(lambda: slack.calls_to("reactions.remove"), timeout=20)
    await settle(bridge)
    posts = slack.posts
    assert len(posts) > 10
    assert all(p["thread_ts"] == MENTION_TS for p in posts)
    assert all(len(p["text"]) <= SLACK_LIMIT for p in posts)
    assert all(p["text"].count("```") % 2 == 0 for p in posts), "a code block was cut open"
    # In order: every line arrives once, in sequence (reopened fences aside).
    seen = [line for p in posts for line in p["text"].split("\n") if line.startswith("print(")]
    expected = [line for line in lines if line.startswith("print(")]
    assert seen == expected


async def test_hostile_answer_cannot_ping_anyone(start_bridge, slack: FakeSlack, emulator: Emulator) -> None:
    hostile = (
        "<!channel> URGENT <!here|here> and <!everyone>, @here @channel @everyone, "
        "<!subteam^S0ADMINS|@admins> <@U0BOSS> [click](!channel) <https://evil.example|ok>"
    )
    emulator.script_reply(None, "refund policy", hostile)
    bridge = await start_bridge()
    await bridge.post_event(payload("app_mention"))
    await slack.wait_for(lambda: slack.posts)
    await settle(bridge)
    text = "".join(texts(slack))
    assert "<!" not in text and "<@" not in text
    for crowd in ("@here", "@channel", "@everyone"):
        assert crowd not in text
    assert "URGENT" in text


# --- platform and service limits ---------------------------------------------------------------------


async def test_slack_429_is_waited_out_and_delivered(start_bridge, slack: FakeSlack, emulator: Emulator) -> None:
    slack.fail("chat.postMessage", status=429, retry_after=1)
    bridge = await start_bridge()
    await bridge.post_event(payload("message_im"))
    await slack.wait_for(lambda: slack.posts, timeout=10)
    await settle(bridge)
    limited, delivered = slack.calls_to("chat.postMessage")
    assert limited.status == 429 and delivered.ok
    assert delivered.time - limited.time >= 1.0  # Retry-After honoured
    assert len(slack.posts) == 1 and "reset my password" in slack.posts[0]["text"]


async def test_a_failed_post_is_retried_and_the_answer_arrives_once(
    start_bridge, slack: FakeSlack, outcomes: Outcomes, caplog: pytest.LogCaptureFixture
) -> None:
    slack.fail("chat.postMessage", status=500)
    bridge = await start_bridge()
    question = payload("message_im")
    with caplog.at_level(logging.WARNING):
        await bridge.post_event(question)
        await slack.wait_for(lambda: slack.posts)
        await settle(bridge)
    # The relay's own attempt was refused: the answer was left to the outbox, which posted it.
    assert outcomes.of(question["event"]["ts"]) == [Outcome.PENDING]
    refused, delivered = slack.calls_to("chat.postMessage")
    assert (refused.status, refused.ok, delivered.ok) == (500, False, True)
    assert refused.args["text"] == delivered.args["text"]
    [answer] = texts(slack)  # the answer the chatbot gave, posted by the outbox's retry: never an error notice
    assert answer != NOTICES["error"] and "reset my password" in answer
    key = Inbound("slack", TEAM, "D0ALICE", question["event"]["ts"], "", "").dedupe_key
    deadline = time.monotonic() + 10
    while (job := await bridge.app.store.job_by_key(key)) is None or job[1] is not JobState.DELIVERED:
        # The outbox records the delivery just after the post.
        assert time.monotonic() < deadline, f"the job never became delivered: {job}"
        await asyncio.sleep(0.01)
    # Secrets never reach a log line: the warnings about the failed post are checked for the token.
    assert BOT_TOKEN not in caplog.text


async def test_a_busy_channel_answering_429_again_and_again_gets_its_answer_late_once(
    start_bridge, slack: FakeSlack, emulator: Emulator
) -> None:
    # More 429s in a row than slack_sdk waits out (it gives up after 3 retries): the outbox
    # keeps the answer InsiteChat already produced and posts it once Slack takes it.
    slack.fail("chat.postMessage", status=429, retry_after=0, count=5)
    bridge = await start_bridge()
    await bridge.post_event(payload("message_im"))
    await slack.wait_for(lambda: slack.posts, timeout=20)
    await settle(bridge)
    [answer] = texts(slack)
    assert answer not in NOTICES.values()
    assert len(chat_calls(emulator)) == 1


@pytest.mark.parametrize(
    ("fault", "notice"),
    [
        (dict(status=429, detail="Monthly message limit reached."), "quota"),
        (dict(status=503, detail="Service unavailable", count=None), "unavailable"),
    ],
)
async def test_insitechat_trouble_reaches_the_user_as_a_notice(
    start_bridge, slack: FakeSlack, emulator: Emulator, fault: dict[str, Any], notice: str
) -> None:
    emulator.inject(path_contains="/chat", **fault)
    bridge = await start_bridge(deadline=1.5)
    await bridge.post_event(payload("app_mention"))
    await slack.wait_for(lambda: slack.posts, timeout=10)
    await settle(bridge)
    [post] = slack.posts
    assert post["text"] == NOTICES[notice].format(when="5 minutes") and post["thread_ts"] == MENTION_TS


# --- slash command ---------------------------------------------------------------------------------


async def test_slash_command_posts_the_question_and_answers_in_its_thread(
    start_bridge, slack: FakeSlack, emulator: Emulator
) -> None:
    bridge = await start_bridge()
    status, body = await bridge.command(text="What is the refund policy?")
    assert status == 200 and body == ""  # acked at once, nothing ephemeral
    await slack.wait_for(lambda: len(slack.posts) == 2)
    await settle(bridge)
    root, answer = slack.posts
    assert root["channel"] == "C0GENERAL" and "thread_ts" not in root
    assert root["text"] == "<@U0ALICE> asked: What is the refund policy?"
    root_ts = slack.calls_to("chat.postMessage")[0].result["ts"]
    assert answer["thread_ts"] == root_ts and "refund policy" in answer["text"]
    [reaction] = slack.calls_to("reactions.add")
    assert reaction.args["timestamp"] == answer["thread_ts"]
    assert len(chat_calls(emulator)) == 1


async def test_slash_command_edge_cases(start_bridge, slack: FakeSlack, emulator: Emulator) -> None:
    bridge = await start_bridge()
    status, body = await bridge.command(text="")
    assert status == 200 and "/ask <question>" in body
    status, body = await bridge.command(text="reset")
    assert status == 200 and "reply `reset` in the thread" in body
    status, body = await bridge.command(text="hello?", channel_id="C0QUIET")
    assert status == 200 and "not set up to answer here" in body
    # Not a member of the channel: the question's post fails before the ack, which tells the user (only them).
    slack.channels["C0PRIVATE"] = {"name": "private", "is_member": False}
    status, body = await bridge.command(text="anyone?", channel_id="C0PRIVATE", response_url=slack.response_url("p"))
    assert status == 200 and "/invite @insitechat" in body
    assert slack.posts == [] and slack.responses == [] and chat_calls(emulator) == []


async def test_a_slash_command_is_stored_before_it_is_acknowledged(
    start_bridge, slack: FakeSlack, emulator: Emulator, tmp_path: Path
) -> None:
    # Slack never sends an acknowledged command again: a crash right after the ack must find
    # the question stored (it was stored in the background after the ack, once its post existed).
    bridge = await start_bridge()
    # Another process holds the state file's write lock for a moment: the job waits for it.
    blocker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    asyncio.get_running_loop().call_later(0.3, blocker.execute, "ROLLBACK")
    try:
        status, body = await bridge.command(text="What is the refund policy?")
        assert status == 200 and body == ""
        assert slack.posts[0]["text"] == "<@U0ALICE> asked: What is the refund policy?"  # posted before the ack
        stored = await bridge.app.store.job_counts()  # a read: WAL readers do not wait for the lock
        assert sum(stored.values()) == 1, stored
    finally:
        blocker.close()
    await slack.wait_for(lambda: len(slack.posts) == 2)


async def test_a_slash_command_that_cannot_be_stored_is_told_so(
    start_bridge, slack: FakeSlack, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(interactions, "BEFORE_ACK", 0.2)
    bridge = await start_bridge()
    # Another process holds the state file's write lock: the job waits for it (5 s), then fails.
    blocker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        status, body = await bridge.command(text="Is anyone there?", response_url=slack.response_url("c"))
        assert status == 200 and body == ""  # acked in time (Slack's 3 s), before the store gave up
        [response] = await slack.wait_for(lambda: slack.responses, timeout=15)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert response["response_type"] == "ephemeral" and response["text"] == NOTICES["not_stored"]
    assert chat_calls(emulator) == []


async def test_slash_command_reset_in_a_dm_starts_a_new_conversation(
    start_bridge, slack: FakeSlack, emulator: Emulator
) -> None:
    bridge = await start_bridge()
    await bridge.post_event(payload("message_im"))
    await slack.wait_for(lambda: len(slack.posts) == 1)
    await settle(bridge)
    status, _ = await bridge.command(text="reset", channel_id="D0ALICE", channel_name="directmessage")
    assert status == 200
    await slack.wait_for(lambda: len(slack.posts) == 2)
    assert slack.posts[1]["text"] == NOTICES["reset"] and slack.posts[1]["channel"] == "D0ALICE"
    await settle(bridge)
    await bridge.post_event(payload("message_im", ts="1700000900.000900", text="what did I ask?"))
    await slack.wait_for(lambda: len(slack.posts) == 3)
    first, last = chat_calls(emulator)
    assert first.json["session_id"] != last.json["session_id"]


# --- feedback while waiting ----------------------------------------------------------------------


async def test_feedback_failures_never_block_the_answer(start_bridge, slack: FakeSlack, outcomes: Outcomes) -> None:
    slack.fail("reactions.add", error="missing_scope")
    slack.fail("reactions.remove", status=500)
    bridge = await start_bridge()
    question = payload("app_mention")
    await bridge.post_event(question)
    await outcomes.wait_for(question["event"]["ts"], Outcome.ANSWERED)
    await slack.wait_for(lambda: slack.calls_to("reactions.remove"))
    await settle(bridge)
    [added], [removed] = slack.calls_to("reactions.add"), slack.calls_to("reactions.remove")
    assert (added.ok, added.result.get("error")) == (False, "missing_scope") and removed.status == 500
    assert len(slack.posts) == 1 and "refund policy" in slack.posts[0]["text"]
    assert outcomes.of(question["event"]["ts"]) == [Outcome.ANSWERED]


async def test_assistant_status_in_dms_when_the_app_has_it(start_bridge, slack: FakeSlack) -> None:
    slack.scopes = ALL_SCOPES + ",assistant:write"
    bridge = await start_bridge()
    await bridge.post_event(payload("message_im"))
    await slack.wait_for(lambda: len(slack.calls_to("assistant.threads.setStatus")) == 2)
    await settle(bridge)
    shown, cleared = (c.args for c in slack.calls_to("assistant.threads.setStatus"))
    assert (shown["channel_id"], shown["thread_ts"]) == ("D0ALICE", "1700000400.000400") and shown["status"]
    assert cleared["status"] == ""
    # In a channel, no assistant status: only the reaction.
    await bridge.post_event(payload("app_mention"))
    await slack.wait_for(lambda: len(slack.posts) == 2 and len(slack.calls_to("reactions.remove")) == 2)
    await settle(bridge)
    assert len(slack.calls_to("assistant.threads.setStatus")) == 2


async def test_no_assistant_status_without_the_scope(start_bridge, slack: FakeSlack) -> None:
    bridge = await start_bridge()
    await bridge.post_event(payload("message_im"))
    await slack.wait_for(lambda: slack.posts and slack.calls_to("reactions.remove"))
    await settle(bridge)
    assert slack.calls_to("assistant.threads.setStatus") == []


@pytest.mark.parametrize("code", ["restricted_action", "restricted_action_read_only_channel", "is_archived"])
async def test_an_answer_slack_refuses_for_good_is_explained_to_the_asker(
    start_bridge, slack: FakeSlack, emulator: Emulator, outcomes: Outcomes, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Never silent: an announcement channel refuses the answer, and the asker is told why, privately.

    And the operator reads one clear line, not tracebacks (the log line is the product there).
    """
    bridge = await start_bridge()
    slack.fail("chat.postMessage", error=code, count=None)
    assert (await bridge.post_event(payload("app_mention")))[0] == 200
    [ephemeral] = await slack.wait_for(lambda: slack.ephemeral)
    assert ephemeral["channel"] == "C0GENERAL" and ephemeral["user"] == payload("app_mention")["event"]["user"]
    assert "couldn't post my answer here" in ephemeral["text"]
    await outcomes.wait_for(MENTION_TS, Outcome.FAILED)
    assert (await bridge.app.store.job_counts()).get(JobState.FAILED) == 1
    assert len(slack.calls_to("chat.postMessage")) == 1  # not retried
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and not r.name.startswith("slack_")]
    assert [r.exc_info for r in loud] == [None] * len(loud)
    assert len([r for r in loud if code in r.getMessage()]) == 1


async def test_when_even_the_ephemeral_note_is_refused_nothing_breaks(
    start_bridge, slack: FakeSlack, outcomes: Outcomes
) -> None:
    bridge = await start_bridge()
    slack.fail("chat.postMessage", error="not_in_channel", count=None)
    slack.fail("chat.postEphemeral", error="not_in_channel", count=None)
    assert (await bridge.post_event(payload("app_mention")))[0] == 200
    await outcomes.wait_for(MENTION_TS, Outcome.FAILED)
    await slack.wait_for(lambda: slack.calls_to("chat.postEphemeral"))
    assert slack.ephemeral == []
    assert (await bridge.post_event(payload("url_verification")))[0] == 200  # still serving


# --- Socket Mode ----------------------------------------------------------------------------------


async def test_only_real_socket_mode_retries_are_logged_as_retries(
    start_bridge, slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    """Bolt turns every envelope's `retry_attempt: 0` into an x-slack-retry-num header of "0".

    The log line is the product here: the operator reads "slack retry N" as Slack redelivering.
    """
    await start_bridge(mode="socket")
    with caplog.at_level(logging.INFO, logger="adapters.slack"):
        first = await slack.send_envelope(payload("app_mention"), retry_attempt=0)
        await asyncio.wait_for(first.acked.wait(), 5)
        retries = [r for r in caplog.records if r.name.startswith("adapters.slack") and "retry" in r.getMessage()]
        assert retries == []
        again = await slack.send_envelope(payload("app_mention"), retry_attempt=2, retry_reason="timeout")
        await asyncio.wait_for(again.acked.wait(), 5)
    [retry] = [r for r in caplog.records if r.name.startswith("adapters.slack") and "retry" in r.getMessage()]
    assert "retry 2 (timeout)" in retry.getMessage()


async def test_socket_mode_envelopes_are_acked_and_answered(start_bridge, slack: FakeSlack, emulator: Emulator) -> None:
    bridge = await start_bridge(mode="socket")
    assert slack.calls_to("apps.connections.open")[0].token == APP_TOKEN
    first = await slack.send_envelope(payload("app_mention"))
    twin = await slack.send_envelope(payload("message_channel_mention"))
    await asyncio.wait_for(asyncio.gather(first.acked.wait(), twin.acked.wait()), 5)
    await slack.wait_for(lambda: slack.posts)
    retry = await slack.send_envelope(payload("app_mention"), retry_attempt=1, retry_reason="timeout")
    await asyncio.wait_for(retry.acked.wait(), 5)
    # A slash command over the socket: the ack carries the ephemeral usage text.
    command = await slack.send_envelope(command_form(text=""), kind="slash_commands")
    await asyncio.wait_for(command.acked.wait(), 5)
    assert command.ack is not None and "/ask <question>" in json.dumps(command.ack.get("payload"))
    await settle(bridge)
    [post] = slack.posts
    assert post["thread_ts"] == MENTION_TS and "refund policy" in post["text"]
    assert len(chat_calls(emulator)) == 1
    assert bridge.app.server_url and (await bridge.post_event(payload("app_mention")))[0] == 404  # no HTTP route
    await bridge.app.stop()
    await slack.wait_for(lambda: not slack.sockets)  # the socket was closed cleanly
