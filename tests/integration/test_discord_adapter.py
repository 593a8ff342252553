"""The Discord adapter end to end: the real discord.py client, a fake Discord, the emulator, the whole BridgeApp."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from adapters.discord import DiscordAdapter, DiscordRefused
from bridge import config
from bridge.app import BridgeApp
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from bridge.messages import Conversation, Outbound
from bridge.relay import NOTICES, Outcome
from bridge.store.records import JobState
from tests.fakes import discord_api as fd
from tests.fakes.discord_api import FakeDiscord
from tests.fakes.outcomes import Outcomes

BOT = SANDBOX_CHATBOT_ID


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll until predicate() is truthy; fail with `what` after the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def outcomes() -> Outcomes:
    """How the relay ended each message, across every bridge a test starts."""
    return Outcomes()


async def turned_down(outcomes: Outcomes, *messages: dict[str, Any]) -> None:
    """Wait until the relay decided to ignore each message: only then does "nothing was posted" prove anything."""
    await outcomes.wait_all([m["id"] for m in messages], Outcome.IGNORED)


def make_settings(
    emulator_url: str, state: Path, *, intent: bool = True, threads: bool = True, extra_routes: str = ""
) -> config.Settings:
    return config.loads(
        f"""
insitechat: {{base_url: "{emulator_url}", api_key: "${{KEY}}"}}
state: {{sqlite: "{state}"}}
server: {{listen: "127.0.0.1:0"}}
discord: {{token: "${{DISCORD_TOKEN}}", message_content_intent: {str(intent).lower()}, threads: {str(threads).lower()}}}
routes:
  - {{platform: discord, chatbot: {BOT}, reply: mention}}
  - {{platform: discord, channel: "{fd.ASK_ALL}", chatbot: {BOT}, reply: all}}
  - {{platform: discord, channel: "{fd.FORUM}", chatbot: {BOT}, reply: all}}
{extra_routes}
""",
        env={"KEY": SANDBOX_KEY, "DISCORD_TOKEN": fd.TOKEN},
    )


@pytest.fixture(autouse=True)
def fast_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    # discord.py waits this long after the last GUILD_CREATE before it calls on_ready.
    monkeypatch.setattr(DiscordAdapter, "guild_ready_timeout", 0.1)
    monkeypatch.setattr(DiscordAdapter, "start_timeout", 10.0)



@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with fd.running_fake() as discord_fake:
        yield discord_fake


Bridge = Callable[..., Awaitable[BridgeApp]]


@pytest.fixture
async def bridge(emulator: Emulator, fake: FakeDiscord, tmp_path: Path, outcomes: Outcomes) -> AsyncIterator[Bridge]:
    """Starts a BridgeApp against the fakes; stops every app it started."""
    apps: list[BridgeApp] = []

    async def start(**kw: Any) -> BridgeApp:
        app = BridgeApp(make_settings(emulator.base_url, tmp_path / "state.db", **kw), grace=2)
        outcomes.watch(app.relay)
        apps.append(app)
        await app.start()
        await asyncio.wait_for(app.connected(), 15)  # the platforms connect in the background
        await fake.wait_ready()
        return app

    yield start
    for app in apps:
        if not app.stopped.is_set():
            await app.stop()


def chat_calls(emulator: Emulator) -> list[Any]:
    return [r for r in emulator.requests if r.path.endswith("/chat")]


def posts_in(fake: FakeDiscord, channel_id: int) -> list[dict[str, Any]]:
    return fake.bot_posts(channel_id)


# --- the conversation ---------------------------------------------------------------------


async def test_mention_creates_a_thread_and_answers_there(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator
) -> None:
    await bridge()
    question = await fake.user_message(fd.GENERAL, "What is the refund policy?", mention_bot=True)
    qid = int(question["id"])
    [answer] = await eventually(lambda: posts_in(fake, qid), what="an answer in the thread")
    [created] = fake.rest("POST", rf"/channels/{fd.GENERAL}/messages/{qid}/threads")
    assert created.json["name"] == "What is the refund policy?"
    assert "refund policy" in answer["content"]
    assert posts_in(fake, fd.GENERAL) == []  # nothing in the channel itself
    [call] = chat_calls(emulator)
    assert call.json["message"] == "What is the refund policy?"  # the mention is not part of the question
    # The thread opens as the bot starts on the answer, and the typing shows in it, where the answer lands.
    assert fake.rest("POST", rf"/channels/{fd.GENERAL}/typing") == []
    order = [c for c in fake.calls if c.method == "POST"]
    opened, typing = order.index(created), order.index(fake.rest("POST", rf"/channels/{qid}/typing")[0])
    assert opened < typing < order.index(fake.rest("POST", rf"/channels/{qid}/messages")[0])
    [post] = fake.rest("POST", rf"/channels/{qid}/messages")
    assert post.json["allowed_mentions"] == {"parse": []}
    assert post.json["enforce_nonce"] is True and 0 < len(post.json["nonce"]) <= 25


async def test_the_question_does_not_wait_for_the_typing_indicator_but_the_answer_does(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator
) -> None:
    app = await bridge()
    fake.hang(path=r"/typing$", method="POST")  # Discord shows the typing, its answer is slow to come
    question = await fake.user_message(fd.GENERAL, "What is the refund policy?", mention_bot=True)
    qid = int(question["id"])
    # The question reached InsiteChat while the typing request was still on its way...
    await eventually(lambda: chat_calls(emulator), what="the question at InsiteChat before the typing's answer")
    assert fake.rest("POST", rf"/channels/{qid}/typing")
    # ...and its answer is stored, but not posted before the typing: it would show after the answer.
    for _ in range(250):
        if (await app.store.job_counts()).get(JobState.ANSWERED):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the answer was never stored")
    await asyncio.sleep(0.2)  # time enough for a post that did not wait to reach the fake
    assert posts_in(fake, qid) == []
    fake.release()
    await eventually(lambda: posts_in(fake, qid), what="the answer once the typing was sent")


async def test_follow_up_in_the_thread_needs_no_mention(bridge: Bridge, fake: FakeDiscord, emulator: Emulator) -> None:
    await bridge()
    question = await fake.user_message(fd.GENERAL, "first question about pricing", mention_bot=True)
    thread = int(question["id"])
    await eventually(lambda: posts_in(fake, thread), what="the first answer")
    await fake.user_message(thread, "and the second one?")
    answers = await eventually(
        lambda: len(posts_in(fake, thread)) == 2 and posts_in(fake, thread), what="the follow-up answer"
    )
    assert "second one" in answers[1]["content"] and "first question about pricing" in answers[1]["content"]
    first, second = chat_calls(emulator)
    assert first.json["session_id"] == second.json["session_id"]  # one session per thread
    assert fake.rest("POST", rf"/channels/{thread}/typing"), "typing shown in the thread"
    assert len(fake.rest("POST", r"/channels/\d+/messages/\d+/threads")) == 1


async def test_thread_messages_for_someone_else_or_marked_are_ignored(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator, outcomes: Outcomes
) -> None:
    await bridge()
    question = await fake.user_message(fd.GENERAL, "question", mention_bot=True)
    thread = int(question["id"])
    await eventually(lambda: posts_in(fake, thread), what="the first answer")
    ignored = [
        await fake.user_message(thread, f"<@{fd.BOB}> what do you think?", mentions=(fd.BOB,)),
        await fake.user_message(thread, "!note to self"),
        await fake.user_message(fd.GENERAL, "chatting in the channel without a mention"),
    ]
    await turned_down(outcomes, *ignored)
    assert len(chat_calls(emulator)) == 1 and len(fake.bot_posts()) == 1


async def test_dm_is_answered_in_the_dm(bridge: Bridge, fake: FakeDiscord, emulator: Emulator) -> None:
    await bridge()
    await fake.user_message(fd.DM_CHANNEL, "hello from a DM", dm=True)
    [answer] = await eventually(lambda: posts_in(fake, fd.DM_CHANNEL), what="a DM answer")
    assert "hello from a DM" in answer["content"]
    assert fake.rest("POST", r"/channels/\d+/messages/\d+/threads") == []
    [post] = fake.rest("POST", rf"/channels/{fd.DM_CHANNEL}/messages")
    assert "message_reference" not in post.json and post.json["allowed_mentions"] == {"parse": []}


async def test_all_channel_answers_without_mention(bridge: Bridge, fake: FakeDiscord) -> None:
    await bridge()
    question = await fake.user_message(fd.ASK_ALL, "anyone know the opening hours?")
    [answer] = await eventually(lambda: posts_in(fake, int(question["id"])), what="an answer in a new thread")
    assert "opening hours" in answer["content"]


async def test_forum_post_is_answered_in_its_own_thread(bridge: Bridge, fake: FakeDiscord) -> None:
    await bridge()
    post = await fake.forum_post("Login broken", "I cannot log in since yesterday")
    thread = int(post["id"])
    [answer] = await eventually(lambda: posts_in(fake, thread), what="an answer in the forum post")
    assert "cannot log in" in answer["content"]
    assert fake.rest("POST", r"/channels/\d+/messages/\d+/threads") == []  # the post is already a thread
    await fake.user_message(thread, "still broken after a restart")
    await eventually(lambda: len(posts_in(fake, thread)) == 2, what="the follow-up in the post")


async def test_bots_and_own_messages_are_ignored(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator, outcomes: Outcomes
) -> None:
    await bridge()
    other_bot = await fake.user_message(fd.GENERAL, "hey bot, answer me", author=fd.OTHER_BOT, mention_bot=True)
    webhook = await fake.user_message(fd.DM_CHANNEL, "a webhook post", dm=True, webhook_id=77)
    question = await fake.user_message(fd.GENERAL, "a real question", mention_bot=True)
    thread = int(question["id"])
    await eventually(lambda: posts_in(fake, thread), what="the answer")
    # The fake delivers the bot's own answer back over the gateway, in a thread it follows.
    itself = await fake.user_message(thread, "the bot talking to itself", author=fd.BOT_ID)
    await turned_down(outcomes, other_bot, webhook, itself)
    assert len(chat_calls(emulator)) == 1 and len(fake.rest("POST", r"/channels/\d+/messages")) == 1


async def test_reconnect_replaying_a_message_gives_one_answer(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator, outcomes: Outcomes
) -> None:
    await bridge()
    question = await fake.user_message(fd.GENERAL, "only once please", mention_bot=True)
    await eventually(lambda: posts_in(fake, int(question["id"])), what="the answer")
    await fake.force_reconnect(replay=[question])
    await fake.wait_ready()
    await outcomes.wait_for(question["id"], Outcome.DUPLICATE)  # the replay reached the relay
    assert len(fake.resumes) == 1 and len(fake.identifies) == 1  # a real RESUME, not a new session
    assert len(chat_calls(emulator)) == 1 and len(fake.bot_posts()) == 1


async def test_restart_replaying_a_message_gives_one_answer(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator, outcomes: Outcomes
) -> None:
    first = await bridge()
    question = await fake.user_message(fd.GENERAL, "answer me once across restarts", mention_bot=True)
    await eventually(lambda: posts_in(fake, int(question["id"])), what="the answer")
    await first.stop()
    await bridge()  # a new process over the same state file
    await fake.dispatch("MESSAGE_CREATE", question)
    await outcomes.wait_for(question["id"], Outcome.DUPLICATE)  # the redelivery reached the new relay
    assert len(fake.identifies) == 2
    assert len(chat_calls(emulator)) == 1 and len(fake.bot_posts()) == 1


async def test_long_answer_is_split_in_order_with_code_fences_intact(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator
) -> None:
    code = "\n".join(f"    step_{i:03d} = compute({i})  # keep this line whole" for i in range(60))
    prose = " ".join(f"Sentence number {i} explains the setup in some detail." for i in range(70))
    answer = f"{prose}\n\n```python\n{code}\n```\n\n{prose}\n\n```\n{code}\n```\nThe end."
    assert len(answer) > 7000
    emulator.script_reply(None, "long answer", answer)
    await bridge()
    question = await fake.user_message(fd.GENERAL, "give me the long answer", mention_bot=True)
    thread = int(question["id"])
    await eventually(
        lambda: posts_in(fake, thread) and posts_in(fake, thread)[-1]["content"].endswith("The end."), what="all parts"
    )
    parts = [p["content"] for p in posts_in(fake, thread)]
    assert len(parts) >= 4 and all(len(p) <= 2000 for p in parts)
    for part in parts:
        assert part.count("```") % 2 == 0, "every part opens and closes its own code fence"
    lines = [ln.strip() for p in parts for ln in p.splitlines() if "step_" in ln]
    assert lines == [f"step_{i:03d} = compute({i})  # keep this line whole" for i in range(60)] * 2
    nonces = [c.json["nonce"] for c in fake.rest("POST", rf"/channels/{thread}/messages")]
    assert len(set(nonces)) == len(parts)


async def test_hostile_answer_cannot_ping_anyone(bridge: Bridge, fake: FakeDiscord, emulator: Emulator) -> None:
    emulator.script_reply(None, "ping", f"@everyone @here look <@{fd.BOB}> and <@&{fd.BOT_ROLE_ID}>!")
    await bridge()
    question = await fake.user_message(fd.GENERAL, "ping them", mention_bot=True)
    thread = int(question["id"])
    await eventually(lambda: posts_in(fake, thread), what="the answer")
    [post] = fake.rest("POST", rf"/channels/{thread}/messages")
    assert post.json["allowed_mentions"] == {"parse": []}
    assert "@everyone" not in post.json["content"] and f"<@{fd.BOB}>" not in post.json["content"]


async def test_rate_limited_post_is_retried(bridge: Bridge, fake: FakeDiscord) -> None:
    await bridge()
    fake.inject(429, path=r"/messages$", method="POST", retry_after=0.05)
    question = await fake.user_message(fd.GENERAL, "busy day?", mention_bot=True)
    thread = int(question["id"])
    [answer] = await eventually(lambda: posts_in(fake, thread), what="the answer after the 429")
    assert len(fake.rest("POST", rf"/channels/{thread}/messages")) == 2  # refused once, then posted
    assert "busy day" in answer["content"]


async def test_a_failed_post_is_retried_and_the_answer_arrives_once(bridge: Bridge, fake: FakeDiscord) -> None:
    await bridge()
    fake.inject(400, path=r"/messages$", method="POST", body={"message": "Invalid Form Body", "code": 50035})
    question = await fake.user_message(fd.GENERAL, "this answer will fail once", mention_bot=True)
    thread = int(question["id"])
    [answer] = await eventually(lambda: posts_in(fake, thread), what="the answer, posted by the outbox's retry")
    assert "this answer will fail once" in answer["content"]  # the answer itself, not an error notice
    assert all(NOTICES["error"] not in p["content"] for p in posts_in(fake, thread))


# --- slash commands -------------------------------------------------------------------------


def followups(fake: FakeDiscord, interaction: dict[str, Any]) -> list[Any]:
    return fake.rest("POST", rf"/webhooks/{fd.APP_ID}/{interaction['token']}")


async def test_slash_ask_is_deferred_then_answered_by_followup(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator
) -> None:
    await bridge()
    assert [c["name"] for c in fake.commands] == ["ask", "reset"]  # synced at start
    assert [o["name"] for o in fake.commands[0]["options"]] == ["question"]
    interaction = await fake.slash("ask", {"question": "What are your opening hours?"})
    [followup] = await eventually(lambda: followups(fake, interaction), what="the followup answer")
    [callback] = fake.rest("POST", rf"/interactions/{interaction['id']}/{interaction['token']}/callback")
    assert callback.json["type"] == 5  # deferred "thinking", sent before the chatbot was asked
    assert fake.calls.index(callback) < fake.calls.index(followup)
    assert "opening hours" in followup.json["content"]
    assert followup.json["allowed_mentions"] == {"parse": []}
    assert chat_calls(emulator)[0].json["message"] == "What are your opening hours?"


async def test_slash_commands_in_a_thread_continue_and_reset_its_session(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator
) -> None:
    await bridge()
    question = await fake.user_message(fd.GENERAL, "remember the word pineapple", mention_bot=True)
    thread = int(question["id"])
    await eventually(lambda: posts_in(fake, thread), what="the first answer")
    asked = await fake.slash("ask", {"question": "which word?"}, channel_id=thread)
    [answer] = await eventually(lambda: followups(fake, asked), what="the /ask answer")
    assert "pineapple" in answer.json["content"]  # same InsiteChat session as the thread
    reset = await fake.slash("reset", channel_id=thread)
    [notice] = await eventually(lambda: followups(fake, reset), what="the /reset notice")
    assert notice.json["content"] == NOTICES["reset"]
    await fake.user_message(thread, "which word now?")
    await eventually(lambda: len(chat_calls(emulator)) == 3, what="the question after the reset")
    sessions = [c.json["session_id"] for c in chat_calls(emulator)]
    assert sessions[0] == sessions[1] != sessions[2]


async def test_slash_reset_in_a_channel_says_where_reset_works(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator
) -> None:
    """/reset outside a thread or DM has no conversation to reset: say how, only to the person, as Slack does."""
    await bridge()
    reset = await fake.slash("reset", channel_id=fd.GENERAL)
    callback_path = rf"/interactions/{reset['id']}/{reset['token']}/callback"
    [callback] = await eventually(lambda: fake.rest("POST", callback_path), what="the answer to /reset")
    assert callback.json["type"] == 4 and callback.json["data"]["flags"] & 64  # at once, only to them
    assert "reply `reset` in the thread" in callback.json["data"]["content"]
    assert NOTICES["reset"] not in callback.json["data"]["content"] and followups(fake, reset) == []
    assert chat_calls(emulator) == []


async def test_slash_commands_use_the_configured_names(
    emulator: Emulator, fake: FakeDiscord, tmp_path: Path
) -> None:
    settings = make_settings(emulator.base_url, tmp_path / "s.db")
    commands = {"ask_command": "question", "reset_command": "forget"}
    settings = settings.model_copy(update={"discord": settings.discord.model_copy(update=commands)})  # type: ignore[union-attr]
    app = BridgeApp(settings, grace=1)
    await app.start()
    await asyncio.wait_for(app.connected(), 15)  # the platforms connect in the background
    try:
        assert [c["name"] for c in fake.commands] == ["question", "forget"]
        interaction = await fake.slash("question", {"question": "renamed?"}, dm=True)
        await eventually(lambda: followups(fake, interaction), what="the answer to the renamed command")
    finally:
        await app.stop()


# --- start-up problems and intents ------------------------------------------------------------


async def test_missing_intent_in_the_portal_gives_a_clear_error(emulator: Emulator, tmp_path: Path) -> None:
    async with fd.running_fake(message_content_allowed=False) as fake:
        app = BridgeApp(make_settings(emulator.base_url, tmp_path / "s.db", intent=True), grace=1)
        await app.start()
        with pytest.raises(DiscordRefused) as failure:
            await asyncio.wait_for(app.connected(), 15)
        # Refused at start: the bridge asks to be stopped, with the reason, and tries no more.
        assert app.stopped.is_set() and app.failure == f"discord: {failure.value}"
        assert len(fake.identifies) == 1
        await app.stop()
    message = str(failure.value)
    assert "Message Content Intent" in message and "discord.message_content_intent: false" in message
    assert fd.TOKEN not in message


async def test_bad_token_gives_a_plain_error(emulator: Emulator, tmp_path: Path) -> None:
    async with fd.running_fake(token=fd.make_token(fd.BOT_ID, "the-real-one")) as fake:
        app = BridgeApp(make_settings(emulator.base_url, tmp_path / "s.db"), grace=1)
        await app.start()
        with pytest.raises(DiscordRefused) as failure:
            await asyncio.wait_for(app.connected(), 15)
        assert app.stopped.is_set() and app.failure == f"discord: {failure.value}"
        await app.stop()
        assert fake.identifies == []  # refused at login, before the gateway
        assert len(fake.rest("GET", r"/users/@me")) == 1  # and not asked again
    assert "refused the bot token (discord.token)" in str(failure.value)
    assert fd.TOKEN not in str(failure.value)


async def test_without_the_intent_it_degrades_and_says_so(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator, outcomes: Outcomes, caplog: pytest.LogCaptureFixture
) -> None:
    await bridge(intent=False)
    assert fake.identifies[0]["intents"] & fd.MESSAGE_CONTENT_INTENT == 0
    # The operator's warning is the product here: the log is where the bridge says it degraded.
    assert "without the Message Content intent" in caplog.text
    question = await fake.user_message(fd.GENERAL, "mentions still carry text", mention_bot=True)
    thread = int(question["id"])
    [answer] = await eventually(lambda: posts_in(fake, thread), what="the answer to a mention")
    assert "mentions still carry text" in answer["content"]
    # Discord blanks these without the intent: never an answer, and no "Hi!" to an empty shell.
    follow_up = await fake.user_message(thread, "a follow-up without a mention")
    await outcomes.wait_for(follow_up["id"], Outcome.NOTICE)
    [_, hint] = posts_in(fake, thread)  # the asker is told once how to go on in this thread
    assert hint["content"] == NOTICES["withheld"]
    again = await fake.user_message(thread, "another one without a mention")
    elsewhere = await fake.user_message(fd.ASK_ALL, "a message in a reply: all channel")
    await outcomes.wait_for(again["id"], Outcome.IGNORED)
    await outcomes.wait_for(elsewhere["id"], Outcome.IGNORED)
    later = await fake.user_message(fd.GENERAL, "a mention after them", mention_bot=True)
    await outcomes.wait_for(later["id"], Outcome.ANSWERED)
    assert len(chat_calls(emulator)) == 2 and len(fake.bot_posts()) == 3  # two answers and the one hint


# --- threads off, re-sends, typing --------------------------------------------------------------


async def test_threads_off_replies_in_place_and_replies_continue_the_conversation(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator
) -> None:
    await bridge(threads=False)
    question = await fake.user_message(fd.GENERAL, "first question about pricing", mention_bot=True)
    [answer] = await eventually(lambda: posts_in(fake, fd.GENERAL), what="an answer in the channel")
    assert fake.rest("POST", r"/channels/\d+/messages/\d+/threads") == []
    [post] = fake.rest("POST", rf"/channels/{fd.GENERAL}/messages")
    assert str(post.json["message_reference"]["message_id"]) == question["id"]
    assert post.json["allowed_mentions"] == {"parse": [], "replied_user": False}
    # A platform reply to the bot's answer, without a mention, continues that conversation.
    await fake.user_message(fd.GENERAL, "and the second one?", reply_to=int(answer["id"]))
    answers = await eventually(
        lambda: len(posts_in(fake, fd.GENERAL)) == 2 and posts_in(fake, fd.GENERAL), what="the reply's answer"
    )
    assert "first question about pricing" in answers[1]["content"]
    first, second = chat_calls(emulator)
    assert first.json["session_id"] == second.json["session_id"]


async def test_a_route_can_turn_threads_off(bridge: Bridge, fake: FakeDiscord) -> None:
    route = f'  - {{platform: discord, channel: "{fd.GENERAL}", chatbot: {BOT}, reply: mention, threads: false}}'
    await bridge(extra_routes=route)
    await fake.user_message(fd.GENERAL, "in place please", mention_bot=True)
    await eventually(lambda: posts_in(fake, fd.GENERAL), what="an answer in place")
    assert fake.rest("POST", r"/channels/\d+/messages/\d+/threads") == []


async def test_resend_after_a_crash_reuses_the_thread_and_the_nonce(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator
) -> None:
    first = await bridge()
    question = fake.message_payload(fd.GENERAL, "asked just before the crash", mention_bot=True)
    fake.messages[int(question["id"])] = question  # posted while the bridge was down
    outbound = Outbound(
        Conversation("discord", str(fd.GUILD_ID), str(fd.GENERAL), question["id"]),
        ("part one", "part two"),
        reply_to=question["id"],
    )
    ids = await first.adapters[0].send(outbound)
    await first.stop()
    second = await bridge()
    assert await second.adapters[0].send(outbound) == ids  # Discord returned the same messages
    assert [p["content"] for p in posts_in(fake, int(question["id"]))] == ["part one", "part two"]
    nonces = [c.json["nonce"] for c in fake.rest("POST", rf"/channels/{question['id']}/messages")]
    assert len(nonces) == 4 and nonces[:2] == nonces[2:]


async def test_a_thread_made_meanwhile_is_reused(bridge: Bridge, fake: FakeDiscord) -> None:
    app = await bridge()
    question = fake.message_payload(fd.GENERAL, "someone opened a thread on this", mention_bot=True)
    qid = int(question["id"])
    fake.messages[qid] = question
    fake.threads[qid] = fake._thread_payload(qid, fd.GENERAL, "their thread", owner=fd.ALICE)  # event missed
    outbound = Outbound(
        Conversation("discord", str(fd.GUILD_ID), str(fd.GENERAL), str(qid)), ("answer",), reply_to=str(qid)
    )
    await app.adapters[0].send(outbound)
    assert len(fake.rest("POST", rf"/channels/{fd.GENERAL}/messages/{qid}/threads")) == 1  # refused: 160004
    assert [p["content"] for p in posts_in(fake, qid)] == ["answer"]


async def test_a_slash_command_that_cannot_be_stored_is_told_so(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator, tmp_path: Path
) -> None:
    # Discord never sends an interaction again: a job the store refuses must not leave the
    # deferred "thinking" reply hanging with only a log line to show for it.
    await bridge()
    blocker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock: the job waits 5 s, then fails
    try:
        interaction = await fake.slash("ask", {"question": "Is anyone there?"})
        [followup] = await eventually(lambda: followups(fake, interaction), timeout=15, what="the notice")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    [callback] = fake.rest("POST", rf"/interactions/{interaction['id']}/{interaction['token']}/callback")
    assert callback.json["type"] == 5  # deferred in time, before the store gave up
    assert followup.json["content"] == NOTICES["not_stored"]
    assert chat_calls(emulator) == []
