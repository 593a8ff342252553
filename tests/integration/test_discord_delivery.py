"""Durable Discord posts: nonces from the delivery key, answers where no thread can be made, typed refusals.

And `check` of "*" routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from adapters.discord import DiscordAdapter, check
from bridge import config
from bridge.app import BridgeApp
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from bridge.messages import Conversation, Delivery, Outbound, OutboundKind
from bridge.ports import PermanentSendError
from bridge.store import JobState
from tests.fakes import discord_api as fd
from tests.fakes.discord_api import FakeDiscord

BOT = SANDBOX_CHATBOT_ID


def make_settings(emulator_url: str, state: Path, *, routes: str = "") -> config.Settings:
    routes = routes or f"  - {{platform: discord, chatbot: {BOT}, reply: mention}}"
    return config.loads(
        f"""
insitechat: {{base_url: "{emulator_url}", api_key: "${{KEY}}"}}
state: {{sqlite: "{state}"}}
server: {{listen: "127.0.0.1:0"}}
discord: {{token: "${{DISCORD_TOKEN}}", message_content_intent: true}}
routes:
{routes}
""",
        env={"KEY": SANDBOX_KEY, "DISCORD_TOKEN": fd.TOKEN},
    )


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def fast_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DiscordAdapter, "guild_ready_timeout", 0.1)
    monkeypatch.setattr(DiscordAdapter, "start_timeout", 10.0)


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with fd.running_fake() as discord_fake:
        yield discord_fake


Bridge = Callable[..., Awaitable[BridgeApp]]


@pytest.fixture
async def bridge(emulator: Emulator, fake: FakeDiscord, tmp_path: Path) -> AsyncIterator[Bridge]:
    apps: list[BridgeApp] = []

    async def start(**kw: Any) -> BridgeApp:
        app = BridgeApp(make_settings(emulator.base_url, tmp_path / "state.db", **kw), grace=2)
        apps.append(app)
        await app.start()
        await fake.wait_ready()
        return app

    yield start
    for app in apps:
        if not app.stopped.is_set():
            await app.stop()


async def settled(app: BridgeApp) -> None:
    """The relay has nothing in flight: every answer and notice it meant to post is posted."""
    await eventually(lambda: not app.relay.in_flight, what="the relay to settle")


def chat_calls(emulator: Emulator) -> list[Any]:
    return [r for r in emulator.requests if r.path.endswith("/chat")]


def question_in(fake: FakeDiscord, channel: int, text: str = "asked while the bridge was down") -> dict[str, Any]:
    """A question that is on Discord but that the bridge never saw (no gateway event)."""
    question = fake.message_payload(channel, text, mention_bot=True)
    fake.messages[int(question["id"])] = question
    return question


def outbound(question: dict[str, Any], *parts: str, key: str, look_first: bool = False, **kw: Any) -> Outbound:
    conversation = Conversation("discord", str(fd.GUILD_ID), question["channel_id"], question["id"])
    return Outbound(conversation, parts, reply_to=question["id"], delivery=Delivery(key, look_first=look_first), **kw)


# --- nonces from the delivery key ---------------------------------------------------------------


async def test_a_resend_of_a_delivery_returns_the_same_messages(bridge: Bridge, fake: FakeDiscord) -> None:
    first = await bridge()
    question = question_in(fake, fd.GENERAL)
    thread = int(question["id"])
    ids = await first.adapters[0].send(outbound(question, "part one", "part two", key="job:1"))
    await first.stop()

    second = await bridge()  # after a crash: nothing remembered but the delivery
    assert await second.adapters[0].send(outbound(question, "part one", "part two", key="job:1")) == ids
    assert [p["content"] for p in fake.bot_posts(thread)] == ["part one", "part two"]
    nonces = [c.json["nonce"] for c in fake.rest("POST", rf"/channels/{thread}/messages")]
    assert all(0 < len(n) <= 25 for n in nonces) and nonces[:2] == nonces[2:] and nonces[0] != nonces[1]

    # Other deliveries with the same words in that thread ("I'm back" twice) are posts of their own.
    notice = Conversation("discord", str(fd.GUILD_ID), str(fd.GENERAL), question["id"])
    for key in ("notice:1", "notice:2"):
        await second.adapters[0].send(Outbound(notice, ("I'm back.",), OutboundKind.NOTICE, delivery=Delivery(key)))
    assert [p["content"] for p in fake.bot_posts(thread)] == ["part one", "part two", "I'm back.", "I'm back."]


async def test_after_the_nonce_window_the_parts_already_posted_are_found_in_the_thread(
    bridge: Bridge, fake: FakeDiscord
) -> None:
    first = await bridge()
    question = question_in(fake, fd.GENERAL)
    thread = int(question["id"])
    [one] = await first.adapters[0].send(outbound(question, "part one", key="job:2"))  # then the crash
    await first.stop()
    for message in fake.messages.values():
        message["nonce"] = None  # Discord forgets nonces after a few minutes
    second = await bridge()
    ids = await second.adapters[0].send(outbound(question, "part one", "part two", key="job:2", look_first=True))
    assert ids[0] == one and len(ids) == 2
    assert [p["content"] for p in fake.bot_posts(thread)] == ["part one", "part two"]  # part one not again


# --- where no thread can be made ------------------------------------------------------------------


async def test_without_thread_permission_the_answer_is_a_reply_in_the_channel(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator
) -> None:
    app = await bridge()
    await fake.revoke("create_public_threads")  # the bot's role lacks Create Public Threads
    question = await fake.user_message(fd.GENERAL, "first question about pricing", mention_bot=True)
    [answer] = await eventually(lambda: fake.bot_posts(fd.GENERAL), what="an answer in the channel")
    await settled(app)
    assert [p["content"] for p in fake.bot_posts()] == [answer["content"]]  # exactly once, no error notice
    assert "first question about pricing" in answer["content"]
    assert int(question["id"]) not in fake.threads
    [_refused] = fake.rest("POST", rf"/channels/{fd.GENERAL}/messages/{question['id']}/threads")
    [post] = fake.rest("POST", rf"/channels/{fd.GENERAL}/messages")
    assert str(post.json["message_reference"]["message_id"]) == question["id"]
    assert post.json["message_reference"]["fail_if_not_exists"] is False
    assert post.json["allowed_mentions"] == {"parse": [], "replied_user": False}

    # A reply to the answer, without a mention, continues the same conversation.
    follow_up = await fake.user_message(fd.GENERAL, "and the second one?", reply_to=int(answer["id"]))
    await eventually(lambda: len(fake.bot_posts(fd.GENERAL)) == 2, what="the follow-up's answer")
    await settled(app)
    second = fake.bot_posts(fd.GENERAL)[1]
    assert "first question about pricing" in second["content"]  # the chatbot remembered the thread
    assert str(second["message_reference"]["message_id"]) == follow_up["id"]
    first_call, second_call = chat_calls(emulator)
    assert first_call.json["session_id"] == second_call.json["session_id"]
    assert len(fake.bot_posts()) == 2


async def test_the_resend_of_a_reply_in_the_channel_is_deduped_too(bridge: Bridge, fake: FakeDiscord) -> None:
    app = await bridge()
    await fake.revoke("create_public_threads", channel=fd.GENERAL)  # one channel's overwrite
    question = question_in(fake, fd.GENERAL)
    ids = await app.adapters[0].send(outbound(question, "in the channel", key="job:1"))
    assert await app.adapters[0].send(outbound(question, "in the channel", key="job:1", look_first=True)) == ids
    assert [p["content"] for p in fake.bot_posts()] == ["in the channel"]


# --- permanent and temporary refusals -----------------------------------------------------------------


async def test_refusals_that_never_change_are_permanent(bridge: Bridge, fake: FakeDiscord) -> None:
    app = await bridge()
    adapter = app.adapters[0]
    # No thread and no posting in the channel either: the fallback fails too.
    await fake.revoke("create_public_threads", "send_messages", channel=fd.GENERAL)
    with pytest.raises(PermanentSendError, match="50013"):
        await adapter.send(outbound(question_in(fake, fd.GENERAL), "nowhere to go", key="job:1"))
    # The channel was deleted.
    gone = fake.message_payload(fd.ASK_ALL, "asked in a channel since deleted", mention_bot=True) | {
        "channel_id": "1299999999999999999"
    }
    with pytest.raises(PermanentSendError, match="10003"):
        await adapter.send(outbound(gone, "too late", key="job:2"))
    assert fake.bot_posts() == []


async def test_an_answer_no_channel_takes_is_explained_to_the_asker_in_a_dm(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator
) -> None:
    """Never silent: no thread, no reply in the channel either, so the asker gets a DM saying why."""
    app = await bridge()
    await fake.revoke("create_public_threads", "send_messages", channel=fd.GENERAL)
    await fake.user_message(fd.GENERAL, "a question the bot cannot answer here", mention_bot=True, author=fd.BOB)
    dms = await eventually(
        lambda: [p for p in fake.bot_posts() if fake.channels.get(int(p["channel_id"]), {}).get("type") == 1],
        what="the DM to the asker",
    )
    [dm] = dms
    assert dm["content"] == (
        f"I couldn't post my answer in <#{fd.GENERAL}>: I'm not allowed to post there. You can ask me here instead."
    )
    assert fake.channels[int(dm["channel_id"])]["recipients"][0]["id"] == str(fd.BOB)
    assert dm["mentions"] == [] and (await app.store.job_counts()).get(JobState.FAILED) == 1


@pytest.mark.parametrize(
    "fault",
    [
        dict(status=503),  # discord.py gives up on a 503 at once
        dict(status=429, headers={}),  # a 429 discord.py does not wait out (no Via header)
    ],
)
async def test_passing_trouble_is_not_permanent(bridge: Bridge, fake: FakeDiscord, fault: dict[str, Any]) -> None:
    app = await bridge()
    dm = Outbound(Conversation("discord", "", str(fd.DM_CHANNEL), ""), ("hello",), delivery=Delivery("job:1"))
    fake.inject(path=r"/messages$", method="POST", **fault)
    with pytest.raises(Exception) as failure:
        await app.adapters[0].send(dm)
    assert not isinstance(failure.value, PermanentSendError)
    # ... and a refusal for good is, in the same place.
    fake.inject(
        403, path=r"/messages$", method="POST", body={"message": "Cannot send messages to this user", "code": 50007}
    )
    with pytest.raises(PermanentSendError):
        await app.adapters[0].send(dm)


# --- check --live of a "*" route ----------------------------------------------------------------------


def check_settings(routes: str, *, threads: bool = True) -> config.Settings:
    return config.loads(
        f"""
