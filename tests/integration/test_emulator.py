"""The InsiteChat emulator, driven over real loopback HTTP like the documented service."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import itertools
import json
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict

from bridge.clock import ManualClock
from bridge.emulator import (
    EVENT_ESCALATED,
    EVENT_LEAD,
    EVENT_MESSAGE,
    EVENT_STARTED,
    QUOTA_DETAIL,
    SANDBOX_CHATBOT_ID,
    SANDBOX_KEY,
    SIGNATURE_HEADER,
    TEST_EVENT,
    ChatbotRecord,
    Emulator,
    serve_forever,
)

SECRET = "whsec-test-secret"
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")
MISSING_ID = "00000000-0000-4000-8000-000000000000"
OLDER, NEWER = "2026-03-01T00:00:00.000000+00:00", "2026-04-01T00:00:00.000000+00:00"
RATE_LIMITED = {"detail": "API rate limit exceeded. Max 3 requests per minute."}


async def poll(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    """Wait until condition() holds; fail loudly at the deadline instead of sleeping blindly."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


@dataclass
class World:
    """Two accounts, so that ownership is always tested against a real neighbour."""

    emulator: Emulator
    key: str
    other_key: str
    bot: ChatbotRecord
    paused_bot: ChatbotRecord
    other_bot: ChatbotRecord

    def client(self, key: str | None = None, **kw: object) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.AsyncClient(base_url=self.emulator.base_url, headers=headers, **kw)  # type: ignore[arg-type]

    def chat_path(self, bot: ChatbotRecord | None = None) -> str:
        return f"/v1/chatbots/{(bot or self.bot).id}/chat"


Launcher = Callable[..., Awaitable[World]]


@pytest.fixture
async def launch() -> AsyncIterator[Launcher]:
    started: list[Emulator] = []

    async def _launch(*, monthly_quota: int | None = None, **kw: object) -> World:
        emulator = Emulator(**kw)  # type: ignore[arg-type]
        acme = emulator.add_account("Acme", monthly_quota=monthly_quota)
        other = emulator.add_account("Other")
        world = World(
            emulator=emulator,
            key=emulator.add_key(acme, "ic_test_acme"),
            other_key=emulator.add_key(other, "ic_test_other"),
            bot=emulator.add_chatbot(
                acme,
                "Support Bot",
                sources=[
                    {"type": "url", "title": "Help Center", "url": "https://acme.test/help", "created_at": OLDER},
                    {"type": "text", "title": "FAQ", "created_at": NEWER},
                ],
            ),
            paused_bot=emulator.add_chatbot(acme, "Sales Bot", provider="chatgpt", is_active=False),
            other_bot=emulator.add_chatbot(other, "Other Bot"),
        )
        await emulator.start()
        started.append(emulator)
        return world

    yield _launch
    for emulator in started:
        await emulator.stop()


