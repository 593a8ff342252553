"""Slack alerts end to end: the whole bridge, real Bolt and slack_sdk, the fake Slack, the InsiteChat emulator."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from adapters.slack import SlackAdapter
from adapters.slack.alerts import ALERT_EVENT_TYPE, HUMAN_ACTION, SECTION_LIMIT
from bridge import config
from bridge.app import BridgeApp
from bridge.clock import SystemClock
from bridge.desk import RESUMED_NOTICE
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, SANDBOX_WEBHOOK_SECRET, Emulator
from bridge.handover import RAISED_IN_DM, TEXTS, HandOverResult
from bridge.messages import Conversation
from bridge.relay import NOTICES
from tests.fakes.slack_api import (
    APP_TOKEN,
    BOT_TOKEN,
    SIGNING_SECRET,
    FakeSlack,
    block_actions,
    interaction_form,
    payload,
    sign,
)

BOT = SANDBOX_CHATBOT_ID
ALERTS = "C0ALERTS"
ONCALL = "<@U0ONCALL>"
HUMAN_ASKED = TEXTS[HandOverResult.RAISED]
THREAD_TS = "1700000100.000100"  # the app_mention payload's ts: the bot answers in its thread


class ShiftedClock(SystemClock):
    """The real clock, moved forward on demand: "an hour later" without waiting an hour."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def time(self) -> float:
        return time.time() + self.offset


def settings_for(
    emulator: Emulator, slack: FakeSlack, state: Path, *, mode: str = "http", human_button: bool = True,
    feedback: bool = True,
) -> config.Settings:
    transport = "signing_secret: ${SLACK_SIGNING_SECRET}" if mode == "http" else "app_token: ${SLACK_APP_TOKEN}"
    buttons_on = (str(human_button).lower(), str(feedback).lower())
    return config.loads(
        f"""
insitechat: {{base_url: "{emulator.base_url}", api_key: "${{IC_KEY}}"}}
state: {{sqlite: "{state}"}}
server: {{listen: "127.0.0.1:0"}}
slack:
  bot_token: ${{SLACK_BOT_TOKEN}}
  {transport}
  mode: {mode}
  api_url: {slack.api_url}
chatbots:
  - {{id: {BOT}, name: Sandbox Bot, webhook_secret: "${{HOOK_SECRET}}"}}
routes:
  - {{platform: slack, chatbot: {BOT}, reply: mention, human_button: {buttons_on[0]}, feedback: {buttons_on[1]}}}
alerts:
  - chatbot: {BOT}
    events: [conversation.started, message.received, conversation.escalated]
    to: ["slack:{ALERTS}"]
    mention: ["{ONCALL}"]
""",
        env={
            "IC_KEY": SANDBOX_KEY,
            "SLACK_BOT_TOKEN": BOT_TOKEN,
            "SLACK_APP_TOKEN": APP_TOKEN,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "HOOK_SECRET": SANDBOX_WEBHOOK_SECRET,
        },
    )


class Bridge:
    """A running BridgeApp, wired to the emulator's webhooks, and a client that talks to it as Slack would."""

    def __init__(self, app: BridgeApp) -> None:
        self.app = app
        self.http = aiohttp.ClientSession()
        self.closed = False

    @property
    def hook_url(self) -> str:
        return f"{self.app.server_url}/webhooks/insitechat/{BOT}"

    @property
    def adapter(self) -> SlackAdapter:
        return next(a for a in self.app.adapters if isinstance(a, SlackAdapter))

    async def post(self, raw: bytes, content_type: str) -> tuple[int, str]:
        headers = {"Content-Type": content_type, **sign(raw)}
        async with self.http.post(self.app.server_url + "/slack/events", data=raw, headers=headers) as response:
            return response.status, await response.text()

    async def event(self, body: dict[str, Any]) -> tuple[int, str]:
        return await self.post(json.dumps(body).encode(), "application/json")

    async def click(self, body: dict[str, Any]) -> tuple[int, str]:
        return await self.post(interaction_form(body), "application/x-www-form-urlencoded")

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.http.close()
            await self.app.stop()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator.sandbox(webhook_retry_delays=(0.05, 0.1, 0.2))
    await emu.start()
    yield emu
    await emu.stop()


