"""The InsiteChat client against exact response sequences (respx) and a few real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import respx
from aiohttp import web

from bridge.clock import ManualClock
from bridge.insitechat import (
    MAX_MESSAGE_CHARS,
    BadRequest,
    Chatbot,
    ChatbotDetail,
    InsiteChatClient,
    InsiteChatError,
    NotFound,
    QuotaExhausted,
    RateLimited,
    RetryPolicy,
    ServerError,
    Source,
    Unauthorized,
    Unavailable,
)
from bridge.limiter import Grant, SlidingWindowLimiter

BASE = "https://ic.test/api"
KEY = "ic_" + "Zq8-tV3_" * 5 + "kP4w"  # 44 characters after the prefix, like a real key
BOT = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
CHAT = f"/v1/chatbots/{BOT}/chat"
START = 1_000_000.0
MakeClient = Callable[..., InsiteChatClient]
RATE_LIMIT = {"detail": "API rate limit exceeded. Max 60 requests per minute."}
QUOTA = {"detail": "Monthly message limit reached."}


def reply(text: str = "hello") -> httpx.Response:
    return httpx.Response(200, json={"response": text})


def fail(status: int, detail: Any = "boom", **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"detail": detail}, headers=headers)


class RecordingLimiter(SlidingWindowLimiter):
    """The real limiter, remembering what the client asked of it."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(55, 60.0, clock=clock)
        self.lanes: list[str] = []
        self.penalties: list[float] = []
        self.held: list[Grant] = []

    async def acquire(self, lane: str = "", *, hold: bool = False) -> Grant:
        self.lanes.append(lane)
        grant = await super().acquire(lane, hold=hold)
        self.held.append(grant)
        return grant

    def penalize(self, until: float) -> None:
        self.penalties.append(until)
        super().penalize(until)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START, autojump=True)


@pytest.fixture
def api() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False, using="httpx") as router:
        yield router


@pytest.fixture
async def make_client(clock: ManualClock) -> AsyncIterator[MakeClient]:
    made: list[InsiteChatClient] = []

    def make(base_url: str = BASE, **kwargs: Any) -> InsiteChatClient:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("random", lambda: 0.5)  # backoff = 0.75 x the cap
        made.append(InsiteChatClient(base_url, KEY, **kwargs))
        return made[-1]

    yield make
    for client in made:
        await client.aclose()


# --- requests and results ---------------------------------------------------------------------


@pytest.mark.parametrize("base_url", [BASE, BASE + "/"])
async def test_chat_sends_bearer_key_and_json_body(
    api: respx.MockRouter, make_client: MakeClient, base_url: str
) -> None:
    route = api.post(CHAT).mock(return_value=reply("**Hi** there"))
    client = make_client(base_url)
    assert await client.chat(BOT, "What are your hours?", "icb-abc") == "**Hi** there"
    request = route.calls.last.request
    assert request.url == f"{BASE}{CHAT}"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert json.loads(request.content) == {"message": "What are your hours?", "session_id": "icb-abc"}


async def test_a_cookie_the_service_sets_is_never_sent_back(api: respx.MockRouter, make_client: MakeClient) -> None:
    # The key authenticates; the client keeps no cookie jar (it costs CPU on every response).
    route = api.post(CHAT).mock(
        return_value=httpx.Response(200, json={"response": "hi"}, headers={"Set-Cookie": "lb=abc; Path=/"})
    )
    client = make_client()
    for _ in range(2):
        assert await client.chat(BOT, "hello", "icb-abc") == "hi"
    assert [call.request.headers.get("Cookie") for call in route.calls] == [None, None]


async def test_each_chatbot_path_goes_to_its_own_url(api: respx.MockRouter, make_client: MakeClient) -> None:
    # URLs are parsed once per path and reused: two chatbots never share one.
    other = "1b2c3d4e-5f60-7890-bcde-f01234567890"
    first = api.post(CHAT).mock(return_value=reply("one"))
    second = api.post(f"/v1/chatbots/{other}/chat").mock(return_value=reply("two"))
    client = make_client()
    answers = [await client.chat(bot, "hello", "icb-abc") for bot in (BOT, other, BOT, other)]
    assert answers == ["one", "two", "one", "two"]
    assert (first.call_count, second.call_count) == (2, 2)


