"""Webhooks to alerts: the receiver over real HTTP, the store, the outbox worker, claim/resolve, hand-over."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from bridge import config
from bridge.alerts import ESCALATED
from bridge.clock import ManualClock, SystemClock
from bridge.desk import AlertDesk
from bridge.emulator import SANDBOX_CHATBOT_ID, Emulator
from bridge.messages import Conversation
from bridge.outbox import Outbox
from bridge.store import SQLiteStore
from bridge.webhooks import SIGNATURE_HEADER, WebhookReceiver, signature_matches
from tests.fakes.alert_poster import FakePoster

BOT = SANDBOX_CHATBOT_ID
SECRET = "whsec-test-secret"


def make_settings(extra_events: str = "", verify: bool = True) -> config.Settings:
    return config.loads(
        f"""
insitechat: {{api_key: "${{KEY}}"}}
console: {{enabled: true}}
slack: {{bot_token: "${{KEY}}", app_token: "${{KEY}}"}}
discord: {{token: "${{KEY}}"}}
chatbots:
  - {{id: {BOT}, name: Support Bot, webhook_secret: "${{SECRET}}"}}
routes: [{{platform: console, chatbot: {BOT}}}]
webhooks: {{verify_signatures: {str(verify).lower()}}}
alerts:
  - chatbot: {BOT}
    events: [conversation.escalated, lead.captured{extra_events}]
    to: ["slack:CALERT", "discord:555"]
    mention: ["<@UONCALL>", "<@&777>"]