StartBridge = Callable[..., Awaitable[Bridge]]


@pytest.fixture
async def start_bridge(emulator: Emulator, slack: FakeSlack, tmp_path: Path) -> AsyncIterator[StartBridge]:
    running: list[Bridge] = []

    async def start(*, clock: Any = None, ping_interval: float | None = None, **kw: Any) -> Bridge:
        app = BridgeApp(settings_for(emulator, slack, tmp_path / "state.db", **kw), clock=clock, grace=2)
        bridge = Bridge(app)
        if ping_interval is not None:
            bridge.adapter.ping_interval = ping_interval
        await app.start()
        await asyncio.wait_for(app.connected(), 15)  # the platforms connect in the background
        emulator.chatbots[BOT].webhook_url = bridge.hook_url  # the dashboard's webhook card, pointed at us
        running.append(bridge)
        return bridge

    yield start
    for bridge in running:
        await bridge.close()


def cards(slack: FakeSlack) -> list[dict[str, Any]]:
    """Alert cards in the alert channel, as Slack stores them (updates applied)."""
    return [m for m in slack.messages.get(ALERTS, []) if m.get("metadata", {}).get("event_type") == ALERT_EVENT_TYPE]


def alert_id_of(card: dict[str, Any]) -> str:
    actions = next(b for b in card["blocks"] if b["type"] == "actions")
    return str(actions["elements"][-1]["value"])


def buttons(card: dict[str, Any]) -> list[str]:
    return [e["text"]["text"] for b in card["blocks"] if b["type"] == "actions" for e in b["elements"]]


def updates_of(slack: FakeSlack, ts: str) -> list[dict[str, Any]]:
    return [c.args for c in slack.calls_to("chat.update") if c.ok and c.args["ts"] == ts]


def ignored_count() -> float:
    """Slack messages the relay decided not to answer, from the /metrics registry."""
    value = REGISTRY.get_sample_value("insitechat_bridge_messages_total", {"platform": "slack", "outcome": "ignored"})
    return value or 0.0


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll a condition no fake call signals (store, relay, readiness) until true or the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def time_passes(bridge: Bridge, clock: ShiftedClock) -> bool:
    """Ten minutes go by: every backoff so far has run out, and the outbox is told to look."""
    clock.offset += 600
    bridge.app.outbox.wake()
    return True


async def outbox_empty(bridge: Bridge) -> bool:
    return (await bridge.app.store.outbox_depth())[0] == 0


async def escalate(emulator: Emulator, session: str = "web-1") -> None:
    """A website visitor says hello, then asks for a human: started, received x2, escalated."""
    await emulator.visitor_message(BOT, "hello there", session_id=session)
    await emulator.visitor_message(BOT, "can I talk to a human please", session_id=session)
    await emulator.wait_for_webhooks()


# --- delivery -------------------------------------------------------------------------------------


async def test_emulator_escalation_is_one_thread_with_the_escalation_broadcast(
    start_bridge: StartBridge, slack: FakeSlack, emulator: Emulator
) -> None:
    await start_bridge()
    await escalate(emulator)
    await slack.wait_for(lambda: len(cards(slack)) == 4)
    posts = [c.args for c in slack.calls_to("chat.postMessage") if c.args["channel"] == ALERTS]
    root, *replies = posts
    escalation = replies[-1]
    root_ts = slack.messages[ALERTS][0]["ts"]
    assert "thread_ts" not in root and all(r["thread_ts"] == root_ts for r in replies)
    assert escalation["reply_broadcast"] is True and not any(r["reply_broadcast"] for r in replies[:-1])
    # The on-call mention is in the escalation only: the one ping of the whole session.
    assert escalation["text"].startswith(ONCALL + " ") and "visitor asked for a human" in escalation["text"]
    assert not any(ONCALL in json.dumps(p) for p in [root, *replies[:-1]])
    assert "talk to a human please" in json.dumps(escalation["blocks"]) and "Sandbox Bot" in json.dumps(
        escalation["blocks"]
    )
    keys = [p["metadata"]["event_payload"]["key"] for p in posts]
    assert all(p["metadata"]["event_type"] == ALERT_EVENT_TYPE for p in posts) and len(set(keys)) == 4
    assert all(p["unfurl_links"] is False for p in posts)
    assert buttons(cards(slack)[-1]) == ["Claim", "Resolve"]


