"""Knowledge gaps (a fallback answer raises answer.unanswered, offers a person) and the report facts answers note."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from bridge import config
from bridge.alerts import UNANSWERED
from bridge.app import BridgeApp
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from bridge.messages import Inbound
from bridge.relay import NOTICES, Outcome
from bridge.store import FactKind

FALLBACK = "Sorry, I don't know that yet."


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator()
    account = emu.add_account("Gaps")
    emu.add_key(account, SANDBOX_KEY)
    emu.add_chatbot(account, "Gap Bot", chatbot_id=SANDBOX_CHATBOT_ID, fallback_message=FALLBACK)
    emu.script_reply(SANDBOX_CHATBOT_ID, "pricing", "**Sorry**, I don't know that yet!")  # the fallback, dressed up
    emu.script_reply(SANDBOX_CHATBOT_ID, "almost", f"{FALLBACK} But the FAQ covers refunds.")  # a near miss
    await emu.start()
    yield emu
    await emu.stop()


@pytest.fixture
async def app(emulator: Emulator, tmp_path: Path) -> AsyncIterator[BridgeApp]:
    settings = config.loads(
        f"""
insitechat: {{base_url: "{emulator.base_url}", api_key: "${{KEY}}"}}
state: {{sqlite: "{tmp_path / 'state.db'}"}}
server: {{listen: "127.0.0.1:0"}}
console: {{enabled: true}}
routes: [{{platform: console, chatbot: {SANDBOX_CHATBOT_ID}}}]
webhooks: {{verify_signatures: false}}
alerts: [{{chatbot: {SANDBOX_CHATBOT_ID}, events: [conversation.escalated, answer.unanswered], to: ["console:gaps"]}}]
""",
        env={"KEY": SANDBOX_KEY},
    )
    out = io.StringIO()
    bridge = BridgeApp(settings, console_in=io.StringIO(""), console_out=out)
    await bridge.start()
    yield bridge
    await bridge.stop()


def ask(text: str, message_id: str) -> Inbound:
    return Inbound("console", "", "console", message_id, "you", text, is_dm=True, author_name="you")


def printed(app: BridgeApp) -> str:
    assert app.console is not None
    return app.console._stdout.getvalue()  # type: ignore[attr-defined]


async def eventually(predicate, what: str, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := predicate()):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return result


def unanswered() -> float:
    return REGISTRY.get_sample_value(
        "insitechat_bridge_answers_total", {"chatbot": SANDBOX_CHATBOT_ID, "result": "unanswered"}
    ) or 0.0


async def test_the_fallback_answer_raises_a_gap_card_and_points_to_a_person(app: BridgeApp, emulator: Emulator) -> None:
    # The fallback message is read in the background after an answer, never in an answer's way.
    assert await app.relay.handle(ask("hello there", "1")) is Outcome.ANSWERED
    await eventually(lambda: [r for r in emulator.requests if r.path.endswith(f"/chatbots/{SANDBOX_CHATBOT_ID}")],
                     what="the fallback message fetched")
    await asyncio.sleep(0.05)
    before = unanswered()
    assert await app.relay.handle(ask("what is your pricing?", "2")) is Outcome.ANSWERED
    await app.outbox.deliver_due()
    out = await eventually(lambda: "The chatbot had no answer" in printed(app) and printed(app), what="the gap card")
    assert NOTICES["gap"] in out  # the answer says a person can help (escalations are routed here)
    card = out[out.index("❔ The chatbot had no answer"):]
    assert '"what is your pricing?"' in card and "Its answer: **Sorry**, I don't know that yet!" in card
    assert "(type /claim or /resolve)" in card  # the team can take the gap on
    assert unanswered() == before + 1


async def test_a_near_miss_is_an_answer(app: BridgeApp, emulator: Emulator) -> None:
    assert await app.relay.handle(ask("hello there", "1")) is Outcome.ANSWERED
    await eventually(lambda: [r for r in emulator.requests if r.path.endswith(f"/chatbots/{SANDBOX_CHATBOT_ID}")],
                     what="the fallback message fetched")
    await asyncio.sleep(0.05)
    before = unanswered()
    assert await app.relay.handle(ask("almost a gap", "2")) is Outcome.ANSWERED
    await app.outbox.deliver_due()
    assert "The chatbot had no answer" not in printed(app) and NOTICES["gap"] not in printed(app)
    assert unanswered() == before


# --- the report's facts ------------------------------------------------------------------------


async def test_answers_gaps_and_an_alerts_life_are_noted_once(app: BridgeApp, emulator: Emulator) -> None:
    assert await app.relay.handle(ask("hello there", "1")) is Outcome.ANSWERED
    await eventually(lambda: [r for r in emulator.requests if r.path.endswith(f"/chatbots/{SANDBOX_CHATBOT_ID}")],
                     what="the fallback message fetched")
    await asyncio.sleep(0.05)
    assert await app.relay.handle(ask("what is your pricing?", "2")) is Outcome.ANSWERED
    await app.facts.flush()
    facts = await app.store.facts_since(0)
    assert [(f.kind, f.chatbot, f.route) for f in facts] == [
        (FactKind.ANSWERED, SANDBOX_CHATBOT_ID, "routes[0]"),
        (FactKind.UNANSWERED, SANDBOX_CHATBOT_ID, "routes[0]"),
        (FactKind.ALERT_RAISED, SANDBOX_CHATBOT_ID, ""),
    ]
    assert facts[0].subject != facts[1].subject  # one per answer: its job
    alert_id = facts[2].subject
    assert facts[2].value == UNANSWERED

    await app.desk.act(alert_id, "claim", "Ana")
    await app.desk.act(alert_id, "claim", "Ben")  # changes nothing: not a second claim
    await app.desk.act(alert_id, "resolve", "Ben")
    await app.facts.flush()
    later = [f for f in await app.store.facts_since(0) if f.subject == alert_id][1:]
    assert [(f.kind, f.actor) for f in later] == [(FactKind.ALERT_CLAIMED, "Ana"), (FactKind.ALERT_RESOLVED, "Ben")]


async def test_facts_are_written_within_a_second_without_a_flush(app: BridgeApp) -> None:
    assert await app.relay.handle(ask("hello there", "1")) is Outcome.ANSWERED
    assert await app.store.facts_since(0) == []  # not in the answer's path
    for _ in range(100):
        if await app.store.facts_since(0):
            break
        await asyncio.sleep(0.05)
    assert [f.kind for f in await app.store.facts_since(0)] == [FactKind.ANSWERED]