""",
        env={"KEY": "ic_test", "SECRET": SECRET},
    )


class Bed:
    """Receiver on loopback + desk + outbox with fake platforms, all on one store file."""

    def __init__(self, path: Path, settings: config.Settings, clock: Any) -> None:
        self.clock = clock
        self.store = SQLiteStore(path, clock=clock)
        self.desk = AlertDesk(settings, self.store, clock)
        self.slack, self.discord = FakePoster("slack"), FakePoster("discord")
        self.outbox = Outbox(self.store, self.desk, clock, jitter=lambda: 0.0)
        self.outbox.register(self.slack)
        self.outbox.register(self.discord)
        self.app = web.Application()
        self.desk.on_queued = self.outbox.wake
        WebhookReceiver(settings, self.desk, clock, body_timeout=0.5).add_routes(self.app)
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/webhooks/insitechat/{BOT}"

    async def close(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        await self.store.close()


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[Bed]:
    b = Bed(tmp_path / "state.db", make_settings(), SystemClock())
    await b.start()
    yield b
    await b.close()


def envelope(event: str = ESCALATED, *, chatbot: str = BOT, minutes_ago: float = 1, **data: Any) -> bytes:
    stamp = (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat()
    body = {"event": event, "chatbot_id": chatbot, "timestamp": stamp,
            "data": {"session_id": "visitor-42", "conversation_id": "conv-42", "message": "I want a human", **data}}
    return json.dumps(body).encode()


def sign(raw: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


async def post(url: str, raw: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(url, content=raw, headers={"Content-Type": "application/json", **(headers or {})})


# --- the receiver ------------------------------------------------------------------------------

GOOD = envelope()
OTHER_BOT = envelope(chatbot="11111111-2222-4333-8444-555555555555")
OLD, FUTURE = envelope(minutes_ago=120), envelope(minutes_ago=-30)
DEEP = b"[" * 1000 + b"]" * 1000  # validly signed, but json's recursion limit is near
DEEP_DATA = envelope(extra=json.loads("[" * 100 + "]" * 100))
BAD_REQUESTS = [
    ("no signature", GOOD, {}, 401),
    ("wrong secret", GOOD, {SIGNATURE_HEADER: sign(GOOD, "other")}, 401),
    ("tampered body", GOOD.replace(b"human", b"robot"), {SIGNATURE_HEADER: sign(GOOD)}, 401),
    ("garbage signature", GOOD, {SIGNATURE_HEADER: "sha256=zz"}, 401),
    ("truncated body", GOOD[:-5], {SIGNATURE_HEADER: sign(GOOD[:-5])}, 400),
    ("not json", b"hello", {SIGNATURE_HEADER: sign(b"hello")}, 400),
    ("json but no envelope", b'{"a": 1}', {SIGNATURE_HEADER: sign(b'{"a": 1}')}, 400),
    ("wrong chatbot in body", OTHER_BOT, {SIGNATURE_HEADER: sign(OTHER_BOT)}, 400),
    ("replayed: two hours old", OLD, {SIGNATURE_HEADER: sign(OLD)}, 400),
    ("from the future", FUTURE, {SIGNATURE_HEADER: sign(FUTURE)}, 400),
    ("nested 1,000 deep", DEEP, {SIGNATURE_HEADER: sign(DEEP)}, 400),
    ("nested 100 deep in its data", DEEP_DATA, {SIGNATURE_HEADER: sign(DEEP_DATA)}, 400),
]


@pytest.mark.parametrize(("name", "raw", "headers", "status"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
async def test_bad_requests_are_refused_and_make_no_alert(
    bed: Bed, name: str, raw: bytes, headers: dict[str, str], status: int
) -> None:
    response = await post(bed.url, raw, headers)
    assert response.status_code == status, name
    await bed.outbox.deliver_due()
    assert bed.slack.posted == [] and bed.discord.posted == []


async def test_a_body_that_trickles_in_is_cut_off_with_408(bed: Bed) -> None:
    """A slow-loris body (headers promise 100 bytes, 10 arrive) must not hold the connection forever."""
    host, port = bed.url.removeprefix("http://").split("/", 1)[0].split(":")
    path = "/" + bed.url.removeprefix("http://").split("/", 1)[1]
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode() + b"{" * 10)
    await writer.drain()
    try:
        answer = await asyncio.wait_for(reader.read(4096), 10)  # the receiver gives it 0.5 s here (10 s in service)
    finally:
        writer.close()
    assert answer.split(b" ", 2)[1] == b"408"
    assert bed.slack.posted == [] and bed.discord.posted == []


async def test_unknown_chatbot_path_is_404(bed: Bed) -> None:
    response = await post(
        bed.url.replace(BOT, "99999999-9999-4999-8999-999999999999"), GOOD, {SIGNATURE_HEADER: sign(GOOD)}
    )
    assert response.status_code == 404


async def test_oversized_body_is_413_without_reading_it_all(bed: Bed) -> None:
    huge = b"x" * (300 * 1024)
    assert (await post(bed.url, huge, {SIGNATURE_HEADER: sign(huge)})).status_code == 413

    async def stream() -> AsyncIterator[bytes]:  # chunked: no Content-Length to trust
        for _ in range(100):
            yield b"y" * 8192

    async with httpx.AsyncClient() as http:
        response = await http.post(bed.url, content=stream(), headers={SIGNATURE_HEADER: "sha256=00"})
    assert response.status_code == 413


@pytest.mark.parametrize(
    "signature",
    [
        lambda raw: hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest(),
        lambda raw: hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest().upper(),
        lambda raw: "SHA256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest(),
        lambda raw: base64.b64encode(hmac.new(SECRET.encode(), raw, hashlib.sha256).digest()).decode(),
    ],
    ids=["hex", "HEX", "prefixed", "base64"],
)
async def test_every_signature_encoding_is_accepted(bed: Bed, signature: Any) -> None:
    response = await post(bed.url, GOOD, {SIGNATURE_HEADER: signature(GOOD)})
    assert response.status_code == 200 and response.json() == {"ok": True, "duplicate": False}


def _digest(raw: bytes) -> bytes:
    return hmac.new(SECRET.encode(), raw, hashlib.sha256).digest()


# Signatures that share a prefix with the right one, or have it as their prefix: none may pass.
NEAR_MISSES = {
    "hex, last byte cut": lambda raw: "sha256=" + _digest(raw).hex()[:62],
    "hex, half": lambda raw: "sha256=" + _digest(raw).hex()[:32],
    "hex, one byte, no prefix": lambda raw: _digest(raw).hex()[:2],
    "prefix only": lambda raw: "sha256=",
    "hex, a byte too many": lambda raw: "sha256=" + _digest(raw).hex() + "00",
    "base64, last bytes cut": lambda raw: base64.b64encode(_digest(raw)).decode()[:40],
    "base64, first 3 bytes": lambda raw: base64.b64encode(_digest(raw)).decode()[:4],
    "base64, a byte too many": lambda raw: base64.b64encode(_digest(raw) + b"\0").decode(),
}


@pytest.mark.parametrize("near_miss", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
async def test_a_truncated_or_extended_signature_is_not_a_match(bed: Bed, near_miss: Callable[[bytes], str]) -> None:
    assert signature_matches(GOOD, "sha256=" + _digest(GOOD).hex(), SECRET)  # the whole one is right
    assert not signature_matches(GOOD, near_miss(GOOD), SECRET)
    response = await post(bed.url, GOOD, {SIGNATURE_HEADER: near_miss(GOOD)})
    assert response.status_code == 401
    await bed.outbox.deliver_due()
    assert bed.slack.posted == [] and bed.discord.posted == []
    assert (await bed.store.outbox_depth())[0] == 0  # nothing was stored either


async def test_unknown_event_is_acknowledged_but_not_alerted(bed: Bed) -> None:
    raw = envelope("visitor.waved")
    response = await post(bed.url, raw, {SIGNATURE_HEADER: sign(raw)})
    assert response.status_code == 202
    await bed.outbox.deliver_due()
    assert bed.slack.posted == []


async def test_storage_failure_is_the_only_5xx(bed: Bed) -> None:
    bed.store._db.close()  # the disk went away
    response = await post(bed.url, GOOD, {SIGNATURE_HEADER: sign(GOOD)})
    assert response.status_code == 503


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        st.binary(max_size=2000),
        st.text(max_size=500).map(str.encode),
        st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=5).map(lambda d: json.dumps(d).encode()),
    ),
    signature=st.one_of(st.none(), st.text(max_size=80)),
    content_type=st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]),
)
async def test_fuzzed_requests_never_5xx_and_never_alert(
    bed: Bed, body: bytes, signature: str | None, content_type: str
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    # Only values an HTTP client can send at all (httpx refuses padded or non-ASCII header values).
    if signature is not None and signature.isprintable() and signature.isascii() and signature.strip() == signature:
        headers[SIGNATURE_HEADER] = signature
    async with httpx.AsyncClient() as http:
        response = await http.post(bed.url, content=body, headers=headers)
    assert 400 <= response.status_code < 500
    assert await bed.store.outbox_due() == []


# --- dedupe, delivery, outages -------------------------------------------------------------------


async def test_same_event_four_times_is_one_alert(bed: Bed) -> None:
    for attempt in range(4):
        response = await post(bed.url, GOOD, {SIGNATURE_HEADER: sign(GOOD)})
        assert response.status_code == 200 and response.json()["duplicate"] is (attempt > 0)
    # A re-sent escalation with other bytes (a new timestamp) is the same escalation.
    again = envelope(minutes_ago=0.5)
    assert (await post(bed.url, again, {SIGNATURE_HEADER: sign(again)})).json()["duplicate"] is True
    await bed.outbox.deliver_due()
    assert len(bed.slack.posts_to("CALERT")) == 1 and len(bed.discord.posts_to("555")) == 1


async def test_escalation_card_with_mentions_per_platform(bed: Bed) -> None:
    await post(bed.url, GOOD, {SIGNATURE_HEADER: sign(GOOD)})
    await bed.outbox.deliver_due()
    [slack] = bed.slack.posted
    assert slack.card["text"].startswith("<@UONCALL> ") and "<@&777>" not in slack.card["text"]
    blocks = json.dumps(slack.card["blocks"])
    assert "A visitor asked for a human" in blocks and "Support Bot" in blocks and "I want a human" in blocks
    assert "visitor-42" in blocks and "insitechat_alert:claim:" in blocks
    [discord] = bed.discord.posted
    assert discord.card["content"] == "<@&777>"
    assert discord.card["embed"]["title"].startswith("🙋")
    assert discord.card["components"][0]["components"][0]["label"] == "Claim"


async def test_hostile_visitor_text_cannot_ping(bed: Bed) -> None:
    raw = envelope(message="<!channel> @here @everyone <@U123> <!subteam^S1> <@&999>")
    await post(bed.url, raw, {SIGNATURE_HEADER: sign(raw)})
    await bed.outbox.deliver_due()
    blocks = json.dumps(bed.slack.posted[0].card["blocks"])
    for ping in ("<!channel>", "<!subteam^S1>", "<@U123>", '@here"', "@everyone"):
        assert ping not in blocks
    description = bed.discord.posted[0].card["embed"]["description"]
    assert "@everyone" not in description and "<@&999>" not in description


async def test_outage_and_restart_deliver_exactly_once(tmp_path: Path) -> None:
    clock = ManualClock()
    clock._epoch_offset = datetime.now(UTC).timestamp() - clock.monotonic()
    settings = make_settings()
    first = Bed(tmp_path / "s.db", settings, clock)
    await first.start()
    first.slack.down = True
    assert (await post(first.url, GOOD, {SIGNATURE_HEADER: sign(GOOD)})).status_code == 200
    for _ in range(30):  # an hour of Slack failing: backoffs grow, nothing is dropped
        await first.outbox.deliver_due()
        clock.advance(120)
    assert first.slack.posted == [] and len(first.discord.posted) == 1
    assert (await first.store.outbox_depth())[0] == 1
    await first.close()
    # The bridge restarts; Slack is back but loses the answer to the first post.
    second = Bed(tmp_path / "s.db", settings, clock)
    await second.start()
    second.slack.crash_after_post = 1
    await second.outbox.deliver_due()
    clock.advance(400)
    await second.outbox.deliver_due()
    assert len(second.slack.posted) == 1  # it looked (find_alert) instead of posting again
    assert "find_alert" in second.slack.calls
    assert second.discord.posted == []  # delivered before the restart, not again
    assert (await second.store.outbox_depth())[0] == 0
    await second.close()


async def test_visitor_session_is_grouped_in_one_thread(tmp_path: Path) -> None:
    b = Bed(tmp_path / "s.db", make_settings(", conversation.started, message.received"), SystemClock())
    await b.start()
    for event in ("conversation.started", "message.received", ESCALATED):
        raw = envelope(event)
        assert (await post(b.url, raw, {SIGNATURE_HEADER: sign(raw)})).status_code == 200
    await b.outbox.deliver_due()
    root, message, escalation = b.slack.posts_to("CALERT")
    assert root.thread == "" and message.thread == root.reference and escalation.thread == root.reference
    assert escalation.broadcast and not message.broadcast
    assert escalation.card["text"].startswith("<@UONCALL>") and "<@UONCALL>" not in message.card["text"]
    await b.close()


async def test_events_about_the_bridges_own_sessions_do_not_echo(tmp_path: Path) -> None:
    b = Bed(tmp_path / "s.db", make_settings(", conversation.started, message.received"), SystemClock())
    await b.start()
    conversation = Conversation("slack", "T1", "C1", "100.1")
    await b.desk.remember_exchange(conversation, conversation.session_id(), "how do I reset?", "Click reset.")
    for event in ("conversation.started", "message.received", ESCALATED):
        raw = envelope(event, session_id=conversation.session_id(), conversation_id="")
        assert (await post(b.url, raw, {SIGNATURE_HEADER: sign(raw)})).status_code == 200
    await b.outbox.deliver_due()
    [escalation] = b.slack.posted  # only the escalation, and it links to the Slack thread
    assert "https://slack.example/C1/100.1" in json.dumps(escalation.card["blocks"])
    # Someone in the Slack thread asked, not a website visitor.
    assert "asked for a human in chat" in escalation.card["text"] and "visitor" not in escalation.card["text"]
    await b.close()


async def test_send_test_from_the_emulator_gives_a_visible_alert(bed: Bed) -> None:
    emulator = Emulator.sandbox(webhook_url=bed.url, webhook_secret=SECRET)
    await emulator.start()
    try:
        attempt = await emulator.send_test(BOT)
        assert attempt.status == 200
        await bed.outbox.deliver_due()
        assert "Test alert" in bed.slack.posted[0].card["text"]
    finally:
        await emulator.stop()


async def test_emulator_escalation_and_lead_reach_both_platforms(bed: Bed) -> None:
    emulator = Emulator.sandbox(webhook_url=bed.url, webhook_secret=SECRET, webhook_retry_delays=(0.05, 0.1, 0.2))
    await emulator.start()
    try:
        await emulator.visitor_message(BOT, "hello", session_id="web-1")
        await emulator.visitor_message(BOT, "can I talk to a human please", session_id="web-1")
        await emulator.capture_lead(
            BOT, name="Ada", email="ada@example.com", phone="+1 555", custom_data={"plan": "pro"}
        )
        await emulator.wait_for_webhooks()
        await bed.outbox.deliver_due()
        cards = sorted((json.dumps(p.card) for p in bed.slack.posted), key=lambda c: "lead" in c)
        assert len(cards) == 2  # started/received are not routed: one escalation, one lead
        assert "talk to a human" in cards[0] and "ada@example.com" in cards[1] and "pro" in cards[1]
        assert len(bed.discord.posted) == 2
    finally:
        await emulator.stop()


# --- claim, resolve, talk to a human -------------------------------------------------------------


async def test_claim_and_resolve_update_every_copy(bed: Bed) -> None:
    await post(bed.url, GOOD, {SIGNATURE_HEADER: sign(GOOD)})
    await bed.outbox.deliver_due()
    alert_id = bed.slack.posted[0].card["blocks"][-1]["elements"][0]["value"]
    claimed = await bed.desk.act(alert_id, "claim", "<@UALICE>")
    assert claimed is not None and claimed.state.value == "claimed"
    assert (await bed.desk.act(alert_id, "claim", "<@UBOB>")).claimed_by == "<@UALICE>"  # second click: no change
    await bed.outbox.deliver_due()
    [slack_update] = bed.slack.posted[0].updates
    assert "Claimed by" in json.dumps(slack_update) and "<@UALICE>" in json.dumps(slack_update)
    assert "Claimed by" in bed.discord.posted[0].updates[0]["embed"]["footer"]["text"]
    await bed.desk.act(alert_id, "resolve", "<@UALICE>")
    await bed.outbox.deliver_due()
    last = bed.slack.posted[0].updates[-1]
    assert "Resolved by" in json.dumps(last) and not any(b["type"] == "actions" for b in last["blocks"])


async def test_talk_to_a_human_pauses_the_thread_until_resolved(bed: Bed) -> None:
    conversation = Conversation("discord", "G1", "42", "900")
    await bed.desk.remember_exchange(conversation, conversation.session_id(), "where is my order?", "It shipped.")
    alert = await bed.desk.request_human(BOT, conversation, "@ada")
    assert alert is not None and await bed.desk.paused(conversation)
    await bed.outbox.deliver_due()
    card = json.dumps(bed.slack.posted[0].card)
    assert "where is my order?" in card and "https://discord.example/42/900" in card
    await bed.desk.act(alert.id, "resolve", "<@UBOB>")
    await bed.outbox.deliver_due()
    assert not await bed.desk.paused(conversation)
    [notice] = bed.discord.sent
    assert notice.conversation == conversation and "I'm back" in notice.parts[0]


def test_has_human_route_follows_escalation_rules() -> None:
    desk = AlertDesk(make_settings(), SQLiteStore(), SystemClock())
    assert desk.has_human_route(BOT)
    assert not desk.has_human_route("11111111-2222-4333-8444-555555555555")


async def test_outbox_worker_runs_in_the_background(bed: Bed) -> None:
    bed.outbox.start()
    try:
        await post(bed.url, GOOD, {SIGNATURE_HEADER: sign(GOOD)})
        for _ in range(200):
            if bed.slack.posted and bed.discord.posted:
                break
            await asyncio.sleep(0.01)
        assert len(bed.slack.posted) == 1 and len(bed.discord.posted) == 1
    finally:
        await bed.outbox.stop()


async def test_leads_cannot_be_claimed(bed: Bed) -> None:
    raw = envelope("lead.captured", lead_id="L-7", name="Ada", email="ada@example.com")
    await post(bed.url, raw, {SIGNATURE_HEADER: sign(raw)})
    await bed.outbox.deliver_due()
    assert "actions" not in json.dumps(bed.slack.posted[0].card["blocks"])
    lead = bed.slack.posted[0]
    alert_id = lead.key.split("|")[0]  # outbox keys are "<alert id>|<destination>"
    unchanged = await bed.desk.act(alert_id, "resolve", "<@UALICE>")
    assert unchanged is not None and unchanged.state.value == "open"
    await bed.outbox.deliver_due()
    assert lead.updates == []


# --- escalation rounds and cards that change while they are posted ------------------------------


async def test_a_second_escalation_after_a_resolve_gets_a_new_card(bed: Bed) -> None:
    first = await post(bed.url, GOOD, {SIGNATURE_HEADER: sign(GOOD)})
    assert first.json()["duplicate"] is False
    await bed.outbox.deliver_due()
    [card] = bed.slack.posted
    await bed.desk.act(card.key.split("|")[0], "resolve", "<@UALICE>")
    again = envelope(minutes_ago=0.5)  # the same visitor session asks for a human again
    response = await post(bed.url, again, {SIGNATURE_HEADER: sign(again)})
    assert response.status_code == 200 and response.json()["duplicate"] is False
    await bed.outbox.deliver_due()
    assert len(bed.slack.posted) == 2 and len(bed.discord.posted) == 2
    assert bed.slack.posted[1].key.split("|")[0] != card.key.split("|")[0]  # a new round, its own alert
    # InsiteChat's retry of that second delivery is still one card.
    assert (await post(bed.url, again, {SIGNATURE_HEADER: sign(again)})).json()["duplicate"] is True
    await bed.outbox.deliver_due()
    assert len(bed.slack.posted) == 2


async def test_the_same_escalation_while_its_alert_is_open_is_one_card(bed: Bed) -> None:
    await post(bed.url, GOOD, {SIGNATURE_HEADER: sign(GOOD)})
    again = envelope(minutes_ago=0.5)
    assert (await post(bed.url, again, {SIGNATURE_HEADER: sign(again)})).json()["duplicate"] is True
    await bed.outbox.deliver_due()
    assert len(bed.slack.posted) == 1


def escalation_at(clock: ManualClock) -> bytes:
    """An escalation stamped with the injected clock's time (the receiver refuses old ones)."""
    stamp = datetime.fromtimestamp(clock.time(), UTC).isoformat()
    return json.dumps({"event": ESCALATED, "chatbot_id": BOT, "timestamp": stamp,
                       "data": {"session_id": "visitor-7", "message": "a human please"}}).encode()


