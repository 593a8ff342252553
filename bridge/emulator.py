"""An InsiteChat-compatible HTTP server: the sandbox, the tests' fake service, a free playground."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import logging
import math
import re
import secrets
import sys
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import aiohttp
from aiohttp import web

from bridge.clock import Clock, SystemClock

log = logging.getLogger(__name__)

API_PREFIX = "/api"
EMULATOR_PREFIX = "/emulator"

EVENT_LEAD = "lead.captured"
EVENT_STARTED = "conversation.started"
EVENT_MESSAGE = "message.received"
EVENT_ESCALATED = "conversation.escalated"
ALL_EVENTS: tuple[str, ...] = (EVENT_STARTED, EVENT_MESSAGE, EVENT_ESCALATED, EVENT_LEAD)
# The dashboard's "Send Test" payload is undocumented; a name no real event uses keeps it apart.
TEST_EVENT = "webhook.test"

SIGNATURE_HEADER = "X-InsiteChat-Signature"
SIGNATURE_FORMATS: tuple[str, ...] = ("hex", "sha256=hex", "base64")
DEFAULT_RETRY_DELAYS: tuple[float, ...] = (60.0, 300.0, 900.0)

MAX_ACTIVE_KEYS = 5
MEMORY_TURNS = 10
RATE_LIMIT_DETAIL = "API rate limit exceeded. Max {limit} requests per minute."
QUOTA_DETAIL = "Monthly message limit reached."
UNAUTHORIZED_DETAIL = "Unauthorized"
NOT_FOUND_DETAIL = "Not Found"

# Short on purpose: a repository hook flags `ic_` followed by 30 or more characters.
SANDBOX_KEY = "ic_sandbox_key"
SANDBOX_CHATBOT_ID = "5a0db0c5-ba5e-4b07-8000-000000000001"
SANDBOX_WEBHOOK_SECRET = "sandbox-webhook-secret"
SANDBOX_GAP_TOPIC = "moon"  # the sandbox chatbot knows nothing about it: questions on it get the fallback message

_KEY_RE = re.compile(r"ic_[A-Za-z0-9_-]+")
_ESCALATION_RE = re.compile(r"\b(human|agent|person|representative)s?\b", re.IGNORECASE)
_ID_NAMESPACE = uuid.UUID("6f2b1c9e-1d7a-4c39-9a55-3e0c1f7b2d10")
# Long enough to outlast any client timeout, short enough that a forgotten fault ends.
_DEFAULT_HANG_SECONDS = 3600.0


class EmulatorError(Exception):
    """An API error: the HTTP status and the `detail` the real service would send."""

    def __init__(self, status: int, detail: str | list[dict[str, Any]], headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.headers = headers or {}


@dataclass
class Account:
    """A customer account: owns chatbots, keys and one monthly message quota."""

    id: str
    name: str
    monthly_quota: int | None = None  # None = unlimited
    messages_used: int = 0


@dataclass
class ChatbotRecord:
    """One chatbot as the service stores it; mutable so tests can repoint webhooks."""

    id: str
    account_id: str
    name: str
    slug: str
    provider: str
    is_active: bool
    created_at: str
    system_prompt: str
    fallback_message: str
    sources: list[dict[str, Any]]
    webhook_url: str | None
    webhook_secret: str
    webhook_events: frozenset[str]

    def summary(self) -> dict[str, Any]:
        """The shape of one entry of `GET /v1/chatbots`."""
        return {
            "id": self.id,
            "name": self.name,
            "slug": self.slug,
            "provider": self.provider,
            "is_active": self.is_active,
            "created_at": self.created_at,
        }

    def detail(self) -> dict[str, Any]:
        """The shape of `GET /v1/chatbots/{id}`; the extra field keeps clients tolerant."""
        return {
            **self.summary(),
            "system_prompt": self.system_prompt,
            "fallback_message": self.fallback_message,
            "welcome_message": f"Hi! I'm {self.name}. How can I help?",
        }


@dataclass
class RecordedRequest:
    """One request the emulator received (the Authorization header is kept for tests)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any
    time: float  # clock.monotonic() on arrival
    status: int | None = None  # None: no answer was sent (disconnect, hang)


