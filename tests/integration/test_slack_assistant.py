"""Slack's assistant view and the status signal: real Bolt and slack_sdk against the fake Slack and the emulator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from adapters.slack.assistant import NOT_SERVED, thread_title
from bridge import config
from bridge.app import BridgeApp
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from bridge.relay import Outcome
from tests.fakes.outcomes import Outcomes
from tests.fakes.slack_api import ALL_SCOPES, APP_TOKEN, BOT_TOKEN, SIGNING_SECRET, FakeSlack, payload
from tests.integration.test_slack import Bridge, chat_calls, settle

DM = "D0ALICE"
STATUS = "is looking it up…"
LOADING = ["Searching the knowledge base…", "Writing an answer…"]
ASSISTANT = f"""
  assistant:
    greeting: "Hi! I answer from the **help centre**."
    prompts_title: Popular questions
    status: "{STATUS}"
    loading_messages: {LOADING}
"""
PROMPTS = [
    {"title": "Refunds", "message": "What is your refund policy?"},
    {"title": "Passwords", "message": "How do I reset my password?"},
]
DM_ROUTE = f"  - {{platform: slack, channel: dm, chatbot: {SANDBOX_CHATBOT_ID}}}"


def assistant_settings(
    emulator: Emulator,
    slack: FakeSlack,
    state: Path,
    *,
    assistant: str = ASSISTANT,
    dm_route: str = DM_ROUTE,
    mode: str = "http",
    redis: tuple[str, str] | None = None,
) -> config.Settings:
    prompts = "\n".join(f"      - {{title: {p['title']}, message: \"{p['message']}\"}}" for p in PROMPTS)
    # Replicas on one Redis (url, prefix), else a SQLite file of this bridge's own.
    state_line = f'{{redis_url: "${{REDIS_URL}}", redis_prefix: "{redis[1]}"}}' if redis else f'{{sqlite: "{state}"}}'
    return config.loads(
        f"""
insitechat:
  base_url: {emulator.base_url}
  api_key: ${{IC_KEY}}