async def test_the_same_webhook_four_times_posts_once(
    start_bridge: StartBridge, slack: FakeSlack, emulator: Emulator
) -> None:
    bridge = await start_bridge()
    await escalate(emulator)
    await slack.wait_for(lambda: len(cards(slack)) == 4)
    [attempt] = [a for a in emulator.webhook_attempts if a.event == "conversation.escalated"]
    for _ in range(4):  # the sender's retries, byte for byte
        async with bridge.http.post(bridge.hook_url, data=attempt.body, headers=attempt.headers) as response:
            assert response.status == 200 and (await response.json())["duplicate"] is True
    await bridge.app.outbox.deliver_due()  # anything a duplicate had queued would go out now
    assert len(cards(slack)) == 4 and await outbox_empty(bridge)
    assert sum(ONCALL in str(p["text"]) for p in slack.posts) == 1


async def test_slack_down_across_a_restart_delivers_exactly_once(
    start_bridge: StartBridge, slack: FakeSlack, emulator: Emulator
) -> None:
    clock = ShiftedClock()
    slack.fail("chat.postMessage", status=500, count=None)  # Slack is down, for as long as it takes
    first = await start_bridge(clock=clock)
    await emulator.visitor_message(BOT, "can I talk to a human please", session_id="web-9")
    await emulator.wait_for_webhooks()  # started, received, escalated: stored, then refused by Slack
    await until(lambda: time_passes(first, clock) and len(slack.calls_to("chat.postMessage")) >= 5)
    await first.close()
    assert slack.messages == {} and slack.posts == []

    # An hour later a new process starts on the same state; Slack is back, but the answer
    # to the first post it makes is lost on the way back.
    clock.offset += 3600
    slack.heal()
    calls_before = len(slack.calls_to("chat.postMessage"))
    lost = slack.fail("chat.postMessage", status=500, after=True)
    second = await start_bridge(clock=clock)
    await slack.wait_for(lambda: lost.remaining == 0)
    await until(lambda: time_passes(second, clock) and outbox_empty(second))
    started, received, escalated = slack.messages[ALERTS]
    keys = [m["metadata"]["event_payload"]["key"] for m in (started, received, escalated)]
    assert len(set(keys)) == 3
    assert (
        received["thread_ts"] == escalated["thread_ts"] == started["ts"] and escalated["subtype"] == "thread_broadcast"
    )
    # The lost post was found by its metadata and not posted again: three posts, one of them "failed".
    assert len(slack.calls_to("chat.postMessage")) - calls_before == 3
    looks = slack.calls_to("conversations.history") + slack.calls_to("conversations.replies")
    assert looks and all(str(c.args["include_all_metadata"]).lower() in ("1", "true") for c in looks)
    # The card found is the one the desk updates on a click.
    alert_id = alert_id_of(escalated)
    assert await second.app.desk.post_reference(alert_id, f"slack:{ALERTS}") == escalated["ts"]



# --- Claim and Resolve ------------------------------------------------------------------------------


