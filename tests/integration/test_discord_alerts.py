"""Discord alerts end to end: emulator webhooks -> BridgeApp -> the real discord.py client -> a fake Discord."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import discord.http
import httpx
import pytest

from adapters.discord.alerts import MARKER_PREFIX
from adapters.discord import DiscordAdapter
from bridge import config
from bridge.app import BridgeApp
from bridge.clock import Clock, ManualClock
from bridge.desk import RESUMED_NOTICE
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator, sign_webhook
from bridge.handover import RAISED_IN_DM, TEXTS, HandOverResult
from bridge.relay import NOTICES, Outcome
from bridge.webhooks import SIGNATURE_HEADER
from tests.fakes import discord_api as fd
from tests.fakes.discord_api import FakeDiscord
from tests.fakes.outcomes import Outcomes

BOT = SANDBOX_CHATBOT_ID
SECRET = "whsec-discord-alerts"
ONCALL = f"<@&{fd.ONCALL_ROLE}> <@{fd.CAROL}>"  # the Discord mentions of the rule, in order
HUMAN_BUTTON = f"insitechat_human:{BOT}"


async def eventually(predicate: Callable[[], Any], timeout: float = 8.0, what: str = "condition") -> Any:
    """Poll until predicate() is truthy; fail with `what` after the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def make_settings(emulator_url: str, state: Path, *, events: str = "conversation.escalated") -> config.Settings:
    return config.loads(
        f"""
insitechat: {{base_url: "{emulator_url}", api_key: "${{KEY}}"}}
state: {{sqlite: "{state}"}}
server: {{listen: "127.0.0.1:0"}}
discord: {{token: "${{DISCORD_TOKEN}}", message_content_intent: true}}
chatbots:
  - {{id: {BOT}, name: Support Bot, webhook_secret: "${{SECRET}}"}}
routes:
  - {{platform: discord, chatbot: {BOT}, reply: mention}}
alerts:
  - chatbot: {BOT}
    events: [{events}]
    to: ["discord:{fd.ALERTS}"]
    mention: ["<@&{fd.ONCALL_ROLE}>", "<@{fd.CAROL}>", "<@UONCALL>"]
""",
        env={"KEY": SANDBOX_KEY, "DISCORD_TOKEN": fd.TOKEN, "SECRET": SECRET},
    )


@pytest.fixture(autouse=True)
def fast_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DiscordAdapter, "guild_ready_timeout", 0.1)
    monkeypatch.setattr(DiscordAdapter, "start_timeout", 10.0)


@pytest.fixture
def outcomes() -> Outcomes:
    """How the relay ended each message, across every bridge a test starts."""
    return Outcomes()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator.sandbox(webhook_secret=SECRET, webhook_retry_delays=(0.05, 0.1, 0.2))
    await emu.start()
    yield emu
    await emu.stop()


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with fd.running_fake() as discord_fake:
        yield discord_fake


Bridge = Callable[..., Awaitable[BridgeApp]]


@pytest.fixture
async def bridge(emulator: Emulator, fake: FakeDiscord, tmp_path: Path, outcomes: Outcomes) -> AsyncIterator[Bridge]:
    """Starts a BridgeApp on one state file, its webhook URL set in the emulator; stops them all."""
    apps: list[BridgeApp] = []

    async def start(*, events: str = "conversation.escalated", clock: Clock | None = None) -> BridgeApp:
        app = BridgeApp(make_settings(emulator.base_url, tmp_path / "state.db", events=events), clock=clock, grace=1)
        outcomes.watch(app.relay)
        apps.append(app)
        await app.start()
        await asyncio.wait_for(app.connected(), 15)  # the platforms connect in the background
        await fake.wait_ready()
        emulator.chatbots[BOT].webhook_url = f"{app.server_url}/webhooks/insitechat/{BOT}"
        return app

    yield start
    for app in apps:
        if not app.stopped.is_set():
            await app.stop()


@pytest.fixture
def quick_discord_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """discord.py retries a 500 five times, sleeping 1, 3, 5, 7 and 9 s: keep the retries, not the waits."""

    class QuickSleeps:
        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        @staticmethod
        async def sleep(delay: float, result: Any = None) -> Any:
            return await asyncio.sleep(min(delay, 0.01), result)

    monkeypatch.setattr(discord.http, "asyncio", QuickSleeps())


def posts(fake: FakeDiscord, channel: int) -> list[dict[str, Any]]:
    return fake.bot_posts(channel)


