"""The hand-over service: when "Talk to a human" is offered, and what a click comes to, the same for every platform."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge import config
from bridge.clock import ManualClock
from bridge.desk import AlertDesk
from bridge.handover import RAISED_IN_DM, TEXTS, HandOverResult, HandOvers
from bridge.messages import Conversation
from bridge.store import SQLiteStore

BOT = "5a0db0c5-ba5e-4b07-8000-000000000001"
OTHER = "11111111-2222-4333-8444-555555555555"  # a chatbot with no escalation route
IN_THREAD = Conversation("slack", "T1", "C1", "100.1")
IN_DM = Conversation("slack", "T1", "D1", "")


def settings_for(routes: str, alerts: bool = True) -> config.Settings:
    escalations = (
        f"alerts: [{{chatbot: {BOT}, events: [conversation.escalated], to: [\"slack:CALERT\"]}}]" if alerts else ""
    )
    return config.loads(
        f"""
insitechat: {{api_key: "${{KEY}}"}}
slack: {{bot_token: "${{KEY}}", app_token: "${{KEY}}"}}
chatbots: [{{id: {BOT}, webhook_secret: "${{KEY}}"}}, {{id: {OTHER}}}]
routes: {routes}
{escalations}
""",
        env={"KEY": "ic_test"},
    )


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "s.db", clock=ManualClock())


def handovers(settings: config.Settings, store: SQLiteStore) -> HandOvers:
    return HandOvers(settings, AlertDesk(settings, store, ManualClock()))


ROUTED = f"[{{platform: slack, chatbot: {BOT}}}, {{platform: slack, channel: C9, chatbot: {OTHER}}}]"


async def test_offered_where_the_route_wants_it_and_escalations_have_a_place(store: SQLiteStore) -> None:
    service = handovers(settings_for(ROUTED), store)
    assert service.offered(IN_THREAD, BOT, is_dm=False)
    assert service.offered(IN_DM, BOT, is_dm=True)  # in DMs too, on every platform
    assert not service.offered(Conversation("slack", "T1", "C9", "1.1"), OTHER, is_dm=False)  # nowhere to escalate
    off = f"[{{platform: slack, chatbot: {BOT}, human_button: false}}]"
    assert not handovers(settings_for(off), store).offered(IN_THREAD, BOT, is_dm=False)
    assert not HandOvers(settings_for(ROUTED), None).offered(IN_THREAD, BOT, is_dm=False)  # no alert desk


async def test_a_click_raises_once_then_says_it_was_raised(store: SQLiteStore) -> None:
    service = handovers(settings_for(ROUTED), store)
    first = await service.request(BOT, IN_THREAD, "<@U1>", is_dm=False)
    assert first.result is HandOverResult.RAISED and first.alert_id
    assert first.text(is_dm=False) == TEXTS[HandOverResult.RAISED]
    again = await service.request(BOT, IN_THREAD, "<@U2>", is_dm=False)
    assert again.result is HandOverResult.ALREADY_RAISED
    assert (await service.request(BOT, IN_DM, "<@U1>", is_dm=True)).text(is_dm=True) == RAISED_IN_DM


@pytest.mark.parametrize(
    ("routes", "chatbot", "expected"),
    [
        (ROUTED, OTHER, HandOverResult.STALE),  # the button names a chatbot this place no longer routes to
        (f"[{{platform: slack, chatbot: {BOT}, reply: \"off\"}}]", BOT, HandOverResult.STALE),  # switched off
        (f"[{{platform: slack, channel: C9, chatbot: {OTHER}}}]", BOT, HandOverResult.STALE),  # no route here any more
        (f"[{{platform: slack, chatbot: {BOT}, human_button: false}}]", BOT, HandOverResult.UNAVAILABLE),
    ],
)
async def test_a_click_the_config_no_longer_backs_raises_nothing(
    store: SQLiteStore, routes: str, chatbot: str, expected: HandOverResult
) -> None:
    service = handovers(settings_for(routes), store)
    assert (await service.request(chatbot, IN_THREAD, "<@U1>", is_dm=False)).result is expected
    assert not await AlertDesk(settings_for(routes), store, ManualClock()).paused(IN_THREAD)


async def test_without_an_escalation_route_the_click_is_unavailable(store: SQLiteStore) -> None:
    service = handovers(settings_for(ROUTED, alerts=False), store)
    assert (await service.request(BOT, IN_THREAD, "<@U1>", is_dm=False)).result is HandOverResult.UNAVAILABLE