async def claim_resolve_round(
    bridge: Bridge, slack: FakeSlack, emulator: Emulator, click: Callable[[dict[str, Any]], Awaitable[None]]
) -> None:
    """Claim, a late second claim, Resolve, and a click on an unknown alert: cards and private answers."""
    await escalate(emulator)
    await slack.wait_for(lambda: len(cards(slack)) == 4)
    card = cards(slack)[-1]
    alert_id = alert_id_of(card)

    await click(block_actions(f"insitechat_alert:claim:{alert_id}", value=alert_id, user="U0CAROL", message=card,
                              response_url=slack.response_url("carol")))
    claimed = await slack.wait_for(lambda: updates_of(slack, card["ts"]))
    assert "Claimed by <@U0CAROL>" in json.dumps(claimed[-1]["blocks"])
    assert buttons(slack.message(ALERTS, card["ts"])) == ["Resolve"]
    assert ONCALL not in claimed[-1]["text"]  # an update never pings again

    # Dave's card was stale: he is told privately, and the card keeps Carol's name.
    await click(block_actions(f"insitechat_alert:claim:{alert_id}", value=alert_id, user="U0DAVE", message=card,
                              response_url=slack.response_url("dave")))
    [told] = await slack.wait_for(lambda: [r for r in slack.responses if r["name"] == "dave"])
    assert told["response_type"] == "ephemeral" and "Already claimed by <@U0CAROL>" in told["text"]

    await click(block_actions(f"insitechat_alert:resolve:{alert_id}", value=alert_id, user="U0DAVE", message=card,
                              response_url=slack.response_url("dave")))
    await slack.wait_for(lambda: "Resolved by" in json.dumps(slack.message(ALERTS, card["ts"])["blocks"]))
    resolved = slack.message(ALERTS, card["ts"])
    assert "Resolved by <@U0DAVE>" in json.dumps(resolved["blocks"]) and buttons(resolved) == []
    assert len(updates_of(slack, card["ts"])) == 2
    alert = await bridge.app.desk.load(alert_id)  # the state is stored, not just drawn
    assert alert is not None and (alert.claimed_by, alert.resolved_by) == ("<@U0CAROL>", "<@U0DAVE>")

    await click(block_actions("insitechat_alert:resolve:0123456789abcdef0123", user="U0ERIN",
                              response_url=slack.response_url("erin")))
    [gone] = await slack.wait_for(lambda: [r for r in slack.responses if r["name"] == "erin"])
    assert "no longer tracked" in gone["text"]
    assert len(cards(slack)) == 4  # clicks never post


async def test_claim_and_resolve_over_http(start_bridge: StartBridge, slack: FakeSlack, emulator: Emulator) -> None:
    bridge = await start_bridge()

    async def click(body: dict[str, Any]) -> None:
        started = time.monotonic()
        status, text = await bridge.click(body)
        assert (status, text) == (200, "") and time.monotonic() - started < 1  # acked before the work

    await claim_resolve_round(bridge, slack, emulator, click)
    forged = interaction_form(block_actions("insitechat_alert:resolve:x"))
    headers = {"Content-Type": "application/x-www-form-urlencoded", **sign(forged, "not-the-secret")}
    async with bridge.http.post(bridge.app.server_url + "/slack/events", data=forged, headers=headers) as response:
        assert response.status == 401


async def test_claim_and_resolve_over_socket_mode(
    start_bridge: StartBridge, slack: FakeSlack, emulator: Emulator
) -> None:
    bridge = await start_bridge(mode="socket")

    async def click(body: dict[str, Any]) -> None:
        envelope = await slack.click(body)
        await asyncio.wait_for(envelope.acked.wait(), 5)

    await claim_resolve_round(bridge, slack, emulator, click)


# --- Talk to a human ------------------------------------------------------------------------------


def human_button(message: dict[str, Any]) -> dict[str, Any]:
    [button] = [e for b in message.get("blocks", []) if b["type"] == "actions" for e in b["elements"]]
    assert button["action_id"] == HUMAN_ACTION
    return button


def chat_calls(emulator: Emulator) -> int:
    return len([r for r in emulator.requests if r.path.endswith("/chat")])