async def test_chatbot_id_cannot_escape_its_path_segment(
    api: respx.MockRouter, make_client: MakeClient
) -> None:
    route = api.get("/v1/chatbots/..%2Fkeys").mock(return_value=httpx.Response(200, json={"id": "x"}))
    await make_client().get_chatbot("../keys")
    assert route.call_count == 1


async def test_list_chatbots_parses_loosely(api: respx.MockRouter, make_client: MakeClient) -> None:
    api.get("/v1/chatbots").mock(
        return_value=httpx.Response(
            200,
            json=[
                {
                    "id": "b1",
                    "name": "Support Bot",
                    "slug": "support-bot",
                    "provider": "gemini",
                    "is_active": False,
                    "created_at": "2026-03-15T10:30:00.123456+00:00",
                    "brand_new_field": {"x": 1},
                },
                {"id": "b2", "name": "Sales", "created_at": "2026-03-15T10:30:00Z"},
                {"name": "no id, useless"},
                "not even an object",
            ],
        )
    )
    bots = await make_client().list_chatbots()
    assert bots == [
        Chatbot(
            "b1", "Support Bot", "support-bot", "gemini", False, datetime(2026, 3, 15, 10, 30, 0, 123456, UTC)
        ),
        Chatbot("b2", "Sales", "", "", True, datetime(2026, 3, 15, 10, 30, tzinfo=UTC)),
    ]


async def test_get_chatbot_and_list_sources(api: respx.MockRouter, make_client: MakeClient) -> None:
    api.get(f"/v1/chatbots/{BOT}").mock(
        return_value=httpx.Response(
            200,
            json={
                "id": BOT,
                "name": "Support Bot",
                "slug": "support-bot",
                "provider": "chatgpt",
                "system_prompt": "Be kind.",
                "fallback_message": None,
                "temperature": 0.2,
            },
        )
    )
    api.get(f"/v1/chatbots/{BOT}/sources").mock(
        return_value=httpx.Response(
            200,
            json=[
                {"id": "s1", "type": "url", "title": "Help", "url": "https://x/help", "status": "done",
                 "page_count": 42, "created_at": "2026-04-01T00:00:00+00:00"},
                {"id": "s2", "type": "notion", "title": "Wiki", "status": "crawling", "page_count": None},
            ],
        )
    )
    client = make_client()
    detail = await client.get_chatbot(BOT)
    assert isinstance(detail, ChatbotDetail)
    assert (detail.id, detail.provider, detail.system_prompt) == (BOT, "chatgpt", "Be kind.")
    assert detail.fallback_message == ""  # null in the JSON
    assert detail.is_active and detail.created_at is None
    sources = await client.list_sources(BOT)
    april = datetime(2026, 4, 1, tzinfo=UTC)
    assert sources[0] == Source("s1", "url", "Help", "https://x/help", "done", 42, april)
    assert sources[1] == Source("s2", "notion", "Wiki", "", "crawling", None, None)


async def test_chat_message_is_capped_and_the_cut_is_logged(
    api: respx.MockRouter, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    route = api.post(CHAT).mock(return_value=reply())
    caplog.set_level(logging.DEBUG, logger="bridge.insitechat")
    await make_client().chat(BOT, "x" * (MAX_MESSAGE_CHARS + 1000), "s")
    assert len(json.loads(route.calls.last.request.content)["message"]) == MAX_MESSAGE_CHARS
    assert "cut from 5000 to 4000" in caplog.text


async def test_a_success_without_reply_text_is_a_server_error_and_not_resent(
    api: respx.MockRouter, make_client: MakeClient
) -> None:
    route = api.post(CHAT).mock(side_effect=[httpx.Response(200, json={"answer": "?"}), reply()])
    with pytest.raises(ServerError):
        await make_client().chat(BOT, "hi", "s")
    assert route.call_count == 1


# --- errors that never retry ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "detail", "error", "text"),
    [
        (401, "Invalid API key", Unauthorized, "Invalid API key"),
        (404, "Chatbot not found", NotFound, "Chatbot not found"),
        (400, "message is required", BadRequest, "message is required"),
        (
            422,
            [
                {"loc": ["body", "payload", "message"], "msg": "Field required", "type": "missing"},
                {"loc": ["body", "payload", "session_id"], "msg": "Input should be a valid string", "type": "x"},
            ],
            BadRequest,
            "body.payload.message: Field required; body.payload.session_id: Input should be a valid string",
        ),
    ],
)
async def test_client_errors_raise_at_once(
    api: respx.MockRouter,
    make_client: MakeClient,
    status: int,
    detail: Any,
    error: type[InsiteChatError],
    text: str,
) -> None:
    route = api.post(CHAT).mock(side_effect=[fail(status, detail), reply()])
    with pytest.raises(error) as caught:
        await make_client().chat(BOT, "hi", "s")
    assert route.call_count == 1
    assert caught.value.status == status
    assert text in str(caught.value)


