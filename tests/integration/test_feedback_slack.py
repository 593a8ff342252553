"""👍 / 👎 on Slack end to end: real Bolt and slack_sdk, the fake Slack, the emulator, the store and /metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from bridge import config
from bridge.app import BridgeApp
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, SANDBOX_WEBHOOK_SECRET, Emulator
from bridge.feedback import REASON_THANKS, TEXTS, Vote, VoteResult
from bridge.store import FactKind
from tests.fakes.slack_api import (
    APP_TOKEN,
    BOT_TOKEN,
    SIGNING_SECRET,
    FakeSlack,
    block_actions,
    feedback_click,
    payload,
    view_closed,
    view_submission,
)
from tests.integration.test_slack_alerts import Bridge, alert_id_of, cards, until

BOT = SANDBOX_CHATBOT_ID
ALERTS = "C0ALERTS"
THREAD_TS = "1700000100.000100"  # the app_mention payload's ts: the bot answers in its thread
ROUTE = "routes[0]"


def settings_for(
    emulator: Emulator, slack: FakeSlack, state: Path, *, mode: str = "http", style: str = "feedback_buttons"
) -> config.Settings:
    transport = "signing_secret: ${SLACK_SIGNING_SECRET}" if mode == "http" else "app_token: ${SLACK_APP_TOKEN}"
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
  feedback_style: {style}
chatbots:
  - {{id: {BOT}, name: Sandbox Bot, webhook_secret: "${{HOOK_SECRET}}"}}
routes:
  - {{platform: slack, chatbot: {BOT}, reply: mention}}
alerts:
  - {{chatbot: {BOT}, events: [answer.flagged], to: ["slack:{ALERTS}"], mention: ["<@U0ONCALL>"]}}
""",
        env={
            "IC_KEY": SANDBOX_KEY,
            "SLACK_BOT_TOKEN": BOT_TOKEN,
            "SLACK_APP_TOKEN": APP_TOKEN,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "HOOK_SECRET": SANDBOX_WEBHOOK_SECRET,
        },
    )


StartBridge = Callable[..., Awaitable[Bridge]]


@pytest.fixture
async def start_bridge(emulator: Emulator, slack: FakeSlack, tmp_path: Path) -> AsyncIterator[StartBridge]:
    running: list[Bridge] = []

    async def start(**kw: Any) -> Bridge:
        app = BridgeApp(settings_for(emulator, slack, tmp_path / "state.db", **kw), grace=2)
        bridge = Bridge(app)
        await app.start()
        await asyncio.wait_for(app.connected(), 15)
        running.append(bridge)
        return bridge

    yield start
    for bridge in running:
        await bridge.close()


def metric(name: str, vote: str) -> float:
    labels = {"chatbot": BOT, "route": ROUTE, "vote": vote}
    return REGISTRY.get_sample_value(f"insitechat_bridge_feedback_{name}_total", labels) or 0.0


def flagged_count() -> float:
    return REGISTRY.get_sample_value("insitechat_bridge_answers_flagged_total", {"chatbot": BOT, "route": ROUTE}) or 0.0


def feedback_values(message: dict[str, Any]) -> dict[str, str]:
    """The 👍 / 👎 values under an answer, by vote, from either feedback style."""
    [block] = [b for b in message.get("blocks", []) if b.get("block_id") == "insitechat_feedback"]
    if block["type"] == "context_actions":
        [element] = block["elements"]
        assert element["type"] == "feedback_buttons"
        return {"up": element["positive_button"]["value"], "down": element["negative_button"]["value"]}
    return {e["action_id"].rsplit(":", 1)[1]: e["value"] for e in block["elements"]}


async def answered(bridge: Bridge, slack: FakeSlack) -> dict[str, Any]:
    await bridge.event(payload("app_mention"))
    [answer] = await slack.wait_for(lambda: slack.messages.get("C0GENERAL"))
    return answer


async def vote_of(bridge: Bridge, job: str, user: str) -> str | None:
    stored = await bridge.app.store.get("vote", f"{job}|{user}")
    return str(stored["vote"]) if stored else None


async def outbox_idle(bridge: Bridge) -> bool:
    return (await bridge.app.store.outbox_depth())[0] == 0