async def test_talk_to_a_human_from_a_thread_pauses_it_until_resolved(
    start_bridge: StartBridge, slack: FakeSlack, emulator: Emulator
) -> None:
    bridge = await start_bridge()
    await bridge.event(payload("app_mention"))
    [answer] = await slack.wait_for(lambda: slack.messages.get("C0GENERAL"))
    assert answer["thread_ts"] == THREAD_TS and "refund policy" in answer["text"]  # `text` stays the fallback
    assert answer["blocks"][0]["text"]["text"] == answer["text"]
    button = human_button(answer)

    await bridge.click(block_actions(HUMAN_ACTION, value=button["value"], user="U0ALICE", channel="C0GENERAL",
                                     message=answer, response_url=slack.response_url("alice")))
    [card] = await slack.wait_for(lambda: cards(slack))
    shown = json.dumps(card["blocks"])
    assert card["text"].startswith(ONCALL) and "asked for a human in chat" in card["text"]
    assert "https://acme.slack.com/archives/C0GENERAL/p1700000100000100" in shown  # the thread's permalink
    assert "What is the refund policy?" in shown and "<@U0ALICE>" not in card["text"]  # the last exchanges
    confirmation = await slack.wait_for(lambda: [p for p in slack.posts if p["text"] == HUMAN_ASKED])
    assert confirmation[0]["thread_ts"] == THREAD_TS and confirmation[0]["channel"] == "C0GENERAL"
    await slack.wait_for(lambda: "asked for a human" in json.dumps(slack.message("C0GENERAL", answer["ts"])["blocks"]))
    assert not [b for b in slack.message("C0GENERAL", answer["ts"])["blocks"] if b["type"] == "actions"]

    # A second click (or a second person) raises nothing new.
    await bridge.click(block_actions(HUMAN_ACTION, value=button["value"], user="U0BOB", channel="C0GENERAL",
                                     message=answer, response_url=slack.response_url("bob")))
    [told] = await slack.wait_for(lambda: [r for r in slack.responses if r["name"] == "bob"])
    assert "already been asked" in told["text"] and len(cards(slack)) == 1

    # The bot stays out of the thread while a person handles it.
    asked, ignored = chat_calls(emulator), ignored_count()
    await bridge.event(payload("message_thread_followup"))
    await until(lambda: ignored_count() > ignored)
    assert chat_calls(emulator) == asked

    # Resolved on the card: the bot says it is back in the thread, and answers again.
    alert_id = alert_id_of(card)
    await bridge.click(
        block_actions(f"insitechat_alert:resolve:{alert_id}", value=alert_id, user="U0CAROL", message=card)
    )
    back = await slack.wait_for(lambda: [p for p in slack.posts if p["text"] == RESUMED_NOTICE])
    assert back[0]["thread_ts"] == THREAD_TS and back[0]["channel"] == "C0GENERAL"
    await bridge.event(payload("message_thread_followup", ts="1700000300.000300", text="And for gift cards?"))
    await slack.wait_for(lambda: any("gift cards" in str(p["text"]) for p in slack.posts))
    assert chat_calls(emulator) == asked + 1

    # Asking again after the first request was resolved is a new alert, in the same alert thread.
    later = next(m for m in slack.messages["C0GENERAL"] if "gift cards" in str(m["text"]))
    await bridge.click(block_actions(HUMAN_ACTION, value=human_button(later)["value"], user="U0ALICE",
                                     channel="C0GENERAL", message=later))
    first, second = await slack.wait_for(lambda: len(cards(slack)) == 2 and cards(slack))
    assert alert_id_of(second) != alert_id and second["thread_ts"] == first["ts"]
    await slack.wait_for(lambda: len([p for p in slack.posts if p["text"] == HUMAN_ASKED]) == 2)