async def test_a_proxy_error_page_still_gives_a_readable_error(
    api: respx.MockRouter, make_client: MakeClient
) -> None:
    api.get("/v1/chatbots").mock(return_value=httpx.Response(403, text="Forbidden by policy"))
    with pytest.raises(InsiteChatError) as caught:
        await make_client().list_chatbots()
    assert type(caught.value) is InsiteChatError
    assert (caught.value.status, "Forbidden by policy" in str(caught.value)) == (403, True)


# --- retries ---------------------------------------------------------------------------------


async def test_5xx_is_retried_with_jittered_backoff(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    route = api.get(f"/v1/chatbots/{BOT}").mock(
        side_effect=[fail(500), fail(502), httpx.Response(200, json={"id": BOT})]
    )
    jitter = iter([0.0, 1.0])
    client = make_client(random=lambda: next(jitter))
    assert (await client.get_chatbot(BOT)).id == BOT
    assert route.call_count == 3
    # Caps 0.5 s then 1 s; the jitter takes half and all of them.
    assert clock.monotonic() - START == pytest.approx(0.25 + 1.0)
    assert client.circuit_state() == "closed"


async def test_backoff_never_exceeds_max_backoff(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    route = api.get("/v1/chatbots").mock(side_effect=[fail(503)] * 6 + [httpx.Response(200, json=[])])
    policy = RetryPolicy(base_backoff=1.0, max_backoff=2.0, failure_threshold=100)
    assert await make_client(policy=policy, random=lambda: 1.0).list_chatbots() == []
    assert route.call_count == 7
    assert clock.monotonic() - START == pytest.approx(1.0 + 2.0 * 5)


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
async def test_chat_is_resent_when_the_request_never_left(
    api: respx.MockRouter, make_client: MakeClient, error: type[Exception]
) -> None:
    route = api.post(CHAT).mock(side_effect=[error, reply("ok")])
    assert await make_client().chat(BOT, "hi", "s") == "ok"
    assert route.call_count == 2


@pytest.mark.parametrize(
    "error", [httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.WriteTimeout]
)
async def test_chat_is_not_resent_once_the_request_may_have_arrived(
    api: respx.MockRouter, make_client: MakeClient, error: type[Exception]
) -> None:
    route = api.post(CHAT).mock(side_effect=[error, reply("ok")])
    with pytest.raises(Unavailable) as caught:
        await make_client().chat(BOT, "hi", "s")
    assert route.call_count == 1
    assert caught.value.request_sent


@pytest.mark.parametrize(
    "status", [500, 502, 504, 501], ids=["500-may-be-processed", "502-gateway", "504-gateway-timeout", "other-5xx"]
)
async def test_chat_is_not_resent_after_a_5xx_that_may_follow_processing(
    api: respx.MockRouter, make_client: MakeClient, status: int
) -> None:
    route = api.post(CHAT).mock(side_effect=[fail(status), reply("ok")])
    client = make_client()
    with pytest.raises(ServerError) as caught:
        await client.chat(BOT, "hi", "s")
    assert route.call_count == 1
    assert caught.value.status == status


async def test_chat_is_resent_once_after_a_503(api: respx.MockRouter, make_client: MakeClient) -> None:
    route = api.post(CHAT).mock(side_effect=[fail(503), reply("ok")])
    assert await make_client().chat(BOT, "hi", "s") == "ok"
    assert route.call_count == 2


async def test_chat_raises_after_a_second_503(api: respx.MockRouter, make_client: MakeClient) -> None:
    route = api.post(CHAT).mock(side_effect=[fail(503), fail(503), reply("ok")])
    with pytest.raises(ServerError) as caught:
        await make_client().chat(BOT, "hi", "s")
    assert route.call_count == 2
    assert caught.value.status == 503


async def test_chat_raises_after_a_second_connect_error(api: respx.MockRouter, make_client: MakeClient) -> None:
    route = api.post(CHAT).mock(side_effect=[httpx.ConnectError, httpx.ConnectError, reply("ok")])
    with pytest.raises(Unavailable) as caught:
        await make_client().chat(BOT, "hi", "s")
    assert route.call_count == 2
    assert not caught.value.request_sent


@pytest.mark.parametrize(
    "failures",
    [[fail(503), httpx.ConnectError], [httpx.ConnectError, fail(503)]],
    ids=["503-then-connect", "connect-then-503"],
)
async def test_chat_has_one_resend_in_total_across_failure_kinds(
    api: respx.MockRouter, make_client: MakeClient, failures: list[Any]
) -> None:
    route = api.post(CHAT).mock(side_effect=[*failures, reply("ok")])
    with pytest.raises((ServerError, Unavailable)):
        await make_client().chat(BOT, "hi", "s")
    assert route.call_count == 2


async def test_a_rate_limit_does_not_use_up_the_chat_resend(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    # The 429 was refused, not processed: waiting it out is not the one re-send.
    route = api.post(CHAT).mock(side_effect=[fail(503), fail(429, RATE_LIMIT["detail"]), reply("ok")])
    assert await make_client().chat(BOT, "hi", "s") == "ok"
    assert route.call_count == 3
    assert clock.monotonic() - START == pytest.approx(0.375 + 60.0)


async def test_a_get_is_still_retried_after_repeated_5xx(api: respx.MockRouter, make_client: MakeClient) -> None:
    route = api.get("/v1/chatbots").mock(side_effect=[fail(500), fail(500), httpx.Response(200, json=[])])
    assert await make_client().list_chatbots() == []
    assert route.call_count == 3


async def test_a_get_is_retried_after_a_read_timeout(
    api: respx.MockRouter, make_client: MakeClient
) -> None:
    route = api.get(f"/v1/chatbots/{BOT}/sources").mock(side_effect=[httpx.ReadTimeout, httpx.Response(200, json=[])])
    assert await make_client().list_sources(BOT) == []
    assert route.call_count == 2


async def test_retries_stop_at_the_deadline(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    route = api.get("/v1/chatbots").mock(return_value=fail(500))
    policy = RetryPolicy(deadline=10.0, base_backoff=1.0, max_backoff=4.0, failure_threshold=100)
    with pytest.raises(ServerError) as caught:
        await make_client(policy=policy).list_chatbots()
    # Backoffs 0.75, 1.5, 3, 3 (total 8.25); the next 3 would end past 10 s.
    assert route.call_count == 5
    assert clock.monotonic() - START == pytest.approx(8.25)
    assert caught.value.status == 500


# --- 429: rate limit and quota ---------------------------------------------------------------


async def test_rate_limit_without_retry_after_waits_the_default_and_holds_the_limiter(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    limiter = RecordingLimiter(clock)
    route = api.post(CHAT).mock(side_effect=[fail(429, RATE_LIMIT["detail"]), reply("ok")])
    assert await make_client(limiter=limiter).chat(BOT, "hi", "s", lane="slack:C1") == "ok"
    assert route.call_count == 2
    assert limiter.penalties == [START + 60.0]
    assert clock.monotonic() - START == pytest.approx(60.0)
    assert limiter.lanes == ["slack:C1", "slack:C1"]  # every attempt queued in the caller's lane
    # Each attempt held its slot until its answer, then let it go (no slot leaks).
    assert [g.held for g in limiter.held] == [False, False]
    assert limiter.held[0].at == pytest.approx(START)  # answered at once, before the 60 s wait


@pytest.mark.parametrize(
    "retry_after",
    ["7", format_datetime(datetime.fromtimestamp(ManualClock(START).time() + 7, UTC), usegmt=True)],
    ids=["seconds", "http-date"],
)
async def test_rate_limit_honours_retry_after(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock, retry_after: str
) -> None:
    route = api.post(CHAT).mock(side_effect=[fail(429, RATE_LIMIT["detail"], **{"Retry-After": retry_after}), reply()])
    await make_client().chat(BOT, "hi", "s")
    assert route.call_count == 2
    assert clock.monotonic() - START == pytest.approx(7.0)


async def test_rate_limit_longer_than_the_deadline_raises_and_still_holds_the_limiter(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    limiter = RecordingLimiter(clock)
    route = api.post(CHAT).mock(side_effect=[fail(429, RATE_LIMIT["detail"]), reply()])
    client = make_client(limiter=limiter, policy=RetryPolicy(deadline=30.0))
    with pytest.raises(RateLimited) as caught:
        await client.chat(BOT, "hi", "s")
    assert route.call_count == 1
    assert caught.value.retry_after == 60.0
    assert clock.monotonic() == START  # gave up at once instead of sleeping into the deadline
    assert limiter.estimated_wait("other") == 60.0  # the rest of the process backs off too


async def test_a_429_without_the_api_detail_is_a_rate_limit_not_quota(
    api: respx.MockRouter, make_client: MakeClient
) -> None:
    # A proxy's bare 429 must not block chat for an hour.
    route = api.post(CHAT).mock(side_effect=[httpx.Response(429, text="<html>slow down</html>"), reply()])
    client = make_client()
    assert await client.chat(BOT, "hi", "s") == "hello"
    assert route.call_count == 2
    assert client.circuit_state() == "closed"


async def test_quota_is_never_retried_and_blocks_chat_until_the_cooldown(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    chat = api.post(CHAT).mock(side_effect=[fail(429, QUOTA["detail"]), reply("back")])
    listing = api.get("/v1/chatbots").mock(return_value=httpx.Response(200, json=[]))
    client = make_client(policy=RetryPolicy(quota_cooldown=600.0))
    with pytest.raises(QuotaExhausted) as caught:
        await client.chat(BOT, "hi", "s")
    assert "Monthly message limit reached." in str(caught.value)
    assert chat.call_count == 1
    assert (client.circuit_state(), client.circuit_open) == ("quota", True)
    with pytest.raises(QuotaExhausted):
        await client.chat(BOT, "again", "s")
    assert chat.call_count == 1  # refused without a request
    assert await client.list_chatbots() == []  # the quota is about messages: reads still work
    assert listing.call_count == 1
    clock.advance(600.0)
    assert client.circuit_state() == "quota"  # until a trial call says otherwise
    assert await client.chat(BOT, "hi", "s") == "back"
    assert client.circuit_state() == "closed"


async def test_after_the_quota_pause_one_trial_call_goes_out_and_the_others_hear_quota(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    release = asyncio.Event()

    async def slow_reply(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return reply("back")

    route = api.post(CHAT).mock(side_effect=[fail(429, QUOTA["detail"]), slow_reply, reply("next")])
    client = make_client()
    with pytest.raises(QuotaExhausted) as first:
        await client.chat(BOT, "hi", "s")
    assert first.value.retry_in == pytest.approx(300.0)  # what the notice tells the user
    clock.advance(300.0)
    trial = asyncio.create_task(client.chat(BOT, "first", "s1"))
    await asyncio.sleep(0.01)  # the trial is on its way; no clock time passes
    with pytest.raises(QuotaExhausted) as meanwhile:
        await client.chat(BOT, "second", "s2")
    assert meanwhile.value.retry_in == 0.0  # a trial is deciding right now
    release.set()
    assert await trial == "back"
    assert client.circuit_state() == "closed"
    assert await client.chat(BOT, "third", "s3") == "next"
    assert route.call_count == 3  # the refused one never left


# --- circuit breaker -------------------------------------------------------------------------


async def test_circuit_opens_after_consecutive_failures_and_half_opens_after_the_cooldown(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    route = api.post(CHAT).mock(side_effect=[fail(500), httpx.ConnectError, fail(503), reply("up")])
    # deadline=0: no retries, so each call is one attempt.
    client = make_client(policy=RetryPolicy(deadline=0.0, failure_threshold=3, circuit_cooldown=30.0))
    for expected in (ServerError, Unavailable, ServerError):
        with pytest.raises(expected):
            await client.chat(BOT, "hi", "s")
    assert (client.circuit_state(), client.circuit_open) == ("open", True)
    with pytest.raises(Unavailable, match="circuit open"):
        await client.chat(BOT, "hi", "s")
    assert route.call_count == 3  # no network while open
    clock.advance(29.0)
    assert client.circuit_state() == "open"
    clock.advance(1.0)
    assert (client.circuit_state(), client.circuit_open) == ("half-open", False)
    assert await client.chat(BOT, "hi", "s") == "up"
    assert client.circuit_state() == "closed"


async def test_a_failed_trial_reopens_the_circuit(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    route = api.get("/v1/chatbots").mock(side_effect=[fail(500), fail(500), httpx.Response(200, json=[])])
    client = make_client(policy=RetryPolicy(deadline=0.0, failure_threshold=1, circuit_cooldown=30.0))
    with pytest.raises(ServerError):
        await client.list_chatbots()
    clock.advance(30.0)
    with pytest.raises(ServerError):
        await client.list_chatbots()  # the trial
    assert client.circuit_state() == "open"
    clock.advance(30.0)
    assert await client.list_chatbots() == []
    assert route.call_count == 3


async def test_success_resets_the_count_of_consecutive_failures(
    api: respx.MockRouter, make_client: MakeClient
) -> None:
    api.post(CHAT).mock(side_effect=[fail(500), reply(), fail(500), reply()])
    client = make_client(policy=RetryPolicy(deadline=0.0, failure_threshold=2))
    with pytest.raises(ServerError):
        await client.chat(BOT, "hi", "s")
    await client.chat(BOT, "hi", "s")
    with pytest.raises(ServerError):
        await client.chat(BOT, "hi", "s")
    assert client.circuit_state() == "closed"


async def test_only_one_trial_call_goes_out_while_half_open(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    release = asyncio.Event()

    async def slow_success(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, json=[])

    route = api.get("/v1/chatbots").mock(side_effect=[fail(500), slow_success, httpx.Response(200, json=[])])
    client = make_client(policy=RetryPolicy(deadline=0.0, failure_threshold=1, circuit_cooldown=30.0))
    with pytest.raises(ServerError):
        await client.list_chatbots()
    clock.advance(30.0)
    trial = asyncio.create_task(client.list_chatbots())
    await asyncio.sleep(0.01)  # let the trial reach the (fake) network; no clock time passes
    with pytest.raises(Unavailable, match="trial"):
        await client.list_chatbots()
    release.set()
    assert await trial == []
    assert await client.list_chatbots() == []
    assert route.call_count == 3


async def test_a_cancelled_trial_does_not_wedge_the_circuit(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    api.get("/v1/chatbots").mock(side_effect=[fail(500), hang, httpx.Response(200, json=[])])
    client = make_client(policy=RetryPolicy(deadline=0.0, failure_threshold=1, circuit_cooldown=30.0))
    with pytest.raises(ServerError):
        await client.list_chatbots()
    clock.advance(30.0)
    trial = asyncio.create_task(client.list_chatbots())
    await asyncio.sleep(0.01)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert client.circuit_state() == "half-open"
    assert await client.list_chatbots() == []


async def test_an_opening_circuit_ends_the_retries_of_the_call_in_progress(
    api: respx.MockRouter, make_client: MakeClient
) -> None:
    route = api.get("/v1/chatbots").mock(side_effect=[fail(500), fail(500), fail(500), httpx.Response(200, json=[])])
    client = make_client(policy=RetryPolicy(failure_threshold=2))
    with pytest.raises(ServerError):
        await client.list_chatbots()
    assert route.call_count == 2
    assert client.circuit_state() == "open"


async def test_client_errors_do_not_count_as_failures(
    api: respx.MockRouter, make_client: MakeClient
) -> None:
    api.get(f"/v1/chatbots/{BOT}").mock(return_value=fail(404))
    client = make_client(policy=RetryPolicy(failure_threshold=1))
    for _ in range(3):
        with pytest.raises(NotFound):
            await client.get_chatbot(BOT)
    assert client.circuit_state() == "closed"


# --- limiter ---------------------------------------------------------------------------------


async def test_every_attempt_on_every_endpoint_goes_through_the_limiter(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    limiter = RecordingLimiter(clock)
    api.post(CHAT).mock(side_effect=[fail(429, RATE_LIMIT["detail"]), httpx.ConnectError, reply()])
    api.get("/v1/chatbots").mock(return_value=httpx.Response(200, json=[]))
    api.get(f"/v1/chatbots/{BOT}").mock(return_value=httpx.Response(200, json={"id": BOT}))
    api.get(f"/v1/chatbots/{BOT}/sources").mock(return_value=httpx.Response(200, json=[]))
    client = make_client(limiter=limiter)
    assert client.limiter is limiter
    await client.chat(BOT, "hi", "s", lane="discord:42")
    await client.list_chatbots()
    await client.get_chatbot(BOT)
    await client.list_sources(BOT)
    assert limiter.lanes == ["discord:42"] * 3 + [""] * 3


async def test_calls_wait_for_the_limiter_before_any_request(
    api: respx.MockRouter, make_client: MakeClient
) -> None:
    clock = ManualClock(START)
    limiter = SlidingWindowLimiter(1, 60.0, clock=clock)
    route = api.post(CHAT).mock(return_value=reply())
    client = make_client(limiter=limiter, clock=clock)
    await client.chat(BOT, "first", "s")
    second = asyncio.create_task(client.chat(BOT, "second", "s"))
    await asyncio.sleep(0.01)
    assert route.call_count == 1
    clock.advance(60.0)
    assert await second == "hello"
    assert route.call_count == 2


# --- secrets ---------------------------------------------------------------------------------


async def test_the_api_key_never_reaches_an_error_or_a_log_line(
    api: respx.MockRouter, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f"bad key {KEY}"
    api.get("/v1/chatbots").mock(return_value=fail(401, echo))
    api.get(f"/v1/chatbots/{BOT}").mock(return_value=httpx.Response(500, text=echo))
    api.get(f"/v1/chatbots/{BOT}/sources").mock(side_effect=httpx.ConnectError(echo))
    api.post(CHAT).mock(side_effect=[fail(429, [{"loc": ["header"], "msg": echo}]), fail(429, echo)])
    client = make_client(policy=RetryPolicy(failure_threshold=100, max_backoff=1.0, deadline=5.0, rate_limit_wait=1.0))
    errors: list[InsiteChatError] = []
    for call in (client.list_chatbots(), client.get_chatbot(BOT), client.list_sources(BOT), client.chat(BOT, "x", "s")):
        with pytest.raises(InsiteChatError) as caught:
            await call
        errors.append(caught.value)
    assert [type(e) for e in errors] == [Unauthorized, ServerError, Unavailable, QuotaExhausted]
    with pytest.raises(QuotaExhausted) as again:
        await client.chat(BOT, "x", "s")
    errors.append(again.value)
    assert "retrying" in caplog.text  # the retry paths did log
    for error in errors:
        text = f"{error} {error!r} {error.detail} {getattr(error, 'reason', '')}"
        assert KEY not in text
        assert "[redacted]" in text
    assert KEY not in caplog.text


def test_an_empty_key_is_refused_without_echoing_anything() -> None:
    with pytest.raises(ValueError, match="empty"):
        InsiteChatClient(BASE, "")


# --- real sockets on loopback: what httpx itself raises ----------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_refused_connection_is_never_sent_so_chat_is_resent_once(
    make_client: MakeClient, clock: ManualClock
) -> None:
    policy = RetryPolicy(deadline=5.0, failure_threshold=100)
    client = make_client(f"http://127.0.0.1:{closed_port()}/api", policy=policy)
    with pytest.raises(Unavailable) as caught:
        await client.chat(BOT, "hi", "s")
    assert not caught.value.request_sent
    assert clock.monotonic() - START == pytest.approx(0.375)  # one backoff: one re-send, then it gave up


async def test_connection_refused_on_a_get_is_retried_until_the_deadline(
    make_client: MakeClient, clock: ManualClock
) -> None:
    policy = RetryPolicy(deadline=5.0, failure_threshold=100)
    client = make_client(f"http://127.0.0.1:{closed_port()}/api", policy=policy)
    with pytest.raises(Unavailable):
        await client.list_chatbots()
    assert 0.375 < clock.monotonic() - START <= 5.0  # it kept backing off, within the budget


@pytest.fixture
async def hanging_server() -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback server that takes requests and never answers them."""
    seen: list[str] = []

    async def hang(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hang)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/api", seen
    await runner.cleanup()


async def test_a_real_read_timeout_on_chat_is_not_resent(
    make_client: MakeClient, hanging_server: tuple[str, list[str]]
) -> None:
    base_url, seen = hanging_server
    client = make_client(base_url, timeout=0.05)  # the one real wait in this file: 50 ms
    with pytest.raises(Unavailable, match="ReadTimeout") as caught:
        await client.chat(BOT, "hi", "s")
    assert caught.value.request_sent
    assert seen == [f"POST /api{CHAT}"]


async def test_a_server_that_hangs_up_after_a_chat_request_is_not_resent(make_client: MakeClient) -> None:
    # The request arrived before the connection was lost: the question may be answered, never asked twice.
    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        client = make_client(f"http://127.0.0.1:{port}/api", policy=RetryPolicy(deadline=5.0, failure_threshold=100))
        with pytest.raises(Unavailable) as caught:
            await client.chat(BOT, "hi", "s")
    finally:
        listener.close()
        await listener.wait_closed()
    assert caught.value.request_sent
    assert len(requests) == 1 and requests[0].startswith(f"POST /api{CHAT} ".encode())


async def test_a_proxy_from_the_environment_carries_the_requests(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HTTP_PROXY as httpx reads it; a client with a transport of its own would go around it.
    request_lines: list[str] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        request_lines.append(head.split(b"\r\n", 1)[0].decode())
        body = b'{"response": "via the proxy"}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n")
        writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(proxy, "127.0.0.1", 0)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}")
    target = f"http://127.0.0.1:{closed_port()}/api"  # nothing listens there: only the proxy answers
    try:
        assert await make_client(target).chat(BOT, "hi", "s") == "via the proxy"
    finally:
        listener.close()
        await listener.wait_closed()
    assert request_lines == [f"POST {target}{CHAT} HTTP/1.1"]


async def test_the_limiter_slot_is_held_while_the_request_is_on_its_way(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    limiter = RecordingLimiter(clock)
    seen: list[bool] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(limiter.held[-1].held)  # the service is counting us now
        return reply("ok")

    api.post(CHAT).mock(side_effect=answer)
    assert await make_client(limiter=limiter).chat(BOT, "hi", "s") == "ok"
    assert seen == [True] and not limiter.held[-1].held


async def test_before_send_runs_after_the_limiter_queue_once_per_request_sent(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    # The relay marks a job "asked" here: a question still queued in the limiter was not sent.
    limiter = RecordingLimiter(clock)
    events: list[str] = []

    async def before_send() -> None:
        events.append(f"send after {len(limiter.held)} grant(s)")

    def answer(request: httpx.Request) -> httpx.Response:
        events.append("request")
        return fail(429, RATE_LIMIT["detail"], **{"Retry-After": "1"}) if events.count("request") == 1 else reply("ok")

    api.post(CHAT).mock(side_effect=answer)
    assert await make_client(limiter=limiter).chat(BOT, "hi", "s", before_send=before_send) == "ok"
    assert events == ["send after 1 grant(s)", "request", "send after 2 grant(s)", "request"]


# --- after an outage: no stale refusals (issue 12 item 3) ---------------------------------------


async def test_a_call_while_the_circuit_is_open_waits_for_the_trial_instead_of_being_refused(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    route = api.post(CHAT).mock(side_effect=[fail(500), reply("up")])
    client = make_client(policy=RetryPolicy(failure_threshold=1, circuit_cooldown=30.0))
    with pytest.raises(ServerError):
        await client.chat(BOT, "hi", "s")
    clock.advance(1.0)  # InsiteChat is back; the circuit does not know yet
    assert await client.chat(BOT, "hi", "s") == "up"  # the trial, as soon as the cooldown allows
    assert clock.monotonic() - START == pytest.approx(30.0)
    assert route.call_count == 2


async def test_calls_wait_for_the_trials_verdict_and_go_when_it_succeeds(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    release = asyncio.Event()

    async def slow_success(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return reply("trial")

    route = api.post(CHAT).mock(side_effect=[fail(500), slow_success, reply("second")])
    client = make_client(policy=RetryPolicy(failure_threshold=1, circuit_cooldown=30.0))
    with pytest.raises(ServerError):
        await client.chat(BOT, "hi", "s")
    clock.advance(30.0)
    trial = asyncio.create_task(client.chat(BOT, "first", "s1"))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(client.chat(BOT, "second", "s2"))
    await asyncio.sleep(0.01)
    assert not second.done()  # waits for the verdict, is not told "unreachable"
    release.set()
    assert (await trial, await second) == ("trial", "second")
    assert route.call_count == 3


async def test_a_late_failure_of_a_call_sent_before_the_outage_does_not_reopen_the_circuit(
    api: respx.MockRouter, make_client: MakeClient, clock: ManualClock
) -> None:
    release = asyncio.Event()

    async def late_failure(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return fail(500)

    api.post(CHAT).mock(side_effect=[late_failure, fail(500), reply("trial"), reply("after")])
    client = make_client(policy=RetryPolicy(deadline=0.0, failure_threshold=1, circuit_cooldown=30.0))
    old = asyncio.create_task(client.chat(BOT, "sent before the outage", "s0"))
    await asyncio.sleep(0.01)
    with pytest.raises(ServerError):
        await client.chat(BOT, "hi", "s")  # opens the circuit
    clock.advance(30.0)
    assert await client.chat(BOT, "hi", "s") == "trial"  # closes it
    release.set()
    with pytest.raises(ServerError):
        await old
    assert client.circuit_state() == "closed"  # a stale failure: it says nothing about now
    assert await client.chat(BOT, "hi", "s") == "after"