async def test_an_escalation_of_the_same_session_days_later_gets_a_new_card(tmp_path: Path) -> None:
    clock = ManualClock()
    bed = Bed(tmp_path / "state.db", make_settings(), clock)
    await bed.start()
    try:
        raw = escalation_at(clock)
        assert (await post(bed.url, raw, {SIGNATURE_HEADER: sign(raw)})).json()["duplicate"] is False
        await bed.outbox.deliver_due()
        [old] = bed.slack.posted
        clock.advance(2 * 86_400)  # open (never resolved), two days later
        raw = escalation_at(clock)
        response = await post(bed.url, raw, {SIGNATURE_HEADER: sign(raw)})
        assert response.status_code == 200 and response.json()["duplicate"] is False
        await bed.outbox.deliver_due()
        assert len(bed.slack.posted) == 2 and len(bed.discord.posted) == 2
        # The old card's buttons still point at its own alert, posts and all.
        old_id = old.key.split("|")[0]
        assert await bed.desk.post_reference(old_id, "slack:CALERT") == old.reference
        claimed = await bed.desk.act(old_id, "claim", "<@UALICE>")
        assert claimed is not None and claimed.state.value == "claimed"
    finally:
        await bed.close()


async def test_a_claim_while_a_card_is_being_posted_reaches_that_card(bed: Bed) -> None:
    await post(bed.url, GOOD, {SIGNATURE_HEADER: sign(GOOD)})
    bed.slack.gate = asyncio.Event()  # Slack takes the card, its answer is slow
    delivering = asyncio.create_task(bed.outbox.deliver_due())
    await asyncio.wait_for(bed.slack.posting.wait(), 5)
    for _ in range(200):  # Discord's copy is posted meanwhile (destinations go side by side)
        if await bed.desk.post_reference(bed.slack.posted[0].key.split("|")[0], "discord:555"):
            break
        await asyncio.sleep(0.01)
    alert_id = bed.slack.posted[0].key.split("|")[0]
    await bed.desk.act(alert_id, "claim", "<@UALICE>")  # clicked on the Discord card
    bed.slack.gate.set()
    await delivering
    await bed.outbox.deliver_due()
    for copy in (bed.slack.posted[0], bed.discord.posted[0]):
        assert copy.updates, f"the {copy.channel} card was never updated"
        assert "Claimed by" in json.dumps(copy.updates[-1])