async def test_talk_to_a_human_in_a_dm_until_resume(
    start_bridge: StartBridge, slack: FakeSlack, emulator: Emulator
) -> None:
    bridge = await start_bridge(mode="socket")
    await slack.send_envelope(payload("message_im"))
    [answer] = await slack.wait_for(lambda: slack.messages.get("D0ALICE"))
    value = human_button(answer)["value"]
    assert json.loads(value) == {"chatbot": BOT, "conversation": "slack:T0TEST:D0ALICE:"}
    envelope = await slack.click(
        block_actions(HUMAN_ACTION, value=value, user="U0ALICE", channel="D0ALICE", message=answer)
    )
    await asyncio.wait_for(envelope.acked.wait(), 5)
    [card] = await slack.wait_for(lambda: cards(slack))
    assert "reset my password" in json.dumps(card["blocks"]) and "Open the chat thread" not in json.dumps(
        card["blocks"]
    )
    [confirmation] = await slack.wait_for(lambda: [p for p in slack.posts if p["text"] == RAISED_IN_DM])
    assert confirmation["channel"] == "D0ALICE" and "thread_ts" not in confirmation

    asked, ignored = chat_calls(emulator), ignored_count()
    await slack.send_envelope(payload("message_im", ts="1700000401.000401", text="hello? anyone?"))
    await until(lambda: ignored_count() > ignored)
    await slack.send_envelope(payload("message_im", ts="1700000402.000402", text="resume"))
    await slack.wait_for(lambda: [p for p in slack.posts if p["text"] == NOTICES["resumed"]])
    await slack.send_envelope(payload("message_im", ts="1700000403.000403", text="How do I change my email?"))
    await slack.wait_for(lambda: any("change my email" in str(p["text"]) for p in slack.posts))
    assert chat_calls(emulator) == asked + 1
    assert not await bridge.app.desk.paused(Conversation("slack", "T0TEST", "D0ALICE", ""))


async def test_the_button_sits_under_the_last_part_only_and_can_be_switched_off(
    start_bridge: StartBridge, slack: FakeSlack, emulator: Emulator
) -> None:
    long_answer = "\n\n".join(f"Paragraph {i}: " + "refund details " * 14 for i in range(16))  # ~3600 characters
    emulator.script_reply(None, "refund policy", long_answer)
    await (await start_bridge()).event(payload("app_mention"))
    *first, last = await slack.wait_for(
        lambda: len(slack.messages.get("C0GENERAL", [])) >= 2 and slack.messages["C0GENERAL"]
    )
    assert all("blocks" not in m for m in first)
    assert len(last["blocks"][0]["text"]["text"]) <= SECTION_LIMIT and human_button(last)
    assert "Paragraph 15" in last["text"] and "Paragraph 0" in first[0]["text"]


async def test_no_button_when_the_route_turns_it_off(start_bridge: StartBridge, slack: FakeSlack) -> None:
    await (await start_bridge(human_button=False, feedback=False)).event(payload("app_mention"))
    [answer] = await slack.wait_for(lambda: slack.messages.get("C0GENERAL"))
    assert "blocks" not in answer and "refund policy" in answer["text"]


# --- readiness and shutdown ---------------------------------------------------------------------


async def readyz(bridge: Bridge) -> tuple[int, dict[str, Any]]:
    async with bridge.http.get(bridge.app.server_url + "/readyz") as response:
        return response.status, await response.json()


async def test_a_silent_socket_turns_not_ready_and_recovers(start_bridge: StartBridge, slack: FakeSlack) -> None:
    bridge = await start_bridge(mode="socket", ping_interval=0.2)
    adapter = bridge.adapter
    await until(lambda: adapter.readiness() is None)
    status, body = await readyz(bridge)
    assert status == 200 and body["parts"]["slack"] == "ok"
    # The socket stays open but nothing comes back: no pong, no hello on a reconnect.
    slack.silent = True
    reason = await until(adapter.readiness, timeout=5)
    assert "silent" in reason or "down" in reason
    status, body = await readyz(bridge)
    assert status == 503 and body["parts"]["slack"] != "ok"
    slack.silent = False  # Slack answers again: the SDK reconnects or its pings get pongs
    await until(lambda: adapter.readiness() is None, timeout=5)