chatbots:
  - id: {SANDBOX_CHATBOT_ID}
    suggested_prompts:
{prompts}
state: {state_line}
server: {{listen: "127.0.0.1:0"}}
slack:
  bot_token: ${{SLACK_BOT_TOKEN}}
  signing_secret: ${{SLACK_SIGNING_SECRET}}
  app_token: ${{SLACK_APP_TOKEN}}
  mode: {mode}
  api_url: {slack.api_url}
{assistant}
routes:
  - {{platform: slack, channel: C0GENERAL, chatbot: {SANDBOX_CHATBOT_ID}, reply: mention}}
  - {{platform: slack, channel: C0OTHER, chatbot: {SANDBOX_CHATBOT_ID}, reply: mention}}
{dm_route}
""",
        env={
            "IC_KEY": SANDBOX_KEY,
            "SLACK_BOT_TOKEN": BOT_TOKEN,
            "SLACK_APP_TOKEN": APP_TOKEN,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            **({"REDIS_URL": redis[0]} if redis else {}),
        },
    )


@pytest.fixture
def outcomes() -> Outcomes:
    return Outcomes()


@pytest.fixture
async def start_bridge(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path, outcomes: Outcomes
) -> AsyncIterator[Callable[..., Awaitable[Bridge]]]:
    running: list[Bridge] = []

    async def start(**kw: Any) -> Bridge:
        app = BridgeApp(assistant_settings(emulator, slack, tmp_path / "state.db", **kw), grace=2)
        outcomes.watch(app.relay)
        await app.start()
        await asyncio.wait_for(app.connected(), 15)
        bridge = Bridge(app)
        running.append(bridge)
        return bridge

    yield start
    for bridge in running:
        await bridge.close()


@pytest.fixture(autouse=True)
def assistant_scope(slack: FakeSlack) -> None:
    """The app as the manifest makes it with slack.assistant on."""
    slack.scopes = ALL_SCOPES + ",assistant:write"


def now_ts(offset: float = 0.0) -> str:
    """A message ts of now: posted while the bridge runs (older ones may carry a dead run's reaction)."""
    return f"{time.time() + offset:.6f}"


def question_in(thread: str, text: str = "What is the refund policy for annual plans?") -> dict[str, Any]:
    return payload("message_im_assistant_thread", ts=now_ts(), thread_ts=thread, text=text)


def mention(channel: str = "C0GENERAL", text: str = "<@UBOT> what is the refund policy?") -> dict[str, Any]:
    return payload("app_mention", channel=channel, ts=now_ts(), text=text)


def reaction_calls(slack: FakeSlack) -> list[str]:
    return [c.method for c in slack.calls if c.method.startswith("reactions.")]


def status_calls(slack: FakeSlack) -> list[dict[str, Any]]:
    return [c.args for c in slack.calls_to("assistant.threads.setStatus")]


# --- the thread opens -------------------------------------------------------------------------


async def test_a_new_assistant_thread_is_greeted_with_the_dm_chatbots_prompts(start_bridge, slack: FakeSlack) -> None:
    bridge = await start_bridge()
    thread = now_ts()
    status, _ = await bridge.post_event(slack.assistant_thread(DM, thread))
    assert status == 200
    await slack.wait_for(lambda: (DM, thread) in slack.suggested)
    [greeting] = [p for p in slack.posts if p.get("thread_ts") == thread]
    assert greeting["channel"] == DM and greeting["text"] == "Hi! I answer from the *help centre*."
    assert slack.suggested[(DM, thread)] == {"title": "Popular questions", "prompts": PROMPTS}
    offered = ("chat.postMessage", "assistant.threads.setSuggestedPrompts")
    assert [c.method for c in slack.calls if c.method in offered] == list(offered)  # greeted, then offered
    # Opening a thread is not a question: nothing asked, no working signal, no title.
    assert slack.calls_to("assistant.threads.setStatus") == [] and slack.titles == {}


async def test_over_socket_mode_the_thread_is_greeted_and_its_question_answered_in_it(
    start_bridge, slack: FakeSlack, outcomes: Outcomes
) -> None:
    await start_bridge(mode="socket")
    thread = now_ts(-5)
    opened = await slack.send_envelope(slack.assistant_thread(DM, thread))
    await asyncio.wait_for(opened.acked.wait(), 5)
    await slack.wait_for(lambda: (DM, thread) in slack.suggested)
    question = question_in(thread)
    await slack.send_envelope(question)
    await outcomes.wait_for(question["event"]["ts"], Outcome.ANSWERED)
    assert [p.get("thread_ts") for p in slack.posts] == [thread, thread]  # the greeting, the answer
    assert len(slack.calls_to("assistant.threads.setStatus")) == 1
    await slack.wait_for(lambda: slack.titles)


async def test_without_a_dm_route_where_it_opens_the_thread_says_so_and_offers_nothing(
    start_bridge, slack: FakeSlack, emulator: Emulator
) -> None:
    elsewhere = f"  - {{platform: slack, workspace: T0ELSEWHERE, channel: dm, chatbot: {SANDBOX_CHATBOT_ID}}}"
    bridge = await start_bridge(dm_route=elsewhere)
    thread = now_ts()
    await bridge.post_event(slack.assistant_thread(DM, thread))
    await slack.wait_for(lambda: [p for p in slack.posts if p.get("thread_ts") == thread])
    await settle(bridge)
    assert [p["text"] for p in slack.posts] == [NOT_SERVED]
    assert slack.calls_to("assistant.threads.setSuggestedPrompts") == []
    assert chat_calls(emulator) == []


async def test_context_changes_are_acknowledged_and_ignored(start_bridge, slack: FakeSlack) -> None:
    bridge = await start_bridge()
    before = len(slack.calls)
    status, _ = await bridge.post_event(payload("assistant_thread_context_changed"))
    assert status == 200  # acknowledged: Slack must not retry it
    await settle(bridge)
    assert slack.calls[before:] == []


# --- a question: status, answer, title ---------------------------------------------------------


async def test_a_question_shows_the_status_then_the_answer_clears_it_and_names_the_thread(
    start_bridge, slack: FakeSlack, emulator: Emulator, outcomes: Outcomes
) -> None:
    bridge = await start_bridge()
    thread = now_ts(-5)
    await bridge.post_event(slack.assistant_thread(DM, thread))
    await slack.wait_for(lambda: (DM, thread) in slack.suggested)
    first = question_in(thread)
    await bridge.post_event(first)
    await outcomes.wait_for(first["event"]["ts"], Outcome.ANSWERED)
    await settle(bridge)

    [shown] = slack.calls_to("assistant.threads.setStatus")
    assert shown.args == {"channel_id": DM, "thread_ts": thread, "status": STATUS, "loading_messages": LOADING}
    assert len(chat_calls(emulator)) == 1
    [answer] = [p for p in slack.posts if "refund" in str(p["text"]).lower()]
    assert (answer["channel"], answer["thread_ts"]) == (DM, thread)
    assert slack.statuses == {}  # Slack cleared it when the answer was posted: no second call needed
    await slack.wait_for(lambda: slack.titles)
    assert slack.titles == {(DM, thread): "What is the refund policy for annual plans?"}
    assert reaction_calls(slack) == []

    second = question_in(thread, "And for monthly plans?")
    await bridge.post_event(second)
    await outcomes.wait_for(second["event"]["ts"], Outcome.ANSWERED)
    await settle(bridge)
    await slack.wait_for(lambda: len(slack.calls_to("assistant.threads.setStatus")) == 2)
    # One status call per answer, none to clear it; the thread keeps its first title.
    assert [c["status"] for c in status_calls(slack)] == [STATUS, STATUS]
    assert len(slack.calls_to("assistant.threads.setTitle")) == 1
    assert slack.titles == {(DM, thread): "What is the refund policy for annual plans?"}
    assert reaction_calls(slack) == [] and slack.statuses == {}


@pytest.mark.parametrize("assistant_on", [True, False])
async def test_each_assistant_thread_is_a_chat_of_its_own_and_a_plain_dm_thread_is_not(
    start_bridge, slack: FakeSlack, emulator: Emulator, outcomes: Outcomes, assistant_on: bool
) -> None:
    # With the assistant view every DM thread is a new chat (as Bolt's Assistant sees them): a
    # second thread must not continue the first one's InsiteChat session. Without it, a DM is
    # one conversation and a thread in it continues it, as before.
    bridge = await start_bridge(**({} if assistant_on else {"assistant": ""}))
    first, second = now_ts(-10), now_ts(-5)
    sent = [
        question_in(first, "What is the refund policy?"),
        question_in(second, "Do you ship to Canada?"),
        question_in(first, "And for annual plans?"),
        payload("message_im", ts=now_ts(), text="Who are you?"),  # top level
    ]
    for event in sent:
        await bridge.post_event(event)
        await outcomes.wait_for(event["event"]["ts"], Outcome.ANSWERED)
    await settle(bridge)
    first_a, second_a, first_b, top = (call.json["session_id"] for call in chat_calls(emulator))
    if assistant_on:
        assert first_a == first_b and len({first_a, second_a, top}) == 3
    else:
        assert first_a == second_a == first_b == top


async def test_a_status_slack_takes_only_after_the_answer_is_cleared_by_the_bridge(
    start_bridge, slack: FakeSlack, outcomes: Outcomes
) -> None:
    # The status is set beside the question, not before it. When its answer comes only after
    # the answer's post, the bridge cannot know whether Slack took it before that post (which
    # cleared it) or after (then it would stay for two minutes): it clears it itself.
    bridge = await start_bridge()
    thread = now_ts(-5)
    held = slack.hang_after("assistant.threads.setStatus")  # takes effect at once, its answer held back
    question = question_in(thread)
    await bridge.post_event(question)
    await outcomes.wait_for(question["event"]["ts"], Outcome.ANSWERED)
    assert held.hung == 1 and len(status_calls(slack)) == 1  # answered while the status call waits
    slack.release()
    await slack.wait_for(lambda: len(status_calls(slack)) == 2)
    await settle(bridge)
    assert [c["status"] for c in status_calls(slack)] == [STATUS, ""] and slack.statuses == {}


async def test_the_echo_of_the_greeting_does_not_name_the_thread(
    start_bridge, slack: FakeSlack, outcomes: Outcomes
) -> None:
    """Slack sends the bot's own greeting back as a message.im in the thread, before any question."""
    bridge = await start_bridge()
    thread = now_ts(-5)
    await bridge.post_event(slack.assistant_thread(DM, thread))
    await slack.wait_for(lambda: (DM, thread) in slack.suggested)
    echo = payload("message_from_self", channel=DM, channel_type="im", thread_ts=thread, ts=now_ts(-4))
    assert (await bridge.post_event(echo))[0] == 200
    question = question_in(thread, "How do I reset my password?")
    await bridge.post_event(question)
    await outcomes.wait_for(question["event"]["ts"], Outcome.ANSWERED)
    await settle(bridge)
    await slack.wait_for(lambda: slack.titles)
    assert slack.titles == {(DM, thread): "How do I reset my password?"}


async def test_a_thread_opened_on_one_replica_is_named_by_the_replica_its_first_question_reaches(
    start_bridge, slack: FakeSlack, outcomes: Outcomes, redis_url: str, redis_prefix: str
) -> None:
    # Slack sends each event to one of an app's connections: with replicas, the thread's opening
    # and its first question often reach different ones.
    here = await start_bridge(redis=(redis_url, redis_prefix))
    there = await start_bridge(redis=(redis_url, redis_prefix))
    thread = now_ts(-5)
    await here.post_event(slack.assistant_thread(DM, thread))
    await slack.wait_for(lambda: (DM, thread) in slack.suggested)
    first = question_in(thread)
    await there.post_event(first)
    await outcomes.wait_for(first["event"]["ts"], Outcome.ANSWERED)
    await settle(there)
    await slack.wait_for(lambda: slack.titles)
    assert slack.titles == {(DM, thread): "What is the refund policy for annual plans?"}
    for bridge, text in ((here, "And for monthly plans?"), (there, "Can I pause instead?")):
        later = question_in(thread, text)
        await bridge.post_event(later)
        await outcomes.wait_for(later["event"]["ts"], Outcome.ANSWERED)
        await settle(bridge)
    assert len(slack.calls_to("assistant.threads.setTitle")) == 1  # named once, by one replica


async def test_a_thread_opened_before_this_run_is_answered_but_never_renamed(
    start_bridge, slack: FakeSlack, outcomes: Outcomes
) -> None:
    bridge = await start_bridge()
    question = question_in(now_ts(-60))  # its assistant_thread_started went to an earlier run
    await bridge.post_event(question)
    await outcomes.wait_for(question["event"]["ts"], Outcome.ANSWERED)
    await settle(bridge)
    assert slack.calls_to("assistant.threads.setTitle") == []
    assert len(slack.calls_to("assistant.threads.setStatus")) == 1


async def test_a_mention_in_a_channel_shows_the_status_in_its_thread(
    start_bridge, slack: FakeSlack, outcomes: Outcomes
) -> None:
    bridge = await start_bridge()
    question = mention()
    await bridge.post_event(question)
    await outcomes.wait_for(question["event"]["ts"], Outcome.ANSWERED)
    await settle(bridge)
    ts = question["event"]["ts"]
    assert [(c["channel_id"], c["thread_ts"], c["status"]) for c in status_calls(slack)] == [("C0GENERAL", ts, STATUS)]
    assert [p["thread_ts"] for p in slack.posts] == [ts] and slack.statuses == {}
    assert reaction_calls(slack) == []


async def test_channel_status_off_keeps_the_reaction_in_channels(
    start_bridge, slack: FakeSlack, outcomes: Outcomes
) -> None:
    bridge = await start_bridge(assistant="  assistant: {channel_status: false}")
    question = mention()
    await bridge.post_event(question)
    await outcomes.wait_for(question["event"]["ts"], Outcome.ANSWERED)
    await slack.wait_for(lambda: slack.calls_to("reactions.remove"))
    assert reaction_calls(slack) == ["reactions.add", "reactions.remove"]
    assert slack.calls_to("assistant.threads.setStatus") == []


async def test_a_top_level_dm_keeps_the_reaction(start_bridge, slack: FakeSlack, outcomes: Outcomes) -> None:
    """Its answer is not posted in a thread, so Slack would never clear a status there."""
    bridge = await start_bridge()
    question = payload("message_im", ts=now_ts())
    await bridge.post_event(question)
    await outcomes.wait_for(question["event"]["ts"], Outcome.ANSWERED)
    await slack.wait_for(lambda: slack.calls_to("reactions.remove"))
    assert reaction_calls(slack) == ["reactions.add", "reactions.remove"]
    assert slack.calls_to("assistant.threads.setStatus") == []


# --- refusals --------------------------------------------------------------------------------


async def test_a_status_refused_for_the_app_falls_back_to_the_reaction_and_is_not_asked_again(
    start_bridge, slack: FakeSlack, outcomes: Outcomes
) -> None:
    slack.fail("assistant.threads.setStatus", error="missing_scope", count=None)
    bridge = await start_bridge()
    first = question_in(now_ts(-5))
    await bridge.post_event(first)
    await outcomes.wait_for(first["event"]["ts"], Outcome.ANSWERED)
    await slack.wait_for(lambda: slack.calls_to("reactions.remove"))
    assert len(slack.calls_to("assistant.threads.setStatus")) == 1
    assert reaction_calls(slack) == ["reactions.add", "reactions.remove"]
    assert slack.reactions_on(DM, first["event"]["ts"]) == set()

    # Refused for the whole app: neither this thread nor a channel asks again.
    for question in (question_in(now_ts(-4)), mention()):
        await bridge.post_event(question)
        await outcomes.wait_for(question["event"]["ts"], Outcome.ANSWERED)
    await slack.wait_for(lambda: len(slack.calls_to("reactions.remove")) == 3)
    assert len(slack.calls_to("assistant.threads.setStatus")) == 1
    assert len(slack.posts) == 3


async def test_a_status_refused_in_one_channel_is_not_asked_there_again_but_still_elsewhere(
    start_bridge, slack: FakeSlack, outcomes: Outcomes
) -> None:
    slack.fail("assistant.threads.setStatus", error="channel_not_found", count=1)
    bridge = await start_bridge()
    for question in (mention("C0GENERAL"), mention("C0GENERAL"), mention("C0OTHER")):
        await bridge.post_event(question)
        await outcomes.wait_for(question["event"]["ts"], Outcome.ANSWERED)
        await settle(bridge)
    await slack.wait_for(lambda: len(slack.calls_to("reactions.remove")) == 2)
    assert [(c["channel_id"]) for c in status_calls(slack)] == ["C0GENERAL", "C0OTHER"]
    assert reaction_calls(slack) == ["reactions.add", "reactions.remove"] * 2
    assert len(slack.posts) == 3 and slack.statuses == {}


async def test_a_passing_status_failure_is_tried_again_next_time(
    start_bridge, slack: FakeSlack, outcomes: Outcomes
) -> None:
    slack.fail("assistant.threads.setStatus", status=500, error="internal_error", count=1)
    bridge = await start_bridge()
    for question in (mention(), mention()):
        await bridge.post_event(question)
        await outcomes.wait_for(question["event"]["ts"], Outcome.ANSWERED)
        await settle(bridge)
    await slack.wait_for(lambda: slack.calls_to("reactions.remove"))
    assert [c.ok for c in slack.calls_to("assistant.threads.setStatus")] == [False, True]
    assert reaction_calls(slack) == ["reactions.add", "reactions.remove"]


# --- the answer does not come at once ---------------------------------------------------------


async def test_a_status_whose_answer_could_not_be_posted_is_cleared(start_bridge, slack: FakeSlack) -> None:
    slack.fail("chat.postMessage", error="internal_error", status=500, count=1)
    bridge = await start_bridge()
    question = mention()
    await bridge.post_event(question)
    ts = question["event"]["ts"]
    # The first post failed: the status is cleared rather than left up for two minutes.
    await slack.wait_for(lambda: [c for c in status_calls(slack) if c["status"] == ""])
    # The outbox's retry shows it again while it posts; the posted answer clears it.
    await slack.wait_for(lambda: [p for p in slack.posts if p.get("thread_ts") == ts], timeout=30)
    await settle(bridge)
    assert [c["status"] for c in status_calls(slack)] == [STATUS, "", STATUS]
    assert slack.statuses == {} and reaction_calls(slack) == []


async def test_a_reaction_left_by_a_run_that_died_is_removed_when_the_status_is_used(
    start_bridge, slack: FakeSlack, outcomes: Outcomes
) -> None:
    question = payload("app_mention", channel="C0GENERAL", ts=now_ts(-30), text="<@UBOT> what is the refund policy?")
    ts = question["event"]["ts"]
    slack.reactions[("C0GENERAL", ts)] = {"eyes"}  # the dead run's working signal
    bridge = await start_bridge()
    await bridge.post_event(question, retry=1)  # Slack's retry reaches the new run
    await outcomes.wait_for(ts, Outcome.ANSWERED)
    await slack.wait_for(lambda: slack.calls_to("reactions.remove"))
    assert slack.reactions_on("C0GENERAL", ts) == set()
    assert len(slack.calls_to("assistant.threads.setStatus")) == 1


# --- titles ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "title"),
    [
        ("How do I reset my password?", "How do I reset my password?"),
        ("  two   spaces\nand a second line", "two spaces"),
        ("\n\nfirst line later", "first line later"),
        (
            "What is the refund policy for annual plans that were bought through a reseller in Europe?",
            "What is the refund policy for annual plans that were…",
        ),
        ("x" * 80, "x" * 59 + "…"),
        ("", ""),
    ],
)
def test_thread_title(question: str, title: str) -> None:
    assert thread_title(question) == title
    assert len(thread_title(question)) <= 60