@dataclass
class Fault:
    """An injected failure, consumed by matching API requests until its count runs out."""

    kind: str  # "status", "hang" or "disconnect"
    status: int
    detail: str
    headers: dict[str, str]
    remaining: int | None  # None = forever
    path_contains: str
    method: str | None
    seconds: float
    hits: int = 0

    def matches(self, request: web.Request) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.method is not None and request.method != self.method.upper():
            return False
        return _path_matches(self.path_contains, request.path)


@dataclass(frozen=True)
class WebhookAttempt:
    """One POST the emulator made (or tried to make) to a webhook URL."""

    event: str
    chatbot_id: str
    url: str
    attempt: int  # 1 = first delivery, 2.. = retries
    time: float  # clock.monotonic() when the attempt started
    status: int | None  # None: no HTTP answer (timeout, refused)
    error: str | None
    outcome: str  # "delivered", "retrying" or "dropped"
    body: bytes
    headers: dict[str, str]


@dataclass
class _Conversation:
    id: str
    session_id: str | None
    turns: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=MEMORY_TURNS))
    message_count: int = 0
    escalated: bool = False


@dataclass(frozen=True)
class _Delivery:
    """An envelope frozen at event time: every retry re-sends the very same bytes."""

    event: str
    chatbot_id: str
    url: str
    secret: str
    body: bytes


@dataclass(frozen=True)
class _Script:
    chatbot_id: str | None
    needle: str
    reply: str


def sign_webhook(body: bytes, secret: str, signature_format: str = "sha256=hex") -> str:
    """The `X-InsiteChat-Signature` value for a raw body, in one of SIGNATURE_FORMATS."""
    mac = hmac.new(secret.encode(), body, hashlib.sha256)
    if signature_format == "hex":
        return mac.hexdigest()
    if signature_format == "sha256=hex":
        return "sha256=" + mac.hexdigest()
    if signature_format == "base64":
        return base64.b64encode(mac.digest()).decode()
    raise ValueError(f"unknown signature format {signature_format!r}; use one of {SIGNATURE_FORMATS}")


def _path_matches(fragment: str, path: str) -> bool:
    """Substring match that ends on a segment boundary, so "/chat" hits .../chat, not /v1/chatbots."""
    if not fragment or fragment.endswith("/"):
        return fragment in path
    return re.search(re.escape(fragment) + r"(?=/|$)", path) is not None


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="microseconds")


def _slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "chatbot"


