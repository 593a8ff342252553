"""👍 / 👎 on Discord end to end: the real discord.py client, the fake Discord, the emulator, the store, /metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from adapters.discord import DiscordAdapter
from bridge import config
from bridge.app import BridgeApp
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from bridge.feedback import REASON_THANKS, TEXTS, Vote, VoteResult
from bridge.store import FactKind
from tests.fakes import discord_api as fd
from tests.fakes.discord_api import FakeDiscord
from tests.integration.test_discord_alerts import buttons, cards, eventually, posts
from tests.integration.test_slack_alerts import until

BOT = SANDBOX_CHATBOT_ID
SECRET = "whsec-discord-feedback"
ROUTE = "routes[0]"
HUMAN_BUTTON = f"insitechat_human:{BOT}"


def make_settings(emulator_url: str, state: Path) -> config.Settings:
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
  - {{chatbot: {BOT}, events: [conversation.escalated, answer.flagged], to: ["discord:{fd.ALERTS}"]}}
""",
        env={"KEY": SANDBOX_KEY, "DISCORD_TOKEN": fd.TOKEN, "SECRET": SECRET},
    )


@pytest.fixture(autouse=True)
def fast_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DiscordAdapter, "guild_ready_timeout", 0.1)
    monkeypatch.setattr(DiscordAdapter, "start_timeout", 10.0)


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with fd.running_fake() as discord_fake:
        yield discord_fake


Start = Callable[[], Awaitable[BridgeApp]]


@pytest.fixture
async def bridge(emulator: Emulator, fake: FakeDiscord, tmp_path: Path) -> AsyncIterator[Start]:
    apps: list[BridgeApp] = []

    async def start() -> BridgeApp:
        app = BridgeApp(make_settings(emulator.base_url, tmp_path / "state.db"), grace=1)
        apps.append(app)
        await app.start()
        await asyncio.wait_for(app.connected(), 15)
        await fake.wait_ready()
        return app

    yield start
    for app in apps:
        if not app.stopped.is_set():
            await app.stop()


def metric(name: str, vote: str) -> float:
    labels = {"chatbot": BOT, "route": ROUTE, "vote": vote}
    return REGISTRY.get_sample_value(f"insitechat_bridge_feedback_{name}_total", labels) or 0.0


def vote_buttons(message: dict[str, Any]) -> dict[str, str]:
    """The 👍 / 👎 custom ids under an answer, by label."""
    return {
        b["label"]: b["custom_id"]
        for row in message["components"] for b in row["components"] if b["custom_id"].startswith("insitechat_vote:")
    }


async def outbox_idle(app: BridgeApp) -> bool:
    return (await app.store.outbox_depth())[0] == 0


def private_replies(fake: FakeDiscord, click: dict[str, Any]) -> list[dict[str, Any]]:
    """What only the clicker saw: the followups of that interaction."""
    return [c.json for c in fake.rest("POST", rf"/webhooks/{fd.APP_ID}/{click['token']}")]


async def test_votes_on_discord_one_per_person_changeable_and_a_down_vote_flags_the_answer_once(
    bridge: Start, fake: FakeDiscord
) -> None:
    app = await bridge()
    asked = await fake.user_message(fd.GENERAL, "where is my parcel?", mention_bot=True)
    thread = int(asked["id"])
    [answer] = await eventually(lambda: posts(fake, thread), what="the answer")
    ids = vote_buttons(answer)
    job = ids["👍"].rsplit(":", 1)[1]
    assert ids == {"👍": f"insitechat_vote:up:{job}", "👎": f"insitechat_vote:down:{job}"}
    assert buttons(answer)[0] == HUMAN_BUTTON  # in one row with "Talk to a human"
    ups, downs, changes = metric("votes", "up"), metric("votes", "down"), metric("vote_changes", "up")

    # 👍: acknowledged, then thanked where only Alice sees it.
    up = await fake.click(answer, ids["👍"], user=fd.ALICE)
    [thanks] = await eventually(lambda: private_replies(fake, up), what="the thanks")
    assert thanks["content"] == TEXTS[(VoteResult.RECORDED, Vote.UP)] and thanks["flags"] & 64  # ephemeral
    assert (await app.store.get("vote", f"{job}|{fd.ALICE}"))["vote"] == "up"
    assert metric("votes", "up") == ups + 1

    # She changes her mind: the 👎 answers with the reason modal; one vote stands, the last.
    down = await fake.click(answer, ids["👎"], user=fd.ALICE)
    [opened] = await eventually(lambda: fake.callbacks_of.get(down["id"]), what="the modal")
    assert opened["type"] == 9 and opened["data"]["custom_id"] == f"insitechat_reason:{job}"
    [card] = await eventually(lambda: cards(fake, fd.ALERTS), what="the flagged card")
    assert (await app.store.get("vote", f"{job}|{fd.ALICE}"))["vote"] == "down"
    assert metric("votes", "down") == downs + 1 and metric("vote_changes", "up") == changes + 1
    embed = card["embeds"][0]
    assert embed["title"] == "👎 An answer was flagged as not helpful"
    assert "where is my parcel?" in embed["description"]  # the question
    assert f"(https://discord.com/channels/{fd.GUILD_ID}/{thread})" in embed["description"]  # the thread
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert "parcel" in fields["Its answer"] and fields["Flagged by"] == "Alice"

    # She submits the modal with a reason; Bob 👎 too and dismisses his (no event): still one card.
    submitted = await fake.submit_modal(down, {"reason": "Tracking links are wrong"}, user=fd.ALICE)
    [reply] = await eventually(lambda: fake.callbacks_of.get(submitted["id"]), what="the thanks for the reason")
    assert reply["type"] == 4 and reply["data"]["content"] == REASON_THANKS and reply["data"]["flags"] & 64
    await eventually(lambda: "Tracking links are wrong" in json.dumps(fake.messages[int(card["id"])]["embeds"]),
                     what="the reason on the card")
    bob = await fake.click(answer, ids["👎"], user=fd.BOB)
    await eventually(lambda: fake.callbacks_of.get(bob["id"]), what="Bob's modal")
    await eventually(lambda: metric("votes", "down") == downs + 2, what="Bob's vote")  # counted after its flag
    await until(lambda: outbox_idle(app))
    assert (await app.store.get("vote", f"{job}|{fd.BOB}"))["vote"] == "down"
    assert len(cards(fake, fd.ALERTS)) == 1

    # Claimable like an escalation.
    claim = next(b for b in buttons(fake.messages[int(card["id"])]) if ":claim:" in b)
    await fake.click(fake.messages[int(card["id"])], claim, user=fd.BOB)
    await eventually(lambda: fake.messages[int(card["id"])]["embeds"][0].get("footer", {}).get("text", "")
                     .startswith("Claimed by Bob"), what="the claim")

    await app.facts.flush()
    facts = [f for f in await app.store.facts_since(0) if f.subject == job]
    assert {f.actor: f.value for f in facts if f.kind is FactKind.VOTE} == {str(fd.ALICE): "down", str(fd.BOB): "down"}
    assert len([f for f in facts if f.kind is FactKind.FLAGGED]) == 1 and all(f.route == ROUTE for f in facts)