async def test_cards_that_waited_out_an_outage_go_as_soon_as_the_platform_is_back(tmp_path: Path) -> None:
    clock = ManualClock()
    bed = Bed(tmp_path / "state.db", make_settings(), clock)
    await bed.start()
    try:
        bed.slack.down = True
        raw = escalation_at(clock)
        assert (await post(bed.url, raw, {SIGNATURE_HEADER: sign(raw)})).status_code == 200
        for _ in range(5):  # five failed tries: the next one is minutes away
            clock.advance(400)
            await bed.outbox.deliver_due()
        assert bed.slack.posted == [] and len(bed.discord.posted) == 1
        bed.slack.down = False
        assert await bed.outbox.deliver_due() == 0  # still backing off...
        await bed.outbox.platform_up("slack")  # ...until Slack is connected again
        assert await bed.outbox.deliver_due() == 1
        assert len(bed.slack.posted) == 1 and len(bed.discord.posted) == 1
    finally:
        await bed.close()


async def test_the_outbox_worker_stops_even_when_work_is_woken_as_it_is_stopped(bed: Bed) -> None:
    # A wake-up and the stop's cancel in one loop turn: Python 3.11's wait_for returned the
    # finished wait and dropped the cancel, so the worker polled on and stop() waited forever.
    for _ in range(20):
        bed.outbox.start()
        await asyncio.sleep(0.01)  # the worker waits for work
        bed.outbox.wake()
        await asyncio.wait_for(bed.outbox.stop(), 5)