async def test_votes_on_slack_one_per_person_changeable_and_a_down_vote_flags_the_answer_once(
    start_bridge: StartBridge, slack: FakeSlack
) -> None:
    bridge = await start_bridge()
    answer = await answered(bridge, slack)
    values = feedback_values(answer)
    job = values["up"].split(":", 1)[1]
    assert values == {"up": f"up:{job}", "down": f"down:{job}"}
    assert answer["blocks"][0]["text"]["text"] == answer["text"]  # the answer itself, above the buttons
    ups, downs, changes = metric("votes", "up"), metric("votes", "down"), metric("vote_changes", "up")

    # 👍: recorded, counted, and thanked where only Alice sees it.
    await bridge.click(feedback_click(values["up"], user="U0ALICE", message=answer,
                                      response_url=slack.response_url("alice-up")))
    [thanks] = await slack.wait_for(lambda: [r for r in slack.responses if r["name"] == "alice-up"])
    assert thanks["text"] == TEXTS[(VoteResult.RECORDED, Vote.UP)] and thanks["response_type"] == "ephemeral"
    assert await vote_of(bridge, job, "U0ALICE") == "up" and metric("votes", "up") == ups + 1

    # She changes her mind: one vote, the last; the change is counted, the 👎 opens the reason modal.
    await bridge.click(feedback_click(values["down"], user="U0ALICE", message=answer))
    [opened] = await slack.wait_for(lambda: slack.views)
    assert opened["view"]["callback_id"] == "insitechat_feedback_reason"
    assert opened["view"]["blocks"][0]["optional"] is True
    [card] = await slack.wait_for(lambda: cards(slack))
    assert await vote_of(bridge, job, "U0ALICE") == "down"
    assert metric("votes", "down") == downs + 1 and metric("vote_changes", "up") == changes + 1
    shown = json.dumps(card["blocks"])
    assert card["text"].startswith("An answer was flagged") and "U0ONCALL" not in shown  # no page, as for gaps
    assert "What is the refund policy?" in shown and "refund policy" in shown  # the question and the answer
    assert "alice" in shown and "<@U0ALICE>" not in shown  # named, never pinged
    assert "https://acme.slack.com/archives/C0GENERAL/p1700000100000100" in shown  # the thread
    assert [b["text"]["text"] for b in card["blocks"] if b["type"] == "actions" for b in b["elements"]] == [
        "Claim", "Resolve"]

    # Bob 👎 too, and gives a reason: still one card, which now shows it.
    flagged = flagged_count()
    await bridge.click(feedback_click(values["down"], user="U0BOB", message=answer))
    await slack.wait_for(lambda: len(slack.views) == 2)
    await until(lambda: metric("votes", "down") == downs + 2)  # Bob's 👎 is counted once its flag is stored
    await bridge.click(view_submission(slack.views[1]["view"], user="U0BOB", reason="It is out of date since May"))
    await slack.wait_for(lambda: "out of date since May" in json.dumps(slack.message(ALERTS, card["ts"])["blocks"]))
    [told] = await slack.wait_for(lambda: [e for e in slack.ephemeral if e["user"] == "U0BOB"])
    assert told["text"] == REASON_THANKS and told["channel"] == "C0GENERAL" and told["thread_ts"] == THREAD_TS
    await until(lambda: outbox_idle(bridge))
    assert len(cards(slack)) == 1 and flagged_count() == flagged  # no second card, not flagged twice

    # The card is claimable like an escalation.
    alert_id = alert_id_of(card)
    await bridge.click(block_actions(f"insitechat_alert:claim:{alert_id}", value=alert_id, user="U0CAROL",
                                     message=card))
    await slack.wait_for(lambda: "Claimed by <@U0CAROL>" in json.dumps(slack.message(ALERTS, card["ts"])["blocks"]))

    # Resolved: the answer stays flagged once; a later 👎 raises no new card.
    await bridge.click(block_actions(f"insitechat_alert:resolve:{alert_id}", value=alert_id, user="U0CAROL",
                                     message=card))
    await slack.wait_for(lambda: "Resolved by <@U0CAROL>" in json.dumps(slack.message(ALERTS, card["ts"])["blocks"]))
    await bridge.click(feedback_click(values["down"], user="U0ERIN", message=answer))
    await until(lambda: metric("votes", "down") == downs + 3)
    await slack.wait_for(lambda: len(slack.views) == 3)
    await bridge.click(view_closed(slack.views[2]["view"], user="U0ERIN"))  # Erin skips the reason
    [skipped] = await slack.wait_for(lambda: [e for e in slack.ephemeral if e["user"] == "U0ERIN"])
    assert skipped["text"] == TEXTS[(VoteResult.RECORDED, Vote.DOWN)]
    await until(lambda: outbox_idle(bridge))
    assert len(cards(slack)) == 1

    # The report's facts: each person's last vote, and one flag.
    await bridge.app.facts.flush()
    facts = [f for f in await bridge.app.store.facts_since(0) if f.subject == job]
    votes = {f.actor: f.value for f in facts if f.kind is FactKind.VOTE}
    assert votes == {"U0ALICE": "down", "U0BOB": "down", "U0ERIN": "down"}
    assert all(f.route == ROUTE and f.chatbot == BOT for f in facts)
    assert len([f for f in facts if f.kind is FactKind.FLAGGED]) == 1