def cards(fake: FakeDiscord, channel: int) -> list[dict[str, Any]]:
    return [m for m in fake.bot_posts(channel) if m["embeds"]]


def buttons(message: dict[str, Any]) -> list[str]:
    return [b["custom_id"] for row in message["components"] for b in row["components"]]


def hand_over_buttons(message: dict[str, Any]) -> list[str]:
    """The buttons of an answer other than 👍 / 👎 (tests/integration/test_feedback_discord.py has those)."""
    ids = [b["custom_id"] for row in message.get("components", []) for b in row["components"]]
    return [i for i in ids if not i.startswith("insitechat_vote:")]


def edits_of(fake: FakeDiscord, message: dict[str, Any]) -> list[dict[str, Any]]:
    return [body for mid, body in fake.edits if mid == int(message["id"])]


def signed_envelope(event: str = "conversation.escalated", **data: Any) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({
        "event": event, "chatbot_id": BOT, "timestamp": datetime.now(UTC).isoformat(),
        "data": {
            "session_id": "web-77", "conversation_id": "conv-77", "message": "a human please", "message_count": 3,
            **data,
        },
    }).encode()
    return body, {"Content-Type": "application/json", SIGNATURE_HEADER: sign_webhook(body, SECRET)}


# --- escalations reach the channel --------------------------------------------------------------


async def test_emulator_escalation_posts_a_card_that_pings_only_the_on_call(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator
) -> None:
    await bridge()
    hostile = f"I want a human now @everyone @here <@{fd.BOB}> <@&{fd.BOT_ROLE_ID}>"
    await emulator.visitor_message(BOT, hostile, session_id="web-1")
    [card] = await eventually(lambda: cards(fake, fd.ALERTS), what="the escalation card")
    embed = card["embeds"][0]
    assert embed["title"] == "🙋 A visitor asked for a human"
    assert "I want a human now" in embed["description"] and "Support Bot" in json.dumps(embed["fields"])
    assert card["content"] == ONCALL  # the Slack id of the rule is not sent to Discord
    # Discord pings exactly the on-call role and person: not everyone, not Bob, not the bot's role.
    assert card["mention_roles"] == [str(fd.ONCALL_ROLE)] and [u["id"] for u in card["mentions"]] == [str(fd.CAROL)]
    assert card["mention_everyone"] is False
    [post] = fake.rest("POST", rf"/channels/{fd.ALERTS}/messages")
    assert post.json["allowed_mentions"] == {"parse": [], "users": [fd.CAROL], "roles": [fd.ONCALL_ROLE]}
    assert post.json["enforce_nonce"] is True and len(post.json["nonce"]) <= 25
    assert MARKER_PREFIX in embed["url"] and embed["url"].startswith("https://app.insitechat.ai/chatbots/")
    claim, resolve = buttons(card)
    assert claim.startswith("insitechat_alert:claim:") and resolve.startswith("insitechat_alert:resolve:")
    assert posts(fake, fd.GENERAL) == []  # the alert channel only