@dataclass
class Receiver:
    """A webhook destination on loopback that keeps the raw bytes, as a verifier must."""

    statuses: deque[int] = field(default_factory=deque)  # answers to give, then 200
    delays: deque[float] = field(default_factory=deque)  # seconds to stall before answering
    hits: list[tuple[CIMultiDict[str], bytes]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.hits.append((request.headers.copy(), body))
        if self.delays:
            await asyncio.sleep(self.delays.popleft())
        return web.Response(status=self.statuses.popleft() if self.statuses else 200)

    def events(self) -> list[dict]:
        return [json.loads(body) for _, body in self.hits]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/insitechat", rec.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/insitechat"
    yield rec
    await runner.cleanup()


def hook(world: World, receiver: Receiver, events: tuple[str, ...] | None = None) -> None:
    world.bot.webhook_url = receiver.url
    world.bot.webhook_secret = SECRET
    if events is not None:
        world.bot.webhook_events = frozenset(events)


# ----- auth and ownership -----------------------------------------------------------


async def test_missing_malformed_unknown_and_revoked_keys_get_the_same_401(launch: Launcher) -> None:
    world = await launch()
    spare = world.emulator.add_key(world.emulator.accounts[world.bot.account_id], "ic_test_spare")
    async with world.client(spare) as client:
        assert (await client.get("/v1/chatbots")).status_code == 200
    world.emulator.revoke_key(spare)

    variants = {
        "missing": {},
        "malformed": {"Authorization": "Bearer not-a-key"},
        "unknown": {"Authorization": "Bearer ic_never_issued"},
        "wrong scheme": {"Authorization": f"Token {world.key}"},
        "revoked": {"Authorization": f"Bearer {spare}"},
    }
    async with httpx.AsyncClient(base_url=world.emulator.base_url) as client:
        answers = {name: await client.get("/v1/chatbots", headers=headers) for name, headers in variants.items()}
    assert {name: (r.status_code, r.json()) for name, r in answers.items()} == {
        name: (401, {"detail": "Unauthorized"}) for name in variants
    }


def test_keys_are_capped_at_five_per_account_and_must_look_like_keys() -> None:
    emulator = Emulator()
    account = emulator.add_account("Acme")
    keys = [emulator.add_key(account) for _ in range(5)]
    assert all(re.fullmatch(r"ic_[A-Za-z0-9_-]{1,29}", key) for key in keys)  # never secret-shaped
    with pytest.raises(ValueError):
        emulator.add_key(account)
    emulator.revoke_key(keys[0])
    emulator.add_key(account)  # revoking frees a slot
    with pytest.raises(ValueError):
        emulator.add_key(emulator.add_account("Other"), "sk_not_insitechat")
    assert len(SANDBOX_KEY) < 33 and SANDBOX_KEY.startswith("ic_")


async def test_another_accounts_chatbot_or_an_unknown_id_is_404(launch: Launcher) -> None:
    world = await launch()
    async with world.client() as client:
        for chatbot_id in (world.other_bot.id, MISSING_ID, "not-a-uuid"):
            for response in (
                await client.get(f"/v1/chatbots/{chatbot_id}"),
                await client.get(f"/v1/chatbots/{chatbot_id}/sources"),
                await client.post(f"/v1/chatbots/{chatbot_id}/chat", json={"message": "hi"}),
            ):
                assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})
        unknown_route = await client.get("/v1/nothing-here")
    assert (unknown_route.status_code, unknown_route.json()) == (404, {"detail": "Not Found"})
    assert world.emulator.accounts[world.other_bot.account_id].messages_used == 0


# ----- shapes -----------------------------------------------------------------------


async def test_list_detail_and_sources_have_the_documented_shapes(launch: Launcher) -> None:
    world = await launch()
    async with world.client() as client:
        listing = (await client.get("/v1/chatbots")).json()
        detail = (await client.get(f"/v1/chatbots/{world.bot.id}")).json()
        sources = (await client.get(f"/v1/chatbots/{world.bot.id}/sources")).json()

    assert isinstance(listing, list)  # a bare array, no envelope
    assert [(b["id"], b["name"], b["is_active"], b["provider"]) for b in listing] == [
        (world.bot.id, "Support Bot", True, "gemini"),
        (world.paused_bot.id, "Sales Bot", False, "chatgpt"),  # paused bots are still listed
    ]
    assert set(listing[0]) == {"id", "name", "slug", "provider", "is_active", "created_at"}
    assert listing[0]["slug"] == "support-bot"
    assert TIMESTAMP_RE.match(listing[0]["created_at"])

    assert {"id", "name", "slug", "provider", "system_prompt", "fallback_message"} <= set(detail)
    assert detail["id"] == world.bot.id

    assert [s["title"] for s in sources] == ["FAQ", "Help Center"]  # newest first
    assert sources[0]["url"] == "" and sources[1]["url"] == "https://acme.test/help"
    assert all(set(s) == {"id", "type", "title", "url", "status", "page_count", "created_at"} for s in sources)