insitechat: {{api_key: "${{KEY}}"}}
discord: {{token: "${{DISCORD_TOKEN}}", threads: {str(threads).lower()}}}
routes:
{routes}
""",
        env={"KEY": "ic_x", "DISCORD_TOKEN": fd.TOKEN},
    )


async def test_check_finds_a_missing_thread_permission_under_a_star_route(fake: FakeDiscord) -> None:
    routes = (
        f'  - {{platform: discord, channel: "{fd.ASK_ALL}", chatbot: {BOT}, threads: false}}\n'
        f'  - {{platform: discord, workspace: "{fd.GUILD_ID}", channel: "*", chatbot: {BOT}}}'
    )
    await fake.revoke("create_public_threads", channel=fd.GENERAL)
    assert await check(check_settings(routes)) == [
        f"routes[1].channel: in #general ({fd.GENERAL}) the bot lacks Create Public Threads",
    ]
    # Server-wide (the bot's role): one line, not one per channel; ask-the-bot has its own route.
    await fake.revoke("create_public_threads")
    assert await check(check_settings(routes)) == [
        f"routes[1].channel: in Discord server Test Server ({fd.GUILD_ID}) the bot's roles lack Create Public Threads, "
        "needed in 2 channel(s) it answers in; grant it to the bot's role",  # general and alerts; the forum needs none
    ]
    # Answering in place needs no thread permission.
    assert await check(check_settings(routes, threads=False)) == []