async def test_same_webhook_four_times_is_one_post(bridge: Bridge, fake: FakeDiscord) -> None:
    app = await bridge()
    body, headers = signed_envelope()
    async with httpx.AsyncClient(base_url=app.server_url) as http:
        answers = [await http.post(f"/webhooks/insitechat/{BOT}", content=body, headers=headers) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert [a.json()["duplicate"] for a in answers] == [False, True, True, True]
    await eventually(lambda: cards(fake, fd.ALERTS), what="the card")

    async def drained() -> bool:
        return (await app.store.outbox_depth())[0] == 0

    deadline = time.monotonic() + 5
    while not await drained():
        assert time.monotonic() < deadline, "the outbox never drained"
        await asyncio.sleep(0.01)
    assert len(posts(fake, fd.ALERTS)) == 1 and len(fake.rest("POST", rf"/channels/{fd.ALERTS}/messages")) == 1


async def test_a_visitor_session_shares_one_thread_and_the_escalation_is_announced(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator
) -> None:
    await bridge(events="conversation.started, message.received, conversation.escalated")
    await emulator.visitor_message(BOT, "hello there", session_id="web-2")
    await emulator.visitor_message(BOT, "can I talk to a person please", session_id="web-2")
    await eventually(lambda: len(posts(fake, fd.ALERTS)) == 2, what="the root card and the announcement")
    root, announcement = posts(fake, fd.ALERTS)
    thread = int(root["id"])
    in_thread = await eventually(
        lambda: len(cards(fake, thread)) == 3 and cards(fake, thread), what="three cards in the thread"
    )
    assert root["embeds"][0]["title"].endswith("New conversation on the website") and root["content"] == ""
    assert [c["embeds"][0]["title"] for c in in_thread] == [
        "✉️ Visitor message", "✉️ Visitor message", "🙋 A visitor asked for a human",
    ]
    [created] = fake.rest("POST", rf"/channels/{fd.ALERTS}/messages/\d+/threads")
    assert created.path.endswith(f"/{thread}/threads") and "web-2" in created.json["name"]
    # The escalation pings once: in the channel, with a link to the thread; the copy inside does not.
    assert (
        announcement["content"].startswith(ONCALL)
        and f"https://discord.com/channels/{fd.GUILD_ID}/{thread}" in announcement["content"]
    )
    assert announcement["mention_roles"] == [str(fd.ONCALL_ROLE)]
    escalation = in_thread[-1]
    assert escalation["content"] == "" and escalation["mention_roles"] == [] and buttons(escalation)
    # Claim on the card inside the thread edits it there.
    claim = buttons(escalation)[0]
    await fake.click(escalation, claim, user=fd.BOB)
    await eventually(
        lambda: fake.rest("PATCH", rf"/channels/{thread}/messages/{escalation['id']}"), what="the edit in the thread"
    )
    assert escalation["embeds"][0]["footer"]["text"].startswith("Claimed by Bob at")
    # A second claim, by someone else, is told who has it (as on Slack), only to them.
    await fake.click(escalation, claim, user=fd.ALICE)  # a Claim button still shown somewhere (a stale copy)
    [told] = await eventually(
        lambda: [
            c for c in fake.rest("POST", r"/webhooks/\d+/[^/]+") if c.json.get("content", "").startswith("Already")
        ],
        what="the note to the second claimer",
    )
    assert told.json["content"] == "Already claimed by Bob." and told.json["flags"] & 64


# --- outage and restart ----------------------------------------------------------------------------


async def test_discord_down_for_an_hour_and_a_restart_deliver_exactly_once(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator, quick_discord_retries: None
) -> None:
    clock = ManualClock()
    clock._epoch_offset = time.time() - clock.monotonic()  # webhook timestamps are checked against it
    alert_posts = rf"/channels/{fd.ALERTS}/messages"
    outage = fake.inject(500, path=alert_posts + "$", method="POST", count=None)
    first = await bridge(clock=clock)
    await emulator.visitor_message(BOT, "I need a human", session_id="web-3")
    await emulator.wait_for_webhooks()
    for _ in range(12):  # an hour of 500s: discord.py retries each attempt, the outbox backs off
        await first.outbox.deliver_due()
        clock.advance(300)
    assert len(fake.rest("POST", alert_posts)) >= 12 * 5 and posts(fake, fd.ALERTS) == []
    assert (await first.store.outbox_depth())[0] == 1
    await first.stop()
    # Back up, but every answer to the post is lost: the card exists, the bridge does not know it.
    fake.faults.remove(outage)
    lost = fake.inject(500, path=alert_posts + "$", method="POST", count=5, commit=True)
    second = await bridge(clock=clock)
    clock.advance(300)
    while lost.count:
        await second.outbox.deliver_due()
        clock.advance(300)
    assert len(posts(fake, fd.ALERTS)) == 1  # Discord deduped the re-sends by nonce
    posts_before = len(fake.rest("POST", alert_posts))
    clock.advance(300)
    await second.outbox.deliver_due()
    assert (await second.store.outbox_depth())[0] == 0
    assert len(fake.rest("POST", alert_posts)) == posts_before, "it looked (history) instead of posting again"
    assert fake.rest("GET", alert_posts)
    assert len(posts(fake, fd.ALERTS)) == 1


# --- buttons --------------------------------------------------------------------------------------


async def test_claim_then_resolve_edit_the_card_in_place(bridge: Bridge, fake: FakeDiscord, emulator: Emulator) -> None:
    await bridge()
    await emulator.visitor_message(BOT, "a human, please", session_id="web-4")
    [card] = await eventually(lambda: cards(fake, fd.ALERTS), what="the card")
    claim, resolve = buttons(card)
    click = await fake.click(card, claim, user=fd.BOB)
    await eventually(lambda: edits_of(fake, card), what="the claim edit")
    [callback] = fake.rest("POST", rf"/interactions/{click['id']}/{click['token']}/callback")
    assert callback.json["type"] == 6  # deferred update, sent before the card was edited
    embed = card["embeds"][0]
    assert embed["footer"]["text"].startswith("Claimed by Bob at") and buttons(card) == [resolve]
    assert card["content"] == ONCALL  # the edit keeps the text and pings no one again
    await fake.click(card, resolve, user=fd.ALICE)
    await eventually(lambda: len(edits_of(fake, card)) == 2, what="the resolve edit")
    assert card["embeds"][0]["footer"]["text"].startswith("Resolved by Alice at") and card["components"] == []
    assert all("content" not in body for body in edits_of(fake, card))


async def test_a_click_on_an_unknown_alert_gets_a_private_answer(bridge: Bridge, fake: FakeDiscord) -> None:
    await bridge()
    stale = await fake.user_message(fd.ALERTS, "an old card", author=fd.BOT_ID)
    click = await fake.click(stale, "insitechat_alert:claim:00000000000000000000", user=fd.BOB)
    [answer] = await eventually(lambda: fake.rest("POST", rf"/webhooks/{fd.APP_ID}/{click['token']}"), what="the reply")
    assert answer.json["flags"] & 64 and "no longer known" in answer.json["content"]
    assert fake.edits == []


# --- talk to a human ---------------------------------------------------------------------------------


async def ask_in_a_thread(fake: FakeDiscord, question: str) -> tuple[int, dict[str, Any]]:
    asked = await fake.user_message(fd.GENERAL, question, mention_bot=True)
    thread = int(asked["id"])
    [answer] = await eventually(lambda: posts(fake, thread), what="the answer")
    return thread, answer


async def hand_over(fake: FakeDiscord, thread: int, answer: dict[str, Any]) -> dict[str, Any]:
    """Click "Talk to a human" under the answer; returns the alert card."""
    assert hand_over_buttons(answer) == [HUMAN_BUTTON]
    await fake.click(answer, HUMAN_BUTTON, user=fd.ALICE)
    await eventually(lambda: len(posts(fake, thread)) == 2, what="the confirmation")
    [alert] = await eventually(lambda: cards(fake, fd.ALERTS), what="the alert card")
    return alert


async def quiet_in(outcomes: Outcomes, message: dict[str, Any]) -> None:
    """The relay decided not to answer a message in a thread it follows (a human has it)."""
    await outcomes.wait_for(message["id"], Outcome.IGNORED)


async def test_talk_to_a_human_alerts_the_team_and_the_bot_stays_quiet_until_resolved(
    bridge: Bridge, fake: FakeDiscord, emulator: Emulator, outcomes: Outcomes
) -> None:
    await bridge()
    thread, answer = await ask_in_a_thread(fake, "where is my parcel?")
    alert = await hand_over(fake, thread, answer)
    assert posts(fake, thread)[1]["content"] == TEXTS[HandOverResult.RAISED]
    assert hand_over_buttons(answer) == [] and buttons(answer)  # the button is gone once pressed; 👍 / 👎 stay
    embed = alert["embeds"][0]
    assert embed["title"] == "🙋 Someone asked for a human in chat"
    assert f"(https://discord.com/channels/{fd.GUILD_ID}/{thread})" in embed["description"]
    assert "where is my parcel?" in embed["description"]  # the last exchanges
    assert alert["content"] == ONCALL
    chats = len([r for r in emulator.requests if r.path.endswith("/chat")])
    await quiet_in(outcomes, await fake.user_message(thread, "hello? anyone there?"))
    assert len(posts(fake, thread)) == 2 and len([r for r in emulator.requests if r.path.endswith("/chat")]) == chats
    # A teammate resolves it: the bot says it is back, and answers again.
    await fake.click(alert, buttons(alert)[-1], user=fd.BOB)
    await eventually(lambda: len(posts(fake, thread)) == 3, what="the I'm back notice")
    assert posts(fake, thread)[2]["content"] == RESUMED_NOTICE
    await fake.user_message(thread, "thanks, one more question")
    await eventually(lambda: len(posts(fake, thread)) == 4, what="an answer again")


async def test_resume_brings_the_bot_back_before_anyone_resolves(
    bridge: Bridge, fake: FakeDiscord, outcomes: Outcomes
) -> None:
    await bridge()
    thread, answer = await ask_in_a_thread(fake, "how do refunds work?")
    await hand_over(fake, thread, answer)
    await quiet_in(outcomes, await fake.user_message(thread, "still there?"))
    await fake.user_message(thread, "resume")
    await eventually(lambda: len(posts(fake, thread)) == 3, what="the resumed notice")
    assert posts(fake, thread)[2]["content"] == NOTICES["resumed"]
    await fake.user_message(thread, "so how long do refunds take?")
    await eventually(lambda: len(posts(fake, thread)) == 4, what="an answer again")
    assert hand_over_buttons(posts(fake, thread)[3]) == [HUMAN_BUTTON]  # and the hand-over is offered again


async def test_hand_over_in_a_dm_as_on_slack(bridge: Bridge, fake: FakeDiscord) -> None:
    """The core decides, so Discord offers the button in a DM as Slack does; the team gets back to the person."""
    await bridge()
    await fake.user_message(fd.DM_CHANNEL, "a question in private", dm=True)
    [answer] = await eventually(lambda: posts(fake, fd.DM_CHANNEL), what="the DM answer")
    assert hand_over_buttons(answer) == [HUMAN_BUTTON]
    await fake.click(answer, HUMAN_BUTTON, user=fd.ALICE)
    confirmation = await eventually(lambda: posts(fake, fd.DM_CHANNEL)[1:], what="the confirmation")
    assert confirmation[0]["content"] == RAISED_IN_DM
    [alert] = await eventually(lambda: cards(fake, fd.ALERTS), what="the alert card")
    assert alert["embeds"][0]["title"] == "🙋 Someone asked for a human in chat"


# --- readiness ------------------------------------------------------------------------------------


async def test_readiness_follows_the_gateway_heartbeat(emulator: Emulator, tmp_path: Path) -> None:
    async with fd.running_fake(heartbeat_interval=0.25) as fake:
        app = BridgeApp(make_settings(emulator.base_url, tmp_path / "state.db"), grace=1)
        await app.start()
        await asyncio.wait_for(app.connected(), 15)  # the platforms connect in the background
        adapter = next(a for a in app.adapters if isinstance(a, DiscordAdapter))
        try:
            async with httpx.AsyncClient(base_url=app.server_url) as http:

                async def discord_part() -> tuple[int, str]:
                    answer = await http.get("/readyz")
                    return answer.status_code, answer.json()["parts"]["discord"]

                assert await discord_part() == (200, "ok")
                # The clock is injectable: a silence of minutes, without waiting for it.
                adapter._perf = lambda: time.perf_counter() + 600
                assert "has not acknowledged a heartbeat" in (await discord_part())[1]
                adapter._perf = time.perf_counter
                # The socket stays open but Discord stops acknowledging heartbeats.
                fake.ack_heartbeats = False
                deadline = time.monotonic() + 5
                while (part := await discord_part()) == (200, "ok"):
                    assert time.monotonic() < deadline, "still ready with a silent gateway"
                    await asyncio.sleep(0.05)
                assert part[0] == 503 and "has not acknowledged a heartbeat" in part[1]
                beats = fake.heartbeats
                assert beats >= 2  # discord.py kept sending them: the socket looked alive
                fake.ack_heartbeats = True
                deadline = time.monotonic() + 5
                while (part := await discord_part()) != (200, "ok"):
                    assert time.monotonic() < deadline, f"not ready again after acks resumed: {part}"
                    await asyncio.sleep(0.05)
                await fake.close_gateway(4004)  # a close discord.py does not come back from
                deadline = time.monotonic() + 5
                while (part := await discord_part())[0] == 200:
                    assert time.monotonic() < deadline, "still ready with the gateway gone"
                    await asyncio.sleep(0.05)
                # Briefly "not connected" while the supervisor takes note; then why it will not come back.
                while not (part := await discord_part())[1].startswith("refused: "):
                    assert time.monotonic() < deadline, f"the refusal was never reported: {part}"
                    await asyncio.sleep(0.05)
                assert part[0] == 503 and part[1].startswith("refused: Discord refused the bot token (discord.token)")
        finally:
            await app.stop()


async def test_slash_answers_offer_the_hand_over_only_inside_a_thread(bridge: Bridge, fake: FakeDiscord) -> None:
    await bridge()
    thread, _ = await ask_in_a_thread(fake, "first, a question in a thread")
    in_thread = await fake.slash("ask", {"question": "and from a slash command?"}, channel_id=thread)
    in_channel = await fake.slash("ask", {"question": "and in the channel?"}, channel_id=fd.GENERAL)
    for interaction, offered in ((in_thread, [HUMAN_BUTTON]), (in_channel, [])):
        [followup] = await eventually(
            lambda i=interaction: fake.rest("POST", rf"/webhooks/{fd.APP_ID}/{i['token']}"), what="the followup"
        )
        assert hand_over_buttons(followup.json) == offered