@pytest.mark.parametrize(
    "raw, loc",
    [
        (b"{}", ["body", "data", "message"]),
        (b'{"message": ""}', ["body", "data", "message"]),
        (b'{"message": "   "}', ["body", "data", "message"]),
        (b'{"message": 5}', ["body", "data", "message"]),
        (b'{"message": "hi", "session_id": 7}', ["body", "data", "session_id"]),
        (b"not json", ["body", "data"]),
        (b'["hi"]', ["body", "data"]),
    ],
)
async def test_a_malformed_chat_body_is_422_with_a_ninja_style_list(
    launch: Launcher, raw: bytes, loc: list[str]
) -> None:
    world = await launch()
    async with world.client() as client:
        response = await client.post(world.chat_path(), content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == loc and error["msg"] and error["type"]
    assert world.emulator.accounts[world.bot.account_id].messages_used == 0  # no quota spent


# ----- limits -----------------------------------------------------------------------


async def test_rolling_rate_limit_per_key_across_endpoints_then_recovery(launch: Launcher) -> None:
    clock = ManualClock()
    world = await launch(clock=clock, rate_limit=3, rate_window=10.0)
    async with world.client() as client, world.client(world.other_key) as neighbour:
        assert (await client.get("/v1/chatbots")).status_code == 200
        clock.advance(4)
        assert (await client.get(f"/v1/chatbots/{world.bot.id}")).status_code == 200
        assert (await client.post(world.chat_path(), json={"message": "hi"})).status_code == 200
        limited = await client.get(f"/v1/chatbots/{world.bot.id}/sources")
        assert (limited.status_code, limited.json()) == (429, RATE_LIMITED)
        assert "Retry-After" not in limited.headers  # like the real service, by default
        assert (await neighbour.get("/v1/chatbots")).status_code == 200  # per key

        clock.advance(5.9)  # the first request is 9.9 s old: still inside the window
        assert (await client.get("/v1/chatbots")).status_code == 429
        clock.advance(0.2)  # now it has left the window, and only it
        assert (await client.get("/v1/chatbots")).status_code == 200
        assert (await client.get("/v1/chatbots")).status_code == 429


async def test_retry_after_header_appears_only_when_switched_on(launch: Launcher) -> None:
    clock = ManualClock()
    world = await launch(clock=clock, rate_limit=1, rate_window=30.0, retry_after_header=True)
    async with world.client() as client:
        await client.get("/v1/chatbots")
        assert (await client.get("/v1/chatbots")).headers["Retry-After"] == "30"
        clock.advance(12)
        assert (await client.get("/v1/chatbots")).headers["Retry-After"] == "18"


async def test_monthly_quota_is_spent_by_chat_only_and_says_so(launch: Launcher) -> None:
    world = await launch(monthly_quota=2)
    async with world.client() as client:
        for text in ("one", "two"):
            assert (await client.post(world.chat_path(), json={"message": text})).status_code == 200
        exhausted = await client.post(world.chat_path(), json={"message": "three"})
        listing = await client.get("/v1/chatbots")
    assert (exhausted.status_code, exhausted.json()) == (429, {"detail": QUOTA_DETAIL})
    assert listing.status_code == 200


# ----- conversation -----------------------------------------------------------------


async def test_memory_keeps_the_last_ten_turns_per_session(launch: Launcher) -> None:
    world = await launch()
    questions = [f"question {n:02d}" for n in range(1, 13)]
    async with world.client() as client:

        async def ask(text: str, session: str) -> str:
            response = await client.post(world.chat_path(), json={"message": text, "session_id": session})
            return response.json()["response"]

        replies = [await ask(q, "s-1") for q in questions]
        stranger = await ask("question 99", "s-2")

    assert replies[0] == '**Support Bot** (turn 1): you asked "question 01". This is the start of our conversation.'
    assert all(q in replies[10] for q in questions[:10])  # 11th turn still sees the first
    assert "(turn 12)" in replies[11]
    assert "question 01" not in replies[11]  # 11 turns back: forgotten
    assert all(f'"{q}"' in replies[11] for q in questions[1:11])
    assert "Earlier" not in stranger and "question 0" not in stranger  # sessions are separate


async def test_calls_without_session_id_share_one_conversation(launch: Launcher) -> None:
    world = await launch()
    account = world.emulator.accounts[world.bot.account_id]
    second_key = world.emulator.add_key(account, "ic_test_second")
    async with world.client() as first, world.client(second_key) as second:
        await first.post(world.chat_path(), json={"message": "remember the blue door"})
        shared = (await second.post(world.chat_path(), json={"message": "what colour?"})).json()["response"]
        separate = (await first.post(world.chat_path(), json={"message": "hi", "session_id": "own"})).json()["response"]
    assert "(turn 2)" in shared and '"remember the blue door"' in shared
    assert "blue door" not in separate


async def test_scripted_replies_override_by_substring_and_stay_in_history(launch: Launcher) -> None:
    world = await launch()
    markdown = "# Refunds\n\n* **30 days**\n* `no questions`\n\n@everyone <!channel>"
    world.emulator.script_reply(world.bot.id, "refund", "old answer")
    world.emulator.script_reply(world.bot.id, "REFUND", markdown)  # latest wins, any case
    world.emulator.script_reply(world.other_bot.id, "hello", "not for this bot")
    async with world.client() as client:

        async def ask(text: str) -> str:
            response = await client.post(world.chat_path(), json={"message": text, "session_id": "s"})
            return response.json()["response"]

        assert await ask("How do refunds work?") == markdown
        follow_up = await ask("hello")
    assert follow_up.startswith("**Support Bot** (turn 2)") and '"How do refunds work?"' in follow_up


# ----- faults and latency -----------------------------------------------------------


async def test_injected_500s_hit_only_matching_requests_then_stop(launch: Launcher) -> None:
    world = await launch()
    fault = world.emulator.inject(status=500, count=2, path_contains="/chat")
    async with world.client() as client:
        assert (await client.get("/v1/chatbots")).status_code == 200
        first = await client.post(world.chat_path(), json={"message": "a"})
        second = await client.post(world.chat_path(), json={"message": "b"})
        third = await client.post(world.chat_path(), json={"message": "c"})
    assert (first.status_code, first.json()) == (500, {"detail": "Internal server error"})
    assert (second.status_code, third.status_code) == (500, 200)
    assert fault.hits == 2
    assert world.emulator.accounts[world.bot.account_id].messages_used == 1  # faults spend nothing
    assert [(r.method, r.status) for r in world.emulator.requests] == [
        ("GET", 200), ("POST", 500), ("POST", 500), ("POST", 200)
    ]
    assert world.emulator.requests[-1].json == {"message": "c"}
    assert world.emulator.requests[-1].headers["Authorization"] == f"Bearer {world.key}"


async def test_disconnect_fault_drops_the_connection_without_an_answer(launch: Launcher) -> None:
    world = await launch()
    world.emulator.inject("disconnect", path_contains="/chat")
    async with world.client() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(world.chat_path(), json={"message": "a"})
        assert (await client.post(world.chat_path(), json={"message": "b"})).status_code == 200
    assert [r.status for r in world.emulator.requests] == [None, 200]


async def test_hang_fault_outlasts_the_client_timeout_and_stop_releases_it(launch: Launcher) -> None:
    world = await launch()
    world.emulator.inject("hang", path_contains="/chat")
    async with world.client(timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(world.chat_path(), json={"message": "a"})
    started = time.monotonic()
    await world.emulator.stop()
    assert time.monotonic() - started < 0.4  # no shutdown grace wasted on the hung handler


async def test_latency_is_spent_on_the_injected_clock(launch: Launcher) -> None:
    clock = ManualClock()
    world = await launch(clock=clock, latency=5.0)
    async with world.client() as client:
        pending = asyncio.create_task(client.get("/v1/chatbots"))
        await poll(lambda: clock.sleepers == 1)
        await asyncio.sleep(0.02)  # let a would-be early answer arrive, if there were one
        assert not pending.done()
        clock.advance(5.0)
        assert (await asyncio.wait_for(pending, 2)).status_code == 200


# ----- webhooks ---------------------------------------------------------------------


@pytest.mark.parametrize("signature_format", ["hex", "sha256=hex", "base64"])
async def test_api_chat_fires_signed_envelopes_in_each_signature_format(
    launch: Launcher, receiver: Receiver, signature_format: str
) -> None:
    world = await launch(signature_format=signature_format)
    hook(world, receiver)
    async with world.client() as client:
        await client.post(world.chat_path(), json={"message": "Where is my order?", "session_id": "icb-slack-T1"})
    await poll(lambda: len(receiver.hits) == 2)

    for headers, raw in receiver.hits:
        mac = hmac.new(SECRET.encode(), raw, hashlib.sha256)
        expected = {
            "hex": mac.hexdigest(),
            "sha256=hex": "sha256=" + mac.hexdigest(),
            "base64": base64.b64encode(mac.digest()).decode(),
        }[signature_format]
        assert headers[SIGNATURE_HEADER] == expected
        assert headers["Content-Type"] == "application/json"
    started, received = receiver.events()
    assert [started["event"], received["event"]] == [EVENT_STARTED, EVENT_MESSAGE]
    assert set(started) == {"event", "chatbot_id", "timestamp", "data"}
    assert started["chatbot_id"] == world.bot.id and TIMESTAMP_RE.match(started["timestamp"])
    assert received["data"] == {
        "session_id": "icb-slack-T1",  # the API caller's own session id
        "conversation_id": started["data"]["conversation_id"],
        "message": "Where is my order?",
        "message_count": 1,
    }


async def test_escalation_fires_once_per_conversation(launch: Launcher, receiver: Receiver) -> None:
    world = await launch()
    hook(world, receiver, events=(EVENT_ESCALATED,))
    ask = world.emulator.visitor_message
    await ask(world.bot.id, "hello", session_id="a")
    await ask(world.bot.id, "Can I talk to a HUMAN?", session_id="a")
    await ask(world.bot.id, "please, a real person", session_id="a")
    await ask(world.bot.id, "my personal data", session_id="b")  # not a request for a human
    await ask(world.bot.id, "Representative!", session_id="b")
    await world.emulator.wait_for_webhooks()
    assert [(e["event"], e["data"]["session_id"], e["data"]["message_count"]) for e in receiver.events()] == [
        (EVENT_ESCALATED, "a", 2),
        (EVENT_ESCALATED, "b", 2),
    ]


async def test_failed_delivery_is_retried_on_the_real_schedule_then_delivered(
    launch: Launcher, receiver: Receiver
) -> None:
    clock = ManualClock(autojump=True)  # the default 1/5/15-minute schedule, without the wait
    world = await launch(clock=clock)
    hook(world, receiver, events=(EVENT_MESSAGE,))
    receiver.statuses.extend([500, 503])
    await world.emulator.visitor_message(world.bot.id, "hi", session_id="v")
    await asyncio.wait_for(world.emulator.wait_for_webhooks(), 3)

    attempts = world.emulator.webhook_attempts
    assert [(a.attempt, a.status, a.outcome) for a in attempts] == [
        (1, 500, "retrying"), (2, 503, "retrying"), (3, 200, "delivered")
    ]
    assert [a.time - attempts[0].time for a in attempts] == [0.0, 60.0, 360.0]
    assert len({body for _, body in receiver.hits}) == 1  # every retry re-sends the same bytes


async def test_delivery_is_dropped_after_three_retries(launch: Launcher, receiver: Receiver) -> None:
    world = await launch(webhook_retry_delays=(0.01, 0.05, 0.15))
    hook(world, receiver, events=(EVENT_MESSAGE,))
    receiver.statuses.extend([500] * 10)
    await world.emulator.visitor_message(world.bot.id, "hi", session_id="v")
    await asyncio.wait_for(world.emulator.wait_for_webhooks(), 3)

    attempts = world.emulator.webhook_attempts
    assert [(a.attempt, a.outcome) for a in attempts] == [
        (1, "retrying"), (2, "retrying"), (3, "retrying"), (4, "dropped")
    ]
    gaps = [later.time - earlier.time for earlier, later in itertools.pairwise(attempts)]
    assert all(gap >= delay for gap, delay in zip(gaps, (0.01, 0.05, 0.15), strict=True))
    assert len(receiver.hits) == 4


async def test_a_timed_out_delivery_counts_as_failed(launch: Launcher, receiver: Receiver) -> None:
    world = await launch(webhook_retry_delays=(0.01,), webhook_timeout=0.2)
    hook(world, receiver, events=(EVENT_MESSAGE,))
    receiver.delays.append(1.0)
    await world.emulator.visitor_message(world.bot.id, "hi", session_id="v")
    await asyncio.wait_for(world.emulator.wait_for_webhooks(), 3)
    first, second = world.emulator.webhook_attempts
    assert (first.status, first.outcome, second.status, second.outcome) == (None, "retrying", 200, "delivered")
    assert first.error and "Timeout" in first.error


async def test_stop_cancels_pending_retries(launch: Launcher, receiver: Receiver) -> None:
    world = await launch()  # real clock, one-minute first retry
    hook(world, receiver, events=(EVENT_MESSAGE,))
    receiver.statuses.append(500)
    await world.emulator.visitor_message(world.bot.id, "hi", session_id="v")
    await poll(lambda: len(world.emulator.webhook_attempts) == 1)
    await asyncio.wait_for(world.emulator.stop(), 1)
    await asyncio.sleep(0)
    leftovers = [t for t in asyncio.all_tasks() if "_retry" in repr(t.get_coro()) and not t.done()]
    assert leftovers == []


async def test_lead_captured_over_http_and_python(launch: Launcher, receiver: Receiver) -> None:
    world = await launch()
    hook(world, receiver)
    lead = {"name": "Ada", "email": "ada@example.com", "phone": "+44 1", "custom_data": {"plan": "team"}}
    async with httpx.AsyncClient(base_url=world.emulator.url) as client:
        answer = await client.post(f"/emulator/chatbots/{world.bot.id}/lead", json=lead)
    bare_id = await world.emulator.capture_lead(world.bot.id, email="bob@example.com")
    await world.emulator.wait_for_webhooks()

    with_data, bare = receiver.events()
    assert with_data["event"] == bare["event"] == EVENT_LEAD
    assert with_data["data"] == {"lead_id": answer.json()["lead_id"], **lead}
    assert bare["data"] == {"lead_id": bare_id, "name": "", "email": "bob@example.com", "phone": ""}


async def test_visitor_endpoint_answers_and_fires_events_in_order(launch: Launcher, receiver: Receiver) -> None:
    world = await launch()
    hook(world, receiver)
    async with httpx.AsyncClient(base_url=world.emulator.url) as client:  # no API key: not the real API
        visitor = f"/emulator/chatbots/{world.bot.id}/visitor"
        answer = await client.post(visitor, json={"session_id": "web-1", "message": "I need an agent"})
        invalid = await client.post(visitor, json={"message": "no session"})
    await poll(lambda: len(receiver.hits) == 3)
    assert "I need an agent" in answer.json()["response"]
    assert invalid.status_code == 422
    assert [(e["event"], e["data"]["session_id"]) for e in receiver.events()] == [
        (EVENT_STARTED, "web-1"),
        (EVENT_MESSAGE, "web-1"),
        (EVENT_ESCALATED, "web-1"),
    ]


async def test_send_test_posts_one_signed_sample_and_never_retries(launch: Launcher, receiver: Receiver) -> None:
    world = await launch()
    hook(world, receiver, events=(EVENT_LEAD,))  # the button ignores the event selection
    receiver.statuses.extend([200, 500])
    async with httpx.AsyncClient(base_url=world.emulator.url) as client:
        ok = await client.post(f"/emulator/chatbots/{world.bot.id}/send-test")
        failed = await client.post(f"/emulator/chatbots/{world.bot.id}/send-test")
    assert ok.json()["delivered"] is True and failed.json() == {"delivered": False, "status": 500, "error": None}
    headers, raw = receiver.hits[0]
    assert headers[SIGNATURE_HEADER] == "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    assert json.loads(raw)["event"] == TEST_EVENT
    await world.emulator.wait_for_webhooks()
    assert len(receiver.hits) == 2


# ----- sandbox ----------------------------------------------------------------------


async def test_serve_forever_prints_how_to_connect_and_stops_on_cancel() -> None:
    out = io.StringIO()
    server = asyncio.create_task(serve_forever("127.0.0.1", 0, out=out))
    await poll(lambda: "chatbot id" in out.getvalue())
    base_url = re.search(r"(http://127\.0\.0\.1:\d+/api)", out.getvalue()).group(1)  # type: ignore[union-attr]
    assert SANDBOX_KEY in out.getvalue() and SANDBOX_CHATBOT_ID in out.getvalue()
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {SANDBOX_KEY}"}) as client:
        [bot] = (await client.get("/v1/chatbots")).json()
        assert (bot["id"], bot["name"]) == (SANDBOX_CHATBOT_ID, "Sandbox Bot")
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
        with pytest.raises(httpx.ConnectError):
            await client.get("/v1/chatbots")
