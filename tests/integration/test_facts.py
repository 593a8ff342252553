"""The report's facts: every answer, knowledge gap, alert, claim and resolve is noted once in the store."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge import config
from bridge.alerts import UNANSWERED
from bridge.app import BridgeApp
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from bridge.messages import Inbound
from bridge.relay import Outcome
from bridge.store import FactKind

FALLBACK = "Sorry, I don't know that yet."


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator()
    account = emu.add_account("Facts")
    emu.add_key(account, SANDBOX_KEY)
    emu.add_chatbot(account, "Fact Bot", chatbot_id=SANDBOX_CHATBOT_ID, fallback_message=FALLBACK)
    emu.script_reply(SANDBOX_CHATBOT_ID, "pricing", FALLBACK)
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
alerts: [{{chatbot: {SANDBOX_CHATBOT_ID}, events: [answer.unanswered], to: ["console:gaps"]}}]
""",
        env={"KEY": SANDBOX_KEY},
    )
    bridge = BridgeApp(settings, console_in=io.StringIO(""), console_out=io.StringIO())
    await bridge.start()
    yield bridge
    await bridge.stop()


def ask(text: str, message_id: str) -> Inbound:
    return Inbound("console", "", "console", message_id, "you", text, is_dm=True, author_name="you")


async def test_answers_gaps_and_an_alerts_life_are_noted_once(app: BridgeApp, emulator: Emulator) -> None:
    assert await app.relay.handle(ask("hello there", "1")) is Outcome.ANSWERED
    for _ in range(250):  # the fallback message is read in the background after the first answer
        if any(r.path.endswith(f"/chatbots/{SANDBOX_CHATBOT_ID}") for r in emulator.requests):
            break
        await asyncio.sleep(0.02)
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