async def test_plain_buttons_over_socket_mode_and_a_reason_on_the_first_click(
    start_bridge: StartBridge, slack: FakeSlack
) -> None:
    bridge = await start_bridge(mode="socket", style="buttons")
    await slack.send_envelope(payload("app_mention"))
    [answer] = await slack.wait_for(lambda: slack.messages.get("C0GENERAL"))
    [block] = [b for b in answer["blocks"] if b.get("block_id") == "insitechat_feedback"]
    assert block["type"] == "actions" and [e["text"]["text"] for e in block["elements"]] == ["👍", "👎"]
    values = feedback_values(answer)

    envelope = await slack.click(feedback_click(values["down"], user="U0ALICE", message=answer, element="button"))
    await asyncio.wait_for(envelope.acked.wait(), 5)
    [opened] = await slack.wait_for(lambda: slack.views)
    submitted = await slack.click(view_submission(opened["view"], user="U0ALICE", reason="Wrong country"))
    await asyncio.wait_for(submitted.acked.wait(), 5)
    await slack.wait_for(lambda: cards(slack) and "Wrong country" in json.dumps(slack.message(
        ALERTS, cards(slack)[0]["ts"])["blocks"]))
    assert len(cards(slack)) == 1
    stored = await bridge.app.store.get("vote", f"{values['down'].split(':', 1)[1]}|U0ALICE")
    assert stored["vote"] == "down" and stored["reason"] == "Wrong country"

    # The same 👍 twice is one vote.
    ups = metric("votes", "up")
    for _ in range(2):
        await slack.click(feedback_click(values["up"], user="U0DAVE", message=answer, element="button",
                                         response_url=slack.response_url("dave")))
    await slack.wait_for(lambda: len([r for r in slack.responses if r["name"] == "dave"]) == 2)
    assert [r["text"] for r in slack.responses if r["name"] == "dave"] == [
        TEXTS[(VoteResult.RECORDED, Vote.UP)], TEXTS[(VoteResult.UNCHANGED, Vote.UP)]]
    assert metric("votes", "up") == ups + 1


async def test_a_forged_or_stale_vote_changes_nothing(start_bridge: StartBridge, slack: FakeSlack) -> None:
    bridge = await start_bridge()
    answer = await answered(bridge, slack)
    ups = metric("votes", "up")
    await bridge.click(feedback_click("up:0123456789abcdef0123456789abcdef", user="U0ALICE", message=answer,
                                      response_url=slack.response_url("stale")))
    [told] = await slack.wait_for(lambda: [r for r in slack.responses if r["name"] == "stale"])
    assert "too old" in told["text"] and metric("votes", "up") == ups


async def test_where_slack_refuses_its_feedback_block_the_answer_comes_with_plain_buttons(
    start_bridge: StartBridge, slack: FakeSlack
) -> None:
    slack.refused_blocks = {"context_actions"}
    bridge = await start_bridge()
    answer = await answered(bridge, slack)
    assert [b["type"] for b in answer["blocks"] if b.get("block_id") == "insitechat_feedback"] == ["actions"]
    assert set(feedback_values(answer)) == {"up", "down"}
    refused = [c for c in slack.calls_to("chat.postMessage") if not c.ok]
    assert [c.result["error"] for c in refused] == ["invalid_blocks"]
    # Remembered: the next answer goes with plain buttons at once.
    await bridge.event(payload("message_thread_followup"))
    await slack.wait_for(lambda: len(slack.messages["C0GENERAL"]) == 2)
    assert len([c for c in slack.calls_to("chat.postMessage") if not c.ok]) == 1