async def test_shutdown_stops_http_intake_first_and_still_posts_the_answer_in_flight(
    start_bridge: StartBridge, slack: FakeSlack, emulator: Emulator
) -> None:
    emulator.latency = 0.5
    bridge = await start_bridge()
    await bridge.event(payload("app_mention"))
    await until(lambda: chat_calls(emulator))  # the answer is on its way
    stopping = asyncio.get_running_loop().create_task(bridge.app.stop())
    await until(lambda: bridge.adapter.readiness() is not None)
    assert "shutting down" in str(bridge.adapter.readiness())
    status, _ = await bridge.event(payload("message_im"))
    assert status == 503  # Slack retries it, and the next run answers
    await stopping
    bridge.closed = True
    await bridge.http.close()
    [answer] = slack.posts
    assert answer["thread_ts"] == THREAD_TS and "refund policy" in answer["text"]
    assert chat_calls(emulator) == 1


async def test_shutdown_closes_the_socket_first_and_still_posts_the_answer_in_flight(
    start_bridge: StartBridge, slack: FakeSlack, emulator: Emulator
) -> None:
    emulator.latency = 0.5
    bridge = await start_bridge(mode="socket")
    await slack.send_envelope(payload("app_mention"))
    await until(lambda: chat_calls(emulator))
    stopping = asyncio.get_running_loop().create_task(bridge.app.stop())
    await slack.wait_for(lambda: not slack.sockets)
    closed_at = asyncio.get_running_loop().time()
    assert slack.posts == []  # the socket went before the answer did
    await stopping
    bridge.closed = True
    await bridge.http.close()
    [answer] = [c for c in slack.calls_to("chat.postMessage") if c.ok]
    assert answer.time > closed_at and "refund policy" in answer.args["text"]
    assert len(slack.calls_to("apps.connections.open")) == 1  # closed for good, not reconnected


# --- the AlertPoster calls on their own ------------------------------------------------------------


async def test_find_alert_pages_through_the_channel_and_the_thread(
    slack: FakeSlack, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = SlackAdapter(
        settings_for(emulator, slack, tmp_path / "s.db").slack, lambda inbound: None, web=aiohttp.web.Application()
    )
    await adapter.start()
    card = {"text": "An alert", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "An alert"}}]}
    since = time.time()
    root = await adapter.post_alert(ALERTS, card, thread="", broadcast=True, key="k-root")
    for n in range(240):
        await adapter.post_alert(ALERTS, card, thread="", broadcast=False, key=f"k-{n}")
    reply = await adapter.post_alert(ALERTS, card, thread=root, broadcast=True, key="k-reply")
    assert slack.posts[0].get("reply_broadcast") is False and slack.posts[-1]["reply_broadcast"] is True
    slack.history_page = 100  # Slack pages long histories: the oldest card is on page three

    assert await adapter.find_alert(ALERTS, "k-root", since=since, thread="") == root
    assert len(slack.calls_to("conversations.history")) == 3
    assert slack.calls_to("conversations.history")[0].args["oldest"] == f"{since - 60:.6f}"
    assert await adapter.find_alert(ALERTS, "k-reply", since=since, thread=root) == reply
    assert await adapter.find_alert(ALERTS, "k-nowhere", since=since, thread=root) is None
    assert await adapter.find_alert(ALERTS, "k-root", since=time.time() + 3600, thread="") is None  # too old
    monkeypatch.setattr("adapters.slack.adapter.FIND_PAGES", 2)  # the search is bounded
    assert await adapter.find_alert(ALERTS, "k-root", since=since, thread="") is None

    slack.fail("conversations.history", status=500)  # Slack cannot be asked: the outbox waits, never guesses
    with pytest.raises(Exception, match="looking for an alert"):
        await adapter.find_alert(ALERTS, "k-root", since=since, thread="")
    await adapter.update_alert(ALERTS, "1.000000", card)  # a deleted card: nothing to update, no error
    assert await adapter.permalink(Conversation("slack", "T0TEST", "D0ALICE", "")) is None
    assert await adapter.permalink(Conversation("slack", "T0TEST", "C0GENERAL", "1.000100")) == (
        "https://acme.slack.com/archives/C0GENERAL/p1000100"
    )
    await adapter.stop()