def _invalid(kind: str, loc: list[str], msg: str) -> dict[str, Any]:
    """One Django-Ninja (pydantic 2) validation error entry."""
    return {"type": kind, "loc": loc, "msg": msg}


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise EmulatorError(422, [_invalid("json_invalid", ["body", "data"], "JSON decode error")]) from None
    if not isinstance(data, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        raise EmulatorError(422, [_invalid("model_attributes_type", ["body", "data"], msg)])
    return data


def _check_text(data: dict[str, Any], name: str, *, required: bool, errors: list[dict[str, Any]]) -> str | None:
    value = data.get(name)
    loc = ["body", "data", name]
    if value is None:
        if required:
            errors.append(_invalid("missing", loc, "Field required"))
        return None
    if not isinstance(value, str):
        errors.append(_invalid("string_type", loc, "Input should be a valid string"))
        return None
    if required and not value.strip():
        errors.append(_invalid("string_too_short", loc, "String should have at least 1 character"))
        return None
    return value


def _chat_body(raw: bytes, *, session_required: bool) -> tuple[str, str | None]:
    data = _parse_object(raw)
    errors: list[dict[str, Any]] = []
    message = _check_text(data, "message", required=True, errors=errors)
    session_id = _check_text(data, "session_id", required=session_required, errors=errors)
    if errors or message is None:
        raise EmulatorError(422, errors)
    return message, session_id or None


def _error_response(exc: EmulatorError) -> web.Response:
    return web.json_response({"detail": exc.detail}, status=exc.status, headers=exc.headers)


class Emulator:
    """The InsiteChat service in one object: accounts, keys, chatbots, chat, limits, webhooks."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        rate_limit: int = 60,
        rate_window: float = 60.0,
        latency: float = 0.0,
        retry_after_header: bool = False,
        webhook_retry_delays: Iterable[float] = DEFAULT_RETRY_DELAYS,
        webhook_timeout: float = 10.0,
        signature_format: str = "sha256=hex",
    ) -> None:
        sign_webhook(b"", "x", signature_format)  # fail at construction, not at the first event
        self.clock: Clock = clock or SystemClock()
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.latency = latency
        self.retry_after_header = retry_after_header
        self.webhook_retry_delays = tuple(webhook_retry_delays)
        self.webhook_timeout = webhook_timeout
        self.signature_format = signature_format
        self.requests: list[RecordedRequest] = []
        self.webhook_attempts: list[WebhookAttempt] = []
        self.faults: list[Fault] = []
        self.accounts: dict[str, Account] = {}
        self.chatbots: dict[str, ChatbotRecord] = {}
        self._keys: dict[str, str] = {}  # active key -> account id
        self._revoked: set[str] = set()
        self._hits: dict[str, deque[float]] = {}
        self._conversations: dict[tuple[str, str], _Conversation] = {}
        self._scripts: list[_Script] = []
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.url = ""  # http://host:port once started

    # ----- setup -------------------------------------------------------------------

    def _new_id(self, kind: str) -> str:
        # Deterministic ids make test failures reproducible run after run.
        return str(uuid.uuid5(_ID_NAMESPACE, f"{kind}:{next(self._ids)}"))

    def add_account(self, name: str, *, monthly_quota: int | None = None) -> Account:
        account = Account(self._new_id("account"), name, monthly_quota)
        self.accounts[account.id] = account
        return account

    def add_key(self, account: Account, key: str | None = None) -> str:
        """Issue an API key (generated if not given); at most 5 active keys per account."""
        if key is None:
            key = "ic_emu_" + secrets.token_urlsafe(12)
        if not _KEY_RE.fullmatch(key):
            raise ValueError("an API key is ic_ followed by URL-safe characters")
        if key in self._keys or key in self._revoked:
            raise ValueError("this key was already issued")
        if sum(1 for owner in self._keys.values() if owner == account.id) >= MAX_ACTIVE_KEYS:
            raise ValueError(f"an account has at most {MAX_ACTIVE_KEYS} active keys")
        self._keys[key] = account.id
        return key

    def revoke_key(self, key: str) -> None:
        if key not in self._keys:
            raise KeyError("no such active key")
        del self._keys[key]
        self._revoked.add(key)

    def add_chatbot(
        self,
        account: Account,
        name: str,
        *,
        chatbot_id: str | None = None,
        provider: str = "gemini",
        is_active: bool = True,
        sources: list[dict[str, Any]] | None = None,
        system_prompt: str = "You are a helpful assistant. Answer from the training sources.",
        fallback_message: str = "Sorry, I don't know that yet.",
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        webhook_events: Iterable[str] = ALL_EVENTS,
    ) -> ChatbotRecord:
        bot_id = str(uuid.UUID(chatbot_id)) if chatbot_id else self._new_id("chatbot")
        if bot_id in self.chatbots:
            raise ValueError(f"chatbot {bot_id} already exists")
        now = self.clock.time()
        bot = ChatbotRecord(
            id=bot_id,
            account_id=account.id,
            name=name,
            slug=_slugify(name),
            provider=provider,
            is_active=is_active,
            created_at=_iso(now),
            system_prompt=system_prompt,
            fallback_message=fallback_message,
            sources=self._fill_sources(sources or [], now),
            webhook_url=webhook_url,
            # The dashboard always shows a secret on the webhook card, so there is always one.
            webhook_secret=webhook_secret or secrets.token_urlsafe(16),
            webhook_events=frozenset(webhook_events),
        )
        self.chatbots[bot.id] = bot
        return bot

    def _fill_sources(self, sources: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        filled = []
        for age, given in enumerate(sources):
            source = {
                "id": self._new_id("source"),
                "type": "url",
                "title": f"Source {age + 1}",
                "url": "",
                "status": "done",
                "page_count": 1,
                # Given order is newest first unless the caller dates them.
                "created_at": _iso(now - age),
                **given,
            }
            if source["type"] == "url" and not source["url"]:
                source["url"] = "https://example.com/docs"
            filled.append(source)
        return sorted(filled, key=lambda s: s["created_at"], reverse=True)

    @classmethod
    def sandbox(
        cls,
        *,
        webhook_url: str | None = None,
        webhook_secret: str = SANDBOX_WEBHOOK_SECRET,
        **kw: Any,
    ) -> Emulator:
        """One account, key SANDBOX_KEY, one chatbot "Sandbox Bot" with id SANDBOX_CHATBOT_ID.

        It answers questions about SANDBOX_GAP_TOPIC with its fallback message: a knowledge gap to show.
        """
        emulator = cls(**kw)
        account = emulator.add_account("Sandbox")
        emulator.add_key(account, SANDBOX_KEY)
        emulator.add_chatbot(
            account,
            "Sandbox Bot",
            chatbot_id=SANDBOX_CHATBOT_ID,
            sources=[
                {"type": "url", "title": "Help Center", "url": "https://example.com/help", "page_count": 42},
                {"type": "file", "title": "pricing.pdf", "url": "", "page_count": 3},
            ],
            webhook_url=webhook_url,
            webhook_secret=webhook_secret,
        )
        bot = emulator.chatbots[SANDBOX_CHATBOT_ID]
        emulator.script_reply(SANDBOX_CHATBOT_ID, SANDBOX_GAP_TOPIC, bot.fallback_message)
        return emulator

    def script_reply(self, chatbot_id: str | None, question_substring: str, reply: str) -> None:
        """Answer `reply` to any question containing the substring (any case); None = every bot.

        The latest script wins, so a test can override an earlier one.
        """
        self._scripts.append(_Script(chatbot_id, question_substring.lower(), reply))

    def inject(
        self,
        kind: str = "status",
        *,
        status: int = 500,
        detail: str = "Internal server error",
        headers: dict[str, str] | None = None,
        count: int | None = 1,
        path_contains: str = "",
        method: str | None = None,
        seconds: float = _DEFAULT_HANG_SECONDS,
    ) -> Fault:
        """Make the next `count` matching API requests fail (None = until clear_faults()).

        `path_contains` must end on a path-segment boundary ("/chat" hits .../chat only).

        kind "status" answers `status` with `{"detail": detail}` and `headers`;
        "hang" holds the connection `seconds` (on the clock) then drops it unanswered;
        "disconnect" drops the connection at once. Faulted requests never reach the service,
        so they spend neither rate limit nor quota.
        """
        if kind not in ("status", "hang", "disconnect"):
            raise ValueError(f"unknown fault kind {kind!r}")
        fault = Fault(kind, status, detail, dict(headers or {}), count, path_contains, method, seconds)
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    # ----- the service -------------------------------------------------------------

    def _owned_bot(self, account: Account, chatbot_id: str) -> ChatbotRecord:
        bot = self.chatbots.get(chatbot_id)
        if bot is None or bot.account_id != account.id:
            # Someone else's chatbot looks exactly like a missing one.
            raise EmulatorError(404, NOT_FOUND_DETAIL)
        return bot

    def _bot(self, chatbot_id: str) -> ChatbotRecord:
        bot = self.chatbots.get(chatbot_id)
        if bot is None:
            raise EmulatorError(404, NOT_FOUND_DETAIL)
        return bot

    def _authenticate(self, request: web.Request) -> Account:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        account_id = self._keys.get(key.strip()) if scheme.lower() == "bearer" else None
        if account_id is None:
            raise EmulatorError(401, UNAUTHORIZED_DETAIL)
        self._count_request(key.strip())
        return self.accounts[account_id]

    def _count_request(self, key: str) -> None:
        now = self.clock.monotonic()
        hits = self._hits.setdefault(key, deque())
        while hits and hits[0] <= now - self.rate_window:
            hits.popleft()
        if len(hits) >= self.rate_limit:
            headers = {}
            if self.retry_after_header:
                headers["Retry-After"] = str(max(1, math.ceil(hits[0] + self.rate_window - now)))
            # Rejected requests are not counted: a client that backs off recovers after one window.
            raise EmulatorError(429, RATE_LIMIT_DETAIL.format(limit=self.rate_limit), headers)
        hits.append(now)

    def _spend_quota(self, account: Account) -> None:
        if account.monthly_quota is not None and account.messages_used >= account.monthly_quota:
            raise EmulatorError(429, QUOTA_DETAIL)
        account.messages_used += 1

    def _converse(self, bot: ChatbotRecord, message: str, session_id: str | None) -> str:
        """One visitor or API turn: spend quota, answer, remember, fire the webhooks."""
        self._spend_quota(self.accounts[bot.account_id])
        key = (bot.id, session_id or "")  # no session id: one shared conversation per chatbot
        conversation = self._conversations.get(key)
        started = conversation is None
        if conversation is None:
            conversation = self._conversations[key] = _Conversation(self._new_id("conversation"), session_id)
        conversation.message_count += 1
        reply = self._compose_reply(bot, conversation, message)
        conversation.turns.append((message, reply))
        self._fire_chat_events(bot, conversation, message, started)
        return reply

    def _compose_reply(self, bot: ChatbotRecord, conversation: _Conversation, message: str) -> str:
        scripted = self._scripted(bot.id, message)
        if scripted is not None:
            return scripted
        head = f'**{bot.name}** (turn {conversation.message_count}): you asked "{message}".'
        if not conversation.turns:
            return f"{head} This is the start of our conversation."
        earlier = "; ".join(f'"{question}"' for question, _ in conversation.turns)
        return f"{head} Earlier in this conversation you asked: {earlier}."

    def _scripted(self, chatbot_id: str, message: str) -> str | None:
        lowered = message.lower()
        for script in reversed(self._scripts):
            if script.chatbot_id in (None, chatbot_id) and script.needle in lowered:
                return script.reply
        return None

    def _fire_chat_events(self, bot: ChatbotRecord, conversation: _Conversation, message: str, started: bool) -> None:
        data = {
            "session_id": conversation.session_id,
            "conversation_id": conversation.id,
            "message": message,
            "message_count": conversation.message_count,
        }
        events = [EVENT_STARTED] if started else []
        events.append(EVENT_MESSAGE)
        if not conversation.escalated and _ESCALATION_RE.search(message):
            conversation.escalated = True  # the service escalates a conversation only once
            events.append(EVENT_ESCALATED)
        self._dispatch(bot, [(event, data) for event in events])

    # ----- python API for the visitor side ------------------------------------------

    async def visitor_message(self, chatbot_id: str, message: str, *, session_id: str = "visitor-1") -> str:
        """A website visitor writes in the widget: answers like chat and fires the events."""
        if not message.strip() or not session_id:
            raise EmulatorError(422, "message and session_id must not be empty")
        return self._converse(self._bot(chatbot_id), message, session_id)

    async def capture_lead(
        self,
        chatbot_id: str,
        *,
        name: str = "",
        email: str = "",
        phone: str = "",
        custom_data: dict[str, Any] | None = None,
    ) -> str:
        """A visitor submits the lead form; returns the lead id."""
        bot = self._bot(chatbot_id)
        lead_id = self._new_id("lead")
        data: dict[str, Any] = {"lead_id": lead_id, "name": name, "email": email, "phone": phone}
        if custom_data is not None:  # the docs say custom_data may be missing
            data["custom_data"] = custom_data
        self._dispatch(bot, [(EVENT_LEAD, data)])
        return lead_id

    async def send_test(self, chatbot_id: str) -> WebhookAttempt:
        """The dashboard's "Send Test": one immediate POST, never retried, whatever the events."""
        bot = self._bot(chatbot_id)
        if not bot.webhook_url:
            raise EmulatorError(400, "No webhook URL configured for this chatbot.")
        data = {"message": "This is a test webhook from InsiteChat.", "test": True}
        return await self._attempt(self._delivery(bot, bot.webhook_url, TEST_EVENT, data), 1, final=True)

    async def wait_for_webhooks(self) -> None:
        """Return once every pending delivery, retries included, has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ----- webhooks -----------------------------------------------------------------

    def _delivery(self, bot: ChatbotRecord, url: str, event: str, data: dict[str, Any]) -> _Delivery:
        envelope = {"event": event, "chatbot_id": bot.id, "timestamp": _iso(self.clock.time()), "data": data}
        return _Delivery(event, bot.id, url, bot.webhook_secret, json.dumps(envelope).encode())

    def _dispatch(self, bot: ChatbotRecord, events: list[tuple[str, dict[str, Any]]]) -> None:
        url = bot.webhook_url
        if not url:
            return
        deliveries = [self._delivery(bot, url, event, data) for event, data in events if event in bot.webhook_events]
        if deliveries:
            self._spawn(self._deliver_in_order(deliveries))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver_in_order(self, deliveries: list[_Delivery]) -> None:
        # First attempts of one action go out in order (started before received before
        # escalated); only a failed one goes off on its own retry schedule.
        for delivery in deliveries:
            attempt = await self._attempt(delivery, 1, final=not self.webhook_retry_delays)
            if attempt.outcome == "retrying":
                self._spawn(self._retry(delivery))

    async def _retry(self, delivery: _Delivery) -> None:
        delays = self.webhook_retry_delays
        for number, delay in enumerate(delays, start=2):
            await self.clock.sleep(delay)
            attempt = await self._attempt(delivery, number, final=number == len(delays) + 1)
            if attempt.outcome != "retrying":
                return

    async def _attempt(self, delivery: _Delivery, number: int, *, final: bool) -> WebhookAttempt:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "InsiteChat-Webhooks/1.0 (emulator)",
            SIGNATURE_HEADER: sign_webhook(delivery.body, delivery.secret, self.signature_format),
        }
        started = self.clock.monotonic()
        status, error = await self._post(delivery, headers)
        ok = status is not None and 200 <= status < 300
        outcome = "delivered" if ok else "dropped" if final else "retrying"
        attempt = WebhookAttempt(
            delivery.event, delivery.chatbot_id, delivery.url, number, started,
            status, error, outcome, delivery.body, headers,
        )
        self.webhook_attempts.append(attempt)
        if not ok:
            log.log(
                logging.WARNING if final else logging.INFO,
                "webhook %s attempt %d to %s failed (%s); %s",
                delivery.event, number, delivery.url, error or status, outcome,
            )
        return attempt

    async def _post(self, delivery: _Delivery, headers: dict[str, str]) -> tuple[int | None, str | None]:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self.webhook_timeout)
        try:
            async with self._http.post(
                delivery.url, data=delivery.body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                await response.read()
                return response.status, None
        except (TimeoutError, aiohttp.ClientError) as exc:
            return None, f"{type(exc).__name__}: {exc}"

    # ----- HTTP layer ---------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        api = API_PREFIX + "/v1/chatbots"
        app.router.add_get(api, self._handle_list)
        app.router.add_get(api + "/{chatbot_id}", self._handle_detail)
        app.router.add_get(api + "/{chatbot_id}/sources", self._handle_sources)
        app.router.add_post(api + "/{chatbot_id}/chat", self._handle_chat)
        emu = EMULATOR_PREFIX + "/chatbots/{chatbot_id}"
        app.router.add_post(emu + "/visitor", self._handle_visitor)
        app.router.add_post(emu + "/lead", self._handle_lead)
        app.router.add_post(emu + "/send-test", self._handle_send_test)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        record = await self._record(request)
        try:
            response = await self._serve(request, handler)
        except EmulatorError as exc:
            response = _error_response(exc)
        except web.HTTPException as exc:  # unknown path or method: JSON like the real backend
            response = web.json_response({"detail": exc.reason}, status=exc.status)
        if response is None:
            # Answer nothing: the transport closes before any byte of a response.
            if request.transport is not None:
                request.transport.close()
            return web.Response()
        record.status = response.status
        return response

    async def _record(self, request: web.Request) -> RecordedRequest:
        body = await request.read()
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            parsed = None
        record = RecordedRequest(
            request.method, request.path, request.query_string, dict(request.headers),
            body, parsed, self.clock.monotonic(),
        )
        self.requests.append(record)
        return record

    async def _serve(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse | None:
        if not request.path.startswith(API_PREFIX + "/"):
            return await handler(request)
        if self.latency > 0:
            await self.clock.sleep(self.latency)
        fault = next((f for f in self.faults if f.matches(request)), None)
        if fault is None:
            return await handler(request)
        fault.hits += 1
        if fault.remaining is not None:
            fault.remaining -= 1
        if fault.kind == "status":
            raise EmulatorError(fault.status, fault.detail, fault.headers)
        if fault.kind == "hang":
            await self._hang(fault.seconds)
        return None

    async def _hang(self, seconds: float) -> None:
        # stop() must not wait for a hung request: it releases every hang at once.
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()

    async def _handle_list(self, request: web.Request) -> web.Response:
        account = self._authenticate(request)
        bots = [bot.summary() for bot in self.chatbots.values() if bot.account_id == account.id]
        return web.json_response(bots)

    async def _handle_detail(self, request: web.Request) -> web.Response:
        account = self._authenticate(request)
        return web.json_response(self._owned_bot(account, request.match_info["chatbot_id"]).detail())

    async def _handle_sources(self, request: web.Request) -> web.Response:
        account = self._authenticate(request)
        return web.json_response(self._owned_bot(account, request.match_info["chatbot_id"]).sources)

    async def _handle_chat(self, request: web.Request) -> web.Response:
        account = self._authenticate(request)
        message, session_id = _chat_body(await request.read(), session_required=False)
        bot = self._owned_bot(account, request.match_info["chatbot_id"])
        return web.json_response({"response": self._converse(bot, message, session_id)})

    async def _handle_visitor(self, request: web.Request) -> web.Response:
        message, session_id = _chat_body(await request.read(), session_required=True)
        bot = self._bot(request.match_info["chatbot_id"])
        return web.json_response({"response": self._converse(bot, message, session_id)})

    async def _handle_lead(self, request: web.Request) -> web.Response:
        data = _parse_object(await request.read())
        errors: list[dict[str, Any]] = []
        fields = {
            name: _check_text(data, name, required=False, errors=errors) or "" for name in ("name", "email", "phone")
        }
        custom_data = data.get("custom_data")
        if custom_data is not None and not isinstance(custom_data, dict):
            errors.append(_invalid("dict_type", ["body", "data", "custom_data"], "Input should be a valid dictionary"))
        if errors:
            raise EmulatorError(422, errors)
        lead_id = await self.capture_lead(request.match_info["chatbot_id"], custom_data=custom_data, **fields)
        return web.json_response({"lead_id": lead_id})

    async def _handle_send_test(self, request: web.Request) -> web.Response:
        attempt = await self.send_test(request.match_info["chatbot_id"])
        delivered = attempt.outcome == "delivered"
        return web.json_response({"delivered": delivered, "status": attempt.status, "error": attempt.error})

    # ----- lifecycle ----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The API base, as a client's `base_url` setting wants it (ends in /api)."""
        return self.url + API_PREFIX

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 = any free port); returns the base URL ending in /api."""
        if self._runner is not None:
            raise RuntimeError("the emulator is already running")
        self._stopping.clear()
        # A short shutdown grace: a request still asleep in injected latency is not worth waiting for.
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        bound_port = runner.addresses[0][1]
        self.url = f"http://{host}:{bound_port}"
        log.info("InsiteChat emulator listening on %s", self.base_url)
        return self.base_url

    async def stop(self) -> None:
        """Release hung requests, stop serving, cancel pending webhook deliveries."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None


async def serve_forever(
    host: str,
    port: int,
    *,
    webhook_url: str | None = None,
    webhook_secret: str = SANDBOX_WEBHOOK_SECRET,
    out: TextIO | None = None,
    **emulator_kw: Any,
) -> None:
    """Run the sandbox emulator until cancelled, after printing how to reach it."""
    emulator = Emulator.sandbox(webhook_url=webhook_url, webhook_secret=webhook_secret, **emulator_kw)
    base_url = await emulator.start(host, port)
    stream = out or sys.stdout
    try:
        print(f"InsiteChat emulator: {base_url}", file=stream)
        print(f"  API key:    {SANDBOX_KEY}", file=stream)
        print(f"  chatbot id: {SANDBOX_CHATBOT_ID}", file=stream)
        if webhook_url:
            print(f"  webhooks -> {webhook_url} (secret {webhook_secret})", file=stream)
        print(f"  visitor:    POST {emulator.url}{EMULATOR_PREFIX}/chatbots/{SANDBOX_CHATBOT_ID}/visitor", file=stream)
        stream.flush()
        await asyncio.Event().wait()
    finally:
        await emulator.stop()
